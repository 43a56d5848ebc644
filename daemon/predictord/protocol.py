"""Wire format between HTTP workers and model workers, the master's control messages, and the typed records that
cross every process boundary (this module is the only contract between an HTTP worker and a model worker).

A frame is ``u32 length | u8 kind | u64 job id | body``. Job frames carry a pickled header tuple and the request
body: a JSON body parsed once, by the HTTP worker, and pickled (the header's content type is then None), any other
body raw, for the model worker to parse; reply frames carry a pickled ``(status, headers)`` and the response body.
Both ends are processes of this daemon, so pickle is safe here and is the fastest stdlib codec for small tuples.
No client bytes are ever unpickled: a client's content type is a string, never None.
"""

from __future__ import annotations

import asyncio
import functools
import json
import pickle
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

from .sources import ApiSource

PREFIX = struct.Struct("!IBQ")  # length of (kind + job id + body), kind, job id
HEADER_LEN = struct.Struct("!I")
SENT_BYTES = struct.Struct("!Q")
# A stream's parts in flight (sent by the model worker, not yet written to the client by the HTTP worker) are at
# most this many bytes, each part counted PART_COST more: a client that reads slowly holds the generator back
# rather than fill the HTTP worker's memory with the stream. The HTTP worker says SENT every quarter window.
STREAM_WINDOW = 8 * 2**20
PART_COST = 64

# HTTP worker -> model worker
JOB = 1
CANCEL = 2
RELEASE = 3  # the HTTP worker has read a reply's body from the model worker's shared file: it may be reused
SENT = 4  # the HTTP worker has written this many more bytes of a stream to its client (body: SENT_BYTES)
# model worker -> HTTP worker
REPLY = 10  # a whole response: header + body
START = 11  # a streamed response begins: header
CHUNK = 12  # a streamed body part
END = 13  # a streamed response ends
ABORT = 14  # a streamed response failed midway (body: message)
# master <-> model worker
CONTROL = 20


Headers = list[tuple[bytes, bytes]]


class JobHeader(NamedTuple):
    """What a JOB frame says about its request, beside the body."""

    api: str
    content_type: str | None  # None: the body is the payload the HTTP worker parsed and pickled (payload.load)
    query_string: bytes
    headers: Headers | None  # only when the predictor asks for them
    request_id: str
    timeout: float
    body_at: str = ""  # the body is in this shared file (bodies.py), not in the frame
    counted: bool = False  # counted among the jobs on their way to a batching replica (Scoreboard.toward); last


class ReplyHeader(NamedTuple):
    """What a REPLY or START frame says about its response, beside the body."""

    status: int
    headers: Headers
    version: str
    body_at: str = ""  # the body is in this shared file of the model worker's (bodies.py), not in the frame


@dataclass(frozen=True)
class Problem:
    """What went wrong with an API, for a person: the one error type of loads, probes, placement and requests."""

    message: str
    file: str | None = None
    line: int | None = None
    kind: str = ""  # "name" or "permissions" (refused before loading), else ""
    version: str | None = None
    at: float | None = None

    def where(self) -> str:
        """``file:line: `` or ``file: `` or nothing, to put before the message."""
        return f"{self.file}:{self.line}: " if self.file and self.line else f"{self.file}: " if self.file else ""

    def __str__(self) -> str:
        return self.where() + self.message

    def stamped(self, version: str) -> Problem:
        """This problem, as of now, for ``version``."""
        return Problem(self.message, self.file, self.line, self.kind, version, time.time())

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Problem:
        return cls(str(d.get("message", "")), d.get("file"), d.get("line"), d.get("kind", ""), d.get("version"),
                   d.get("at"))


# -- master <-> model worker (pickled in CONTROL frames) -----------------------------------------------------------
@dataclass(frozen=True)
class Started:
    """Model worker -> master: it listens for jobs."""

    pid: int
    rss: int = 0  # its resident bytes before any load (the base its APIs' measured memory adds to)


