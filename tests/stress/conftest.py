"""The stress suite (`make stress`, run by .ci/run after `make test`): the hostile cases at full scale, against the
real daemon. It shares the integration tests' harness."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))

from daemons import make_daemon, pytest_runtest_makereport  # noqa: E402,F401 - the fixture and its hook
