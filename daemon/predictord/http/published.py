"""What the master publishes for the HTTP workers: the routing table and the status document, two files.

The routing table (``routes.json``) is read on every request's path, the status document (``status.json``) only by
the status routes. Each has its counter on the scoreboard, and a worker re-reads a file only when its counter moved:
one memory read per request, and a status change (stats, events, every few seconds) never costs the hot path a read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..protocol import RoutingTable
from ..scoreboard import Scoreboard

ROUTES_FILE = "routes.json"  # RoutingTable.dumps(); the master bumps scoreboard.routes_version after writing it
STATUS_FILE = "status.json"  # the status document; the master bumps scoreboard.status_version after writing it


def starting_status() -> dict[str, Any]:
    """The status document before the master has written one: no API, no worker, not ready."""
    return {"apis": {}, "workers": [], "daemon": {"ready": False, "not_ready": {}, "workers_down": []}}


class Published:
    """The master's two files, each re-read only when its counter on the scoreboard has moved."""

    def __init__(self, scoreboard: Scoreboard, runtime: Path) -> None:
        self.scoreboard = scoreboard
        self.routes_path = runtime / ROUTES_FILE
        self.status_path = runtime / STATUS_FILE
        self._routes = RoutingTable()
        self._routes_version = -1
        self._status = starting_status()
        self._status_version = -1

    def routes(self) -> RoutingTable:
        """The current routing table (the hot path calls this on every request)."""
        version = self.scoreboard.routes_version
        if version != self._routes_version:
            try:
                self._routes = RoutingTable.loads(self.routes_path.read_bytes())
                self._routes_version = version
            except (OSError, ValueError):
                pass  # not written yet: keep the last table
        return self._routes

    def status(self) -> dict[str, Any]:
        """The current status document: ``apis`` (each API's GET /NAME), workers, series, events, devices,
        decisions and ``daemon`` (pid, started_at, predictors_dir, ready, not_ready, workers_down)."""
        version = self.scoreboard.status_version
        if version != self._status_version:
            try:
                loaded = json.loads(self.status_path.read_bytes())
            except (OSError, ValueError):
                return self._status  # not written yet: keep the last document
            self._status, self._status_version = loaded, version
        return self._status
