"""The rebalance policy: a window of samples in, decisions out. Pure: no I/O, no clock, no processes.

Every rule needs its condition to hold over the whole window (hysteresis) and leaves an API alone for ``cooldown``
seconds after a change to it, so oscillating load never flaps replicas on and off. The master applies the decisions
through the same make-before-break mechanism as a reload.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from ..devices import GpuSample, HostSample

GIB = float(1 << 30)


@dataclass(frozen=True)
class WorkerSample:
    """One model worker: where it runs, what placement has on it, and how busy it was."""

    slot: int
    device: str  # "cpu", "gpu0", ...
    apis: tuple[str, ...] = ()
    busy: float = 0.0  # fraction of the sample period spent running jobs (summed over its threads)
    extra: bool = False  # added by the policy (it may retire it), not configured
    pid: int = 0
    outstanding: int = 0  # jobs sent to it and not yet answered (its queue plus what it runs)
    latency: float = 0.0  # seconds a job takes on it (the average of its APIs' service times)
    owner: str | None = None  # the API it is dedicated to, None: shared


@dataclass(frozen=True)
class ApiSample:
    """One API: its replicas, its load and its bounds."""

    name: str
    kind: str  # "cpu" or "gpu": the device kind its replicas need
    slots: tuple[int, ...] = ()  # the workers placement gives it
    ready: int = 0  # replicas serving now
    outstanding: int = 0  # requests in flight, queued or running
    capacity: int = 0  # requests its ready replicas run at once
    footprint: int = 0  # bytes one replica holds where it runs (0: not measured yet)
    min_replicas: int = 1
    max_replicas: int = 0  # 0: as many as the workers allow
    latency: float = 0.0  # seconds a job takes (the replicas' average service time)
    isolated: bool = False  # it runs only on workers of its own (a new replica is a new worker)

    @property
    def queued(self) -> int:
        return max(0, self.outstanding - self.capacity)


@dataclass(frozen=True)
class Sample:
    """Everything the policy sees at one moment."""

    at: float
    host: HostSample = field(default_factory=HostSample)
    gpus: tuple[GpuSample, ...] = ()
    workers: tuple[WorkerSample, ...] = ()
    apis: tuple[ApiSample, ...] = ()

    def api(self, name: str) -> ApiSample | None:
        return next((a for a in self.apis if a.name == name), None)

    def gpu(self, label: str) -> GpuSample | None:
        return next((g for g in self.gpus if g.label == label), None)


@dataclass(frozen=True)
class Limits:
    """The policy's thresholds and bounds ([rebalance] and [workers] in config.toml)."""

    window: int = 5
    cooldown: float = 30.0
    idle_after: float = 120.0
    queue_high: float = 2.0
    gpu_spare: float = 70.0
    foreign_util: float = 50.0
    foreign_memory: float = 0.5
    headroom: int = 1 << 30
    cpu_busy: float = 85.0
    cpu_workers_max: int = 1
    gpu_workers_max: int = 2


@dataclass(frozen=True)
class Decision:
    """One change and why. ``action``: add, remove or move a replica; drain or restore a GPU; retire an idle added
    worker; refuse (an add or move that does not fit: the reason is shown on the API)."""

    action: str
    api: str | None = None
    device: str | None = None  # where it goes (add, move, restore) or what is drained
    slot: int | None = None  # the worker it leaves (remove, move) or that goes (retire)
    reason: str = ""
    into: int | None = None  # add, move: the existing worker to load it on (None: start a new one on ``device``)

    def text(self) -> str:
        what = {"add": f"+1 replica of {self.api} on {self.device}",
                "remove": f"-1 replica of {self.api} from {self.device} (worker {self.slot})",
                "move": f"moving a replica of {self.api} from worker {self.slot} to {self.device}",
                "drain": f"draining {self.device}", "restore": f"using {self.device} again",
                "retire": f"retiring worker {self.slot} ({self.device})",
                "refuse": f"not adding a replica of {self.api}"}[self.action]
        return f"{what}: {self.reason}"


@dataclass(frozen=True)
class PolicyState:
    """What the policy remembers between samples."""

    changed_at: Mapping[str, float] = field(default_factory=dict)  # API -> its last change (cool-down)
    busy_at: Mapping[str, float] = field(default_factory=dict)  # API -> the last sample with requests in flight
    drained: frozenset[str] = frozenset()  # GPUs taken out of service
    refused: Mapping[str, str] = field(default_factory=dict)  # API -> the reason last given (said once)


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def _pressured(gpu: GpuSample, limits: Limits) -> str | None:
    """Why a GPU counts as taken by someone else's work, or None."""
    if gpu.foreign_util >= limits.foreign_util:
        return f"other processes use {gpu.foreign_util:.0f}% of it"
    if gpu.memory_total and gpu.foreign_memory >= limits.foreign_memory * gpu.memory_total:
        return f"other processes hold {_gib(gpu.foreign_memory)} of {_gib(gpu.memory_total)}"
    return None


