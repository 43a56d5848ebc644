"""One Ray Serve replica of one API version: the predictor loaded from the version's bundle (its runtime_env working
directory), answering HTTP with the daemon's own code: arguments by name (``payload.offer``), payloads by
Content-Type with the same 400s (``payload.load``), compressed bodies decoded as the HTTP workers decode them
(``coding``), the same return conversion (``payload.to_reply``) and the same error bodies
(``payload.exception_reply``), plus ``X-Predictor-Version`` (Serve's proxy echoes or makes ``X-Request-ID``)."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import ray
from ray import serve
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from .. import coding
from .. import payload as pl
from ..config import ServerConfig
from ..loader import instantiate, load_class, warm_up
from ..sources import source_for

log = logging.getLogger("predictord.ray")
REQUEST_ID = "x-request-id"
DECODED_AT_MOST = ServerConfig().max_body_bytes  # a compressed body's limit once decoded: the daemon's default


def reply_response(reply: pl.Reply, version: str) -> Response:
    """A ``payload.Reply`` as a starlette response (a stream as a StreamingResponse), with the version that answered."""
    headers = [*reply.headers, (b"x-predictor-version", version.encode())]
    if reply.stream is not None:
        response: Response = StreamingResponse(_parts(reply.stream), status_code=reply.status,
                                               background=reply.background)
    else:
        response = Response(reply.body, status_code=reply.status, background=reply.background)
    response.raw_headers = [h for h in response.raw_headers if h[0] not in (b"content-type",)] + headers
    return response


async def _parts(stream: Any) -> Any:
    if hasattr(stream, "__anext__"):
        async for part in stream:
            yield pl.chunk_bytes(part)
        return
    loop = asyncio.get_running_loop()
    done = object()
    while (part := await loop.run_in_executor(None, next, stream, done)) is not done:
        yield pl.chunk_bytes(part)


class PredictorReplica:
    """The deployment class of every API (``serve.deployment(PredictorReplica)``, one application per API)."""

    def __init__(self, name: str, version: str, entry: str, config: dict[str, Any], serving: dict[str, Any]) -> None:
        started = time.monotonic()
        self.name, self.version, self.route = name, version, f"/{name}"
        source = source_for(Path.cwd() / entry)  # the working directory is the version's bundle
        imported = load_class(source, version)
        device = "cuda" if ray.get_gpu_ids() else "cpu"
        self.instance = instantiate(imported, config, device)
        warm_up(imported, self.instance, tuple(serving.get("warmup", ())), serving["max_batch_size"])
        self.signature = imported.signature
        self.timeout = float(serving["timeout"])
        self.pool = ThreadPoolExecutor(int(serving["threads"]), thread_name_prefix=f"predict-{name}")
        self.batched: Any = None
        if serving["max_batch_size"] > 1:
            self.batched = serve.batch(max_batch_size=int(serving["max_batch_size"]),
                                       batch_wait_timeout_s=float(serving["batch_wait_ms"]) / 1000)(self._batch)
        log.info("API %s version %s loaded on %s in %.2fs", name, version, device, time.monotonic() - started)

    async def __call__(self, request: Request) -> Response:
        request_id = request.headers.get(REQUEST_ID, "")
        if request.url.path.rstrip("/") != self.route:
            return reply_response(pl.error_reply(404, f"no API named {request.url.path[1:]!r} at {request.url.path}; "
                                                      "GET / lists the APIs", request_id), self.version)
        if request.method == "GET":
            return reply_response(pl.Reply(200, list(pl.JSON_HEADERS), pl.to_json(self.status())), self.version)
        if request.method != "POST":
            reply = pl.error_reply(405, f"{self.route} answers POST (predict) and GET (status)", request_id)
            reply.headers.append((b"allow", b"GET, POST"))
            return reply_response(reply, self.version)
        try:
            reply = await asyncio.wait_for(self.answer(request), self.timeout)
        except TimeoutError:
            reply = pl.error_reply(504, f"API {self.name!r} did not answer within its timeout ({self.timeout:g}s)",
                                   request_id)
        except (Exception, SystemExit) as e:  # noqa: BLE001 - user code: every failure becomes a clear reply
            if not pl.client_error(e):
                log.error("API %s request %s: predict() raised %s: %s", self.name, request_id, type(e).__name__, e,
                          exc_info=e)
            reply = pl.exception_reply(e, self.name, request_id)
        return reply_response(reply, self.version)

    async def answer(self, request: Request) -> pl.Reply:
        body, headers = await request.body(), request.headers.raw
        if encoding := request.headers.get("content-encoding"):  # as the daemon's HTTP workers decode it
            try:
                body = await coding.decode_body(body, coding.codings(encoding.encode("latin-1")), DECODED_AT_MOST)
            except coding.CodingError as e:
                raise HTTPException(e.status, str(e), {k.decode(): v.decode() for k, v in e.headers}) from None
            headers = coding.plain_headers(headers, len(body))
        payload = await pl.load(request.headers.get("content-type", ""), body)
        query = request.url.query.encode()
        if self.batched is not None:
            return pl.to_reply(await self.batched((payload, query, headers)))
        result = await self.call(self.instance.predict, pl.offer(self.signature.predict_args, payload, query, headers))
        reply = pl.to_reply(result)
        if self.signature.post_predict_args is not None and reply.status < 500:
            asked = pl.offer(self.signature.post_predict_args, payload, query, headers, result)
            asyncio.get_running_loop().run_in_executor(self.pool, lambda: self.instance.post_predict(**asked))
        return reply

    async def _batch(self, items: list[tuple[Any, bytes, list[tuple[bytes, bytes]]]]) -> list[Any]:
        """serve.batch's call: one predict() with lists, as the daemon's batching calls it."""
        args: dict[str, Any] = {}
        for name in self.signature.predict_args:
            per = [pl.offer((name,), p, q, h)[name] for p, q, h in items]
            args[name] = per
        results = await self.call(self.instance.predict, args)
        if not isinstance(results, (list, tuple)) or len(results) != len(items):
            got = f"{len(results)} results" if isinstance(results, (list, tuple)) else type(results).__name__
            raise TypeError(f"predict() returned {got} for a batch of {len(items)}; a batching predictor must return a "
                            "list with one result per payload")
        if self.signature.post_predict_args is not None:  # with lists, as the daemon's batching calls it
            asked = {**args, "response": list(results)}
            names = self.signature.post_predict_args
            asyncio.get_running_loop().run_in_executor(
                self.pool, lambda: self.instance.post_predict(**{n: asked.get(n) for n in names}))
        return list(results)

    async def call(self, method: Any, kwargs: dict[str, Any]) -> Any:
        """A predictor method: awaited when it is async, else in the API's threads (off the replica's loop)."""
        if self.signature.is_async:
            return await method(**kwargs)
        return await asyncio.get_running_loop().run_in_executor(self.pool, lambda: method(**kwargs))

    def check_health(self) -> None:
        """Serve's health check, every [serving] health_interval: the predictor's health(), if it has one (a raise
        or False: Serve replaces this replica)."""
        if self.signature.has_health and self.instance.health() is False:
            raise RuntimeError(f"API {self.name}: health() returned False")

    def status(self) -> dict[str, Any]:
        """GET /NAME on a replica: what it serves, and where."""
        context = ray.get_runtime_context()
        return {"name": self.name, "state": "ready", "version": {"serving": [self.version]},
                "signature": {"predict": list(self.signature.predict_args)}, "node": context.get_node_id()}


class NotFound:
    """The application at route ``/``: what no API's route takes gets the daemon's 404 (GET / lists the APIs)."""

    def __init__(self, registry: str) -> None:
        self.registry = registry

    async def __call__(self, request: Request) -> Response:
        request_id = request.headers.get(REQUEST_ID, "")
        if request.url.path == "/" and request.method == "GET":
            actor = ray.get_actor(self.registry, namespace="predictord")
            return reply_response(pl.Reply(200, list(pl.JSON_HEADERS), pl.to_json(await actor.apis.remote())), "")
        return reply_response(pl.error_reply(404, f"no API named {request.url.path[1:]!r} at {request.url.path}; "
                                                  "GET / lists the APIs", request_id), "")
