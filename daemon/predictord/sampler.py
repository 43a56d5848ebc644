"""What the rebalancer samples: GPUs (NVML, or a replayed trace), the host (psutil). Every NVML call is guarded:
a GPU that errors is reported unhealthy, never raised."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any, Protocol

import psutil

from .gpus import Gpu
from .rebalance import GpuSample, HostSample

log = logging.getLogger("predictord.master")


class GpuReader(Protocol):
    """Reads every GPU once; ``ours`` are the pids of our model workers (anything else is foreign)."""

    def read(self, ours: Collection[int]) -> list[GpuSample]: ...

    def close(self) -> None: ...


class NvmlGpus:
    """The real GPUs, through NVML (nvidia-ml-py). Never initialises CUDA."""

    def __init__(self, indices: Sequence[int]) -> None:
        import pynvml

        self.nvml: Any = pynvml
        self.indices = list(indices)
        self.last_seen: dict[int, int] = {}  # GPU -> timestamp of its newest process utilization sample
        pynvml.nvmlInit()

    def read(self, ours: Collection[int]) -> list[GpuSample]:
        return [self._read_one(i, ours) for i in self.indices]

    def _read_one(self, index: int, ours: Collection[int]) -> GpuSample:
        nvml = self.nvml
        try:
            h = nvml.nvmlDeviceGetHandleByIndex(index)
            util = float(nvml.nvmlDeviceGetUtilizationRates(h).gpu)
            mem = nvml.nvmlDeviceGetMemoryInfo(h)
            procs = nvml.nvmlDeviceGetComputeRunningProcesses(h)
        except nvml.NVMLError as e:
            return GpuSample(index, healthy=False, error=f"NVML: {e}")
        foreign = [p for p in procs if p.pid not in ours]
        foreign_memory = sum(int(p.usedGpuMemory or 0) for p in foreign)
        return GpuSample(index, True, util, int(mem.used), int(mem.total), foreign_memory,
                         self._foreign_util(h, index, util, ours, bool(foreign), len(procs) > len(foreign)),
                         processes=tuple((p.pid, int(p.usedGpuMemory or 0), p.pid in ours) for p in procs))

    def _foreign_util(self, h: Any, index: int, util: float, ours: Collection[int], any_foreign: bool,
                      any_ours: bool) -> float:
        """Utilization taken by processes not ours: NVML's per-process samples where the GPU keeps them; else all of
        it when only foreign processes are on the GPU, none when only ours are, and half when both are (a guess,
        said as such in the README)."""
        nvml = self.nvml
        try:
            samples = nvml.nvmlDeviceGetProcessUtilization(h, self.last_seen.get(index, 0))
        except nvml.NVMLError_NotFound:
            return 0.0  # no process ran kernels since the last sample
        except nvml.NVMLError:
            if not any_foreign:
                return 0.0
            return util if not any_ours else util / 2
        if samples:
            self.last_seen[index] = max(s.timeStamp for s in samples)
        return float(min(100, sum(s.smUtil for s in samples if s.pid not in ours)))

    def close(self) -> None:
        try:
            self.nvml.nvmlShutdown()
        except self.nvml.NVMLError:
            pass


class TraceGpus:
    """GPU samples replayed from a JSON-lines file, one line per sample (the last line repeats once the file is
    done). Each line: ``{"gpus": [{"index": 0, "util": 35, "memory_used": ..., "memory_total": ..., ...}]}`` with
    GpuSample's fields. The file is read again at each sample, so a test can change what the GPUs look like."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.reads = 0

    def lines(self) -> list[dict[str, Any]]:
        try:
            return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        except (OSError, ValueError) as e:
            log.error("GPU trace %s cannot be read (%s); the simulated GPUs keep their last sample", self.path, e)
            return []

    def read(self, ours: Collection[int]) -> list[GpuSample]:
        lines = self.lines()
        if not lines:
            return []
        line = lines[min(self.reads, len(lines) - 1)]
        self.reads += 1
        return [gpu_sample(g) for g in line.get("gpus", [])]

    def gpus(self) -> list[Gpu]:
        """The simulated GPUs, from the trace's first line (what discovery would have found)."""
        lines = self.lines()
        return [Gpu(g.index, "simulated GPU (trace)", f"trace-{g.index}", g.memory_total)
                for g in (gpu_sample(d) for d in (lines[0].get("gpus", []) if lines else []))]

    def close(self) -> None:
        pass


def gpu_sample(d: dict[str, Any]) -> GpuSample:
    """A GpuSample from a trace line's entry (unknown keys are ignored)."""
    names = {f.name for f in dataclasses.fields(GpuSample)}
    fields = {k: v for k, v in d.items() if k in names}
    fields["processes"] = tuple(tuple(p) for p in fields.get("processes", ()))
    return GpuSample(**fields)


def read_host() -> HostSample:
    """Host CPU (since the previous call) and memory."""
    mem = psutil.virtual_memory()
    return HostSample(psutil.cpu_percent(interval=None), int(mem.available), int(mem.total))
