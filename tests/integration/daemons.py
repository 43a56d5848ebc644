"""The make_daemon fixture: real daemons in a temp directory, each stopped at the end of its test (the integration
and stress suites share it)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import TORCH, Daemon

LOG_TAIL = 12_000  # characters of each daemon's log a failed test prints: CI keeps only the test's output


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Keep each phase's report on the test, so that the fixture can tell at teardown whether the test failed."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture
def make_daemon(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Any]:
    """Build daemons in a temp directory; every one started is stopped at the end of the test, and a failed test
    prints the end of each one's log (a hang or a race seen once in CI is explained by it, not guessed at)."""
    started: list[Daemon] = []

    torch = TORCH if getattr(request.module, "TORCH_PRELOADED", False) else ""

    def make(predictors: dict[str, str], config: str = "", start: bool = True) -> Daemon:
        d = Daemon(tmp_path / f"d{len(started)}", torch + config)
        for rel, text in predictors.items():
            d.write(rel, text)
        started.append(d)
        return d.start() if start else d

    yield make
    for d in started:
        d.stop()
    report = getattr(request.node, "report_call", None)
    if report is not None and report.failed:
        for d in started:
            if d.log_path.exists():
                print(f"--- the last {LOG_TAIL} characters of {d.log_path} ---\n{d.logs()[-LOG_TAIL:]}")
