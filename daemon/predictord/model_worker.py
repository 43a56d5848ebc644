"""A model worker: a process pinned to one device that loads predictors and runs their predict().

It is forked by the master, listens on a Unix socket for jobs from the HTTP workers, and takes the next queued job
for an API whenever one of that API's threads is free. Predictor code runs off the event loop (sync predict in a
thread; async predict on the loop), so the loop keeps reading jobs, answering the master and beating.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from starlette.datastructures import Headers, QueryParams
from starlette.exceptions import HTTPException

from . import logs
from . import payload as pl
from .loader import ApiSource, LoadError, Signature, instantiate, load_class, modules_under
from .protocol import (
    ABORT,
    CANCEL,
    CHUNK,
    CONTROL,
    END,
    JOB,
    REPLY,
    START,
    FrameProtocol,
    FrameReader,
    control,
    split_header,
    with_header,
)
from .scoreboard import Scoreboard

log = logging.getLogger("predictord.model")
HUNG_GRACE = 5.0  # seconds past its request timeout before a running predict counts as hung
DRAIN_QUIET = 0.5


@dataclass(frozen=True)
class Device:
    """Where a model worker runs: ``cpu`` or one GPU (its NVML index and the name shown to users)."""

    kind: str  # "cpu" or "gpu"
    index: int | None = None

    @property
    def label(self) -> str:
        return "cpu" if self.kind == "cpu" else f"gpu{self.index}"

    @property
    def torch_device(self) -> str:
        return "cpu" if self.kind == "cpu" else "cuda"


@dataclass
class Job:
    """One request taken from an HTTP worker's connection."""

    conn: JobConnection
    job_id: int
    header: tuple[Any, ...]
    body: bytes
    started: float = 0.0


@dataclass
class LoadedApi:
    """A predictor instance loaded in this worker, with its queue and its threads."""

    name: str
    version: str
    instance: Any
    signature: Signature
    threads: int
    timeout: float
    executor: ThreadPoolExecutor
    queue: deque[Job] = field(default_factory=deque)
    running: dict[int, Job] = field(default_factory=dict)
    modules: dict[str, Any] = field(default_factory=dict)  # what its import added to sys.modules


class JobConnection(FrameProtocol):
    """One HTTP worker's connection: jobs in, replies out."""

    def __init__(self, worker: ModelWorker) -> None:
        super().__init__()
        self.worker = worker
        self.closed = False

    def frame_received(self, kind: int, job_id: int, payload: memoryview) -> None:
        if kind == JOB:
            header, body = split_header(payload)
            self.worker.submit(Job(self, job_id, header, body))
        elif kind == CANCEL:
            self.worker.cancel(self, job_id)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True

    def reply(self, job_id: int, status: int, headers: list[pl.Header], body: bytes, version: str = "") -> None:
        if not self.closed:
            self.send(REPLY, job_id, *with_header((status, headers, version), body))


def _offer(names: tuple[str, ...], payload: Any, query: bytes, headers: Any, response: Any = None) -> dict[str, Any]:
    """The arguments a predictor method asked for, by name."""
    kwargs: dict[str, Any] = {}
    for name in names:
        if name == "payload":
            kwargs[name] = payload
        elif name == "query_params":
            kwargs[name] = QueryParams(query)
        elif name == "headers":
            kwargs[name] = Headers(raw=headers or [])
        elif name == "response":
            kwargs[name] = response
    return kwargs


def _next(iterator: Any, default: object) -> Any:
    return next(iterator, default)


