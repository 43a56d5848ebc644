"""The master's records: each API (what it wants served, where, what went wrong), the replicas that serve it, and
the recent events a person looking at `predictord status` wants to see."""

from __future__ import annotations

import dataclasses
import re
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ..config import ApiSettings
from ..protocol import Problem, ReplicaRow, Route
from ..sources import ApiSource

Target = tuple[str, ApiSource, ApiSettings]  # version, its snapshot, its settings


@dataclass
class ApiRecord:
    """One API as the master tracks it: the version it wants served, where, and what went wrong."""

    name: str
    slot: int  # its column in the scoreboard
    source: ApiSource
    version: str  # the newest version seen on disk: its code, and -N for its N-th load again after a touch
    settings: ApiSettings | None = None  # None until the version passed its probe
    signature: dict[str, Any] | None = None
    placement: tuple[int, ...] = ()  # written by Catalog.plan only
    probing: bool = False
    error: Problem | None = None  # the last failure
    note: str | None = None
    failed_versions: set[str] = field(default_factory=set)
    loaded_at: dict[str, float] = field(default_factory=dict)  # version -> when its first replica became ready
    origin: ApiSource | None = None  # the user's files (``source`` is the snapshot that probes and workers use)
    good: Target | None = None  # the newest version that loaded: a fallback
    scale: int | None = None  # replicas the rebalancer wants (None: [serving] replicas)
    steer: tuple[int, ...] | None = None  # workers the rebalancer asked for; the next plan starts from them
    footprint: int = 0  # bytes its last load took where it runs (GPU memory on a GPU, else host memory)
    rebalance_note: str | None = None  # why the rebalancer could not give it what it needed
    request_error: Problem | None = None  # the last exception a predict() raised (request time, not load time)
    request_errors: int = 0  # how many the model workers reported
    crash: Problem | None = None  # the last time its code ended a model worker process
    crashes: list[float] = field(default_factory=list)  # monotonic times its code ended a model worker
    contained: bool = False  # its code ended a shared worker: it runs in workers of its own until it changes
    check: str | None = None  # "waiting to be checked" (probes are all busy), "being checked", or None
    quarantined: bool = False  # it ended its workers crash_limit times in crash_window: not loaded again until it
    #                            changes
    envs: dict[str, str | None] = field(default_factory=dict)  # version -> the key of its environment (None: none)
    stamp: str = ""  # its files' mtimes and folder when last seen (a change with the same code: load it again)
    health: Problem | None = None  # the last failure of its health()

    def changed(self) -> None:
        """Its files changed: a new version gets a fresh start (no crash count, no quarantine)."""
        self.crashes.clear()
        self.quarantined = self.contained = False
        if self.error is not None and self.error.kind in ("crash", "quarantine"):
            self.error = None

    @property
    def isolated(self) -> bool:
        """It runs in model workers of its own: [serving] isolation = "process", or it crashed a shared one."""
        return self.settings is not None and (self.settings.serving.isolation == "process" or self.contained
                                              or self.target_env() is not None)

    def target_env(self) -> str | None:
        """The key of the environment its target version runs in (None: the daemon's own packages)."""
        target = self.target()
        return self.envs.get(target[0]) if target is not None else None

    def target(self) -> Target | None:
        """What a worker should load now: the newest version, or while it is broken or being checked, the last
        version that loaded (None: nothing loadable yet)."""
        if self.quarantined:
            return None
        if self.settings is not None and not self.probing and self.version not in self.failed_versions:
            return self.version, self.source, self.settings
        return self.good

    def user_paths(self, problem: Problem) -> Problem:
        """A problem whose file (and message) name the snapshot, pointed at the user's files instead."""
        message = problem.message
        if self.source.home is not None:
            message = message.replace(str(self.source.root), str(self.source.home))
        return dataclasses.replace(problem, file=self.source.original(problem.file), message=message)

    @property
    def user_source(self) -> ApiSource:
        """The user's files (for messages), not the snapshot."""
        return self.origin or self.source

    def fail(self, problem: Problem, version: str | None = None) -> None:
        version = version or self.version
        self.error = problem.stamped(version)
        self.failed_versions.add(version)
        if self.good is not None and self.good[0] == version:
            self.good = None  # the fallback itself failed (a replacement worker could not load it)

    def replicas_wanted(self) -> int:
        """[serving] replicas, or what the rebalancer gave it, within max_replicas."""
        serving = self.settings.serving if self.settings else None
        if serving is None:
            return 1
        wanted = max(serving.replicas, self.scale or 0)
        return min(wanted, max(serving.replicas, serving.max_replicas)) if serving.max_replicas else wanted


