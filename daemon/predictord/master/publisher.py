"""What the master tells the rest of the world: the routing table (hot: every HTTP worker dispatches by it), the
status document (slow: GET /, GET /NAME, `predictord status`, the page), the gauges only the master knows, and
systemd's READY and STATUS. Two files, so a status change never makes the HTTP workers re-read the routes."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import metrics
from ..protocol import RoutingTable
from ..scoreboard import Scoreboard
from .balancer import Balancer
from .catalog import Catalog
from .fleet import Fleet
from .history import History, read_snapshot
from .notify import Notifier
from .records import Events, api_status, route

log = logging.getLogger("predictord.master")
SAMPLE_EVERY = 5.0  # seconds between the samples behind status's recent figures


def write_atomically(path: Path, data: bytes) -> None:
    """Replace a file so that readers never see half of it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@dataclass(frozen=True)
class DaemonInfo:
    """The facts about the daemon itself that the status document carries."""

    pid: int
    started_at: float
    predictors_dir: str
    http_workers: int
    reading_for: float = 0.0  # seconds the reading of the predictors directory in progress has taken


class Publisher:
    """Writes routes.json and status.json into the runtime directory and bumps their versions."""

    def __init__(self, runtime: Path, scoreboard: Scoreboard, notifier: Notifier) -> None:
        self.routes_path = runtime / "routes.json"
        self.status_path = runtime / "status.json"
        self.scoreboard = scoreboard
        self.notifier = notifier
        self.history = History()
        self.next_sample = 0.0
        self.routes = RoutingTable()
        self.exported: set[str] = set()  # APIs whose gauges were set

    def sample_due(self, now: float, catalog: Catalog) -> bool:
        """Every SAMPLE_EVERY seconds: take a snapshot of the merged metrics (and each API's outstanding requests)
        for the recent figures and the charts."""
        if now < self.next_sample:
            return False
        self.next_sample = now + SAMPLE_EVERY
        queued = {name: self.scoreboard.api_outstanding(r.slot) for name, r in catalog.apis.items() if r.slot >= 0}
        self.history.add(read_snapshot(queued=queued))
        return True

    def publish(self, catalog: Catalog, fleet: Fleet, balancer: Balancer, events: Events, info: DaemonInfo) -> None:
        """Write what changed: the routing table when routing changed, the status document always."""
        replicas = {name: fleet.replicas(name) for name in catalog.apis}
        sick = {name: fleet.unhealthy(name) for name in catalog.apis}
        table = RoutingTable({n: route(r, replicas[n], len(sick[n])) for n, r in catalog.apis.items()},
                             info.predictors_dir)
        if table != self.routes or not self.routes_path.exists():
            write_atomically(self.routes_path, table.dumps())
            self.routes = table
            self.scoreboard.bump_routes()
        apis = {name: {**api_status(record, replicas[name], sick[name]), "stats": self.history.recent(name),
                       "environment": catalog.environment_status(record)}
                for name, record in catalog.apis.items()}
        workers = [{"slot": h.slot, "pid": h.pid, "device": h.device.label, "up": h.up, "apis": dict(h.loaded),
                    "loading": sorted(h.loading), "started_at": h.started_at, "restarts": fleet.restarts.get(h.slot, 0),
                    **balancer.worker_load(h.slot)} for h in fleet]
        not_ready = {n: a["state"] for n, a in apis.items() if a["state"] != "ready"}
        loading = [n for n, state in not_ready.items() if state == "loading"]
        down = [s for s in balancer.devices if s not in fleet.workers or not fleet.workers[s].up]
        document = {
            "apis": apis,
            "workers": workers,
            "series": {name: self.history.series(name) for name in apis},
            "events": list(events.recent),
            "devices": balancer.device_status(),
            "decisions": list(balancer.decisions),
            "daemon": {"pid": info.pid, "started_at": info.started_at, "predictors_dir": info.predictors_dir,
                       "ready": not loading and not down and not catalog.probes, "not_ready": not_ready,
                       "workers_down": down, "probes": catalog.probe_status(), "reading_for": info.reading_for,
                       "not_apis": dict(catalog.notes)},
        }
        write_atomically(self.status_path, json.dumps(document, default=str).encode())
        self.scoreboard.bump_status()
        self.export_gauges(apis, fleet, balancer, info)
        self.tell_systemd(not_ready, down, len(fleet.workers), len(balancer.devices), bool(catalog.probes))
        log.debug("published: %s", {n: a["state"] for n, a in apis.items()})

    def export_gauges(self, apis: dict[str, Any], fleet: Fleet, balancer: Balancer, info: DaemonInfo) -> None:
        """Replicas by state and workers by device, as gauges (set here, in the only process that knows)."""
        m = metrics.get()
        for name in self.exported - set(apis):  # a deleted API reads 0, not its last value
            m.replicas.labels(name, "ready").set(0)
            m.replicas.labels(name, "loading").set(0)
        for name, api in apis.items():
            m.replicas.labels(name, "ready").set(len(api["replicas"]))
            m.replicas.labels(name, "loading").set(sum(1 for h in fleet if name in h.loading))
        self.exported = set(apis)
        devices = {d.label: 0 for d in balancer.devices.values()}
        for h in fleet:
            if h.up and not h.stopping:
                devices[h.device.label] = devices.get(h.device.label, 0) + 1
        for label, n in devices.items():
            m.workers.labels("model", label).set(n)
        m.workers.labels("http", "cpu").set(info.http_workers)

    def tell_systemd(self, not_ready: dict[str, str], down: list[int], workers: int, slots: int,
                     probing: bool) -> None:
        """READY=1 once every API is ready or has failed for its own reasons; STATUS= always."""
        states = list(not_ready.values())
        loading, failed = states.count("loading"), states.count("failed")
        ready = len(self.routes.apis) - loading - failed
        text = (f"{ready} APIs ready, {loading} loading, {failed} failed; "
                f"{workers - len(down)}/{slots} model workers up")
        if loading == 0 and not probing and not down:
            self.notifier.set_ready(text)
        else:
            self.notifier.status(text)
