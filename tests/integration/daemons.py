"""The make_daemon fixture: real daemons in a temp directory, each stopped at the end of its test (the integration
and stress suites share it)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import Daemon


@pytest.fixture
def make_daemon(tmp_path: Path) -> Iterator[Any]:
    """Build daemons in a temp directory; every one started is stopped at the end of the test."""
    started: list[Daemon] = []

    def make(predictors: dict[str, str], config: str = "", start: bool = True) -> Daemon:
        d = Daemon(tmp_path / f"d{len(started)}", config)
        for rel, text in predictors.items():
            d.write(rel, text)
        started.append(d)
        return d.start() if start else d

    yield make
    for d in started:
        d.stop()
