"""The HTTP workers' ASGI app: ``POST /NAME`` by hand, the daemon's own routes from a table, every error as JSON.

It holds no models. ``POST /NAME`` is the hot path, in four steps: admit (the API can take it: loaded, its queue
not full), read (the body, bounded, parsed if it is JSON: a malformed one is a 400 here), dispatch (to a replica,
through the dispatcher), respond (the model worker's answer, whole or streamed). Every other request goes to the
handler table in routes.py.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import bodies, coding, metrics
from .. import payload as pl
from ..bodies import SHARED_FROM, SharedBody
from ..protocol import KILL_CAUSES, PART_COST, STREAM_WINDOW, JobHeader, ReplyHeader, Route, RoutingTable
from ..scoreboard import Scoreboard
from . import routes
from .dispatch import Answer, ClientGone, Dispatcher, PendingJob, WorkerLost
from .guard import ON_LOST, Limits
from .published import Published
from .responses import RETRY, Header, Send, error, send_response, unauthorized
from .safety import Tokens, authorized, redact

log = logging.getLogger("predictord.http")
access = logging.getLogger("predictord.access")

Scope = dict[str, Any]
Receive = Any  # the ASGI receive callable
CLIENT_GONE = 499  # the status counted (not sent) for a client that closed its connection first, as nginx logs it
PARSE_IN_THREAD = 4 * 2**20  # bytes: a JSON body this large is parsed off the loop (a thread hand-off costs more below)
SENT_EVERY = STREAM_WINDOW // 4  # bytes of a stream written to its client between two SENT frames
WAIT_AT_MOST = 30.0  # seconds a request waits for an API to load or for routes without a dead worker
CLOSE = ((b"connection", b"close"),)


class Refused(Exception):
    """An error answer instead of a prediction: one of the steps of ``POST /NAME`` said no."""

    def __init__(self, status: int, message: str, headers: tuple[Header, ...] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


def _closing(send: Send) -> Send:
    """``send`` that adds ``Connection: close`` to the response, so the client does not reuse the connection."""

    async def wrapped(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), *CLOSE]}
        await send(message)

    return wrapped


def lost_message(name: str, lost: WorkerLost, board: Scoreboard, table: RoutingTable) -> str:
    """The 502 of a request that was inside predict() when its model worker died, blaming the right API: the one
    whose code called os._exit, or the daemon (and why), or else naming what else the worker was running."""
    names = {route.slot: api for api, route in table.apis.items()}
    worker = f"model worker {lost.worker}"
    ended = board.exit_of(lost.row) if lost.row >= 0 else None
    cause = board.killed(lost.row) if lost.row >= 0 else 0
    if ended is not None and names.get(ended[0]) == name:
        text = f"API {name!r}: its own code ended {worker} (os._exit({ended[1]})) while handling this request"
    elif ended is not None:
        text = (f"API {name!r}: {worker} was ended by API {names.get(ended[0], '?')!r} (os._exit({ended[1]})) "
                "while handling this request, which it shares the worker with")
    elif cause:
        why = list(KILL_CAUSES.values())[cause - 1] if cause <= len(KILL_CAUSES) else "it was ended"
        text = f"API {name!r}: the daemon ended {worker} while handling this request: {why}"
    else:
        running, _, _ = board.running(lost.row) if lost.row >= 0 else ({}, set(), False)
        others = sorted(names.get(s, "?") for s in running if names.get(s) != name)
        text = f"API {name!r}: {worker} exited while handling this request"
        text += f" (it was also running {', '.join(repr(o) for o in others)})" if others else ""
    return text + "; the worker is being replaced"


def response_start(reply: ReplyHeader, body: bytes | memoryview | None, request_id: str) -> dict[str, Any]:
    """The ASGI head of a model worker's answer: its headers, Content-Length when it has a whole body and did not
    set one, X-Request-ID, and X-Predictor-Version."""
    headers = [*reply.headers]
    if body is not None and not any(k.lower() == b"content-length" for k, _ in reply.headers):
        headers.append((b"content-length", str(len(body)).encode()))
    headers.append((b"x-request-id", request_id.encode("latin-1")))
    if reply.version:
        headers.append((b"x-predictor-version", reply.version.encode()))
    return {"type": "http.response.start", "status": reply.status, "headers": headers}


class Front:
    """The ASGI app every HTTP worker runs (created once in the master, used in each forked worker)."""

    def __init__(self, scoreboard: Scoreboard, runtime: Path, max_body: int, access_log: bool = False,
                 limits: Limits | None = None, tokens: Tokens | None = None, *,
                 dispatcher: Dispatcher | None = None) -> None:
        self.access_log = access_log
        self.limits = limits or Limits(64 * 1024, 60.0)
        self.tokens = tokens or Tokens()
        self.scoreboard = scoreboard
        self.published = Published(scoreboard, runtime)
        self.max_body = max_body
        self.draining = False  # set by the HTTP worker on shutdown: answer with Connection: close
        self._dispatcher = dispatcher  # None: made on first use, in the worker process (after the fork)
        self._ids = itertools.count()
        self._id_prefix = ""
        self._counters: dict[tuple[str, int], Any] = {}
        self._latency: dict[str, Any] = {}
        self._flusher: asyncio.TimerHandle | None = None
        self.share_bodies = bodies.available()  # large bodies through /dev/shm (bodies.py)
        self._pool: bodies.Pool | None = None  # made in the worker process (after the fork)
        self._unshared_at = -math.inf  # when a body last found no room in /dev/shm (logged once a minute)
        self._huge: asyncio.Semaphore | None = None  # one huge JSON parse at a time (made in the worker process)

    @property
    def dispatcher(self) -> Dispatcher:
        if self._dispatcher is None:
            slot = int(os.environ.get("PREDICTORD_HTTP_SLOT", "0"))
            self._dispatcher = Dispatcher(self.scoreboard, slot)
        return self._dispatcher

    def _new_id(self) -> str:
        """32 hex digits, unique: a random prefix per process (uuid4 costs more than the rest of routing)."""
        if not self._id_prefix:
            self._id_prefix = os.urandom(8).hex()
        return f"{self._id_prefix}{next(self._ids):016x}"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await self._lifespan(receive, send)
            return
        if self.draining:
            send = _closing(send)
        request_id = ""
        for key, value in scope["headers"]:
            if key == b"x-request-id":
                request_id = value.decode("latin-1")[:128]
                break
        request_id = request_id or self._new_id()
        path = scope["path"]
        if scope["method"] != "POST" or path in routes.OWN_PATHS:
            await routes.handle(self, scope, send, request_id)
            return
        name = path[1:]
        route = self.published.routes().apis.get(name) if "/" not in name else None
        if route is None:
            await send_response(send, routes.not_found(path, request_id, self.published.routes().apis), request_id)
            self.count(metrics.NO_API, 404)
        elif not authorized(scope["headers"], self.tokens.predict):
            await send_response(send, unauthorized("auth_token_file", request_id), request_id)
            self.count(name, 401)
        else:
            await self._predict(scope, receive, send, name, route, request_id)

    def count(self, api: str, code: int) -> None:
        """One more answer with status ``code`` for ``api`` (metrics.NO_API: a path that named none)."""
        key = (api, code)
        counter = self._counters.get(key)
        if counter is None:
            counter = self._counters[key] = metrics.get().requests.labels(api, f"{code // 100}xx", str(code))
        metrics.tally.inc(counter)

    # -- POST /NAME ------------------------------------------------------------------------------------------------
    async def _predict(self, scope: Scope, receive: Receive, send: Send, name: str, route: Route,
                       request_id: str) -> None:
        """A prediction: admit, read, dispatch, respond; counted (status code and latency per API; in-flight
        requests come from the scoreboard, which already counts them)."""
        sent = [0]

        async def sending(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                sent[0] = message["status"]
            await send(message)

        started = time.perf_counter()
        on_lost: list[Callable[[], None]] | None = scope.get("extensions", {}).get(ON_LOST, {}).get("callbacks")
        shared: list[SharedBody] = []
        answered = False
        try:
            if not route.replicas and route.state == "loading":
                route = await self._wait_loaded(name, route, started)
            self._admit(name, route)
            header, body = await self._read(scope, receive, name, route, request_id, shared)
            job, (reply, out) = await self._dispatch(name, route, header, body, started, on_lost)
            answered = True  # the model worker has read its body: a shared file may serve the next one
            if reply.status == 504 and not out:  # the worker dropped it from its queue after our deadline
                raise Refused(504, f"API {name!r} did not answer in time")
            await sending(response_start(reply, out, request_id))
            if out is not None:
                await sending({"type": "http.response.body", "body": out})
            else:
                await self._relay(sending, job, name, request_id, on_lost)
        except Refused as e:
            await send_response(sending, error(e.status, e.message, request_id, e.headers), request_id)
        except ClientGone:  # mid-body, or waiting: its job was dropped from the worker's queue or will be discarded
            sent[0] = CLIENT_GONE
        finally:
            for body_file in shared:  # answered: reused; given up on (the worker may still read it): removed
                assert self._pool is not None
                if answered:
                    self._pool.give(body_file)
                else:
                    body_file.remove()
            self._record(scope, name, sent[0] or 500, time.perf_counter() - started, request_id)

    def _admit(self, name: str, route: Route) -> None:
        """Refuse (503, Retry-After) an API that no replica serves, or whose queue is full."""
        if not route.replicas:
            if route.state == "failed" and route.problem is not None and route.problem.kind == "quarantine":
                where = route.problem.where().rstrip(": ")
                message = f"API {name!r} is {route.problem.message}" + (f" (last at {where})" if where else "")
            elif route.state == "failed" and route.problem is not None:
                message = f"API {name!r} failed to load: {route.problem}"
            elif route.state == "unhealthy" and route.problem is not None:
                message = f"API {name!r} is unhealthy: {route.problem}; retry shortly"
            else:
                message = f"API {name!r} is {route.state}; retry shortly"
            raise Refused(503, redact(message, self.published.routes().predictors_dir), RETRY)
        if self.dispatcher.queued(route) >= route.queue_limit:
            raise Refused(503, f"API {name!r} has {route.queue_limit} requests queued ([serving] queue_limit); "
                          "retry later", RETRY)

    async def _read(self, scope: Scope, receive: Receive, name: str, route: Route, request_id: str,
                    shared: list[SharedBody]) -> tuple[JobHeader, bytes]:
        """The job's header and body: the body read whole (413 past max_body_bytes); a JSON one parsed here (400 if
        malformed) and sent pickled, any other as it came. One of bodies.SHARED_FROM bytes or more goes through a
        shared file (bodies.py): raw bytes written into it as they arrive, a parsed payload pickled into it."""
        content_type = ""
        length = -1
        applied: list[str] = []
        for key, value in scope["headers"]:
            if key == b"content-type":
                content_type = value.decode("latin-1")
            elif key == b"content-length" and value.isdigit():
                length = int(value)
                if length > self.max_body:
                    raise self._too_large()
            elif key == b"content-encoding":
                try:
                    applied += coding.codings(value)
                except coding.Unsupported as e:
                    raise Refused(e.status, str(e), (*e.headers, *CLOSE)) from None
        json_body = pl.is_json(content_type)
        if length >= SHARED_FROM and self.share_bodies and not json_body and not applied:
            self._share(shared, lambda body: body.reserve(length))
        parts, size = await self._receive(receive, shared)
        headers = scope["headers"] if route.wants_headers else None
        if applied:
            parts, size, headers = await self._decode(parts, applied, headers)
        query = scope["query_string"]
        large = size >= SHARED_FROM
        sent_type: str | None = content_type
        if json_body:
            if size >= PARSE_IN_THREAD:
                body = await self._parse_huge(parts, shared)
            else:
                body = b"".join(parts)
                try:
                    payload = pl.parse_json(body)
                except pl.BadPayload as e:
                    raise Refused(400, str(e)) from None
                if not (large and self.share_bodies and self._share(shared, lambda body: body.dump(payload))):
                    body = pl.pack(payload)
            sent_type = None  # the model worker's sign: the body is a parsed payload (pl.load)
        elif large and self.share_bodies and not shared and self._share(shared, lambda body: body.reserve(size)):
            # chunked (no Content-Length): shared now that its size is known
            for chunk in parts:
                shared[0].write(chunk)
        if shared:
            return JobHeader(name, sent_type, query, headers, request_id, route.timeout, shared[0].ref), b""
        return JobHeader(name, sent_type, query, headers, request_id, route.timeout), body if json_body else \
            b"".join(parts)

    async def _receive(self, receive: Receive, shared: list[SharedBody]) -> tuple[list[bytes], int]:
        """The body's chunks (written into the shared file instead, if there is one) and its size; 413 past
        max_body_bytes."""
        parts: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise self._too_large()
            if shared:
                try:
                    shared[0].write(chunk)
                except OSError as e:  # no room after all: this body goes in the job frame
                    parts = [shared[0].contents(), chunk]
                    self._unshare(shared, e)
            else:
                parts.append(chunk)
            if not message.get("more_body"):
                return parts, size

    async def _decode(self, parts: list[bytes], applied: list[str],
                      headers: list[Header] | None) -> tuple[list[bytes], int, list[Header] | None]:
        """A compressed body decoded, and the headers predict() sees made to match it."""
        data = b"".join(parts)
        parts.clear()
        try:
            body = await coding.decode_body(data, applied, self.max_body)
        except coding.CodingError as e:
            raise Refused(e.status, str(e), e.headers) from None
        return [body], len(body), None if headers is None else coding.plain_headers(headers, len(body))

    async def _parse_huge(self, parts: list[bytes], shared: list[SharedBody]) -> bytes:
        """A huge JSON body (its chunks, taken from ``parts``), parsed and pickled in a thread so that this worker's
        loop keeps its other connections; one at a time per HTTP worker: the GIL runs one parse at a time anyway, and
        one being parsed and pickled holds about three times its size, so the others wait holding only their text.
        The text is let go once parsed. Returns the pickled payload, or b"" once it is in a shared file."""
        if self._huge is None:
            self._huge = asyncio.Semaphore(1)
        async with self._huge:
            text = b"".join(parts)
            parts.clear()
            try:
                payload = await asyncio.to_thread(pl.parse_json, text)
            except pl.BadPayload as e:
                raise Refused(400, str(e)) from None
            del text
            if self.share_bodies:
                try:
                    await asyncio.to_thread(self._take(shared).dump, payload)
                    return b""
                except OSError as e:
                    self._unshare(shared, e)
            return pl.pack(payload)

    def _take(self, shared: list[SharedBody]) -> SharedBody:
        if self._pool is None:
            self._pool = bodies.Pool(os.getppid(), self.dispatcher.http_slot)
        shared.append(self._pool.take())
        return shared[0]

    def _share(self, shared: list[SharedBody], fill: Callable[[SharedBody], None]) -> bool:
        """Take a shared file for this request's body and ``fill`` it (make room, or pickle the payload into it);
        False if /dev/shm has no room (the body goes in the job frame instead: slower, never refused)."""
        try:
            fill(self._take(shared))
        except OSError as e:
            self._unshare(shared, e)
            return False
        return True

    def _unshare(self, shared: list[SharedBody], error: OSError) -> None:
        shared.pop().remove()
        now = time.monotonic()
        if now - self._unshared_at > 60:  # once a minute at most: a full /dev/shm would otherwise log every request
            self._unshared_at = now
            log.warning("a large request body goes through the socket: no room for it in %s (%s)", bodies.ROOT,
                        error.strerror or error)

    def _too_large(self) -> Refused:
        # The rest of the body is never read: close the connection rather than drain it.
        return Refused(413, f"the request body is over {self.max_body} bytes ([server] max_body_bytes)", CLOSE)

    async def _dispatch(self, name: str, route: Route, header: JobHeader, body: bytes, started: float,
                        on_lost: list[Callable[[], None]] | None) -> tuple[PendingJob, Answer]:
        """Send the job to a replica and wait for the start of its answer, within the API's deadline."""
        dispatcher = self.dispatcher
        while True:
            replica = dispatcher.choose(route.replicas, route.slot)
            remaining = route.timeout - (time.perf_counter() - started)
            try:
                return await dispatcher.submit(replica, route.slot, header, body, remaining, on_lost)
            except TimeoutError:
                raise Refused(504, f"API {name!r} did not answer within {route.timeout:g}s ([serving] timeout)") \
                    from None
            except WorkerLost as e:
                if e.started:  # it may have run: only the client may decide to send it again
                    raise Refused(502, lost_message(name, e, self.scoreboard, self.published.routes())) from None
                why = f"its model worker {e.worker} went away before it started the request"
            except OSError as e:  # the connect failed, so the job was never sent: safe to send it elsewhere
                why = f"its model worker is not reachable ({e.strerror})"
            fresh = await self._wait_rerouted(name, replica.socket, started, route.timeout)
            if fresh is None:
                raise Refused(503, f"API {name!r}: {why}, and no other replica took it in time; retry", RETRY)
            if not fresh.replicas:
                self._admit(name, fresh)  # it failed or was quarantined meanwhile: say why
            route = fresh

    async def _relay(self, send: Send, job: PendingJob, name: str, request_id: str,
                     on_lost: list[Callable[[], None]] | None) -> None:
        """A streamed answer's parts, as the model worker sends them; the client leaving stops the stream."""
        stream = job.stream
        assert stream is not None
        left = functools.partial(stream.put_nowait, ClientGone())
        if on_lost is not None:
            on_lost.append(left)
        sent = 0  # bytes written to the client and not yet said to the model worker (SENT)
        try:
            while True:
                part = await stream.get()
                if part is None:
                    break
                if isinstance(part, ClientGone):  # nobody reads the rest: the model worker closes the generator
                    job.cancel()
                    return
                if isinstance(part, BaseException):
                    log.error("API %s request %s: stream cut: %s", name, request_id, part)
                    raise part  # uvicorn closes the connection: the client sees a truncated response
                # uvicorn's send returns once the connection's buffer is below its high-water mark: the client reads
                await send({"type": "http.response.body", "body": part, "more_body": True})
                sent += len(part) + PART_COST
                if sent >= SENT_EVERY:
                    job.sent(sent)
                    sent = 0
        finally:
            if on_lost is not None:
                on_lost.remove(left)
        await send({"type": "http.response.body", "body": b""})

    def _record(self, scope: Scope, name: str, status: int, seconds: float, request_id: str) -> None:
        """Count a prediction's answer (no response started: the client went away, or we failed: 500)."""
        self.count(name, status)
        latency = self._latency.get(name)
        if latency is None:
            latency = self._latency[name] = metrics.get().latency.labels(name)
        metrics.tally.observe(latency, seconds)
        if self.access_log:
            access.info("%s %s %d %.1fms request_id=%s", scope["method"], scope["path"], status, seconds * 1000,
                        request_id, extra={"api": name, "status": status, "ms": round(seconds * 1000, 2),
                                           "request_id": request_id})

    async def _wait_loaded(self, name: str, route: Route, started: float) -> Route:
        """An API still loading (the daemon just started, or it was just added): wait for it, within the request's
        deadline, rather than refuse; a request sent before a socket-activated start is answered this way."""
        deadline = started + min(route.timeout, WAIT_AT_MOST)
        while time.perf_counter() < deadline:
            await asyncio.sleep(0.05)
            fresh = self.published.routes().apis.get(name)
            if fresh is None or fresh.replicas or fresh.state != "loading":
                return fresh or route
        return route

    async def _wait_rerouted(self, name: str, dead: str, started: float, timeout: float) -> Route | None:
        """A model worker that just died is still in this worker's routes until the master publishes new ones (a
        few ms): wait for routes that no longer name it and have a replica, within the request's deadline."""
        deadline = started + min(timeout, WAIT_AT_MOST)
        while time.perf_counter() < deadline:
            await asyncio.sleep(0.02)
            fresh = self.published.routes().apis.get(name)
            if fresh is None:
                return None
            if fresh.state == "failed" or (fresh.replicas and all(r.socket != dead for r in fresh.replicas)):
                return fresh
        return None

    # -- lifespan --------------------------------------------------------------------------------------------------
    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.published.routes()
                self._flusher = asyncio.get_running_loop().call_later(metrics.FLUSH_EVERY, self._flush)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._flusher is not None:
                    self._flusher.cancel()
                metrics.tally.flush()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _flush(self) -> None:
        metrics.tally.flush()
        if self._pool is not None:
            self._pool.trim(time.monotonic())
        if self._dispatcher is not None:
            self._dispatcher.answers.sweep(time.monotonic())  # mappings of answer files removed since, or idle
        self._flusher = asyncio.get_running_loop().call_later(metrics.FLUSH_EVERY, self._flush)
