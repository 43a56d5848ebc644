"""The NVML sampler's handling of what NVML answers, against a stand-in for the pynvml module (this machine has no
GPU; the real module is exercised by bench/gpu_rebalance.py on the GPU machine)."""

from __future__ import annotations

import sys
from types import SimpleNamespace
from typing import Any

import pytest

from predictord.devices import NvmlGpus, read_host

GIB = 1 << 30


class NVMLError(Exception):
    pass


class NVMLError_NotFound(NVMLError):  # noqa: N801 - pynvml's own name
    pass


class NVMLError_NotSupported(NVMLError):  # noqa: N801
    pass


class FakeNvml:
    """Two GPUs: answers are set per test; an exception in ``fail`` is raised for that GPU."""

    NVMLError = NVMLError
    NVMLError_NotFound = NVMLError_NotFound

    def __init__(self) -> None:
        self.fail: dict[int, Exception] = {}
        self.procs: dict[int, list[Any]] = {0: [], 1: []}
        self.proc_util: dict[int, Any] = {0: [], 1: []}
        self.util = {0: 40, 1: 90}

    def nvmlInit(self) -> None:  # noqa: N802
        pass

    def nvmlShutdown(self) -> None:  # noqa: N802
        pass

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:  # noqa: N802
        if i in self.fail:
            raise self.fail[i]
        return i

    def nvmlDeviceGetUtilizationRates(self, h: int) -> Any:  # noqa: N802
        return SimpleNamespace(gpu=self.util[h])

    def nvmlDeviceGetMemoryInfo(self, h: int) -> Any:  # noqa: N802
        return SimpleNamespace(used=10 * GIB, total=80 * GIB)

    def nvmlDeviceGetComputeRunningProcesses(self, h: int) -> list[Any]:  # noqa: N802
        return self.procs[h]

    def nvmlDeviceGetProcessUtilization(self, h: int, since: int) -> Any:  # noqa: N802
        value = self.proc_util[h]
        if isinstance(value, Exception):
            raise value
        return value


@pytest.fixture
def nvml(monkeypatch: pytest.MonkeyPatch) -> FakeNvml:
    fake = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    return fake


def proc(pid: int, memory: int | None) -> Any:
    return SimpleNamespace(pid=pid, usedGpuMemory=memory)


def test_a_gpu_that_errors_is_reported_unhealthy_and_the_others_still_read(nvml: FakeNvml) -> None:
    nvml.fail[1] = NVMLError("GPU is lost")
    g0, g1 = NvmlGpus([0, 1]).read(set())
    assert g0.healthy and g0.util == 40 and g0.memory_total == 80 * GIB
    assert not g1.healthy and g1.error == "NVML: GPU is lost"


def test_processes_not_ours_are_foreign_by_memory_and_by_their_own_utilization_samples(nvml: FakeNvml) -> None:
    nvml.procs[0] = [proc(100, 4 * GIB), proc(200, 6 * GIB), proc(300, None)]  # 300: memory hidden (containers)
    nvml.proc_util[0] = [SimpleNamespace(pid=100, smUtil=10, timeStamp=5), SimpleNamespace(pid=200, smUtil=70,
                                                                                           timeStamp=6)]
    reader = NvmlGpus([0])
    (g,) = reader.read({100})
    assert g.foreign_memory == 6 * GIB and g.foreign_util == 70
    assert g.processes == ((100, 4 * GIB, True), (200, 6 * GIB, False), (300, 0, False))
    assert reader.last_seen[0] == 6, "the next read asks only for samples after the newest one seen"


def test_no_process_samples_since_the_last_read_means_no_foreign_utilization(nvml: FakeNvml) -> None:
    nvml.procs[0] = [proc(200, GIB)]
    nvml.proc_util[0] = NVMLError_NotFound()
    (g,) = NvmlGpus([0]).read({100})
    assert g.foreign_util == 0.0 and g.healthy


def test_without_per_process_utilization_foreign_use_is_estimated_from_the_process_list(nvml: FakeNvml) -> None:
    nvml.proc_util[1] = NVMLError_NotSupported()
    nvml.procs[1] = [proc(200, GIB)]
    assert NvmlGpus([1]).read({100})[0].foreign_util == 90, "only others on it: all of its utilization"
    nvml.procs[1] = [proc(100, GIB), proc(200, GIB)]
    assert NvmlGpus([1]).read({100})[0].foreign_util == 45, "both: half"
    nvml.procs[1] = [proc(100, GIB)]
    assert NvmlGpus([1]).read({100})[0].foreign_util == 0, "only ours: none"


def test_the_host_sample_is_plausible() -> None:
    host = read_host()
    assert 0 <= host.cpu <= 100 and 0 < host.memory_available <= host.memory_total