@dataclass(frozen=True)
class Load:
    """Master -> model worker: load this version of an API."""

    source: ApiSource  # the version's snapshot
    version: str
    config: dict[str, Any]
    serving: dict[str, Any]  # the API's [serving] settings, as a dict
    api_slot: int  # its column in the scoreboard


@dataclass(frozen=True)
class Loaded:
    """Model worker -> master: a Load finished (``problem`` is None when it worked)."""

    api: str
    version: str
    problem: Problem | None = None
    seconds: float = 0.0
    footprint: int = 0  # bytes the load took where it runs
    signature: dict[str, Any] = field(default_factory=dict)
    rss: int = 0  # resident bytes the load added to the worker

    @property
    def ok(self) -> bool:
        return self.problem is None


@dataclass(frozen=True)
class Unload:
    """Master -> model worker: stop serving an API once no job has come for a moment."""

    api: str


@dataclass(frozen=True)
class LogLevel:
    """Master -> model worker: log at this level from now on (SIGHUP changed [server] log_level)."""

    level: str


@dataclass(frozen=True)
class Unloaded:
    """Model worker -> master: an API is gone from it."""

    api: str
    rss: int = 0  # the worker's resident bytes afterwards


@dataclass(frozen=True)
class Failed:
    """Model worker -> master: an API's predict() raised (the newest such error, and how many since the last
    report; at most one report per API per second, so an error storm costs the master nothing)."""

    api: str
    version: str
    problem: Problem
    count: int


@dataclass(frozen=True)
class Hung:
    """Model worker -> master: a predict() ran far past its timeout (the worker stops beating)."""

    api: str
    seconds: float
    request_id: str


@dataclass(frozen=True)
class Health:
    """Model worker -> master: an API's health() failed (``ok`` False: the replica is out of the routes), passed again,
    or failed ``failures`` times in a row, and the replica is being loaded again (``reloading``)."""

    api: str
    version: str
    ok: bool
    problem: Problem | None = None
    failures: int = 0
    reloading: bool = False


Control = Started | Load | Loaded | Unload | LogLevel | Unloaded | Failed | Hung | Health

# Why the master ended a model worker itself (the scoreboard holds the index + 1, for the HTTP workers to say).
KILL_CAUSES = {
    "heartbeat": "it sent no heartbeat within [workers] heartbeat_timeout (a predict() hung)",
    "load_timeout": "a load ran past [predictors] load_timeout",
    "memory": "its memory passed [workers] max_rss_mib",
    "retired": "it was retired",
}
KILL_CODES = {cause: i + 1 for i, cause in enumerate(KILL_CAUSES)}


# -- master -> HTTP workers: the routing table ---------------------------------------------------------------------
class ReplicaRow(NamedTuple):
    """A model worker that serves an API, as a row of the routing table."""

    worker: int  # its slot
    socket: str
    threads: int  # jobs it runs at once for this API (its threads times its batch size)
    version: str
    row: int = 0  # its process's row of job marks in the scoreboard (see scoreboard.py)
    lanes: int = 1  # predict() calls it runs at once for this API (its threads)


@dataclass(frozen=True)
class Route:
    """What an HTTP worker needs to dispatch to one API."""

    slot: int  # the API's column in the scoreboard
    replicas: tuple[ReplicaRow, ...]
    timeout: float
    queue_limit: int
    wants_headers: bool
    state: str  # ready, loading or failed
    problem: Problem | None = None  # why it failed, when it did

    @functools.cached_property
    def capacity(self) -> int:
        """Jobs its replicas run at once (computed once per table: it is read on every request)."""
        return sum(r.threads for r in self.replicas)


