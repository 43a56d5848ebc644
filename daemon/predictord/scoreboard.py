"""Shared memory, made by the master before it forks, that gives every process the same view of the load.

Each cell has one writer, so no lock is needed (aligned 8-byte stores are atomic on the platforms we run on):
- HTTP worker ``h`` counts the jobs it has out on model worker ``m`` and for API ``a`` (``sent[h][m]``,
  ``api[h][a]``); the sums over ``h`` are the global outstanding counts that dispatch balances on and that bound
  each API's queue. When model worker ``m`` dies, each HTTP worker sees its connection close and zeroes its own
  cell; when HTTP worker ``h`` dies, the master zeroes its row.
- Model worker ``m`` stamps ``beat[m]`` (milliseconds) while it is healthy; the master replaces it when it stops.
- Model worker ``m`` keeps the moving average of its service time for API ``a`` in ``svc[m][a]`` (microseconds), so
  dispatch can send a job where it will finish first (shortest expected delay), not merely where fewest wait.
- Model worker ``m`` publishes, per API ``a``, the line ``fixed + n * per_job`` through what its predict() calls of n
  jobs took, measured per batch size (``cost[m][a]``, nanoseconds; costs.py): dispatch's estimate of when a job
  sent there would finish, batches ahead included.
- Model worker ``m`` adds the time its jobs spent running to ``busy[m]`` (microseconds, cumulative), which the
  rebalancer's sampler turns into a busy fraction.
- Model worker process ``g`` (rows by spawn generation, so a replacement in the same slot writes a fresh row and
  the dead one's is still there to read) marks each job it starts in ``run[g]`` (API column and job id) and clears
  the mark once the reply has left; its ``os._exit`` hook notes which API called it. When a worker dies, an HTTP
  worker tells the jobs that never started (sent again, to another replica) from those inside ``predict()`` (they
  fail), and the master reads which API was running. The master notes there why it ended a worker itself.
- The master bumps ``routes_version`` whenever it rewrites the routing table, so an HTTP worker notices a change
  with one memory read per request, and ``status_version`` whenever it rewrites the status document (read only by
  the slow status routes, so a status change never makes the HTTP workers re-read the routes).
"""

from __future__ import annotations

import mmap
import os
import time

MAX_HTTP = 64
MAX_MODEL = 128

_ROUTES = 0
_STATUS = 1
_MASTER = 2  # the master's loop stamps it every tick (milliseconds): /healthz reads it
_DRAINING = 3  # 1 from SIGTERM on, while [server] drain_delay runs: /readyz answers 503, requests are still served
_BEAT = 4
_SENT = _BEAT + MAX_MODEL
_TOWARD = _SENT + MAX_HTTP * MAX_MODEL  # [http][process row]: jobs of batching APIs sent there, ever
_TAKEN = _TOWARD + MAX_HTTP * 2 * MAX_MODEL  # [process row]: those the process took off its sockets, ever
_API = _TAKEN + 2 * MAX_MODEL  # the API-sized regions follow, at offsets each Scoreboard computes
RUN_ROWS = 2 * MAX_MODEL
RUN_CELLS = 256  # per row: 3 cells of facts about the process, then one per job it runs at once
_R_EXIT, _R_KILLED, _R_OVERFLOW, _R_JOBS = 0, 1, 2, 3
API_SHIFT = 48  # a job mark: (API column + 1) << API_SHIFT | job id (HTTP workers' job ids stay below 2**48)
JOB_BITS = (1 << API_SHIFT) - 1


def job_ids_of(http_slot: int) -> int:
    """The first job id HTTP worker ``http_slot`` uses: ids are unique over all HTTP workers (the slot in bits 40+)."""
    return (http_slot << 40) + 1


