"""GPU discovery through NVML, never through CUDA (the master must not initialise CUDA before it forks)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


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
