"""What a model worker holds for each API it serves: the loaded predictor with its queue and runners
(``LoadedApi``), the jobs taken from HTTP workers (``Job``), and the small helpers that call predictor code: the
arguments it asked for by name, its errors as replies and as problems for the master, and ``CURRENT``, the API
whose code a task or thread runs now (the worker's os._exit hook reads it)."""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .. import metrics
from .. import payload as pl
from ..costs import BatchCosts
from ..loader import Signature, user_frame
from ..namespace import Namespace
from ..protocol import JobHeader, Problem

if TYPE_CHECKING:
    from .jobs import JobConnection
    from .lanes import Lanes

INLINE_BELOW = 0.0005  # seconds: a sync predict this short runs on the loop (a thread hop costs ~50-100 us)
INLINE_BATCH_BELOW = 0.002  # seconds: a batch this short runs on the loop of a worker that serves its API alone
MAX_MESSAGE = 500  # characters of an exception's text kept in a request error
# The API whose code this task or thread runs now: the worker's os._exit hook reads it to say who ended the process.
CURRENT: contextvars.ContextVar[LoadedApi | None] = contextvars.ContextVar("predictord_api", default=None)
# The version (NAME@VERSION) being imported and constructed in the loader's thread.
LOADING: contextvars.ContextVar[str | None] = contextvars.ContextVar("predictord_loading", default=None)


def owner() -> str | None:
    """The version whose code runs in this task or thread (what it prints, the processes it starts are its)."""
    api = CURRENT.get()
    if api is not None and api.namespace is not None:
        return api.namespace.name
    return LOADING.get()


@dataclass(eq=False)
class Job:
    """One request taken from an HTTP worker's connection."""

    conn: JobConnection
    job_id: int
    header: JobHeader
    body: bytes
    arrived: float = 0.0
    started: float = 0.0
    reported: bool = False  # told the master it hung
    cancelled: bool = False  # the HTTP worker said nobody wants the rest (a stream whose client left)
    mark: int = -1  # its cell among the worker's marks of running jobs (scoreboard.RunMarks)
    alive: float = 0.0  # when it last showed progress (its start; a stream's last part): hung past its timeout
    unsent: int = 0  # a stream's bytes sent to the HTTP worker and not yet to its client (protocol.STREAM_WINDOW)
    room: asyncio.Event | None = None  # set when the HTTP worker says SENT or the stream should stop

    @property
    def request_id(self) -> str:
        return self.header.request_id


@dataclass
class LoadedApi:
    """A predictor instance loaded in this worker, with its queue and its runners."""

    name: str
    version: str
    instance: Any
    signature: Signature
    threads: int
    timeout: float
    lanes: Lanes  # its threads for predictor code
    max_batch_size: int = 1
    batch_wait: float = 0.0  # seconds
    slot: int = 0  # its column in the scoreboard
    service: float = 0.0  # moving average of a job's time here, start to reply (published for the rebalancer)
    costs: BatchCosts = field(default_factory=BatchCosts)  # a predict() of n jobs here (published for dispatch)
    queue: deque[Job] = field(default_factory=deque)
    running: set[Job] = field(default_factory=set)  # (Job hashes by identity: id() is an audited call, ~1 us each)
    runners: int = 0
    waiter: asyncio.Future[None] | None = None  # a filling batch waits on it for the next job (set by submit)
    last_job: float = 0.0  # monotonic time the newest job arrived
    namespace: Namespace | None = None  # its modules (dropped when it is retired)

    seconds: float = 0.01  # moving average of a sync predict (serializing the result included)
    batch_seconds: float = 0.01  # moving average of a batch's predict
    inline: bool = False  # run on the loop: the thread hop costs more than predict itself
    alone: bool = True  # the only API of its worker (only then may it run on the loop: it can stall nobody)
    rss: int = 0  # resident bytes its load added to the worker
    load: Any = None  # the Load it came from (protocol.Load): a reload after failed health checks repeats it
    health_interval: float = 0.0  # seconds between health() calls (0: none)
    health_limit: int = 3  # failures in a row before it is loaded again
    health_due: float = 0.0  # monotonic
    health_failures: int = 0
    health_check: Any = None  # the running health() call (a concurrent Future), if one is
    reloading: bool = False

    def observe(self, seconds: float) -> None:
        """Predicts far shorter than a thread hand-off run on the loop, only when it is its worker's one API and
        has threads = 1 (then nothing would run beside them anyway, and a slow one stalls nobody else); a slow one
        sends them back to the thread."""
        self.seconds += (seconds - self.seconds) * 0.1
        self.inline = self.alone and self.threads == 1 and self.seconds < INLINE_BELOW

    _observers: tuple[Any, Any, Any] | None = None

    def observers(self) -> tuple[Any, Any, Any]:
        """This API's queue-wait, predict-time and batch-size histograms (labelled once)."""
        if self._observers is None:
            m = metrics.get()
            self._observers = (m.queue_wait.labels(self.name), m.predict.labels(self.name), m.batch.labels(self.name))
        return self._observers

    def observe_batch(self, seconds: float) -> None:
        """A batch runs on the loop, like a short predict, when its worker serves this API alone and a batch takes
        under INLINE_BATCH_BELOW (the thread hand-off and its wake-ups cost more than small batches)."""
        self.batch_seconds += (seconds - self.batch_seconds) * 0.1
        self.inline = self.alone and self.threads == 1 and self.batch_seconds < INLINE_BATCH_BELOW

    @property
    def busy(self) -> bool:
        return bool(self.queue or self.running or self.runners)


def error_reply(status: int, message: str, job: Job, **extra: Any) -> pl.Reply:
    return pl.error_reply(status, message, job.request_id, **extra)


def request_problem(api: LoadedApi, e: BaseException, doing: str = "predict()") -> Problem:
    """A request-time error as the master shows it: type, message, and the user's file and line."""
    text = str(e)
    text = text if len(text) <= MAX_MESSAGE else text[:MAX_MESSAGE] + "..."
    file, line = user_frame(e, api.namespace.source) if api.namespace is not None else (None, None)
    return Problem(f"{doing} raised {type(e).__name__}: {text}", file, line, "request", api.version, time.time())


def next_part(api: LoadedApi, iterator: Any, default: object) -> Any:
    CURRENT.set(api)
    return next(iterator, default)


def in_api(api: LoadedApi, fn: Callable[..., Any], *args: Any) -> Any:
    """Run predictor code in one of its API's threads, noting whose it is (see CURRENT)."""
    CURRENT.set(api)
    return fn(*args)
