"""Prometheus metrics from every process, aggregated with prometheus-client's multiprocess mode.

The master points PROMETHEUS_MULTIPROC_DIR at a folder of its runtime directory before it creates the metrics
(``get()``), so every forked worker writes its samples there; ``GET /metrics`` merges them, plus the outstanding and
queued requests read live from the scoreboard.
"""

from __future__ import annotations

import bisect
import glob
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
LOAD = (0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
NO_API = "-"  # the label of requests that matched no API (so random paths cannot blow up the label set)


class Metrics:
    """Every metric the daemon exports; one instance per process tree (made in the master, used after fork)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.requests = Counter("predictord_requests", "Requests answered, by API, status class and status code.",
                                ["api", "class", "code"])
        self.latency = Histogram("predictord_request_duration_seconds",
                                 "Time from the request's arrival to its response, queueing included.", ["api"],
                                 buckets=LATENCY)
        self.queue_wait = Histogram("predictord_queue_wait_seconds",
                                    "Time a job waited in its model worker's queue before predict() took it.",
                                    ["api"], buckets=LATENCY)
        self.predict = Histogram("predictord_predict_seconds",
                                 "Time in predict() per call (a whole batch for batching APIs), parsing and "
                                 "serializing included.", ["api"], buckets=LATENCY)
        self.batch = Histogram("predictord_batch_size", "Requests per predict() call.", ["api"], buckets=BATCH)
        self.replicas = Gauge("predictord_replicas", "Replicas of each API by state (ready, loading).",
                              ["api", "state"], multiprocess_mode="livemostrecent")
        self.loads = Counter("predictord_loads", "Loads of an API version on a model worker, by kind (load: its "
                             "first version; reload: a new one) and result.", ["api", "kind", "result"])
        self.load_seconds = Histogram("predictord_load_duration_seconds", "Time a replica took to load (import and "
                                      "__init__).", ["api"], buckets=LOAD)
        self.restarts = Counter("predictord_worker_restarts", "Worker processes that exited unplanned, by kind "
                                "and cause.", ["kind", "cause"])
        self.workers = Gauge("predictord_workers", "Worker processes up, by kind and device.", ["kind", "device"],
                             multiprocess_mode="livemostrecent")
        self.rebalance = Counter("predictord_rebalance_decisions", "Decisions of the rebalancer, by action (add, "
                                 "remove, move, drain, restore, retire, refuse).", ["action"])
        self.device_util = Gauge("predictord_device_utilization_percent", "Utilization of each GPU (NVML) and of "
                                 "the host's CPUs (psutil), at the last sample.", ["device"],
                                 multiprocess_mode="livemostrecent")
        self.device_memory = Gauge("predictord_device_memory_bytes", "Memory of each GPU and of the host at the last "
                                   "sample, by use (used, total, foreign: held by processes not ours; available).",
                                   ["device", "use"], multiprocess_mode="livemostrecent")


class Tally:
    """Hot-path counts kept in plain dicts and flushed to the metrics about once a second.

    In multiprocess mode one metric update takes a lock and writes to a memory-mapped file (2-4 us); four of them
    per request cost 15 % of a trivial predictor's throughput (measured with bench/run.py's echo case). A dict
    update costs a tenth of that. Figures reach /metrics within FLUSH_EVERY seconds; a worker that crashes loses at
    most that much of its counts.
    """

    def __init__(self) -> None:
        self.counts: dict[Any, float] = {}
        self.observed: dict[Any, list[Any]] = {}  # histogram child -> [per-bucket counts, sum]

    def inc(self, counter: Any, n: float = 1) -> None:
        self.counts[counter] = self.counts.get(counter, 0) + n

    def observe(self, histogram: Any, value: float) -> None:
        entry = self.observed.get(histogram)
        if entry is None:
            entry = self.observed[histogram] = [[0] * len(histogram._upper_bounds), 0.0]
        entry[0][bisect.bisect_left(histogram._upper_bounds, value)] += 1  # the bucket observe() would pick
        entry[1] += value

    def flush(self) -> None:
        counts, observed = self.counts, self.observed
        self.counts, self.observed = {}, {}
        for counter, n in counts.items():
            counter.inc(n)
        for histogram, (buckets, total) in observed.items():
            histogram._sum.inc(total)
            for i, n in enumerate(buckets):
                if n:
                    histogram._buckets[i].inc(n)


FLUSH_EVERY = 1.0
tally = Tally()
_metrics: Metrics | None = None


def prepare(directory: Path) -> None:
    """Call once in the master, before ``get()`` and before any fork."""
    directory.mkdir(parents=True, exist_ok=True)
    os.environ[ENV] = str(directory)


def get() -> Metrics:
    global _metrics
    if _metrics is None:
        _metrics = Metrics()
    return _metrics


def process_gone(pid: int) -> None:
    """A worker exited: drop its live gauges (its counters stay in the totals)."""
    if os.environ.get(ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


class LiveCollector:
    """Outstanding and queued requests per API, read from the scoreboard at scrape time."""

    def __init__(self, rows: Any) -> None:
        self.rows = rows  # () -> iterable of (api, outstanding, queued)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        outstanding = GaugeMetricFamily("predictord_in_flight_requests", "Requests sent to model workers and not "
                                        "answered yet (queued or running), over all HTTP workers.", labels=["api"])
        queued = GaugeMetricFamily("predictord_queued_requests", "Requests waiting for a free replica.",
                                   labels=["api"])
        for api, out, waiting in self.rows():
            outstanding.add_metric([api], out)
            queued.add_metric([api], waiting)
        yield outstanding
        yield queued


def readable_files(directory: str) -> list[str]:
    """The processes' metric files that parse now: a file just created (empty) or caught mid-write by another
    process is left out of this read, instead of ending the reader (the master's loop, a scrape)."""
    from prometheus_client.mmap_dict import MmapedDict

    good = []
    for path in glob.glob(os.path.join(directory, "*.db")):
        try:
            for _ in MmapedDict.read_all_values_from_file(path):  # type: ignore[no-untyped-call]
                pass
        except (OSError, ValueError, struct.error, UnicodeDecodeError):
            continue
        good.append(path)
    return good


class TolerantCollector:
    """prometheus-client's multiprocess collector over the files that parse (see ``readable_files``)."""

    def collect(self) -> Any:
        from prometheus_client import multiprocess

        merge = multiprocess.MultiProcessCollector.merge
        for _ in range(3):  # a file that changed between the check and the merge: look again
            try:
                return merge(readable_files(os.environ[ENV]), accumulate=True)  # type: ignore[no-untyped-call]
            except (OSError, ValueError, struct.error, UnicodeDecodeError):
                continue
        return []


def collected() -> Any:
    """A registry of every process's metrics, read tolerantly."""
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    registry.register(TolerantCollector())
    return registry


def exposition(rows: Any) -> bytes:
    """The Prometheus text format of every process's metrics plus the live ones."""
    from prometheus_client import generate_latest

    registry = collected()
    registry.register(LiveCollector(rows))
    data: bytes = generate_latest(registry)
    return data
