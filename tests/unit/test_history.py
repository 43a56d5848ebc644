"""The recent figures and the charts' series (master/history.py), from snapshots made by hand."""

from __future__ import annotations

from predictord.master.history import SERIES, History, Snapshot


def snap(at: float, ok: int, errors: int, batch: tuple[float, float], queued: int) -> Snapshot:
    buckets = [0.0] * 16
    for i in range(3, 16):  # every request under 10 ms (bucket 3 is le=0.01)
        buckets[i] = ok + errors
    return Snapshot(at, {"a": {"200": ok, "500": errors}}, {"a": buckets}, {"a": batch}, {"a": queued})


def test_series_hold_rate_latency_errors_batch_size_and_outstanding() -> None:
    h = History()
    h.add(snap(100.0, 0, 0, (0.0, 0.0), 0))
    h.add(snap(105.0, 40, 10, (60.0, 20.0), 7))
    h.add(snap(110.0, 40, 10, (60.0, 20.0), 0))
    first, idle = h.series("a")
    point = dict(zip(SERIES, first, strict=True))
    assert point["time"] == 105.0 and point["requests_per_s"] == 10.0 and point["errors_per_s"] == 2.0
    assert point["batch_size"] == 3.0 and point["outstanding"] == 7
    assert 0 < point["p50_ms"] <= point["p99_ms"] <= 10
    assert dict(zip(SERIES, idle, strict=True)) | {"time": 0} == {
        "time": 0, "requests_per_s": 0.0, "p99_ms": None, "p50_ms": None, "errors_per_s": 0.0, "batch_size": None,
        "outstanding": 0}, "nothing happened: no latency and no batch size, not zeros"
    assert h.series("unknown") == [[105.0, 0.0, None, None, 0.0, None, None], [110.0, 0.0, None, None, 0.0, None, None]]
