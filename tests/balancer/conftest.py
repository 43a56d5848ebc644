"""The several-hosts suite (`make balancer-test`, run by .ci/run): two real daemons behind Debian's HAProxy, which
`make balancer-deps` installs. It shares the integration tests' harness."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))

from daemons import make_daemon, pytest_runtest_makereport  # noqa: E402,F401 - the fixture and its hook
