"""The master's API registry: scanning the directory, probing new versions, placing replicas, and publishing the
routing table the HTTP workers read. A mixin of the Master, kept apart so each file holds one concern."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import metrics, probe
from ..config import Config, ConfigError, load_api_settings
from ..devices import Device
from ..scoreboard import MAX_APIS, Scoreboard
from ..sources import name_problem, scan, snapshot
from . import permissions
from .fleet import Fleet
from .history import History
from .notify import Notifier
from .placement import Want, WorkerSlot, place
from .records import ApiRecord, Replica, route, write_routes

log = logging.getLogger("predictord.master")
Probe = tuple[subprocess.Popen[bytes], str, float, list[bytes]]  # process, version, deadline, output so far


class ApiRegistry:
    """API records, their probes and placement, and the routing table (the Master provides the state below)."""

    pconfig: Config
    apis: dict[str, ApiRecord]
    probes: dict[str, Probe]
    fleet: Fleet
    devices: dict[int, Device]
    dirty: bool
    scoreboard: Scoreboard
    routes_path: Path
    runtime: Path
    notifier: Notifier
    started_at: float
    pid: int
    WORKERS: dict[int, Any]
    exported: set[str]
    history: History
    restarts: dict[int, int]
    events: deque[dict[str, Any]]
    decisions: deque[dict[str, Any]]
    device_status: Callable[[], list[dict[str, Any]]]
    worker_load: Callable[[int], dict[str, Any]]
    gpu_room: Callable[[], dict[str, int]]

    # -- APIs: scan, probe, place ----------------------------------------------------------------------------------
    def sync_sources(self, only: set[str] | None = None) -> None:
        """Make the API records match the directory (or just the APIs in ``only``): probe new and changed APIs,
        drop removed ones."""
        found = scan(self.pconfig.predictors_dir)
        if only is not None:
            found = {n: s for n, s in found.items() if n in only}
        for name in set(self.apis) - set(found):
            if only is None or name in only:
                log.info("API %s was removed; unloading it", name)
                self.event("removed", f"API {name} was removed")
                del self.apis[name]
        for name, source in found.items():
            version = source.version()
            record = self.apis.get(name)
            refused = record is not None and (record.error or {}).get("kind") == "permissions"
            if record is not None and record.version == version and record.origin == source:
                if not refused:
                    continue
                record.failed_versions.discard(version)  # a chmod or chown changes no content: check again
            elif record is not None:
                log.info("API %s changed (version %s -> %s); checking the new version", name, record.version,
                         version)
            else:
                log.info("API %s found (version %s); checking it", name, version)
            if record is None:
                used = {r.slot for r in self.apis.values()}
                free = sorted(set(range(MAX_APIS)) - used)
                if not free:
                    log.error("API %s: more than %d APIs; not loading it", name, MAX_APIS)
                    continue
                record = ApiRecord(name, free[0], source, version)
                self.apis[name] = record
            record.origin, record.version = source, version
            try:
                record.source = snapshot(source, self.runtime / "snapshots" / f"{name}-{version}")
            except OSError as e:
                record.fail({"message": f"cannot copy its code to check it: {e}", "file": str(source.code),
                             "line": None})
                continue
            self.start_probe(record)
        self.replace()
        self.dirty = True

    def start_probe(self, record: ApiRecord) -> None:
        problem = name_problem(record.name)
        if not problem and self.pconfig.predictors.check_permissions:
            problem = permissions.check_source(record.origin or record.source, self.pconfig.predictors_dir)
            if problem:
                log.error("API %s refused: %s", record.name, problem)
        if problem:
            kind = "name" if name_problem(record.name) else "permissions"
            record.fail({"message": problem, "file": None, "line": None, "kind": kind})
            return
        old = self.probes.pop(record.name, None)
        if old is not None:
            old[0].kill()
        record.probing = True
        proc = probe.start(record.source.folder or record.source.code, init=False, stderr=tempfile.TemporaryFile())
        os.set_blocking(proc.stdout.fileno(), False)  # type: ignore[union-attr]
        deadline = time.monotonic() + self.pconfig.predictors.load_timeout
        self.probes[record.name] = (proc, record.version, deadline, [])

    def read_probe(self, name: str) -> None:
        proc, version, _, chunks = self.probes[name]
        assert proc.stdout is not None
        try:
            data = proc.stdout.read()
        except BlockingIOError:
            return
        if data:
            chunks.append(data)
            return
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
        stderr = b""
        if proc.stderr:
            proc.stderr.seek(0)
            stderr = proc.stderr.read()
        self.finish_probe(name, probe.outcome(self.apis[name].source.code if name in self.apis else Path(name),
                                              b"".join(chunks), stderr or b"", proc.returncode))

    def finish_probe(self, name: str, result: dict[str, Any]) -> None:
        proc, version, _, _ = self.probes.pop(name)
        for stream in (proc.stdout, proc.stderr):
            if stream:
                stream.close()
        record = self.apis.get(name)
        if record is None or record.version != version:
            return  # removed or changed meanwhile; a newer probe decides
        record.probing = False
        self.dirty = True
        if not result["ok"]:
            metrics.get().loads.labels(name, "reload" if record.loaded_at else "load", "failed").inc()
            e = record.user_paths(result["error"])
            record.fail(e, version)
            where = f"{e.get('file')}:{e.get('line')}" if e.get("line") else str(e.get("file"))
            log.error("API %s version %s is broken: %s: %s", name, version, where, e["message"])
            self.event("failed", f"API {name} version {version} is broken: {where}: {e['message']}")
            return
        try:
            record.settings = load_api_settings(record.source.settings)
        except ConfigError as err:
            record.fail(record.user_paths({"message": str(err), "file": str(record.source.settings), "line": None}),
                        version)
            log.error("API %s: %s", name, err)
            return
        record.signature = result["signature"]
        log.info("API %s version %s passed its checks: predict(%s)", name, version,
                 ", ".join(result["signature"]["predict"]))
        self.replace()

    def prune_snapshots(self) -> None:
        """Drop the code copies of versions nothing will load again: not wanted, not the fallback, not on a worker."""
        keep = set()
        for name, record in self.apis.items():
            keep.add(f"{name}-{record.version}")
            if record.good is not None:
                keep.add(f"{name}-{record.good[0]}")
        for handle in self.fleet.workers.values():
            keep |= {f"{name}-{version}" for name, version in handle.loaded.items()}
            keep |= {f"{name}-{version}" for name, (version, _) in handle.loading.items()}
        root = self.runtime / "snapshots"
        for entry in root.iterdir() if root.is_dir() else ():
            if entry.name not in keep:
                shutil.rmtree(entry, ignore_errors=True)

    def event(self, kind: str, text: str) -> None:
        """Something a person looking at `predictord status` wants to know happened."""
        self.events.append({"at": round(time.time(), 3), "kind": kind, "text": text})
        self.dirty = True

    def replace(self) -> None:
        """Recompute where every API goes (pure placement), keeping what already runs where it is."""
        slots = [WorkerSlot(s, d.kind, d.label) for s, d in self.devices.items()]
        wants = {n: Want(r.settings.serving.device, _replicas(r), r.footprint)
                 for n, r in self.apis.items() if r.settings is not None}
        placed = place(slots, wants, {n: r.placement for n, r in self.apis.items()}, self.gpu_room())
        for name, p in placed.items():
            record = self.apis[name]
            before = (record.placement, record.note, record.error)
            record.placement, record.note = p.slots, p.note
            if p.error:
                record.error = {"message": p.error, "file": str(record.user_source.settings), "line": None,
                                "version": record.version}
            self.dirty |= (record.placement, record.note, record.error) != before

    def export_gauges(self, apis: dict[str, Any]) -> None:
        """Replicas by state and workers by device, as gauges (set here, in the only process that knows)."""
        m = metrics.get()
        for name in set(self.exported) - set(apis):  # a deleted API reads 0, not its last value
            m.replicas.labels(name, "ready").set(0)
            m.replicas.labels(name, "loading").set(0)
        for name, api in apis.items():
            m.replicas.labels(name, "ready").set(len(api["replicas"]))
            m.replicas.labels(name, "loading").set(sum(1 for h in self.fleet.workers.values() if name in h.loading))
        self.exported = set(apis)
        devices = {d.label: 0 for d in self.devices.values()}
        for h in self.fleet.workers.values():
            if h.up and not h.stopping:
                devices[h.device.label] = devices.get(h.device.label, 0) + 1
        for label, n in devices.items():
            m.workers.labels("model", label).set(n)
        m.workers.labels("http", "cpu").set(len(self.WORKERS))

    def tell_systemd(self, apis: dict[str, Any], down: list[int]) -> None:
        """READY=1 once every API is ready or has failed for its own reasons; STATUS= always."""
        states = [a["status"]["state"] for a in apis.values()]
        counts = {s: states.count(s) for s in ("ready", "loading", "failed")}
        text = (f"{counts['ready']} APIs ready, {counts['loading']} loading, {counts['failed']} failed; "
                f"{len(self.fleet.workers) - len(down)}/{len(self.devices)} model workers up")
        if counts["loading"] == 0 and not self.probes and not down:
            self.notifier.set_ready(text)
        else:
            self.notifier.status(text)

    # -- the routing table -----------------------------------------------------------------------------------------
    def replicas(self, name: str) -> list[Replica]:
        return [Replica(h.slot, h.pid, h.device.label, h.socket_path, h.loaded[name], h.threads.get(name, 1))
                for h in self.fleet.workers.values()
                if name in h.loaded and name not in h.unloading and not h.stopping]

    def publish(self) -> None:
        """Write the routing table and bump its version; HTTP workers pick it up on their next request."""
        apis = {name: route(record, self.replicas(name)) for name, record in self.apis.items()}
        for name, api in apis.items():
            api["status"]["stats"] = self.history.recent(name)
        workers = [{"slot": h.slot, "pid": h.pid, "device": h.device.label, "up": h.up, "apis": dict(h.loaded),
                    "loading": sorted(h.loading), "started_at": h.started_at, "restarts": self.restarts.get(h.slot, 0),
                    **self.worker_load(h.slot)}
                   for h in self.fleet.workers.values()]
        not_ready = {n: a["status"]["state"] for n, a in apis.items() if a["status"]["state"] != "ready"}
        down = [s for s in self.devices if s not in self.fleet.workers or not self.fleet.workers[s].up]
        write_routes(self.routes_path, {
            "apis": apis,
            "workers": workers,
            "series": {name: self.history.series(name) for name in apis},
            "events": list(self.events),
            "devices": self.device_status(),
            "decisions": list(self.decisions),
            "daemon": {"pid": self.pid, "started_at": self.started_at, "predictors_dir":
                       str(self.pconfig.predictors_dir), "ready": not not_ready and not down and not self.probes,
                       "not_ready": not_ready, "workers_down": down},
        })
        self.scoreboard.bump_routes()
        self.dirty = False
        self.export_gauges(apis)
        self.tell_systemd(apis, down)
        log.debug("routes published: %s", {n: a["status"]["state"] for n, a in apis.items()})


def _replicas(record: ApiRecord) -> int:
    """How many replicas an API gets: [serving] replicas, or what the rebalancer gave it within max_replicas."""
    serving = record.settings.serving if record.settings else None
    if serving is None:
        return 1
    wanted = max(serving.replicas, record.scale or 0)
    return min(wanted, max(serving.replicas, serving.max_replicas)) if serving.max_replicas else wanted
