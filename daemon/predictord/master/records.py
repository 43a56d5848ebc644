"""The master's record of each API, and the routing table it publishes to the HTTP workers."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ApiSettings
from ..sources import ApiSource


@dataclass
class ApiRecord:
    """One API as the master tracks it: the version it wants served, where, and what went wrong."""

    name: str
    slot: int  # its column in the scoreboard
    source: ApiSource
    version: str  # the newest version seen on disk
    settings: ApiSettings | None = None  # None until the version passed its probe
    signature: dict[str, Any] | None = None
    placement: tuple[int, ...] = ()
    probing: bool = False
    error: dict[str, Any] | None = None  # the last failure: message, file, line, version
    note: str | None = None
    failed_versions: set[str] = field(default_factory=set)
    loaded_at: dict[str, float] = field(default_factory=dict)  # version -> when its first replica became ready
    origin: ApiSource | None = None  # the user's files (``source`` is the snapshot that probes and workers use)
    good: tuple[str, ApiSource, ApiSettings] | None = None  # the newest version that loaded: a fallback
    scale: int | None = None  # replicas the rebalancer wants (None: [serving] replicas)
    footprint: int = 0  # bytes its last load took where it runs (GPU memory on a GPU, else host memory)
    rebalance_note: str | None = None  # why the rebalancer could not give it what it needed

    def target(self) -> tuple[str, ApiSource, ApiSettings] | None:
        """What a worker should load now: the newest version, or while it is broken or being checked, the last
        version that loaded (None: nothing loadable yet)."""
        if self.settings is not None and not self.probing and self.version not in self.failed_versions:
            return self.version, self.source, self.settings
        return self.good

    def user_paths(self, error: dict[str, Any]) -> dict[str, Any]:
        """An error whose file (and message) name the snapshot, pointed at the user's files instead."""
        message = str(error.get("message", ""))
        if self.source.home is not None:
            message = message.replace(str(self.source.root), str(self.source.home))
        return {**error, "file": self.source.original(error.get("file")), "message": message}

    @property
    def user_source(self) -> ApiSource:
        """The user's files (for messages), not the snapshot."""
        return self.origin or self.source

    def fail(self, error: dict[str, Any], version: str | None = None) -> None:
        self.error = {**error, "version": version or self.version, "at": time.time()}
        self.failed_versions.add(version or self.version)
        if self.good is not None and self.good[0] == (version or self.version):
            self.good = None  # the fallback itself failed (a replacement worker could not load it)


@dataclass(frozen=True)
class Replica:
    """A model worker that has an API loaded and takes its jobs."""

    slot: int
    pid: int
    device: str
    socket: str
    version: str
    threads: int


def api_state(record: ApiRecord, replicas: list[Replica]) -> str:
    """ready (a replica serves it), failed (nothing serves it and it failed), or loading."""
    if replicas:
        return "ready"
    if record.error is not None and (record.version in record.failed_versions or not record.probing):
        return "failed"
    return "loading"


def api_status(record: ApiRecord, replicas: list[Replica]) -> dict[str, Any]:
    """What GET /NAME shows: state, versions, placement, last error and settings."""
    serving = dataclasses.asdict(record.settings.serving) if record.settings else None
    live = sorted({r.version for r in replicas})
    return {
        "name": record.name,
        "state": api_state(record, replicas),
        "version": {
            "wanted": record.version,
            "serving": live,
            "loaded_at": {v: record.loaded_at.get(v) for v in live},
        },
        "source": str((record.origin or record.source).code),
        "replicas": [{"worker": r.slot, "pid": r.pid, "device": r.device, "version": r.version} for r in replicas],
        "placement": list(record.placement),
        "signature": record.signature,
        "serving": serving,
        "error": record.error,
        "note": record.note,
        "rebalance": {"replicas": record.scale, "footprint": record.footprint, "note": record.rebalance_note},
    }


def route(record: ApiRecord, replicas: list[Replica]) -> dict[str, Any]:
    """What an HTTP worker needs to dispatch to an API, plus its status document."""
    serving = record.settings.serving if record.settings else None
    return {
        "slot": record.slot,
        "replicas": [[r.slot, r.socket, r.threads, r.version] for r in replicas],
        "timeout": serving.timeout if serving else 60.0,
        "queue_limit": serving.queue_limit if serving else 0,
        "wants_headers": any("headers" in ((record.signature or {}).get(m) or ()) for m in ("predict", "post_predict")),
        "status": api_status(record, replicas),
    }


def write_routes(path: Path, routes: dict[str, Any]) -> None:
    """Replace the routing table atomically (readers never see half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(routes, default=str))
    os.replace(tmp, path)
