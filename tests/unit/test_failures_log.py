"""How failures of predictor code are logged (model/failures.py): per kind and minute, a traceback, then a line
each for LINES more, then a count."""

from __future__ import annotations

import logging

import pytest

from predictord.model import failures
from predictord.model.failures import COUNT, LINE, LINES, TRACEBACK, FailureLog


def test_a_kind_gets_a_traceback_then_lines_then_a_count(caplog: pytest.LogCaptureFixture) -> None:
    log = FailureLog(every=60)
    caplog.set_level(logging.ERROR, "predictord.model")
    assert log.how("a", ValueError("bad 0"), "a.py:5", "r0", now=100) == TRACEBACK
    hows = [log.how("a", ValueError(f"bad {n}"), "a.py:5", f"r{n}", now=101) for n in range(1, LINES + 4)]
    assert hows == [LINE] * LINES + [COUNT] * 3
    # another kind: another API, another type, another line
    assert log.how("b", ValueError("bad"), "a.py:5", "x", now=104) == TRACEBACK
    assert log.how("a", KeyError("k"), "a.py:5", "x", now=104) == TRACEBACK
    assert log.how("a", ValueError("bad"), "a.py:9", "x", now=104) == TRACEBACK
    log.sweep(now=159)
    assert caplog.records == [], "nothing summed up before the window ends"
    log.sweep(now=160)
    assert [r.getMessage() for r in caplog.records] == [
        f"API a: 3 more requests failed with ValueError at a.py:5 in the last 60s, not logged one by one (the last: "
        f"request r{LINES + 3}, ValueError: bad {LINES + 3})"]
    assert log.how("a", ValueError("again"), "a.py:5", "r", now=161) == TRACEBACK, "a new window"


def test_the_next_window_sums_up_the_last_and_a_stop_sums_up_all(caplog: pytest.LogCaptureFixture,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(failures, "LINES", 0)
    log = FailureLog(every=10)
    caplog.set_level(logging.ERROR, "predictord.model")
    assert log.how("a", RuntimeError("x"), "", "r1", now=0) == TRACEBACK
    assert log.how("a", RuntimeError("y"), "", "r2", now=5) == COUNT
    assert log.how("a", RuntimeError("z"), "", "r3", now=12) == TRACEBACK  # before any sweep
    assert [r.getMessage() for r in caplog.records] == [
        "API a: 1 more request failed with RuntimeError in the last 12s, not logged one by one (the last: request "
        "r2, RuntimeError: y)"]
    log.sweep(now=30)
    assert len(caplog.records) == 1, "a window with nothing more says nothing"
    assert log.how("a", RuntimeError("v"), "", "r4", now=31) == TRACEBACK
    assert log.how("a", RuntimeError("w"), "", "r5", now=32) == COUNT
    log.sweep(now=32, every=True)  # the worker stops: what was counted is said
    assert caplog.records[-1].getMessage().startswith("API a: 1 more request failed with RuntimeError in the last 1s")
