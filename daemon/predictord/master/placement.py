"""Which model workers load which APIs: a pure function, data in, data out."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class WorkerSlot:
    """A model worker as placement sees it."""

    slot: int
    kind: str  # "cpu" or "gpu"
    label: str  # "cpu", "gpu0", ...
    owner: str | None = None  # the API it is dedicated to ([serving] isolation = "process"), None: shared
    env: str = ""  # the environment it runs in (a dedicated worker of an API with requirements), "": the daemon's


@dataclass(frozen=True)
class Want:
    """What an API asks for: a device kind and a number of replicas."""

    device: str  # "cpu", "gpu" or "any"
    replicas: int
    footprint: int = 0  # bytes one replica held at its last load (0: not measured yet)
    isolated: bool = False  # only on workers dedicated to it; never on a shared one
    env: str = ""  # only on workers of this environment ("": the daemon's own packages)


@dataclass(frozen=True)
class Placement:
    """Where an API goes, or why it cannot go anywhere; ``note`` says when it got fewer replicas than asked."""

    slots: tuple[int, ...]
    error: str | None = None
    note: str | None = None


def place(
    workers: Sequence[WorkerSlot],
    wants: Mapping[str, Want],
    current: Mapping[str, Sequence[int]] | None = None,
    room: Mapping[str, int] | None = None,
) -> dict[str, Placement]:
    """Spread each API's replicas over the workers of its device kind, fewest APIs first.

    ``any`` means the GPUs when there are any, else the CPU workers. An isolated API goes only on the workers
    dedicated to it, and no other API ever goes there. APIs keep the workers they already have
    (``current``) while those still fit, so a re-placement moves as little as possible. ``room`` is the memory a new
    replica may take on each GPU (free minus headroom, at the last sample): a replica whose measured footprint does
    not fit is not placed there, and the API says why instead of failing with CUDA out of memory.
    """
    current = current or {}
    room = dict(room or {})
    label = {w.slot: w.label for w in workers}
    load = {w.slot: 0 for w in workers}
    result: dict[str, Placement] = {}
    order = sorted(wants, key=lambda n: (-len(current.get(n, ())), n))
    for name in order:
        want = wants[name]
        kind = want.device
        if kind == "any":
            kind = "gpu" if any(w.kind == "gpu" for w in workers) else "cpu"
        owner = name if want.isolated else None
        candidates = [w.slot for w in workers if w.kind == kind and w.owner == owner and w.env == want.env]
        if not candidates and want.isolated and any(w.kind == kind for w in workers):
            result[name] = Placement((), error=f"waiting for a {kind} model worker of its own ([serving] isolation "
                                               "= \"process\")")
            continue
        if not candidates:
            what = "a GPU, and none was found (NVML)" if kind == "gpu" else (
                "a CPU model worker of its own, and none could be started" if want.isolated
                else "a CPU model worker, and [workers] cpu = 0")
            fix = 'set device = "cpu" or "any" in [serving]' if kind == "gpu" else "set [workers] cpu >= 1"
            result[name] = Placement((), error=f"device {want.device!r} needs {what}; {fix}")
            continue
        kept = [s for s in current.get(name, ()) if s in candidates][: want.replicas]
        rest = sorted((s for s in candidates if s not in kept), key=lambda s: (load[s], s))
        short = sorted({label[s] for s in rest
                        if want.footprint and room.get(label[s], want.footprint) < want.footprint})
        rest = [s for s in rest if label[s] not in short]
        chosen = tuple(sorted(kept + rest[: want.replicas - len(kept)]))
        for s in chosen:
            load[s] += 1
            if s not in kept and label[s] in room:
                room[label[s]] -= want.footprint
        note = None
        if short and len(chosen) < want.replicas:
            gib = ", ".join(f"{g} {room[g] / 2**30:.1f} GiB" for g in short)
            why = f"{want.footprint / 2**30:.1f} GiB (its measured footprint) does not fit in the room left on {gib}"
            if not chosen:
                result[name] = Placement((), error=f"not placed: {why}; free memory on a GPU or lower the model's size")
                continue
            note = f"asked for {want.replicas} replicas; {len(chosen)} placed: {why}"
        elif len(chosen) < want.replicas:
            note = f"asked for {want.replicas} replicas on {kind}; only {len(chosen)} {kind} worker(s) exist"
        result[name] = Placement(chosen, note=note)
    return result


def plan_slots(current: Mapping[int, T], wanted: Sequence[T]) -> dict[int, T]:
    """Model worker slots for the wanted devices: those already running keep their slots, new ones get free slots,
    the rest are dropped (the master retires them once their APIs are served elsewhere)."""
    remaining = list(wanted)
    plan: dict[int, T] = {}
    for slot, device in sorted(current.items()):
        if device in remaining:
            remaining.remove(device)
            plan[slot] = device
    free = (s for s in range(10**6) if s not in current and s not in plan)
    for device in remaining:
        plan[next(free)] = device
    return plan
