"""Shared memory, made by the master before it forks, that gives every process the same view of the load.

Each cell has one writer, so no lock is needed (aligned 8-byte stores are atomic on the platforms we run on):
- HTTP worker ``h`` counts the jobs it has out on model worker ``m`` and for API ``a`` (``sent[h][m]``,
  ``api[h][a]``); the sums over ``h`` are the global outstanding counts that dispatch balances on and that bound
  each API's queue. When model worker ``m`` dies, each HTTP worker sees its connection close and zeroes its own
  cell; when HTTP worker ``h`` dies, the master zeroes its row.
- Model worker ``m`` stamps ``beat[m]`` (milliseconds) while it is healthy; the master replaces it when it stops.
- Model worker ``m`` keeps the moving average of its service time for API ``a`` in ``svc[m][a]`` (microseconds), so
  dispatch can send a job where it will finish first (shortest expected delay), not merely where fewest wait.
- Model worker ``m`` adds the time its jobs spent running to ``busy[m]`` (microseconds, cumulative), which the
  rebalancer's sampler turns into a busy fraction.
- The master bumps ``routes_version`` whenever it rewrites the routing table, so an HTTP worker notices a change
  with one memory read per request, and ``status_version`` whenever it rewrites the status document (read only by
  the slow status routes, so a status change never makes the HTTP workers re-read the routes).
"""

from __future__ import annotations

import mmap
import time

MAX_HTTP = 64
MAX_MODEL = 128
MAX_APIS = 256

_ROUTES = 0
_STATUS = 1
_BEAT = 2
_SENT = _BEAT + MAX_MODEL
_API = _SENT + MAX_HTTP * MAX_MODEL
_SVC = _API + MAX_HTTP * MAX_APIS
_BUSY = _SVC + MAX_MODEL * MAX_APIS
_CELLS = _BUSY + MAX_MODEL


class Scoreboard:
    """Counters in an anonymous shared mapping, inherited by every forked worker."""

    def __init__(self) -> None:
        self._map = mmap.mmap(-1, _CELLS * 8)
        self.cells = memoryview(self._map).cast("q")
        self.http_slots = 1  # how many HTTP rows to sum; the master sets it before forking

    @property
    def routes_version(self) -> int:
        return self.cells[_ROUTES]

    def bump_routes(self) -> int:
        self.cells[_ROUTES] += 1
        return self.cells[_ROUTES]

    @property
    def status_version(self) -> int:
        return self.cells[_STATUS]

    def bump_status(self) -> int:
        self.cells[_STATUS] += 1
        return self.cells[_STATUS]

    def beat(self, model_slot: int) -> None:
        self.cells[_BEAT + model_slot] = int(time.time() * 1000)

    def last_beat(self, model_slot: int) -> float:
        return self.cells[_BEAT + model_slot] / 1000.0

    def add(self, http_slot: int, model_slot: int, api_slot: int, delta: int) -> None:
        """HTTP worker ``http_slot`` sent (+1) or settled (-1) a job on a model worker for an API."""
        c = self.cells
        c[_SENT + http_slot * MAX_MODEL + model_slot] += delta
        c[_API + http_slot * MAX_APIS + api_slot] += delta

    def set_service(self, model_slot: int, api_slot: int, seconds: float) -> None:
        self.cells[_SVC + model_slot * MAX_APIS + api_slot] = int(seconds * 1e6)

    def service(self, model_slot: int, api_slot: int) -> float:
        """Seconds a job of this API takes on this model worker (moving average; 0 until it has run one)."""
        return self.cells[_SVC + model_slot * MAX_APIS + api_slot] / 1e6

    def add_busy(self, model_slot: int, seconds: float) -> None:
        self.cells[_BUSY + model_slot] += int(seconds * 1e6)

    def busy(self, model_slot: int) -> float:
        """Seconds model worker ``model_slot`` has spent running jobs (summed over its concurrent jobs)."""
        return self.cells[_BUSY + model_slot] / 1e6

    def outstanding(self, model_slot: int) -> int:
        """Jobs sent to a model worker and not yet answered, over all HTTP workers."""
        return sum(self.cells[_SENT + model_slot : _SENT + self.http_slots * MAX_MODEL : MAX_MODEL])

    def api_outstanding(self, api_slot: int) -> int:
        """Jobs for an API not yet answered, over all HTTP workers and replicas."""
        return sum(self.cells[_API + api_slot : _API + self.http_slots * MAX_APIS : MAX_APIS])

    def clear_model(self, http_slot: int, model_slot: int, api_counts: dict[int, int]) -> None:
        """HTTP worker ``http_slot`` lost its connection to a model worker: its jobs there are settled."""
        c = self.cells
        c[_SENT + http_slot * MAX_MODEL + model_slot] = 0
        for api_slot, n in api_counts.items():
            c[_API + http_slot * MAX_APIS + api_slot] -= n

    def clear_http(self, http_slot: int) -> None:
        """An HTTP worker died: nothing it sent is outstanding any more."""
        c = self.cells
        for i in range(MAX_MODEL):
            c[_SENT + http_slot * MAX_MODEL + i] = 0
        for i in range(MAX_APIS):
            c[_API + http_slot * MAX_APIS + i] = 0
