"""Faults under load against a real daemon (scenarios in faults.py): only the requests inside the faulty process
fail, each with a clear 5xx; the other API never fails; service comes back. bench/faults.py measures the same
scenarios for RELIABILITY.md."""

from __future__ import annotations

import os
from typing import Any

import faults
import pytest
from faults import Figures


def _only(figures: Figures, allowed: set[str]) -> None:
    codes = figures.codes
    assert set(codes) <= allowed, codes
    assert figures.others_failed == 0, [o for o in figures.outcomes if o.api != figures.faulty_api and o.status != 200]
    assert len(figures.recovery()) == len(figures.faults), "service came back after every fault"


def test_sigkill_model_worker_under_load_fails_only_its_requests_with_502(make_daemon: Any) -> None:
    figures = faults.kill_model_worker(make_daemon, kills=3)
    _only(figures, {"502"})
    assert len(figures.failed("a")) <= 4 * 3, "at most the 4 clients' requests inside each killed worker"


def test_sigkill_http_worker_fails_only_the_requests_it_held(make_daemon: Any) -> None:
    figures = faults.kill_http_worker(make_daemon)
    failed = figures.failed("*")
    assert all(o.status is None for o in failed), figures.codes  # a dead HTTP worker cannot answer; it drops them
    assert len(failed) <= 8, "at most the 8 clients' requests in flight, about half of them on the victim"
    assert len(figures.recovery()) == 1


def test_sigstop_model_worker_gets_504_then_502_and_is_replaced(make_daemon: Any) -> None:
    figures = faults.stop_model_worker(make_daemon)
    _only(figures, {"504", "502"})
    assert "504" in figures.codes, "requests past the 1 s deadline are answered, not left hanging"


def test_memory_leak_is_killed_at_the_limit_and_replaced(make_daemon: Any) -> None:
    figures = faults.leak_memory(make_daemon)
    _only(figures, {"502"})
    assert len(figures.failed("a")) <= 1, "one client: at most its one request inside the worker"


def test_predict_that_never_returns_gets_504_and_its_worker_is_replaced(make_daemon: Any) -> None:
    figures = faults.hang_forever(make_daemon)
    assert figures.note.startswith("the hung request: 504;")
    _only(figures, {"504", "502"})


def test_sigterm_mid_reload_finishes_accepted_requests_and_leaves_nothing(make_daemon: Any) -> None:
    figures, d, _ = faults.sigterm_mid_reload(make_daemon)
    assert d.proc is not None and d.proc.returncode == 0
    before = [o for o in figures.outcomes if o.sent < figures.faults[0]]
    assert before and all(o.status == 200 for o in before), [o for o in before if o.status != 200]
    after = {o.status or o.error for o in figures.outcomes if o.sent >= figures.faults[0]}
    assert after <= {200, "ConnectError"}, after  # answered while draining, or refused once the listener closed
    with pytest.raises(ProcessLookupError):
        os.killpg(d.proc.pid, 0)  # no worker, probe or loader left in the daemon's process group
    assert "SIGTERM: draining in-flight requests" in d.logs() and "Traceback" not in d.logs()
