"""Devices: where model workers run (``Device``), GPU discovery through NVML (never through CUDA: the master must
not initialise CUDA before it forks), and what the rebalancer samples: GPUs (NVML, or a replayed trace) and the host
(psutil). This is the one module that speaks NVML; every call is guarded, so a GPU that errors is reported unhealthy,
never raised."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import psutil

log = logging.getLogger("predictord.master")


@dataclass(frozen=True)
class Device:
    """Where a model worker runs: ``cpu`` or one GPU (its NVML index and the name shown to users)."""

    kind: str  # "cpu" or "gpu"
    index: int | None = None
    env: str = ""  # the environment a dedicated worker runs in (its folder); "": the daemon's own packages
    fresh: bool = False  # start it from a fresh interpreter of that environment, not a fork of the master

    @property
    def label(self) -> str:
        return "cpu" if self.kind == "cpu" else f"gpu{self.index}"

    @property
    def torch_device(self) -> str:
        return "cpu" if self.kind == "cpu" else "cuda"


@dataclass(frozen=True)
class Gpu:
    """One GPU as NVML reports it."""

    index: int
    name: str
    uuid: str
    memory_total: int


def discover(wanted: Any) -> tuple[list[Gpu], str]:
    """The GPUs to use (``wanted``: "all", "none" or a list of indices) and one line saying what was found."""
    if wanted == "none":
        return [], "GPUs disabled by [workers] gpus = \"none\"; running CPU-only"
    try:
        import pynvml
    except ImportError:
        return [], "nvidia-ml-py is not installed; running CPU-only"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        return [], f"no NVIDIA driver or GPU found ({e}); running CPU-only"
    try:
        gpus, notes = [], []
        for i in range(pynvml.nvmlDeviceGetCount()):
            if wanted != "all" and i not in wanted:
                continue
            try:
                h = pynvml.nvmlDeviceGetHandleByIndex(i)
                name = pynvml.nvmlDeviceGetName(h)
                gpus.append(Gpu(i, name if isinstance(name, str) else name.decode(),
                                str(pynvml.nvmlDeviceGetUUID(h)), int(pynvml.nvmlDeviceGetMemoryInfo(h).total)))
            except pynvml.NVMLError as e:  # a GPU that errors is skipped, the others still serve
                notes.append(f"GPU {i} did not answer NVML ({e}); skipping it")
        missing = [] if wanted == "all" else sorted(set(wanted) - {g.index for g in gpus})
        summary = ", ".join(f"gpu{g.index} {g.name} {g.memory_total // 2**20} MiB" for g in gpus) or "none"
        if missing:
            notes.append(f"asked for GPUs {missing}, which do not exist")
        summary = "; ".join([summary, *notes])
        return gpus, f"GPUs found: {summary}"
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass


@dataclass(frozen=True)
class GpuSample:
    """One GPU at one moment (from NVML, or from a replayed trace)."""

    index: int
    healthy: bool = True
    util: float = 0.0  # percent of the last sample period the GPU was busy
    memory_used: int = 0  # bytes
    memory_total: int = 0
    foreign_memory: int = 0  # bytes held by processes that are not ours
    foreign_util: float = 0.0  # percent taken by processes that are not ours
    error: str | None = None
    processes: tuple[tuple[int, int, bool], ...] = ()  # compute processes on it: (pid, bytes, ours)

    @property
    def label(self) -> str:
        return f"gpu{self.index}"

    @property
    def free(self) -> int:
        return max(0, self.memory_total - self.memory_used)


@dataclass(frozen=True)
class HostSample:
    """The host's CPU and memory (psutil)."""

    cpu: float = 0.0  # percent over all cores
    memory_available: int = 0
    memory_total: int = 0


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