@dataclass(frozen=True)
class Replica:
    """A model worker that has an API loaded and takes its jobs."""

    worker: int
    pid: int
    device: str
    socket: str
    version: str
    threads: int  # jobs at once (threads x batch size)
    marks: int = 0  # its process's row of job marks in the scoreboard
    lanes: int = 1  # predict() calls at once (threads)

    def row(self) -> ReplicaRow:
        return ReplicaRow(self.worker, self.socket, self.threads, self.version, self.marks, self.lanes)


def api_state(record: ApiRecord, replicas: list[Replica], unhealthy: int = 0) -> str:
    """ready (a replica serves it), failed (nothing serves it and it failed, or it is quarantined), unhealthy (its
    only replicas fail their health checks), or loading."""
    if record.quarantined:
        return "failed"
    if replicas:
        return "ready"
    if unhealthy:
        return "unhealthy"
    if record.error is not None and (record.version in record.failed_versions or not record.probing):
        return "failed"
    return "loading"


def api_status(record: ApiRecord, replicas: list[Replica], unhealthy: list[dict[str, Any]] | None = None
               ) -> dict[str, Any]:
    """What GET /NAME shows: state, versions, placement, last error and settings."""
    serving = dataclasses.asdict(record.settings.serving) if record.settings else None
    live = sorted({r.version for r in replicas})
    return {
        "name": record.name,
        "state": api_state(record, replicas, len(unhealthy or ())),
        "unhealthy": unhealthy or [],
        "health": record.health.as_dict() if record.health else None,
        "version": {
            "wanted": record.version,
            "serving": live,
            "loaded_at": {v: record.loaded_at.get(v) for v in live},
        },
        "source": str(record.user_source.code),
        "replicas": [{"worker": r.worker, "pid": r.pid, "device": r.device, "version": r.version} for r in replicas],
        "placement": list(record.placement),
        "signature": record.signature,
        "serving": serving,
        "error": record.error.as_dict() if record.error else None,
        "request_error": record.request_error.as_dict() if record.request_error else None,
        "request_errors": record.request_errors,
        "quarantined": record.quarantined,
        "crash": record.crash.as_dict() if record.crash else None,
        "crashes": len(record.crashes),
        "contained": record.contained,
        "check": record.check,
        "isolation": record.settings.serving.isolation if record.settings else None,
        "note": record.note,
        "rebalance": {"replicas": record.scale, "footprint": record.footprint, "note": record.rebalance_note},
    }


def route(record: ApiRecord, replicas: list[Replica], unhealthy: int = 0) -> Route:
    """What an HTTP worker needs to dispatch to an API."""
    serving = record.settings.serving if record.settings else None
    signature = record.signature or {}
    if record.quarantined:
        replicas = []  # its replicas are being unloaded: send them nothing more
    return Route(
        slot=record.slot,
        replicas=tuple(r.row() for r in replicas),
        timeout=serving.timeout if serving else 60.0,
        queue_limit=serving.queue_limit if serving else 0,
        wants_headers=any("headers" in (signature.get(m) or ()) for m in ("predict", "post_predict")),
        state=api_state(record, replicas, unhealthy),
        problem=record.error if record.error is not None or not unhealthy else record.health,
    )


class Events:
    """Recent loads, reloads, failures, restarts and rebalancing, for `predictord status` and the page."""

    def __init__(self, keep: int = 50) -> None:
        self.recent: deque[dict[str, Any]] = deque(maxlen=keep)
        self.changed = False

    def add(self, kind: str, text: str, api: str | None = None) -> None:
        """An event; ``api``: the API it is about (by default, the one a text that starts "API NAME" names)."""
        if api is None and (named := re.match(r"API (\S+)", text)):
            api = named.group(1)
        self.recent.append({"at": round(time.time(), 3), "kind": kind, "text": text, "api": api})
        self.changed = True