@dataclass(frozen=True)
class RoutingTable:
    """The hot table every HTTP worker re-reads when the master bumps ``routes_version`` (status is elsewhere)."""

    apis: dict[str, Route] = field(default_factory=dict)
    predictors_dir: str = ""

    def dumps(self) -> bytes:
        apis = {n: {**asdict(r), "replicas": [list(x) for x in r.replicas],
                    "problem": r.problem.as_dict() if r.problem else None} for n, r in self.apis.items()}
        return json.dumps({"apis": apis, "predictors_dir": self.predictors_dir}).encode()

    @classmethod
    def loads(cls, data: bytes) -> RoutingTable:
        raw = json.loads(data)
        apis = {n: Route(a["slot"], tuple(ReplicaRow(*x) for x in a["replicas"]), a["timeout"], a["queue_limit"],
                         a["wants_headers"], a["state"], Problem.from_dict(a["problem"]) if a["problem"] else None)
                for n, a in raw["apis"].items()}
        return cls(apis, raw.get("predictors_dir", ""))


def frame(kind: int, job_id: int, *parts: bytes) -> list[bytes]:
    """The pieces of one frame, for ``transport.writelines`` (no copy of a large body)."""
    size = 9 + sum(len(p) for p in parts)
    return [PREFIX.pack(size, kind, job_id), *parts]


def with_header(header: tuple[Any, ...], body: bytes = b"") -> tuple[bytes, bytes, bytes]:
    """A pickled header, its length, and the body: the payload of JOB, REPLY and START frames. A typed header goes
    as a plain tuple (a NamedTuple pickles by class, ~3.5 us more each way); the reader rebuilds it with ``_make``."""
    h = pickle.dumps(tuple(header), protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER_LEN.pack(len(h)), h, body


def split_header(payload: memoryview) -> tuple[Any, bytes]:
    """Inverse of ``with_header``."""
    (n,) = HEADER_LEN.unpack_from(payload)
    return pickle.loads(payload[4 : 4 + n]), bytes(payload[4 + n :])


def split_header_view(payload: memoryview) -> tuple[Any, memoryview]:
    """``split_header`` with the body left a view of the payload, not copied: a large reply goes to its client from
    the buffer it was read into (FrameReader gives each large frame a buffer of its own, never reused)."""
    (n,) = HEADER_LEN.unpack_from(payload)
    return pickle.loads(payload[4 : 4 + n]), payload[4 + n :]


def control(message: Control) -> bytes:
    """A control message from or to the master, as one frame."""
    return b"".join(frame(CONTROL, 0, pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)))


READ_SIZE = 256 * 1024  # bytes: a buffered reader's buffer, which the socket is read into
BIG_FRAME = 64 * 1024  # a frame with a body this large or larger is read into a buffer of its own, of its size


