"""What a predict() of n jobs costs on a replica, and when a new job would finish there.

A model worker measures each call it makes (start to the last reply out) per batch size, as a moving average per
size (``BatchCosts``), and publishes the line ``fixed + n * per_job`` through those averages to the scoreboard.
Two numbers describe both ends: on a CPU a batch of 8 costs about 8 of 1 (``fixed`` near 0), on a GPU about 1
(``per_job`` near 0). An HTTP worker reads them for each replica of an API and sends a job where
``expected_finish`` is soonest: the batches ahead of it on that replica, at their real cost, then its own.

A replica that looks dear gets no jobs, so nothing would ever correct its figures: a first batch that paid a cold
start (torch's first forward pass) would keep it idle for good while the other replica queues. So a line not fed for
STALE_AFTER, while the API's other replicas hold more jobs than one batch of this one, is forgotten, and the replica
is priced again as the cheapest one that has run (what an HTTP worker does for a replica that has not run yet): its
next batch measures it afresh. Without a queue it is left alone: spreading a light load over more replicas pays
each batch's fixed cost more often, and cold caches (bench/ab.py --case mlp-replicas: forgetting on idleness alone
cost the MLP 9-14 % at 1, 8 and 64 clients on 2 cores).
"""

from __future__ import annotations

import math
import time

REFIT_EVERY = 16  # batches between fits of the line once its sizes are known (a fit is ~1 us a size)
MAX_WEIGHT = 32.0  # a size's weight in the fit grows with the batches seen at that size, up to this
STALE_AFTER = 2.0  # seconds without a call here after which the line is forgotten (the replica is probed again)


class BatchCosts:
    """Moving averages of one API's predict() time by batch size, and the line through them."""

    def __init__(self) -> None:
        self.sizes: dict[int, list[float]] = {}  # n -> [moving average seconds, weight]
        self.line = (0.0, 0.0)  # (fixed, per_job) seconds; (0, 0): not measured (dispatch prices it as the cheapest)
        self.last = 0.0  # time.monotonic() of the last call observed
        self._since_fit = 0

    def observe(self, n: int, seconds: float) -> bool:
        """Note a call of ``n`` jobs that took ``seconds``; True when the line changed (then publish it)."""
        self.last = time.monotonic()
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

    def forget_if_stale(self, now: float) -> bool:
        """Forget the line if no call fed it for STALE_AFTER; True if it was forgotten (then publish (0, 0))."""
        if self.line == (0.0, 0.0) or now - self.last < STALE_AFTER:
            return False
        self.sizes.clear()
        self.line = (0.0, 0.0)
        self._since_fit = 0
        return True

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
