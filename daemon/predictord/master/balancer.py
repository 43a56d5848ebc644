"""The master's rebalancer: sample devices, queues and workers every [rebalance] interval, ask the pure policy
(``rebalance.decide``) what to change, and turn its decisions into what is wanted (replicas, worker slots); the
catalog re-plans from that, so every change is make before break like a reload."""

from __future__ import annotations

import logging
import time
from collections import deque
from pathlib import Path
from typing import Any

import psutil

from .. import metrics
from ..config import Config
from ..devices import Device, GpuReader, NvmlGpus, TraceGpus, read_host
from ..envs import EnvInfo
from ..scoreboard import MAX_MODEL, Scoreboard
from .catalog import Catalog
from .fleet import Fleet
from .placement import WorkerSlot
from .rebalance import ApiSample, Decision, Limits, PolicyState, Sample, WorkerSample, decide
from .records import Events

log = logging.getLogger("predictord.master")
SERIES = 60  # samples of each device kept for the status page


def tree_rss() -> int:
    """Resident bytes of this process and all its descendants (the daemon: master, workers, probes, builds)."""
    total = 0
    try:
        me = psutil.Process()
        for p in [me, *me.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                continue
    except psutil.Error:
        return 0
    return total


class Balancer:
    """The model worker slots wanted on each device, the policy's samples and state, and the decisions it made."""

    def __init__(self, config: Config, devices: dict[int, Device], catalog: Catalog, fleet: Fleet,
                 scoreboard: Scoreboard, events: Events) -> None:
        self.config = config
        self.devices = devices  # slot -> device: the model workers that should run
        self.catalog = catalog
        self.fleet = fleet
        self.scoreboard = scoreboard
        self.events = events
        self.gpu_reader: GpuReader | None = None
        self.window: deque[Sample] = deque(maxlen=config.rebalance.window)
        self.policy = PolicyState()
        self.next_tick = 0.0
        self.extra_slots: set[int] = set()  # model worker slots the policy added
        self.owners: dict[int, str] = {}  # slot -> the API it is dedicated to ([serving] isolation = "process")
        self.gone: dict[int, str] = {}  # slot -> why it was dropped (for the retirement's log line)
        self.drained: set[str] = set()  # GPUs the policy took out of service
        self.busy_seen: dict[int, tuple[float, float]] = {}  # slot -> (when, busy seconds) at the last sample
        self.decisions: deque[dict[str, Any]] = deque(maxlen=30)
        self.device_series: dict[str, deque[tuple[float, float]]] = {}
        self.ours = 0  # resident bytes of the daemon's processes at the last sample
        self.changed = False

    def configure(self, config: Config, devices: dict[int, Device]) -> None:
        """A reloaded config: its slots (drained GPUs stay out, added slots that went stay gone, the APIs' own
        workers stay theirs) and its sampler."""
        self.config = config
        owned = {s: d for s, d in self.devices.items() if s in self.owners}
        self.devices = {s: d for s, d in devices.items() if d.label not in self.drained and s not in owned} | owned
        for slot in set(self.extra_slots) - set(self.devices):
            self.drop_slot(slot, "its slot is no longer configured")
        self.start_sampler()
        self.catalog.needs_plan = True

    def slots(self) -> list[WorkerSlot]:
        """The wanted model workers, as placement sees them."""
        return [WorkerSlot(s, d.kind, d.label, self.owners.get(s), d.env) for s, d in self.devices.items()]

    def drop_slot(self, slot: int, why: str) -> None:
        """A model worker slot is no longer wanted: its worker is retired once its APIs are served elsewhere."""
        self.devices.pop(slot, None)
        self.extra_slots.discard(slot)
        self.owners.pop(slot, None)
        self.gone[slot] = why
        self.catalog.needs_plan = self.changed = True

    def recycle(self, slot: int, why: str) -> None:
        """Replace a model worker, make before break: a new slot on its device (shared or the same API's own), the
        old one dropped (its APIs move, then it retires)."""
        device = self.devices.get(slot)
        if device is None:
            return  # going already
        log.warning("replacing model worker %d (%s): %s", slot, device.label, why)
        self.events.add("recycle", f"model worker {slot} ({device.label}) is replaced: {why}")
        owner = self.owners.get(slot)
        env = self.catalog.env_info(owner) if owner is not None else None
        if self.add_worker(device.label, extra=slot in self.extra_slots, owner=owner, env=env) is not None:
            self.drop_slot(slot, f"replaced: {why}")

    def gone_why(self, slot: int) -> str:
        return self.gone.get(slot, "its slot is no longer configured")

    # -- model workers of their own -------------------------------------------------------------------------------
    def dedicate(self) -> None:
        """Every API with [serving] isolation = "process" has as many model workers of its own as it wants replicas
        (on its device kind); workers of APIs that no longer want them are dropped."""
        wanted = {n: r for n, r in self.catalog.apis.items() if r.isolated and not r.quarantined}
        for slot, owner in list(self.owners.items()):
            if owner not in wanted:
                self.drop_slot(slot, f"API {owner} no longer needs a model worker of its own")
        for name, record in wanted.items():
            env = self.catalog.env_info(name)
            where = str(env.path) if env is not None else ""
            for slot in [s for s, o in self.owners.items() if o == name and self.devices[s].env != where]:
                self.drop_slot(slot, f"API {name} runs in another environment now")  # retired once replaced
            mine = sorted(s for s, o in self.owners.items() if o == name)
            keep = set(record.steer if record.steer is not None else record.placement)
            while len(mine) > record.replicas_wanted():
                extra = max(mine, key=lambda s: (s not in keep, s))
                mine.remove(extra)
                self.drop_slot(extra, f"API {name} needs fewer replicas")
            while len(mine) < record.replicas_wanted():
                device = self.dedicated_device(record.settings.serving.device if record.settings else "any")
                added = self.add_worker(device, extra=False, owner=name, env=env) if device else None
                if added is None:
                    break
                mine.append(added)

    def kind_of(self, name: str) -> str | None:
        """The device kind an API runs on: cpu or gpu (any: gpu when there are GPUs); None when unknown."""
        record = self.catalog.apis.get(name)
        if record is None or record.settings is None:
            return None
        device = record.settings.serving.device
        if device != "any":
            return device
        return "gpu" if any(d.kind == "gpu" for d in self.devices.values()) else "cpu"

    def dedicated_device(self, kind: str) -> str | None:
        """Where a new worker of an API's own goes: the GPU with the fewest workers for gpu (and any, when there
        are GPUs), else the CPU; None when it asks for a GPU and there is none (placement says so)."""
        gpus = sorted({d.label for d in self.devices.values() if d.kind == "gpu"} - self.drained)
        if kind == "cpu" or (kind == "any" and not gpus):
            return "cpu"
        if not gpus:
            return None
        count = {g: sum(1 for d in self.devices.values() if d.label == g) for g in gpus}
        return min(gpus, key=lambda g: (count[g], g))

    def start_sampler(self) -> None:
        """The GPU reader: the configured trace, else NVML when there are GPUs; none for a CPU-only host."""
        if self.gpu_reader is not None:
            self.gpu_reader.close()
            self.gpu_reader = None
        self.window = deque(self.window, maxlen=self.config.rebalance.window)
        trace = self.config.gpu_trace
        indices = sorted({d.index for d in self.devices.values() if d.kind == "gpu" and d.index is not None})
        if trace is not None:
            self.gpu_reader = TraceGpus(trace)
            log.info("rebalance: GPU samples replayed from %s", trace)
        elif indices:
            try:
                self.gpu_reader = NvmlGpus(indices)
            except Exception as e:  # noqa: BLE001 - NVML raises its own error classes (and OSError without a driver)
                log.error("rebalance: NVML did not start (%s); GPUs are not sampled", e)

    def limits(self) -> Limits:
        r, w = self.config.rebalance, self.config.workers
        return Limits(window=r.window, cooldown=r.cooldown, idle_after=r.idle_after, queue_high=r.queue_high,
                      gpu_spare=r.gpu_spare, foreign_util=r.foreign_util, foreign_memory=r.foreign_memory,
                      headroom=r.headroom_mib << 20, cpu_busy=r.cpu_busy, cpu_workers_max=max(w.cpu, w.cpu_max),
                      gpu_workers_max=w.gpu_max)

    def due_in(self, now: float) -> float:
        return max(0.0, self.next_tick - now)

    def tick(self, now: float) -> None:
        """Each loop: the APIs' own workers; every interval: one sample, the policy's decisions, and each applied
        and logged with its reason."""
        self.dedicate()
        if now < self.next_tick:
            return
        self.next_tick = now + self.config.rebalance.interval
        sample = self.take_sample()
        self.window.append(sample)
        for gpu in sample.gpus:
            series = self.device_series.setdefault(gpu.label, deque(maxlen=SERIES))
            series.append((round(sample.at, 1), gpu.util))
        self.device_series.setdefault("host", deque(maxlen=SERIES)).append((round(sample.at, 1), sample.host.cpu))
        self.export_devices(sample)  # the status document carries the devices at the next publish
        self.ours = tree_rss()
        if self.catalog.unplaced():
            self.catalog.needs_plan = True  # an API that fit nowhere may fit now
        if not self.config.rebalance.enabled:
            return
        decisions, self.policy = decide(list(self.window), self.policy, self.limits())
        for decision in decisions:
            self.apply(decision)

    # -- sampling --------------------------------------------------------------------------------------------------
    def take_sample(self) -> Sample:
        now = time.time()
        ours = {h.pid for h in self.fleet.workers.values()}
        gpus = self.gpu_reader.read(ours) if self.gpu_reader is not None else []
        placed: dict[int, list[str]] = {}
        for name, record in self.catalog.apis.items():
            for slot in record.placement:
                placed.setdefault(slot, []).append(name)
        workers = []
        for slot, device in sorted(self.devices.items()):
            busy_now = self.scoreboard.busy(slot)
            when, before = self.busy_seen.get(slot, (now, busy_now))
            self.busy_seen[slot] = (now, busy_now)
            handle = self.fleet.workers.get(slot)
            names = tuple(sorted(placed.get(slot, ())))
            service = [self.scoreboard.service(slot, self.catalog.apis[n].slot) for n in names]
            workers.append(WorkerSample(slot, device.label, names,
                                        (busy_now - before) / (now - when) if now > when else 0.0,
                                        slot in self.extra_slots, handle.pid if handle else 0,
                                        self.scoreboard.outstanding(slot), sum(service) / max(1, len(service)),
                                        self.owners.get(slot)))
        has_gpu = any(d.kind == "gpu" for d in self.devices.values())
        apis = []
        for name, record in sorted(self.catalog.apis.items()):
            if record.settings is None:
                continue
            serving = record.settings.serving
            kind = serving.device if serving.device != "any" else ("gpu" if has_gpu else "cpu")
            replicas = self.fleet.replicas(name)
            service = [self.scoreboard.service(r.worker, record.slot) for r in replicas]
            apis.append(ApiSample(name, kind, record.placement, len(replicas),
                                  self.scoreboard.api_outstanding(record.slot), sum(r.threads for r in replicas),
                                  record.footprint, serving.replicas, serving.max_replicas,
                                  sum(service) / len(service) if service else 0.0, record.isolated))
        return Sample(now, read_host(), tuple(gpus), tuple(workers), tuple(apis))

    def export_devices(self, sample: Sample) -> None:
        m = metrics.get()
        for gpu in sample.gpus:
            m.device_util.labels(gpu.label).set(gpu.util)
            for use, value in (("used", gpu.memory_used), ("total", gpu.memory_total),
                               ("foreign", gpu.foreign_memory)):
                m.device_memory.labels(gpu.label, use).set(value)
        m.device_util.labels("host").set(sample.host.cpu)
        m.device_memory.labels("host", "available").set(sample.host.memory_available)
        m.device_memory.labels("host", "total").set(sample.host.memory_total)

    # -- applying decisions ----------------------------------------------------------------------------------------
    def apply(self, d: Decision) -> None:
        """A decision changes what is wanted (replicas, worker slots); the catalog re-plans from it."""
        record = self.catalog.apis.get(d.api) if d.api else None
        if d.action in ("add", "move", "remove") and record is None:
            return
        if d.action == "refuse":
            if record is not None:
                record.rebalance_note = d.text()
            log.warning("rebalance: %s", d.text())
        else:
            log.info("rebalance: %s", d.text())
        if record is not None and d.action in ("add", "move"):
            if record.isolated:  # its replicas only ever run in workers of its own
                slot = self.add_worker(d.device or "cpu", extra=False, owner=record.name,
                                       env=self.catalog.env_info(record.name))
            else:
                slot = d.into if d.into is not None else self.add_worker(d.device or "cpu")
            if slot is None:
                return
            kept = [s for s in record.placement if d.action == "add" or s != d.slot]
            steer = tuple(sorted({*kept, slot}))
            self.catalog.want(record.name, len(steer), steer)
        elif record is not None and d.action == "remove":
            steer = tuple(s for s in record.placement if s != d.slot)
            self.catalog.want(record.name, len(steer), steer, record.rebalance_note)
        elif d.action == "drain" and d.device:
            self.drained.add(d.device)
            for slot in [s for s, dev in self.devices.items() if dev.label == d.device]:
                self.drop_slot(slot, f"the rebalancer drained {d.device}")
            self.catalog.needs_plan = True
        elif d.action == "restore" and d.device:
            self.drained.discard(d.device)
            self.add_worker(d.device, extra=False)
            self.catalog.needs_plan = True
        elif d.action == "retire" and d.slot is not None:
            self.drop_slot(d.slot, "the rebalancer retired it: no API is placed on it")
        metrics.get().rebalance.labels(d.action).inc()
        self.decisions.append({"at": round(time.time(), 3), "action": d.action, "api": d.api, "device": d.device,
                               "text": d.text()})
        if d.action != "refuse":
            self.events.add("rebalance", d.text(), d.api)
        self.changed = True

    def add_worker(self, label: str, extra: bool = True, owner: str | None = None,
                   env: EnvInfo | None = None) -> int | None:
        """A new model worker slot on ``label`` (cpu, gpu0, ...), shared or dedicated to ``owner`` (in its
        environment ``env``, if it has one); the master's loop spawns it."""
        used = set(self.devices) | set(self.fleet.workers)
        free = [s for s in range(MAX_MODEL) if s not in used]
        if not free:
            log.error("no model worker slot left (%d in use)", MAX_MODEL)
            return None
        kind, index = ("cpu", None) if label == "cpu" else ("gpu", int(label.removeprefix("gpu")))
        device = Device(kind, index, str(env.path) if env else "", env.fresh if env else False)
        self.devices[free[0]] = device
        self.gone.pop(free[0], None)
        if extra:
            self.extra_slots.add(free[0])
        if owner is not None:
            self.owners[free[0]] = owner
            log.info("model worker slot %d (%s) is API %s's own%s", free[0], label, owner,
                     f" (environment {env.key}{', a fresh interpreter' if env.fresh else ''})" if env else "")
        self.catalog.needs_plan = self.changed = True
        return free[0]

    def gpu_room(self) -> dict[str, int]:
        """Memory a new replica may take on each GPU in service: free at the last sample, less the headroom."""
        last = self.window[-1] if self.window else None
        headroom = self.config.rebalance.headroom_mib << 20
        return {g.label: g.free - headroom for g in (last.gpus if last else ()) if g.label not in self.drained}

    def worker_load(self, slot: int) -> dict[str, Any]:
        """A worker's busy fraction and jobs at the last sample, and whether the rebalancer added it."""
        last = self.window[-1] if self.window else None
        w = next((w for w in last.workers if w.slot == slot), None) if last else None
        device = self.devices.get(slot)
        return {"busy": round(w.busy, 3) if w else None, "jobs": w.outstanding if w else None,
                "latency_ms": round(w.latency * 1000, 2) if w else None, "added": slot in self.extra_slots,
                "dedicated": self.owners.get(slot), "env": Path(device.env).name if device and device.env else None,
                "fresh": bool(device and device.fresh)}

    def device_status(self) -> list[dict[str, Any]]:
        """The devices as the status page and `predictord status` show them: latest sample, utilization series."""
        last = self.window[-1] if self.window else None
        out: list[dict[str, Any]] = []
        if last is None:
            return out
        workers: dict[str, int] = {}
        for w in last.workers:
            workers[w.device] = workers.get(w.device, 0) + 1
        for gpu in last.gpus:
            state = "drained" if gpu.label in self.drained else "ok" if gpu.healthy else "unhealthy"
            text = (f"{state}, util {gpu.util:.0f}%, memory {gpu.memory_used / 2**30:.1f}/"
                    f"{gpu.memory_total / 2**30:.1f} GiB, others' memory {gpu.foreign_memory / 2**30:.1f} GiB, "
                    f"others' util {gpu.foreign_util:.0f}%, {workers.get(gpu.label, 0)} worker(s)")
            if gpu.error:
                text += f"; {gpu.error}"
            out.append({"name": gpu.label, "kind": "gpu", "state": state, "util": gpu.util,
                        "memory_used": gpu.memory_used, "memory_total": gpu.memory_total,
                        "foreign_memory": gpu.foreign_memory, "foreign_util": gpu.foreign_util,
                        "workers": workers.get(gpu.label, 0), "text": text,
                        "processes": [{"pid": p, "memory": m, "ours": o} for p, m, o in gpu.processes],
                        "series": list(self.device_series.get(gpu.label, ()))})
        host = last.host
        busy = [round(w.busy, 2) for w in last.workers if w.device == "cpu"]
        out.append({"name": "host", "kind": "cpu", "state": "ok", "util": host.cpu,
                    "memory_available": host.memory_available, "memory_total": host.memory_total,
                    "memory_ours": self.ours,
                    "workers": workers.get("cpu", 0),
                    "text": f"CPU {host.cpu:.0f}%, {host.memory_available / 2**30:.1f} of "
                            f"{host.memory_total / 2**30:.1f} GiB available, {workers.get('cpu', 0)} CPU worker(s), "
                            f"busy {busy}",
                    "series": list(self.device_series.get("host", ()))})
        return out