class ModelWorker:
    """The model worker process's state and event loop."""

    def __init__(self, slot: int, device: Device, ctl: socket.socket, scoreboard: Scoreboard, socket_path: str,
                 threads: int) -> None:
        self.slot = slot
        self.device = device
        self.ctl = ctl
        self.scoreboard = scoreboard
        self.socket_path = socket_path
        self.torch_threads = threads
        self.apis: dict[str, LoadedApi] = {}
        self.loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="load")
        self.stopping = False
        self.loop: asyncio.AbstractEventLoop

    # -- process set-up -------------------------------------------------------------------------------------------
    def run(self) -> None:
        """Entry point in the forked child; never returns."""
        code = 0
        try:
            self._init_process()
            asyncio.run(self._serve())
        except Exception:  # noqa: BLE001 - last resort in a child: log and exit with a code the master names
            log.exception("model worker %s (pid %d) crashed", self.device.label, os.getpid())
            code = 1
        finally:
            logging.shutdown()
            os._exit(code)

    def _init_process(self) -> None:
        os.environ["CUDA_VISIBLE_DEVICES"] = "" if self.device.kind == "cpu" else str(self.device.index)
        os.environ["OMP_NUM_THREADS"] = str(self.torch_threads)
        os.environ["PREDICTORD_WORKER"] = f"{self.slot}:{self.device.label}"
        logs.set_role(f"model{self.slot}:{self.device.label}")
        torch = sys.modules.get("torch")
        if torch is not None:
            torch.set_num_threads(self.torch_threads)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the master orchestrates shutdown
        signal.signal(signal.SIGQUIT, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    async def _serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.loop.add_signal_handler(signal.SIGTERM, self._begin_stop)
        server = await self.loop.create_unix_server(lambda: JobConnection(self), self.socket_path)
        self.ctl.setblocking(False)
        reader = FrameReader(self._control_frame)
        self.loop.add_reader(self.ctl.fileno(), self._read_control, reader)
        self.scoreboard.beat(self.slot)
        self._tell_master({"op": "started", "pid": os.getpid()})
        while not self.stopping:
            self._beat()
            await asyncio.sleep(0.5)
        server.close()
        await self._drain()

    def _begin_stop(self) -> None:
        self.stopping = True

    async def _drain(self) -> None:
        """Finish what was accepted, and go once no job has come for DRAIN_QUIET seconds (a job sent just before
        the HTTP workers saw the new routes still gets its answer)."""
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < DRAIN_QUIET:
            if any(a.queue or a.running for a in self.apis.values()):
                quiet_since = time.monotonic()
            self._beat()
            await asyncio.sleep(0.05)

    def _beat(self) -> None:
        """Stamp the heartbeat unless a predict has hung past its deadline (then the master replaces us)."""
        now = time.monotonic()
        for api in self.apis.values():
            for job in api.running.values():
                if now - job.started > api.timeout + HUNG_GRACE:
                    if not getattr(job, "reported", False):
                        job.reported = True  # type: ignore[attr-defined]
                        self._tell_master({"op": "hung", "api": api.name, "seconds": round(now - job.started, 1),
                                           "request_id": job.header[4]})
                    return
        self.scoreboard.beat(self.slot)

    # -- control channel with the master --------------------------------------------------------------------------
    def _read_control(self, reader: FrameReader) -> None:
        try:
            data = self.ctl.recv(65536)
        except BlockingIOError:
            return
        if not data:  # the master is gone: nothing will ever route to us again
            log.warning("model worker %s (pid %d): master gone, exiting", self.device.label, os.getpid())
            self.stopping = True
            self.loop.remove_reader(self.ctl.fileno())
            return
        reader.feed(data)

    def _tell_master(self, message: dict[str, Any]) -> None:
        try:
            self.ctl.setblocking(True)
            self.ctl.sendall(control(message))
        except OSError:
            pass  # the master is gone; _read_control will notice
        finally:
            self.ctl.setblocking(False)

    def _control_frame(self, kind: int, job_id: int, payload: memoryview) -> None:
        import pickle

        if kind != CONTROL:
            return
        message = pickle.loads(payload)
        op = message["op"]
        if op == "load":
            self.loop.create_task(self._load(message))
        elif op == "unload":
            self.loop.create_task(self._unload(message["api"]))

    async def _load(self, m: dict[str, Any]) -> None:
        source: ApiSource = m["source"]
        started = time.monotonic()
        try:
            api = await self.loop.run_in_executor(self.loader, self._load_blocking, m)
        except LoadError as e:
            log.error("model worker %s: API %s version %s failed to load: %s", self.device.label, source.name,
                      m["version"], e)
            self._tell_master({"op": "loaded", "api": source.name, "version": m["version"], "ok": False,
                               "error": e.as_dict()})
            return
        old = self.apis.get(api.name)
        self.apis[api.name] = api
        if old is not None:
            self.loop.create_task(self._retire(old))
        seconds = time.monotonic() - started
        log.info("model worker %s (pid %d): API %s version %s loaded in %.2fs", self.device.label, os.getpid(),
                 api.name, api.version, seconds)
        self._tell_master({"op": "loaded", "api": api.name, "version": api.version, "ok": True,
                           "seconds": seconds, "signature": api.signature.as_dict()})

    def _load_blocking(self, m: dict[str, Any]) -> LoadedApi:
        source: ApiSource = m["source"]
        module_name = f"predictord_api_{source.name.replace('-', '_')}_{m['version']}"
        before = set(sys.modules)
        cls, signature = load_class(source, module_name)
        modules = {n: sys.modules[n] for n in set(sys.modules) - before
                   if n == module_name or (source.folder is not None and n in modules_under(source.folder))}
        instance = instantiate(cls, signature, source, m["config"], self.device.torch_device)
        threads = m["serving"].get("threads", 1)
        return LoadedApi(source.name, m["version"], instance, signature, threads, m["serving"]["timeout"],
                         ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"predict-{source.name}"),
                         modules=modules)

    async def _unload(self, name: str) -> None:
        api = self.apis.pop(name, None)
        if api is not None:
            await self._retire(api)
        self._tell_master({"op": "unloaded", "api": name})

    async def _retire(self, api: LoadedApi) -> None:
        """Let an API's accepted jobs finish, then drop its instance and give its memory back."""
        while api.queue or api.running:
            await asyncio.sleep(0.05)
        api.executor.shutdown(wait=False)
        api.instance = None
        for name, module in api.modules.items():
            if sys.modules.get(name) is module:  # a newer version may have imported its own under that name
                del sys.modules[name]
        api.modules.clear()
        gc.collect()
        torch = sys.modules.get("torch")
        if torch is not None and self.device.kind == "gpu" and torch.cuda.is_initialized():
            torch.cuda.empty_cache()

    # -- jobs -----------------------------------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        api = self.apis.get(job.header[0])
        if api is None:
            body = pl.error_body(f"API {job.header[0]!r} is not loaded on this worker; retry", request_id=job.header[4])
            job.conn.reply(job.job_id, 503, [(b"content-type", b"application/json"), (b"retry-after", b"1")], body)
            return
        api.queue.append(job)
        if len(api.running) < api.threads:
            self._start_next(api)

    def cancel(self, conn: JobConnection, job_id: int) -> None:
        """The HTTP worker gave up on a job (deadline): drop it if it has not started."""
        for api in self.apis.values():
            for job in api.queue:
                if job.conn is conn and job.job_id == job_id:
                    api.queue.remove(job)
                    conn.reply(job_id, 504, [], b"")
                    return

    def _start_next(self, api: LoadedApi) -> None:
        while api.queue and len(api.running) < api.threads:
            job = api.queue.popleft()
            job.started = time.monotonic()
            api.running[id(job)] = job
            self.loop.create_task(self._run(api, job))

    async def _run(self, api: LoadedApi, job: Job) -> None:
        try:
            await self._answer(api, job)
        finally:
            api.running.pop(id(job), None)
            self._start_next(api)

    async def _answer(self, api: LoadedApi, job: Job) -> None:
        name, content_type, query, headers, request_id, _ = job.header
        result: Any = None
        payload: Any = None
        try:
            payload = await pl.parse_form(content_type, job.body) if pl.is_form(content_type) else None
            if api.signature.is_async:
                if payload is None:
                    payload = pl.parse_body(content_type, job.body)
                result = await api.instance.predict(**_offer(api.signature.predict_args, payload, query, headers))
                reply = pl.to_reply(result)
            else:
                payload, result, reply = await self.loop.run_in_executor(api.executor, self._predict_sync, api, job,
                                                                         payload)
        except pl.BadPayload as e:
            reply = pl.Reply(400, [(b"content-type", b"application/json")],
                             pl.error_body(str(e), request_id=request_id))
        except HTTPException as e:
            extra = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (e.headers or {}).items()]
            reply = pl.Reply(e.status_code, [(b"content-type", b"application/json"), *extra],
                             pl.error_body(str(e.detail), request_id=request_id))
        except Exception as e:  # noqa: BLE001 - user code failed: log the traceback, answer 500 without it
            log.error("API %s request %s: predict() raised %s: %s", name, request_id, type(e).__name__, e,
                      exc_info=True)
            reply = pl.Reply(500, [(b"content-type", b"application/json")], pl.error_body(
                f"API {name!r} failed while handling this request ({type(e).__name__}); "
                "the traceback is in the daemon's log", api=name, request_id=request_id))
        if reply.stream is None:
            job.conn.reply(job.job_id, reply.status, reply.headers, reply.body, api.version)
        else:
            await self._stream(api, job, reply)
        if api.signature.post_predict_args is not None and reply.status < 500:
            self.loop.run_in_executor(api.executor, self._post_predict, api, job, payload, result)

    def _predict_sync(self, api: LoadedApi, job: Job, payload: Any) -> tuple[Any, Any, pl.Reply]:
        _, content_type, query, headers, _, _ = job.header
        if payload is None:
            payload = pl.parse_body(content_type, job.body)
        result = api.instance.predict(**_offer(api.signature.predict_args, payload, query, headers))
        return payload, result, pl.to_reply(result)

    def _post_predict(self, api: LoadedApi, job: Job, payload: Any, result: Any) -> None:
        _, _, query, headers, request_id, _ = job.header
        try:
            api.instance.post_predict(**_offer(api.signature.post_predict_args or (), payload, query, headers, result))
        except Exception:  # noqa: BLE001 - the response is gone already; the log is the only place for this
            log.exception("API %s request %s: post_predict() raised", api.name, request_id)

    async def _stream(self, api: LoadedApi, job: Job, reply: pl.Reply) -> None:
        """Send a generator's parts as they come; a failure midway aborts the response."""
        conn, job_id = job.conn, job.job_id
        conn.send(START, job_id, *with_header((reply.status, reply.headers, api.version)))
        stream = reply.stream
        try:
            if hasattr(stream, "__anext__"):
                async for part in stream:  # type: ignore[union-attr]
                    if conn.closed:
                        return
                    conn.send(CHUNK, job_id, pl.chunk_bytes(part))
            else:
                done = object()
                while not conn.closed:
                    part = await self.loop.run_in_executor(api.executor, _next, stream, done)
                    if part is done:
                        break
                    conn.send(CHUNK, job_id, pl.chunk_bytes(part))
        except Exception as e:  # noqa: BLE001 - user code failed midway: log it, cut the response
            log.error("API %s request %s: the streamed response failed: %s", api.name, job.header[4], e,
                      exc_info=True)
            if not conn.closed:
                conn.send(ABORT, job_id, str(e).encode())
            return
        if not conn.closed:
            conn.send(END, job_id)
