"""Recent figures per API for `predictord status` and the status page: the master samples the merged metrics every
few seconds and keeps ten minutes of snapshots; rates and quantiles over the last minute come from differences.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ..metrics import LATENCY, collected

WINDOW = 60.0  # seconds of "recent" in status
KEEP = 600.0  # seconds of history for the charts


@dataclass
class Snapshot:
    """Cumulative counts per API at one moment."""

    at: float
    requests: dict[str, dict[str, float]] = field(default_factory=dict)  # api -> code -> count
    buckets: dict[str, list[float]] = field(default_factory=dict)  # api -> cumulative latency bucket counts
    batches: dict[str, tuple[float, float]] = field(default_factory=dict)  # api -> (sum of batch sizes, calls)
    queued: dict[str, int] = field(default_factory=dict)  # api -> requests outstanding at that moment


def read_snapshot(now: float | None = None, queued: dict[str, int] | None = None) -> Snapshot:
    """The merged metrics of every process, reduced to what status needs (``queued``: each API's outstanding
    requests now, from the scoreboard)."""
    registry = collected()
    snap = Snapshot(time.time() if now is None else now, queued=dict(queued or {}))
    bounds = [*LATENCY, float("inf")]
    for family in registry.collect():
        for s in family.samples:
            api = s.labels.get("api")
            if api is None:
                continue
            if s.name == "predictord_requests_total":
                codes = snap.requests.setdefault(api, {})
                codes[s.labels["code"]] = codes.get(s.labels["code"], 0.0) + s.value
            elif s.name == "predictord_request_duration_seconds_bucket":
                le = float(s.labels["le"])
                row = snap.buckets.setdefault(api, [0.0] * len(bounds))
                row[bounds.index(le)] += s.value
            elif s.name in ("predictord_batch_size_sum", "predictord_batch_size_count"):
                total, calls = snap.batches.get(api, (0.0, 0.0))
                snap.batches[api] = (total + s.value, calls) if s.name.endswith("_sum") else (total, calls + s.value)
    return snap


def quantile(q: float, counts: list[float]) -> float | None:
    """A quantile from cumulative histogram counts (linear within the bucket, as Prometheus does)."""
    total = counts[-1] if counts else 0
    if total <= 0:
        return None
    rank = q * total
    bounds = [*LATENCY, float("inf")]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in zip(bounds, counts, strict=True):
        if count >= rank:
            if bound == float("inf"):
                return LATENCY[-1]
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / max(count - lower_count, 1e-12)
        lower_bound, lower_count = bound, count
    return LATENCY[-1]


class History:
    """Snapshots over time, and the figures derived from them."""

    def __init__(self) -> None:
        self.snapshots: deque[Snapshot] = deque()

    def add(self, snap: Snapshot) -> None:
        self.snapshots.append(snap)
        while self.snapshots and snap.at - self.snapshots[0].at > KEEP:
            self.snapshots.popleft()

    def _base(self, now: float, window: float) -> Snapshot | None:
        for s in self.snapshots:
            if now - s.at <= window:
                return s
        return None

    def recent(self, api: str) -> dict[str, Any]:
        """Totals, and requests/s, errors, p50 and p99 over the last minute, for one API."""
        if not self.snapshots:
            return {"requests": 0, "codes": {}, "rps": 0.0, "errors": 0, "p50_ms": None, "p99_ms": None}
        last = self.snapshots[-1]
        base = self._base(last.at, WINDOW) or last
        codes = last.requests.get(api, {})
        before = base.requests.get(api, {})
        span = max(last.at - base.at, 1e-9)
        delta = {c: n - before.get(c, 0) for c, n in codes.items()}
        now_b, base_b = last.buckets.get(api), base.buckets.get(api)
        window_b = [a - (base_b[i] if base_b else 0) for i, a in enumerate(now_b)] if now_b else []
        p50, p99 = quantile(0.5, window_b), quantile(0.99, window_b)
        return {
            "requests": int(sum(codes.values())),
            "codes": {c: int(n) for c, n in sorted(codes.items())},
            "rps": round(sum(delta.values()) / span, 2) if last is not base else 0.0,
            "errors": int(sum(n for c, n in delta.items() if c.startswith("5"))),
            "p50_ms": round(p50 * 1000, 2) if p50 is not None else None,
            "p99_ms": round(p99 * 1000, 2) if p99 is not None else None,
        }

    def series(self, api: str) -> list[list[float | None]]:
        """Between consecutive snapshots, for the charts: [time, requests/s, p99 ms, p50 ms, 5xx/s, mean batch size,
        requests outstanding] (SERIES names the columns; None where there was nothing to measure)."""
        points: list[list[float | None]] = []
        snaps = list(self.snapshots)
        for a, b in zip(snaps, snaps[1:], strict=False):
            span = max(b.at - a.at, 1e-9)
            before, after = a.requests.get(api, {}), b.requests.get(api, {})
            count = sum(after.values()) - sum(before.values())
            errors = sum(n - before.get(c, 0) for c, n in after.items() if c.startswith("5"))
            ab, bb = a.buckets.get(api), b.buckets.get(api)
            window = [y - (ab[i] if ab else 0) for i, y in enumerate(bb)] if bb else []
            p99, p50 = quantile(0.99, window), quantile(0.5, window)
            (s0, n0), (s1, n1) = a.batches.get(api, (0.0, 0.0)), b.batches.get(api, (0.0, 0.0))
            points.append([round(b.at, 1), round(count / span, 2), _ms(p99), _ms(p50), round(errors / span, 2),
                           round((s1 - s0) / (n1 - n0), 2) if n1 > n0 else None, b.queued.get(api)])
        return points


SERIES = ("time", "requests_per_s", "p99_ms", "p50_ms", "errors_per_s", "batch_size", "outstanding")


def _ms(seconds: float | None) -> float | None:
    return round(seconds * 1000, 2) if seconds is not None else None
