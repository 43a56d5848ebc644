"""The rebalance policy on synthetic and replayed traces: pure data in, decisions out."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from predictord.devices import GpuSample, HostSample, TraceGpus
from predictord.master.rebalance import (
    ApiSample,
    Decision,
    Limits,
    PolicyState,
    Sample,
    WorkerSample,
    decide,
)

GIB = 1 << 30
LIMITS = Limits(window=3, cooldown=10.0, idle_after=30.0, queue_high=2.0, headroom=GIB, cpu_workers_max=2,
                gpu_workers_max=2)
HOST = HostSample(cpu=20.0, memory_available=16 * GIB, memory_total=24 * GIB)
TRACES = Path(__file__).parent / "traces"


def gpu(index: int, util: float = 10.0, used: int = 2 * GIB, total: int = 80 * GIB, **kw: object) -> GpuSample:
    return GpuSample(index, util=util, memory_used=used, memory_total=total, **kw)  # type: ignore[arg-type]


def api(name: str = "mlp", kind: str = "gpu", slots: tuple[int, ...] = (0,), outstanding: int = 0,
        **kw: object) -> ApiSample:
    return ApiSample(name, kind, slots, ready=kw.pop("ready", len(slots)), outstanding=outstanding,  # type: ignore[arg-type]
                     capacity=kw.pop("capacity", len(slots)), **kw)  # type: ignore[arg-type]


def run(samples: Iterable[Sample], limits: Limits = LIMITS,
        state: PolicyState | None = None) -> tuple[list[tuple[float, Decision]], PolicyState]:
    """Feed samples one by one, as the master does, and collect every decision with the time it was made."""
    state = state or PolicyState()
    window: list[Sample] = []
    made: list[tuple[float, Decision]] = []
    for sample in samples:
        window = (window + [sample])[-limits.window:]
        decisions, state = decide(window, state, limits)
        made += [(sample.at, d) for d in decisions]
    return made, state


def two_gpus(apis: tuple[ApiSample, ...], at: float, gpus: tuple[GpuSample, ...] | None = None,
             workers: tuple[WorkerSample, ...] | None = None) -> Sample:
    workers = workers or (WorkerSample(0, "gpu0", ("mlp",)), WorkerSample(1, "gpu1", ()))
    return Sample(at, HOST, gpus or (gpu(0), gpu(1)), workers, apis)


def test_a_hot_api_on_an_idle_gpu_grows_after_a_full_window() -> None:
    samples = [two_gpus((api(outstanding=9),), t, (gpu(0, util=30), gpu(1, util=60))) for t in range(3)]
    made, _ = run(samples[:2])
    assert made == []  # two samples are not a window yet
    made, _ = run(samples)
    assert [(d.action, d.api, d.device, d.into) for _, d in made] == [("add", "mlp", "gpu0", None)]
    text = made[0][1].text()
    assert text.startswith("+1 replica of mlp on gpu0: queue 8, util 30%, free 78.0 GiB"), text


def test_a_new_replica_goes_to_an_existing_worker_before_a_new_one() -> None:
    samples = [two_gpus((api(outstanding=9),), t, (gpu(0, util=80), gpu(1, util=5))) for t in range(3)]
    made, _ = run(samples)
    assert [(d.action, d.device, d.into) for _, d in made] == [("add", "gpu1", 1)]


def test_a_queue_below_the_threshold_in_one_sample_of_the_window_does_not_grow() -> None:
    queues = [9, 9, 1, 9, 9, 1, 9, 9, 1] * 4  # oscillating load: never high for a whole window
    made, _ = run(two_gpus((api(outstanding=q),), t) for t, q in enumerate(queues))
    assert made == []


def test_oscillating_load_after_a_scale_up_does_not_flap() -> None:
    """Busy, then bursts and pauses shorter than idle_after: one add and no remove."""
    samples = [two_gpus((api(outstanding=9),), t) for t in range(3)]
    grown = (api(slots=(0, 1), outstanding=0),)
    samples += [two_gpus(grown if t % 4 else (api(slots=(0, 1), outstanding=1),), t) for t in range(3, 60)]
    made, _ = run(samples)
    assert [d.action for _, d in made] == ["add"]


def test_an_idle_api_gives_back_its_added_replica_and_its_added_worker_is_retired() -> None:
    workers = (WorkerSample(0, "gpu0", ("mlp",)), WorkerSample(2, "gpu0", ("mlp",), extra=True),
               WorkerSample(1, "gpu1", ()))
    samples = [two_gpus((api(slots=(0, 2), outstanding=1),), 0, workers=workers)]
    samples += [two_gpus((api(slots=(0, 2)),), t, workers=workers) for t in range(1, 40)]
    made, _ = run(samples)
    assert [(t, d.action, d.slot) for t, d in made] == [(30, "remove", 2), (30, "retire", 2)]


def test_an_api_at_its_minimum_is_never_taken_below_it() -> None:
    made, _ = run(two_gpus((api(slots=(0,), min_replicas=1),), t) for t in range(100))
    assert made == []


def test_a_foreign_process_saturating_gpu0_moves_the_replica_to_gpu1() -> None:
    busy = (gpu(0, util=98, foreign_util=95.0), gpu(1, util=3))
    made, _ = run(two_gpus((api(outstanding=1),), t, busy) for t in range(3))
    assert [(d.action, d.api, d.device, d.slot, d.into) for _, d in made] == [("move", "mlp", "gpu1", 0, 1)]
    assert "gpu0: other processes use 95% of it" in made[0][1].reason


def test_a_gpu_filled_by_someone_else_counts_as_saturated() -> None:
    full = (gpu(0, util=5, used=70 * GIB, foreign_memory=60 * GIB), gpu(1))
    made, _ = run(two_gpus((api(),), t, full) for t in range(3))
    assert [d.action for _, d in made] == ["move"]
    assert "other processes hold 60.0 GiB of 80.0 GiB" in made[0][1].reason


def test_a_replica_whose_footprint_does_not_fit_is_refused_once_with_the_figures() -> None:
    tight = (gpu(0, util=30, used=70 * GIB), gpu(1, util=95))
    made, state = run(two_gpus((api(outstanding=9, footprint=20 * GIB),), t, tight) for t in range(10))
    assert [d.action for _, d in made] == ["refuse"]  # said once, not at every sample
    reason = made[0][1].reason
    assert "gpu0 has 10.0 GiB free, 21.0 GiB needed (20.0 GiB measured + headroom)" in reason, reason
    assert "gpu1 is 95% busy" in reason, reason
    assert state.refused


def test_a_lost_gpu_is_drained_at_once_and_restored_after_a_healthy_window() -> None:
    lost = (gpu(0), GpuSample(1, healthy=False, error="NVML: GPU is lost"))
    samples = [two_gpus((api(),), t, lost) for t in range(3)]
    samples += [two_gpus((api(),), t) for t in range(3, 8)]
    made, _ = run(samples)
    assert [(t, d.action, d.device) for t, d in made] == [(0, "drain", "gpu1"), (5, "restore", "gpu1")]
    assert made[0][1].reason == "NVML: GPU is lost"


def test_a_drained_gpu_takes_no_new_replicas() -> None:
    lost = (gpu(0, util=90), GpuSample(1, healthy=False, error="lost"))
    made, _ = run(two_gpus((api(outstanding=9),), t, lost) for t in range(3))
    assert [d.action for _, d in made] == ["drain", "refuse"]
    assert "gpu1 is out of service" in made[1][1].reason


def cpu_sample(at: float, outstanding: int, host: HostSample = HOST, slots: tuple[int, ...] = (0,),
               workers: int = 1, max_replicas: int = 0) -> Sample:
    ws = tuple(WorkerSample(i, "cpu", ("echo",) if i in slots else ()) for i in range(workers))
    return Sample(at, host, (), ws, (api("echo", "cpu", slots, outstanding, max_replicas=max_replicas),))


def test_cpu_workers_scale_up_to_their_maximum_from_queueing() -> None:
    made, _ = run(cpu_sample(t, 6) for t in range(3))
    assert [(d.action, d.device, d.into) for _, d in made] == [("add", "cpu", None)]
    made, _ = run(cpu_sample(t, 6, slots=(0, 1), workers=2) for t in range(3))
    assert [d.action for _, d in made] == ["refuse"]
    assert "cpu already runs its most workers (2)" in made[0][1].reason


def test_no_cpu_worker_is_added_when_the_host_cpu_is_saturated() -> None:
    hot = HostSample(cpu=97.0, memory_available=16 * GIB, memory_total=24 * GIB)
    made, _ = run(cpu_sample(t, 6, host=hot) for t in range(3))
    assert [d.action for _, d in made] == ["refuse"]
    assert "the host CPU is 97% busy" in made[0][1].reason


def test_max_replicas_bounds_growth() -> None:
    made, _ = run(cpu_sample(t, 6, workers=2, max_replicas=1) for t in range(3))
    assert [d.action for _, d in made] == ["refuse"]
    assert "max_replicas = 1" in made[0][1].reason


def test_the_cooldown_spaces_changes_to_one_api() -> None:
    samples = [cpu_sample(t, 20, workers=2) for t in range(3)]
    samples += [cpu_sample(t, 20, slots=(0, 1), workers=2) for t in range(3, 20)]
    limits = Limits(window=3, cooldown=10.0, queue_high=2.0, cpu_workers_max=4)
    made, _ = run(samples, limits)
    assert [(t, d.action) for t, d in made] == [(2, "add"), (12, "add")]


def test_a_replayed_trace_of_a_foreign_job_starting_on_gpu0(tmp_path: Path) -> None:
    """tests/unit/traces/foreign_job.jsonl: gpu0 idle, then another user's training job takes it (util and
    memory climb); the mlp replica moves to gpu1 once the job has held gpu0 for a whole window."""
    reader = TraceGpus(TRACES / "foreign_job.jsonl")
    samples = [two_gpus((api(outstanding=1),), t, tuple(reader.read({101, 102}))) for t in range(12)]
    made, _ = run(samples)
    assert [(d.action, d.device) for _, d in made] == [("move", "gpu1")]
    first_pressured = next(t for t, s in enumerate(samples) if s.gpus[0].foreign_util >= LIMITS.foreign_util)
    assert made[0][0] == first_pressured + LIMITS.window - 1


def test_trace_replay_repeats_its_last_line_and_reads_changes(tmp_path: Path) -> None:
    trace = tmp_path / "gpus.jsonl"
    trace.write_text(json.dumps({"gpus": [{"index": 0, "util": 5, "memory_total": 8 * GIB, "extra": 1,
                                           "processes": [[7, GIB, False]]}]}) + "\n")
    reader = TraceGpus(trace)
    assert [(g.util, g.processes) for g in reader.read(())] == [(5, ((7, GIB, False),))]
    assert [g.util for g in reader.read(())] == [5]
    assert [(g.index, g.memory_total) for g in reader.gpus()] == [(0, 8 * GIB)]
    trace.write_text(json.dumps({"gpus": [{"index": 0, "util": 99, "healthy": False, "error": "lost"}]}) + "\n")
    (sample,) = reader.read(())
    assert (sample.util, sample.healthy, sample.error) == (99, False, "lost")
