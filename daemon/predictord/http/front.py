"""The HTTP workers' ASGI app: one route per API, the daemon's own routes, and every error as JSON.

It holds no models: ``POST /NAME`` reads the body (bounded), parses it if it is JSON (a malformed one is a 400
here), picks a replica, and forwards the payload to a model worker through the dispatcher. The app is plain ASGI
because this is the hot path of every request.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from .. import metrics
from .. import payload as pl
from ..scoreboard import Scoreboard
from . import openapi
from .dispatch import ClientGone, Dispatcher, WorkerLost
from .guard import ON_LOST, Limits
from .page import PAGE
from .safety import Tokens, authorized, redact, redact_status

log = logging.getLogger("predictord.http")
access = logging.getLogger("predictord.access")

Scope = dict[str, Any]
JSON = b"application/json"
OWN_ROUTES = ("/", "/healthz", "/readyz", "/metrics", "/openapi.json")
OPEN_ROUTES = ("/healthz", "/readyz")  # probes: never behind the admin token
ADMIN_STATUS = "/admin/status"
PAGE_BYTES = PAGE.encode()
CLIENT_GONE = 499  # the status counted (not sent) for a client that closed its connection first, as nginx logs it
PARSE_ON_LOOP = 64 * 1024  # bytes: a JSON body up to this is parsed on the loop (~1.5 ms of numbers), larger: a thread


class TooLarge(Exception):
    """The request body is over [server] max_body_bytes."""


def status_body(routes: dict[str, Any], where: str | None = None) -> dict[str, Any]:
    """GET / and `predictord status`: every API's status, the workers, devices, series and recent events. With
    ``where`` (the predictors directory), text that reaches clients is redacted as error bodies are."""
    body = {k: routes.get(k, []) for k in ("workers", "devices", "decisions", "events")}
    apis = {n: a["status"] for n, a in routes["apis"].items()}
    if where is not None:
        apis = {n: redact_status(status, where) for n, status in apis.items()}
        for key in ("events", "decisions"):
            body[key] = [{**e, "text": redact(e["text"], where)} for e in body[key]]
    return {"apis": apis, **body, "daemon": routes.get("daemon", {}), "series": routes.get("series", {})}


def _closing(send: Any) -> Any:
    """``send`` that adds ``Connection: close`` to the response, so the client does not reuse the connection."""

    async def wrapped(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
        await send(message)

    return wrapped


def _wants_html(scope: Scope) -> bool:
    """A browser asking for the page (its Accept lists text/html); scripts and curl get JSON."""
    for key, value in scope["headers"]:
        if key == b"accept":
            return b"text/html" in value
    return False


def _json(obj: Any) -> bytes:
    return json.dumps(obj, default=str, separators=(",", ":")).encode()


class Front:
    """The ASGI app every HTTP worker runs (created once in the master, used in each forked worker)."""

    def __init__(self, scoreboard: Scoreboard, routes_path: Path, max_body: int, access_log: bool = False,
                 limits: Limits | None = None, tokens: Tokens | None = None) -> None:
        self.access_log = access_log
        self.limits = limits or Limits(64 * 1024, 60.0)
        self.tokens = tokens or Tokens()
        self.scoreboard = scoreboard
        self.routes_path = routes_path
        self.max_body = max_body
        self.draining = False  # set by the HTTP worker on shutdown: answer with Connection: close
        self._dispatcher: Dispatcher | None = None
        self._ids = itertools.count()
        self._id_prefix = ""
        self._counters: dict[tuple[str, int], Any] = {}
        self._latency: dict[str, Any] = {}
        self._flusher: asyncio.TimerHandle

    def _new_id(self) -> str:
        """32 hex digits, unique: a random prefix per process (uuid4 costs more than the rest of routing)."""
        if not self._id_prefix:
            self._id_prefix = os.urandom(8).hex()
        return f"{self._id_prefix}{next(self._ids):016x}"

    @property
    def dispatcher(self) -> Dispatcher:
        if self._dispatcher is None:  # first use in this worker process (after the fork)
            slot = int(os.environ.get("PREDICTORD_HTTP_SLOT", "0"))
            self._dispatcher = Dispatcher(self.scoreboard, slot, self.routes_path)
        return self._dispatcher

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        if self.draining:
            send = _closing(send)
        request_id = ""
        for key, value in scope["headers"]:
            if key == b"x-request-id":
                request_id = value.decode("latin-1")[:128]
                break
        request_id = request_id or self._new_id()
        path, method = scope["path"], scope["method"]
        if path == ADMIN_STATUS and (scope.get("server") or ("", 0))[1] is None:  # only on the Unix socket
            await self._send(send, 200, _json(status_body(self.dispatcher.routes())), request_id)
            return
        if path in OWN_ROUTES:
            if method not in ("GET", "HEAD"):
                await self._error(send, 405, f"{path} answers GET only", request_id, [(b"allow", b"GET")])
                return
            if path not in OPEN_ROUTES and not authorized(scope["headers"], self.tokens.admin):
                await self._unauthorized(send, "admin_token_file", request_id)
                return
            if path == "/" and _wants_html(scope):
                await send({"type": "http.response.start", "status": 200, "headers": [
                    (b"content-type", b"text/html; charset=utf-8"), (b"content-length", str(len(PAGE_BYTES)).encode()),
                    (b"x-request-id", request_id.encode("latin-1")), (b"cache-control", b"no-cache")]})
                await send({"type": "http.response.body", "body": PAGE_BYTES})
                return
            await self._own_route(path, send, request_id)
            return
        name = path[1:]
        routes = self.dispatcher.routes()
        route = routes["apis"].get(name) if "/" not in name else None
        if route is None:
            await self._error(send, 404, f"no API named {name!r} at {path}; GET / lists the APIs", request_id)
            self._count(metrics.NO_API, 404)
            return
        if method == "POST":
            if not authorized(scope["headers"], self.tokens.predict):
                await self._unauthorized(send, "auth_token_file", request_id)
                self._count(name, 401)
                return
            await self._observed(scope, receive, send, name, route, request_id)
        elif method in ("GET", "HEAD"):
            if not authorized(scope["headers"], self.tokens.admin):
                await self._unauthorized(send, "admin_token_file", request_id)
                return
            live = {"outstanding": self.scoreboard.api_outstanding(route["slot"])}
            status = redact_status(route["status"], routes["daemon"].get("predictors_dir", ""))
            await self._send(send, 200, _json({**status, **live}), request_id)
        else:
            await self._error(send, 405, f"{path} answers POST (predict) and GET (status)", request_id,
                              [(b"allow", b"GET, POST")])

    def _count(self, api: str, code: int) -> None:
        key = (api, code)
        counter = self._counters.get(key)
        if counter is None:
            counter = self._counters[key] = metrics.get().requests.labels(api, f"{code // 100}xx", str(code))
        metrics.tally.inc(counter)

    async def _observed(self, scope: Scope, receive: Any, send: Any, name: str, route: dict[str, Any],
                        request_id: str) -> None:
        """A prediction, counted: status code and latency per API (in-flight requests come from the scoreboard,
        which already counts them, so the hot path pays for two metric updates, not four)."""
        sent = [0]

        async def sending(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                sent[0] = message["status"]
            await send(message)

        latency = self._latency.get(name)
        if latency is None:
            latency = self._latency[name] = metrics.get().latency.labels(name)
        started = time.perf_counter()
        try:
            await self._predict(scope, receive, sending, name, route, request_id)
        except ClientGone:  # mid-body, or waiting: its job was dropped from the worker's queue or will be discarded
            sent[0] = CLIENT_GONE
        finally:
            seconds = time.perf_counter() - started
            self._count(name, sent[0] or 500)  # no response started: the client went away, or we failed
            metrics.tally.observe(latency, seconds)
            if self.access_log:
                access.info("%s %s %d %.1fms request_id=%s", scope["method"], scope["path"], sent[0] or 500,
                            seconds * 1000, request_id, extra={"api": name, "status": sent[0] or 500,
                                                               "ms": round(seconds * 1000, 2),
                                                               "request_id": request_id})

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.dispatcher.routes()
                self._flusher = asyncio.get_running_loop().call_later(metrics.FLUSH_EVERY, self._flush)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self._flusher.cancel()
                metrics.tally.flush()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _flush(self) -> None:
        metrics.tally.flush()
        self._flusher = asyncio.get_running_loop().call_later(metrics.FLUSH_EVERY, self._flush)

    async def _own_route(self, path: str, send: Any, request_id: str) -> None:
        routes = self.dispatcher.routes()
        daemon = routes["daemon"]
        if path == "/healthz":
            await self._send(send, 200, _json({"status": "ok", "pid": os.getpid()}), request_id)
        elif path == "/metrics":
            text = metrics.exposition(self._live_rows)
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"text/plain; version=0.0.4; charset=utf-8"),
                (b"content-length", str(len(text)).encode()), (b"x-request-id", request_id.encode("latin-1"))]})
            await send({"type": "http.response.body", "body": text})
        elif path == "/readyz":
            if daemon.get("ready"):
                await self._send(send, 200, _json({"ready": True}), request_id)
            else:
                reasons = [f"API {n} is {s}" for n, s in sorted(daemon.get("not_ready", {}).items())]
                reasons += [f"model worker {s} is not up" for s in daemon.get("workers_down", [])]
                body = {"ready": False, "error": "; ".join(reasons) or "the daemon is starting",
                        "not_ready": daemon.get("not_ready", {})}
                await self._send(send, 503, _json(body), request_id)
        elif path == "/openapi.json":
            doc = openapi.document(routes, self.tokens.predict is not None, self.tokens.admin is not None)
            await self._send(send, 200, _json(doc), request_id)
        else:
            await self._send(send, 200, _json(status_body(routes, daemon.get("predictors_dir", ""))), request_id)

    def _live_rows(self) -> list[tuple[str, int, int]]:
        """(api, outstanding, queued) for every API, from the scoreboard."""
        rows = []
        for name, route in self.dispatcher.routes()["apis"].items():
            outstanding = self.scoreboard.api_outstanding(route["slot"])
            rows.append((name, outstanding, max(0, self.dispatcher.queued(route))))
        return rows

    async def _predict(self, scope: Scope, receive: Any, send: Any, name: str, route: dict[str, Any],
                       request_id: str) -> None:
        started = time.monotonic()
        if not route["replicas"] and route["status"]["state"] == "loading":
            route = await self._wait_loaded(name, route, started)
        replicas = route["replicas"]
        if not replicas:
            status = route["status"]
            if status["state"] == "failed" and status["error"]:
                e = status["error"]
                where = f"{e['file']}:{e['line']}: " if e.get("line") else f"{e['file']}: " if e.get("file") else ""
                message = f"API {name!r} failed to load: {where}{e['message']}"
            else:
                message = f"API {name!r} is {status['state']}; retry shortly"
            message = redact(message, self.dispatcher.routes()["daemon"].get("predictors_dir", ""))
            await self._error(send, 503, message, request_id, [(b"retry-after", b"1")])
            return
        dispatcher = self.dispatcher
        if dispatcher.queued(route) >= route["queue_limit"]:
            await self._error(send, 503, f"API {name!r} has {route['queue_limit']} requests queued "
                              "([serving] queue_limit); retry later", request_id, [(b"retry-after", b"1")])
            return
        try:
            body = await self._read_body(scope, receive)
        except TooLarge:  # the rest of the body is never read: close the connection rather than drain it
            await self._error(send, 413, f"the request body is over {self.max_body} bytes ([server] max_body_bytes)",
                              request_id, [(b"connection", b"close")])
            return
        content_type, headers = "", None
        for key, value in scope["headers"]:
            if key == b"content-type":
                content_type = value.decode("latin-1")
        if route["wants_headers"]:
            headers = scope["headers"]
        sent_type: str | None = content_type
        if pl.is_json(content_type):
            try:
                body = await self._parse(body)
            except pl.BadPayload as e:
                await self._error(send, 400, str(e), request_id)
                return
            sent_type = None  # the model worker's sign that the body is the parsed payload (payload.load)
        header = (name, sent_type, scope["query_string"], headers, request_id, route["timeout"])
        on_lost = scope.get("extensions", {}).get(ON_LOST, {}).get("callbacks")
        while True:
            replica = dispatcher.choose(replicas, route["slot"])
            remaining = route["timeout"] - (time.monotonic() - started)
            try:
                job, (status, out_headers, version, out_body) = await dispatcher.submit(
                    replica, route["slot"], header, body, remaining, on_lost)
                break
            except TimeoutError:
                await self._error(send, 504, f"API {name!r} did not answer within {route['timeout']:g}s "
                                  "([serving] timeout)", request_id)
                return
            except WorkerLost as e:
                await self._error(send, 502, f"API {name!r}: {e}; the worker is being replaced", request_id)
                return
            except OSError as e:  # the connect failed, so the job was never sent: safe to send it elsewhere
                fresh = await self._wait_rerouted(name, replica[1], started, route["timeout"])
                if fresh is None:
                    await self._error(send, 503, f"API {name!r}: its model worker is not reachable ({e.strerror}); "
                                      "retry", request_id, [(b"retry-after", b"1")])
                    return
                route, replicas = fresh, fresh["replicas"]
        extra = [(b"x-request-id", request_id.encode("latin-1"))]
        if version:
            extra.append((b"x-predictor-version", version.encode()))
        if status == 504 and not out_body:  # the worker dropped it from its queue after our deadline
            await self._error(send, 504, f"API {name!r} did not answer in time", request_id)
            return
        if out_body is not None:
            has_length = any(k.lower() == b"content-length" for k, _ in out_headers)
            length = [] if has_length else [(b"content-length", str(len(out_body)).encode())]
            await send({"type": "http.response.start", "status": status, "headers": [*out_headers, *length, *extra]})
            await send({"type": "http.response.body", "body": out_body})
            return
        await send({"type": "http.response.start", "status": status, "headers": [*out_headers, *extra]})
        stream = job.stream
        assert stream is not None
        left = functools.partial(stream.put_nowait, ClientGone())
        if on_lost is not None:
            on_lost.append(left)
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
                await send({"type": "http.response.body", "body": part, "more_body": True})
        finally:
            if on_lost is not None:
                on_lost.remove(left)
        await send({"type": "http.response.body", "body": b""})

    async def _wait_loaded(self, name: str, route: dict[str, Any], started: float) -> dict[str, Any]:
        """An API still loading (the daemon just started, or it was just added): wait for it, within the request's
        deadline, rather than refuse; a request sent before a socket-activated start is answered this way."""
        deadline = started + min(route["timeout"], 30.0)
        while time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            fresh = self.dispatcher.routes()["apis"].get(name)
            if fresh is None or fresh["replicas"] or fresh["status"]["state"] != "loading":
                return fresh or route
        return route

    async def _wait_rerouted(self, name: str, dead: str, started: float, timeout: float) -> dict[str, Any] | None:
        """A model worker that just died is still in this worker's routes until the master publishes new ones (a
        few ms): wait for routes that no longer name it and have a replica, within the request's deadline."""
        deadline = started + min(timeout, 30.0)
        while time.monotonic() < deadline:
            await asyncio.sleep(0.02)
            fresh: dict[str, Any] | None = self.dispatcher.routes()["apis"].get(name)
            if fresh is None or fresh["status"]["state"] == "failed":
                return None
            if fresh["replicas"] and all(r[1] != dead for r in fresh["replicas"]):
                return fresh
        return None

    async def _parse(self, body: bytes) -> bytes:
        """A JSON body, parsed and packed for the model worker; a large one in a thread, off this worker's loop."""
        if len(body) <= PARSE_ON_LOOP:
            return pl.pack(pl.parse_json(body))
        return await asyncio.to_thread(lambda: pl.pack(pl.parse_json(body)))

    async def _read_body(self, scope: Scope, receive: Any) -> bytes:
        for key, value in scope["headers"]:
            if key == b"content-length" and value.isdigit() and int(value) > self.max_body:
                raise TooLarge
        parts: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise TooLarge
            parts.append(chunk)
            if not message.get("more_body"):
                return b"".join(parts)

    async def _send(self, send: Any, status: int, body: bytes, request_id: str,
                    headers: list[tuple[bytes, bytes]] | None = None) -> None:
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", JSON), (b"content-length", str(len(body)).encode()),
            (b"x-request-id", request_id.encode("latin-1")), *(headers or [])]})
        await send({"type": "http.response.body", "body": body})

    async def _unauthorized(self, send: Any, setting: str, request_id: str) -> None:
        await self._error(send, 401, f"this route needs the bearer token of [server] {setting}: send "
                          "'Authorization: Bearer TOKEN'", request_id, [(b"www-authenticate", b"Bearer")])

    async def _error(self, send: Any, status: int, message: str, request_id: str,
                     headers: list[tuple[bytes, bytes]] | None = None) -> None:
        await self._send(send, status, _json({"error": message, "request_id": request_id}), request_id, headers)