class _Plan:
    """The workers as this round of decisions leaves them, so two decisions never claim the same room."""

    def __init__(self, sample: Sample, limits: Limits, drained: Iterable[str]) -> None:
        self.sample, self.limits = sample, limits
        self.apis_on = {w.slot: set(w.apis) for w in sample.workers}
        self.device_of = {w.slot: w.device for w in sample.workers}
        self.owner_of = {w.slot: w.owner for w in sample.workers}
        self.extra = {w.slot for w in sample.workers if w.extra}
        self.new_workers: dict[str, int] = {}  # device -> workers this round will start
        self.claimed: dict[str, int] = {}  # GPU -> bytes this round places on it
        self.drained = set(drained)

    def workers_on(self, device: str, owner: str | None = None) -> int:
        """Workers on ``device``: the shared ones, or those of one API's own."""
        return sum(1 for s, d in self.device_of.items() if d == device and self.owner_of.get(s) == owner) + \
            self.new_workers.get(f"{device}/{owner}" if owner else device, 0)

    def room(self, api: ApiSample, device: str) -> tuple[int | None, str | None]:
        """A worker on ``device`` that can take a replica of ``api`` (None: start one), or why none can. An isolated
        API's replica always starts a worker of its own."""
        owner = api.name if api.isolated else None
        free = sorted((len(apis), slot) for slot, apis in self.apis_on.items()
                      if self.device_of[slot] == device and api.name not in apis and self.owner_of.get(slot) == owner)
        if free:
            return free[0][1], None
        cap = self.limits.cpu_workers_max if device == "cpu" else self.limits.gpu_workers_max
        if self.workers_on(device, owner) < cap:
            return None, None
        return None, f"{device} already runs its most workers ({cap})"

    def gpu_fits(self, api: ApiSample, gpu: GpuSample) -> str | None:
        """Why a replica of ``api`` cannot go on ``gpu``, or None."""
        if gpu.label in self.drained or not gpu.healthy:
            return f"{gpu.label} is out of service"
        pressure = _pressured(gpu, self.limits)
        if pressure:
            return f"{gpu.label}: {pressure}"
        if gpu.util >= self.limits.gpu_spare:
            return f"{gpu.label} is {gpu.util:.0f}% busy"
        need = api.footprint + self.limits.headroom
        free = gpu.free - self.claimed.get(gpu.label, 0)
        if api.footprint and free < need:
            return f"{gpu.label} has {_gib(free)} free, {_gib(need)} needed ({_gib(api.footprint)} measured + headroom)"
        return None

    def choose(self, api: ApiSample, avoid: str | None = None) -> tuple[str, int | None] | str:
        """Where a new replica of ``api`` goes: (device, worker or None to start one), or why nowhere."""
        if api.kind == "cpu":
            host = self.sample.host
            if host.cpu >= self.limits.cpu_busy:
                return f"the host CPU is {host.cpu:.0f}% busy"
            need = api.footprint + self.limits.headroom
            if api.footprint and host.memory_available < need:
                return f"the host has {_gib(host.memory_available)} available, {_gib(need)} needed"
            slot, why = self.room(api, "cpu")
            return why if why else ("cpu", slot)
        reasons = []
        for gpu in sorted(self.sample.gpus, key=lambda g: (g.util, -g.free, g.index)):
            if gpu.label == avoid:
                continue
            why = self.gpu_fits(api, gpu)
            if why is None:
                slot, why = self.room(api, gpu.label)
                if why is None:
                    return gpu.label, slot
            reasons.append(why)
        return "; ".join(reasons) or "no GPU is in service"

    def take(self, api: ApiSample, device: str, slot: int | None) -> None:
        if slot is None:
            key = f"{device}/{api.name}" if api.isolated else device
            self.new_workers[key] = self.new_workers.get(key, 0) + 1
        else:
            self.apis_on[slot].add(api.name)
        if device != "cpu":
            self.claimed[device] = self.claimed.get(device, 0) + api.footprint


def _gist(reason: str) -> str:
    """A reason without its figures: a refusal is said again only when its cause changes, not its numbers."""
    return re.sub(r"[0-9.]+", "#", reason)


def _where(sample: Sample, device: str, api: ApiSample | None = None) -> str:
    """The figures behind a decision about ``device``: queue, utilization and free memory."""
    parts = [f"queue {api.queued}"] if api is not None else []
    if device == "cpu":
        parts += [f"host CPU {sample.host.cpu:.0f}%", f"available {_gib(sample.host.memory_available)}"]
    else:
        gpu = sample.gpu(device)
        if gpu is not None:
            parts += [f"util {gpu.util:.0f}%", f"free {_gib(gpu.free)}"]
    return ", ".join(parts)


