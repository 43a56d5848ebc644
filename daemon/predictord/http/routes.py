"""The daemon's own routes as a table: status, probes, metrics, the OpenAPI document, the page, GET /NAME.

Routing as data, as in starlette's routing.py: each ``Endpoint`` says which requests it takes (``matches``), which
methods it allows, whether it asks for the admin token, and the handler that makes its answer. Only ``POST /NAME``,
the hot path, is written by hand (front.py); every other request comes here and walks the table in order.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import parse_qs

from .. import metrics
from ..protocol import Route, RoutingTable
from ..scoreboard import Scoreboard
from . import openapi
from .dispatch import Dispatcher
from .page import PAGE
from .published import Published
from .responses import Response, Send, dumps, error, ok, send_response, unauthorized
from .safety import Tokens, authorized, redact, redact_status

Scope = dict[str, Any]
READ = frozenset({"GET", "HEAD"})
HTML = b"text/html; charset=utf-8"
PAGE_BYTES = PAGE.encode()
PROMETHEUS = b"text/plain; version=0.0.4; charset=utf-8"
LISTS = ("workers", "devices", "decisions", "events")  # in the order `predictord status --json` has always shown
MASTER_STUCK = 5.0  # seconds without a tick of the master's loop before /healthz says so


class Site(Protocol):
    """What the handlers read: the front, as its table sees it."""

    scoreboard: Scoreboard
    published: Published
    tokens: Tokens
    draining: bool

    @property
    def dispatcher(self) -> Dispatcher: ...

    def count(self, api: str, code: int) -> None: ...


Handler = Callable[[Site, Scope], Response]


@dataclass(frozen=True)
class Endpoint:
    """One slow route: the requests it takes, the methods it allows, the token it asks for, and its handler."""

    handle: Handler
    path: str | None  # None: /NAME, for every API in the routing table
    methods: frozenset[str] | None = READ  # None: any method
    allow: bytes = b"GET"
    refusal: str = "{path} answers GET only"  # the 405's message
    open: bool = False  # probes and the admin socket: never behind the admin token
    when: Callable[[Scope], bool] | None = None

    def matches(self, site: Site, scope: Scope) -> bool:
        """This endpoint takes the request (whatever its method: a wrong one is this endpoint's 405)."""
        path: str = scope["path"]
        if self.path is None:
            return "/" not in path[1:] and path[1:] in site.published.routes().apis
        return path == self.path and (self.when is None or self.when(scope))

    def answer(self, site: Site, scope: Scope, request_id: str) -> Response:
        """The handler's answer, or the 405 or 401 that comes before it."""
        if self.methods is not None and scope["method"] not in self.methods:
            return error(405, self.refusal.format(path=scope["path"]), request_id, ((b"allow", self.allow),))
        if not self.open and not authorized(scope["headers"], site.tokens.admin):
            return unauthorized("admin_token_file", request_id)
        return self.handle(site, scope)


def status_body(doc: dict[str, Any], where: str | None = None) -> dict[str, Any]:
    """GET / and `predictord status`: every API's status, the workers, devices, series and recent events. With
    ``where`` (the predictors directory), text that reaches clients is redacted as error bodies are."""
    apis: dict[str, Any] = doc.get("apis", {})
    body = {key: doc.get(key, []) for key in LISTS}
    if where is not None:
        apis = {n: redact_status(status, where) for n, status in apis.items()}
        for key in ("events", "decisions"):
            body[key] = [{**e, "text": redact(e["text"], where)} for e in body[key]]
    return {"apis": apis, **body, "daemon": doc.get("daemon", {}), "series": doc.get("series", {})}


def live_rows(site: Site) -> list[tuple[str, int, int]]:
    """(api, outstanding, queued) for every API, from the scoreboard."""
    table: RoutingTable = site.published.routes()
    return [(name, site.scoreboard.api_outstanding(route.slot), max(0, site.dispatcher.queued(route)))
            for name, route in table.apis.items() if route.slot >= 0]


def on_admin_socket(scope: Scope) -> bool:
    """The request came over the Unix admin socket (uvicorn gives its server no port there)."""
    return (scope.get("server") or ("", 0))[1] is None


def wants_html(scope: Scope) -> bool:
    """A browser asking for the page (its Accept lists text/html); scripts and curl get JSON."""
    for key, value in scope["headers"]:
        if key == b"accept":
            return b"text/html" in value
    return False


def handle_admin_status(site: Site, scope: Scope) -> Response:
    """/admin/status, for `predictord status` on the host: the status document, nothing redacted."""
    return ok(status_body(site.published.status()))


def handle_healthz(site: Site, scope: Scope) -> Response:
    """/healthz: this HTTP worker is alive, and so is the master's loop (it stamps the scoreboard every tick; one
    that stopped ticking, hung or stopped, makes this 503, so a probe or systemd's watchdog can restart it)."""
    silent = time.time() - site.scoreboard.master_beat()
    if silent > MASTER_STUCK:
        return Response(503, dumps({"status": "stuck", "pid": os.getpid(), "error": f"the daemon's master has not "
                                    f"ticked for {silent:.0f}s; it replaces no worker and loads no change"}))
    return ok({"status": "ok", "pid": os.getpid()})


def handle_readyz(site: Site, scope: Scope) -> Response:
    """/readyz: this host takes traffic. 200 once it has settled: no API is still loading (each is ready, or failed
    for a reason of its own, listed under ``failed``) and every model worker is up; 503 while it starts, loads, has
    a worker down, or drains. A failed API does not take the host out of a balancer: ``/readyz?api=NAME`` is that
    API's own check (200 when it has a ready replica here)."""
    if site.draining or site.scoreboard.draining:  # closing, or in [server] drain_delay before it
        return Response(503, dumps({"ready": False, "error": "the daemon is stopping"}))
    asked = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("api")
    if asked:
        return api_ready(site, asked[0])
    daemon = site.published.status().get("daemon", {})
    failed = {n: s for n, s in daemon.get("not_ready", {}).items() if s == "failed"}
    if daemon.get("ready"):
        return ok({"ready": True, "failed": failed} if failed else {"ready": True})
    loading = {n: s for n, s in daemon.get("not_ready", {}).items() if s != "failed"}
    reasons = [f"API {n} is {s}" for n, s in sorted(loading.items())]
    reasons += [f"model worker {s} is not up" for s in daemon.get("workers_down", [])]
    body = {"ready": False, "error": "; ".join(reasons) or "the daemon is starting",
            "not_ready": daemon.get("not_ready", {})}
    return Response(503, dumps(body))


def api_ready(site: Site, name: str) -> Response:
    """/readyz?api=NAME: 200 when the API has a ready replica on this host; 503 (with why) when it has none; 404
    when the host has no such API."""
    table = site.published.routes()
    route = table.apis.get(name)
    if route is None:
        return Response(404, dumps({"ready": False, "api": name, "error": f"no API named {name!r} here"}))
    if route.replicas and route.state == "ready":
        return ok({"ready": True, "api": name, "replicas": len(route.replicas)})
    why = redact(route.problem.message, table.predictors_dir) if route.problem is not None else None
    return Response(503, dumps({"ready": False, "api": name, "state": route.state,
                                "error": why or f"API {name} is {route.state}"}))


def handle_metrics(site: Site, scope: Scope) -> Response:
    """/metrics: every process's metrics, and the live rows of the scoreboard."""
    return Response(200, metrics.exposition(lambda: live_rows(site)), PROMETHEUS)


def handle_openapi(site: Site, scope: Scope) -> Response:
    """/openapi.json: the OpenAPI document of the APIs in the status document."""
    tokens = site.tokens
    return ok(openapi.document(site.published.status(), tokens.predict is not None, tokens.admin is not None))


def handle_page(site: Site, scope: Scope) -> Response:
    """GET / from a browser: the status page, which polls GET / for JSON."""
    return Response(200, PAGE_BYTES, HTML, ((b"cache-control", b"no-cache"),))


def handle_status(site: Site, scope: Scope) -> Response:
    """GET /: the status document, redacted for clients."""
    return ok(status_body(site.published.status(), site.published.routes().predictors_dir))


def route_status(name: str, route: Route) -> dict[str, Any]:
    """GET /NAME from the routing table alone, for the moment between the master's two files (the routes written,
    the status document not yet): the same keys a client reads, so ``error`` is there whenever the API failed."""
    problem = route.problem.as_dict() if route.problem else None
    unhealthy = route.state == "unhealthy"
    return {"name": name, "state": route.state, "error": None if unhealthy else problem,
            "health": problem if unhealthy else None, "unhealthy": [], "replicas": [], "crash": None,
            "request_error": None, "version": {"wanted": None, "serving": [], "loaded_at": {}}, "environment": None,
            "note": "the status document is being rewritten; GET again for the rest"}


def handle_api_status(site: Site, scope: Scope) -> Response:
    """GET /NAME: the API's status document, plus its outstanding requests over all HTTP workers."""
    name = scope["path"][1:]
    table = site.published.routes()
    route = table.apis[name]
    status = site.published.status().get("apis", {}).get(name) or route_status(name, route)
    live = {"outstanding": site.scoreboard.api_outstanding(route.slot) if route.slot >= 0 else 0}
    return ok({**redact_status(status, table.predictors_dir), **live})


ROUTES: tuple[Endpoint, ...] = (
    Endpoint(handle_admin_status, "/admin/status", methods=None, open=True, when=on_admin_socket),
    Endpoint(handle_healthz, "/healthz", open=True),
    Endpoint(handle_readyz, "/readyz", open=True),
    Endpoint(handle_metrics, "/metrics"),
    Endpoint(handle_openapi, "/openapi.json"),
    Endpoint(handle_page, "/", when=wants_html),
    Endpoint(handle_status, "/"),
    Endpoint(handle_api_status, None, allow=b"GET, POST", refusal="{path} answers POST (predict) and GET (status)"),
)
OWN_PATHS = frozenset(e.path for e in ROUTES if e.path is not None)  # POST to these never predicts


def not_found(path: str, request_id: str, apis: Collection[str]) -> Response:
    """404 for a path that names no API (and is none of the daemon's own); one that would, but for its slashes or
    capitals (``/echo/``, ``/Echo``), is told the API's path."""
    near = path.strip("/").lower()
    hint = f"; the API is at /{near}" if near != path[1:] and near in apis else ""
    return error(404, f"no API named {path[1:]!r} at {path}{hint}; GET / lists the APIs", request_id)


async def handle(site: Site, scope: Scope, send: Send, request_id: str) -> None:
    """Answer a request that is not a prediction: the first endpoint that matches it, else 404."""
    for endpoint in ROUTES:
        if endpoint.matches(site, scope):
            await send_response(send, endpoint.answer(site, scope, request_id), request_id)
            return
    await send_response(send, not_found(scope["path"], request_id, site.published.routes().apis), request_id)
    site.count(metrics.NO_API, 404)