class FrameReader:
    """Splits a byte stream into frames and calls back once per whole frame, with a view of its body.

    Two ways in: ``feed`` it what a socket gave, or (``FrameProtocol``, an asyncio BufferedProtocol) let the socket
    be read into ``buffer()`` and say how much came with ``filled``. The buffered way copies a small frame once,
    out of the buffer, and reads a large one (BIG_FRAME and up) straight into a bytearray of its exact size that is
    handed on as it is: an 8 MB reply was copied five times on its way through the HTTP worker (the socket's chunks,
    the growing buffer, the frame's slice, its bytes, the body's bytes), each copy into fresh pages the kernel had to
    fault in and zero (``bench/ab.py --case replies``). The view a frame is handed in is of bytes of its own (a small
    frame's, copied out of the buffer) or of the large frame's own buffer, never reused, so it may be kept
    (``split_header_view``).
    """

    def __init__(self, on_frame: Callable[[int, int, memoryview], None]) -> None:
        self._buf = bytearray()
        self._on_frame = on_frame
        self._start = 0  # buffered: what is not yet taken is self._buf[self._start:self._end]
        self._end = 0
        self._big: bytearray | None = None  # buffered: the large frame being read, and how much of it came
        self._big_at = 0
        self._big_id = (0, 0)  # its kind and job id

    def feed(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        pos = 0
        end = len(buf)
        frames = []
        with memoryview(buf) as view:
            while end - pos >= PREFIX.size:
                size, kind, job_id = PREFIX.unpack_from(buf, pos)
                if end - pos - 4 < size:
                    break
                frames.append((kind, job_id, bytes(view[pos + PREFIX.size : pos + 4 + size])))
                pos += 4 + size
        if pos:
            del buf[:pos]
        for kind, job_id, body in frames:
            self._on_frame(kind, job_id, memoryview(body))

    def buffer(self) -> memoryview:
        """Where the next read goes: the rest of the large frame being read, or the free end of the buffer."""
        if self._big is not None:
            return memoryview(self._big)[self._big_at :]
        if not self._buf:
            self._buf = bytearray(READ_SIZE)
        return memoryview(self._buf)[self._end :]

    def filled(self, n: int) -> None:
        """``n`` bytes were read into the last ``buffer()``: call back for each frame they complete."""
        big = self._big
        if big is not None:
            self._big_at += n
            if self._big_at == len(big):
                self._big = None
                kind, job_id = self._big_id
                self._on_frame(kind, job_id, memoryview(big))
            return
        buf = self._buf
        start, end = self._start, self._end + n
        frames = []
        with memoryview(buf) as view:
            while end - start >= PREFIX.size:
                size, kind, job_id = PREFIX.unpack_from(buf, start)
                if end - start - 4 >= size:  # whole: one copy out of the buffer
                    frames.append((kind, job_id, memoryview(bytes(view[start + PREFIX.size : start + 4 + size]))))
                    start += 4 + size
                elif size - (PREFIX.size - 4) >= BIG_FRAME:  # large: the rest goes straight into a buffer of its own
                    big = bytearray(size - (PREFIX.size - 4))
                    have = end - start - PREFIX.size
                    big[:have] = view[start + PREFIX.size : end]
                    self._big, self._big_at, self._big_id = big, have, (kind, job_id)
                    start = end
                    break
                else:
                    break
            if start == end:
                start = end = 0
            elif end == len(buf) or start > len(buf) // 2:  # a small frame's start: to the front, so it fits
                view[: end - start] = view[start:end]
                start, end = 0, end - start
        self._start, self._end = start, end
        for kind, job_id, body in frames:
            self._on_frame(kind, job_id, body)


class FrameProtocol(asyncio.BufferedProtocol):
    """An asyncio protocol speaking frames; subclasses implement ``frame_received``. The socket is read into the
    FrameReader's buffer (a BufferedProtocol): a large frame arrives in a buffer of its own, without a copy.

    Frames sent within one turn of the loop leave together, in one ``writelines`` at its end: under load a turn
    answers (or sends) several jobs, and one system call for all of them, on each side, is what the hop costs least
    (echo at 64 clients: see BENCHMARKS.md). A frame is held for the rest of its turn, never longer.
    """

    transport: asyncio.Transport

    def __init__(self) -> None:
        self._reader = FrameReader(self.frame_received)
        self._held: list[bytes] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio.Transport
        self._loop = asyncio.get_running_loop()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._reader.buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self._reader.filled(nbytes)

    def frame_received(self, kind: int, job_id: int, payload: memoryview) -> None:
        raise NotImplementedError

    def send(self, kind: int, job_id: int, *parts: bytes) -> None:
        held = self._held
        if not held:
            assert self._loop is not None
            self._loop.call_soon(self.flush)
        held.append(PREFIX.pack(9 + sum(len(p) for p in parts), kind, job_id))
        held.extend(parts)

    def holding(self) -> bool:
        """Frames are waiting for the end of this loop turn (not yet in the transport)."""
        return bool(self._held)

    def flush(self) -> None:
        """Write the frames held in this turn (called at its end)."""
        held, self._held = self._held, []
        if held and not self.transport.is_closing():
            self.transport.writelines(held)
        self.flushed()

    def flushed(self) -> None:
        """Called after each flush; a subclass may act once its frames are in the transport."""