def decide(window: Sequence[Sample], state: PolicyState, limits: Limits) -> tuple[list[Decision], PolicyState]:
    """The decisions for the newest sample, given the ones before it, and the state to remember."""
    if not window:
        return [], state
    now, last = window[-1].at, window[-1]
    recent = list(window[-limits.window:])
    full = len(recent) >= limits.window
    changed = dict(state.changed_at)
    busy = {a.name: (now if a.outstanding else state.busy_at.get(a.name, now)) for a in last.apis}
    refused = {n: r for n, r in state.refused.items() if n in busy}
    drained = set(state.drained)
    out: list[Decision] = []

    def cooled(name: str) -> bool:
        return now - changed.get(name, float("-inf")) >= limits.cooldown

    def refuse(d: Decision) -> None:
        """Say a refusal once; again only when its cause changes."""
        if d.api is not None and refused.get(d.api) != _gist(d.reason):
            out.append(d)
            refused[d.api] = _gist(d.reason)

    def claim(api: ApiSample, d: Decision) -> None:
        """Make an add or a move, and keep its room from the decisions after it."""
        plan.take(api, d.device or api.kind, d.into)
        changed[api.name] = now
        refused.pop(api.name, None)
        out.append(d)

    # A GPU that errors is drained at once; it comes back only after a whole window of healthy samples.
    for gpu in last.gpus:
        if not gpu.healthy and gpu.label not in drained:
            drained.add(gpu.label)
            out.append(Decision("drain", device=gpu.label, reason=gpu.error or "NVML stopped answering for it"))
        elif gpu.label in drained and full and all((s.gpu(gpu.label) or gpu).healthy for s in recent):
            drained.discard(gpu.label)
            out.append(Decision("restore", device=gpu.label, reason=f"healthy for {len(recent)} samples"))

    plan = _Plan(last, limits, drained)
    by_slot = {w.slot: w for w in last.workers}

    # Work on a GPU that someone else saturates moves to a GPU with headroom, one replica per API per cool-down.
    pressured: dict[str, str] = {}
    for gpu in last.gpus:
        why = _pressured(gpu, limits)
        if why and full and gpu.healthy and gpu.label not in drained and all(
                (g := s.gpu(gpu.label)) is not None and _pressured(g, limits) for s in recent):
            pressured[gpu.label] = why
    for api in last.apis:
        if api.kind != "gpu" or not cooled(api.name):
            continue
        stuck = [s for s in api.slots if s in by_slot and by_slot[s].device in pressured]
        if not stuck:
            continue
        source = by_slot[stuck[0]].device
        target = plan.choose(api, avoid=source)
        if isinstance(target, str):
            refuse(Decision("refuse", api.name, source, stuck[0],
                            f"{source}: {pressured[source]}, and no other GPU fits: {target}"))
        else:
            claim(api, Decision("move", api.name, target[0], stuck[0],
                                f"{source}: {pressured[source]}; {target[0]}: {_where(last, target[0])}", target[1]))

    # A queue that stays above queue_high per replica for the whole window adds a replica where it fits.
    for api in sorted(last.apis, key=lambda a: -a.queued):
        if not full or not cooled(api.name) or api.ready < len(api.slots):
            continue  # still loading one: see what it does first
        history = [s.api(api.name) for s in recent]
        if not all(h is not None and h.queued >= limits.queue_high * max(1, h.ready) for h in history):
            continue
        where = (f"it has max_replicas = {api.max_replicas}" if api.max_replicas and len(api.slots) >= api.max_replicas
                 else plan.choose(api))
        if isinstance(where, str):
            refuse(Decision("refuse", api.name, api.kind, None, f"queue {api.queued}, but {where}"))
        else:
            claim(api, Decision("add", api.name, where[0], None, _where(last, where[0], api), where[1]))

    # An API idle for idle_after gives back its added replicas, newest-added workers first, down to its minimum.
    for api in last.apis:
        idle = now - busy[api.name]
        if len(api.slots) <= api.min_replicas or idle < limits.idle_after or not cooled(api.name):
            continue
        slot = max(api.slots, key=lambda s: (s in plan.extra, s))
        device = by_slot[slot].device if slot in by_slot else "?"
        changed[api.name] = now
        plan.apis_on.get(slot, set()).discard(api.name)
        out.append(Decision("remove", api.name, device, slot,
                            f"no requests for {idle:.0f}s; {len(api.slots) - 1} replica(s) stay"))

    # A worker the policy added that no API is placed on any more is retired.
    for w in last.workers:
        if w.extra and not plan.apis_on.get(w.slot):
            out.append(Decision("retire", device=w.device, slot=w.slot, reason="no API is placed on it"))

    new_state = replace(state, changed_at=changed, busy_at=busy, drained=frozenset(drained), refused=refused)
    return out, new_state
