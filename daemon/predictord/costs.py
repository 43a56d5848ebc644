"""What a predict() of n jobs costs on a replica, and when a new job would finish there.

A model worker measures each call it makes (start to the last reply out) per batch size, as a moving average per
size (``BatchCosts``), and publishes the line ``fixed + n * per_job`` through those averages to the scoreboard.
Two numbers describe both ends: on a CPU a batch of 8 costs about 8 of 1 (``fixed`` near 0), on a GPU about 1
(``per_job`` near 0). An HTTP worker reads them for each replica of an API and sends a job where
``expected_finish`` is soonest: the batches ahead of it on that replica, at their real cost, then its own.
"""

from __future__ import annotations

import math

REFIT_EVERY = 16  # batches between fits of the line once its sizes are known (a fit is ~1 us a size)
MAX_WEIGHT = 32.0  # a size's weight in the fit grows with the batches seen at that size, up to this


class BatchCosts:
    """Moving averages of one API's predict() time by batch size, and the line through them."""

    def __init__(self) -> None:
        self.sizes: dict[int, list[float]] = {}  # n -> [moving average seconds, weight]
        self.line = (0.0, 0.0)  # (fixed, per_job) seconds
        self._since_fit = 0

    def observe(self, n: int, seconds: float) -> bool:
        """Note a call of ``n`` jobs that took ``seconds``; True when the line changed (then publish it)."""
        entry = self.sizes.get(n)
        if entry is None:
            self.sizes[n] = [seconds, 1.0]
            self._since_fit = REFIT_EVERY  # a new size: fit now
        else:
            entry[0] += (seconds - entry[0]) * 0.2
            entry[1] = min(entry[1] + 1.0, MAX_WEIGHT)
        self._since_fit += 1
        if self._since_fit < REFIT_EVERY and len(self.sizes) > 1:
            return False
        self._since_fit = 0
        line = fit(self.sizes)
        changed = line != self.line
        self.line = line
        return changed

    def cost(self, n: int) -> float:
        fixed, per_job = self.line
        return fixed + per_job * n


def fit(sizes: dict[int, list[float]]) -> tuple[float, float]:
    """Weighted least squares of seconds on batch size, both terms kept ≥ 0. With one size seen, the cost is taken
    as proportional to the size (the CPU case, and the cautious guess: it never promises a free batch)."""
    if not sizes:
        return 0.0, 0.0
    if len(sizes) == 1:
        ((n, (t, _)),) = sizes.items()
        return 0.0, t / n
    w = sx = sy = sxx = sxy = 0.0
    for n, (t, weight) in sizes.items():
        w += weight
        sx += weight * n
        sy += weight * t
        sxx += weight * n * n
        sxy += weight * n * t
    det = w * sxx - sx * sx
    per_job = (w * sxy - sx * sy) / det if det > 0 else 0.0
    fixed = (sy - per_job * sx) / w
    if per_job < 0:  # bigger batches measured cheaper: noise; the cost is flat
        return sy / w, 0.0
    if fixed < 0:  # the line would cross zero: through the origin instead
        return 0.0, sxy / sxx
    return fixed, per_job


def expected_finish(ahead: int, lanes: int, batch: int, fixed: float, per_job: float) -> float:
    """Seconds until a job sent now finishes on a replica with ``ahead`` jobs outstanding, ``lanes`` predict()
    calls at once and batches of up to ``batch``: its lane's share of the jobs ahead runs in full batches, then the
    new job's batch with what remains."""
    jobs = math.ceil((ahead + 1) / max(1, lanes))
    batch = max(1, batch)
    full = (jobs - 1) // batch
    last = jobs - full * batch
    return full * (fixed + per_job * batch) + fixed + per_job * last