class Scoreboard:
    """Counters in an anonymous shared mapping, inherited by every forked worker."""

    def __init__(self, apis: int = 1024, fd: int | None = None) -> None:
        self.apis = apis  # API columns: [predictors] max_apis
        self._svc = _API + MAX_HTTP * apis
        self._busy = self._svc + MAX_MODEL * apis
        self._run = self._busy + MAX_MODEL
        self._cost = self._run + RUN_ROWS * RUN_CELLS  # [model][api]: (fixed, per job) nanoseconds (costs.py)
        size = (self._cost + MAX_MODEL * apis * 2) * 8
        if fd is None:  # a memfd, not an anonymous mapping: a worker started by exec (not fork) maps it by its fd
            fd = os.memfd_create("predictord-scoreboard", os.MFD_CLOEXEC)
            os.ftruncate(fd, size)
        self.fd = fd
        self._map = mmap.mmap(fd, size)
        self.cells = memoryview(self._map).cast("q")
        self.http_slots = 1  # how many HTTP rows to sum; the master sets it before forking

    def beat_master(self) -> None:
        self.cells[_MASTER] = int(time.time() * 1000)

    def master_beat(self) -> float:
        """When the master's loop last ticked (wall clock seconds; 0 before its first tick)."""
        return self.cells[_MASTER] / 1000.0

    def set_draining(self) -> None:
        self.cells[_DRAINING] = 1

    @property
    def draining(self) -> bool:
        """The master got SIGTERM and is about to stop: balancers should take this host out (see /readyz)."""
        return bool(self.cells[_DRAINING])

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
        c[_API + http_slot * self.apis + api_slot] += delta

    def set_service(self, model_slot: int, api_slot: int, seconds: float) -> None:
        self.cells[self._svc + model_slot * self.apis + api_slot] = int(seconds * 1e6)

    def service(self, model_slot: int, api_slot: int) -> float:
        """Seconds a job of this API takes on this model worker (moving average; 0 until it has run one)."""
        return self.cells[self._svc + model_slot * self.apis + api_slot] / 1e6

    def set_cost(self, model_slot: int, api_slot: int, fixed: float, per_job: float) -> None:
        """The line through what a predict() of n jobs of this API costs on this model worker (costs.py)."""
        i = self._cost + (model_slot * self.apis + api_slot) * 2
        self.cells[i] = int(fixed * 1e9)
        self.cells[i + 1] = int(per_job * 1e9)

    def cost(self, model_slot: int, api_slot: int) -> tuple[float, float]:
        """(fixed, per job) seconds of a predict() of this API here; (0, 0) until it has run one."""
        i = self._cost + (model_slot * self.apis + api_slot) * 2
        return self.cells[i] / 1e9, self.cells[i + 1] / 1e9

    def add_busy(self, model_slot: int, seconds: float) -> None:
        self.cells[self._busy + model_slot] += int(seconds * 1e6)

    def busy(self, model_slot: int) -> float:
        """Seconds model worker ``model_slot`` has spent running jobs (summed over its concurrent jobs)."""
        return self.cells[self._busy + model_slot] / 1e6

    def outstanding(self, model_slot: int) -> int:
        """Jobs sent to a model worker and not yet answered, over all HTTP workers."""
        return sum(self.cells[_SENT + model_slot : _SENT + self.http_slots * MAX_MODEL : MAX_MODEL])

    def api_outstanding(self, api_slot: int) -> int:
        """Jobs for an API not yet answered, over all HTTP workers and replicas."""
        return sum(self.cells[_API + api_slot : _API + self.http_slots * self.apis : self.apis])

    def clear_model(self, http_slot: int, model_slot: int, api_counts: dict[int, int]) -> None:
        """HTTP worker ``http_slot`` lost its connection to a model worker: its jobs there are settled."""
        c = self.cells
        c[_SENT + http_slot * MAX_MODEL + model_slot] = 0
        for api_slot, n in api_counts.items():
            c[_API + http_slot * self.apis + api_slot] -= n

    # -- jobs on their way to a model worker process (batching: is waiting for more any use?) -----------------------
    def toward(self, http_slot: int, row: int) -> None:
        """HTTP worker ``http_slot`` sends a job of a batching API to the process of ``row`` (counted before the
        send; the job's header says so, for the process to count it as taken)."""
        self.cells[_TOWARD + http_slot * RUN_ROWS + row] += 1

    def taken(self, row: int, n: int = 1) -> None:
        """The process of ``row`` took ``n`` jobs of batching APIs off its sockets."""
        self.cells[_TAKEN + row] += n

    def in_transit(self, row: int) -> int:
        """Jobs of batching APIs sent to the process of ``row`` that it has not taken yet, over all HTTP workers."""
        sent = sum(self.cells[_TOWARD + row : _TOWARD + self.http_slots * RUN_ROWS : RUN_ROWS])
        return int(sent - self.cells[_TAKEN + row])

    # -- what each model worker process runs, for when it dies -----------------------------------------------------
    def clear_run(self, row: int) -> None:
        """A fresh row for a new model worker process (the master, before it forks)."""
        base = self._run + row * RUN_CELLS
        self.cells[base : base + RUN_CELLS] = memoryview(bytes(RUN_CELLS * 8)).cast("q")
        for h in range(MAX_HTTP):
            self.cells[_TOWARD + h * RUN_ROWS + row] = 0
        self.cells[_TAKEN + row] = 0

    def mark(self, row: int, index: int, api_slot: int, job_id: int) -> None:
        self.cells[self._run + row * RUN_CELLS + _R_JOBS + index] = ((api_slot + 1) << API_SHIFT) | job_id

    def unmark(self, row: int, index: int) -> None:
        self.cells[self._run + row * RUN_CELLS + _R_JOBS + index] = 0

    def set_overflow(self, row: int) -> None:
        self.cells[self._run + row * RUN_CELLS + _R_OVERFLOW] = 1

    def running(self, row: int) -> tuple[dict[int, int], set[int], bool]:
        """What a model worker process was running: {API column: jobs}, the job ids, and whether it lost count."""
        base = self._run + row * RUN_CELLS
        apis: dict[int, int] = {}
        jobs = set()
        for mark in self.cells[base + _R_JOBS : base + RUN_CELLS].tolist():
            if mark:
                apis[(mark >> API_SHIFT) - 1] = apis.get((mark >> API_SHIFT) - 1, 0) + 1
                jobs.add(mark & JOB_BITS)
        return apis, jobs, bool(self.cells[base + _R_OVERFLOW])

    def set_exit(self, row: int, api_slot: int, code: int) -> None:
        """The worker's os._exit was called from an API's code (its column), with this exit code."""
        self.cells[self._run + row * RUN_CELLS + _R_EXIT] = ((api_slot + 1) << 16) | (code & 0xFFFF)

    def exit_of(self, row: int) -> tuple[int, int] | None:
        """(API column, exit code) when an API's code called os._exit in that process, else None."""
        value = self.cells[self._run + row * RUN_CELLS + _R_EXIT]
        return ((value >> 16) - 1, value & 0xFFFF) if value else None

    def set_killed(self, row: int, cause: int) -> None:
        """The master ended that process itself, for a cause (protocol.KILL_CAUSES index + 1)."""
        self.cells[self._run + row * RUN_CELLS + _R_KILLED] = cause

    def killed(self, row: int) -> int:
        return self.cells[self._run + row * RUN_CELLS + _R_KILLED]

    def clear_http(self, http_slot: int) -> None:
        """An HTTP worker died: nothing it sent is outstanding any more."""
        c = self.cells
        for i in range(MAX_MODEL):
            c[_SENT + http_slot * MAX_MODEL + i] = 0
        for i in range(self.apis):
            c[_API + http_slot * self.apis + i] = 0


class RunMarks:
    """A model worker's marks of the jobs it runs (one writer: that worker's event loop)."""

    def __init__(self, board: Scoreboard, row: int) -> None:
        self.board = board
        self.row = row
        self.free = list(range(RUN_CELLS - _R_JOBS - 1, -1, -1))

    def start(self, api_slot: int, job_id: int) -> int:
        """Mark a job as started; its index, or -1 when every cell is taken (then the row says it lost count)."""
        if not self.free:
            self.board.set_overflow(self.row)
            return -1
        index = self.free.pop()
        self.board.mark(self.row, index, api_slot, job_id)
        return index

    def end(self, index: int) -> None:
        """The job's answer has left the process: it no longer counts as running."""
        if index >= 0:
            self.board.unmark(self.row, index)
            self.free.append(index)
