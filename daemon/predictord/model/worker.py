"""A model worker: a process pinned to one device that loads predictors and runs their predict().

It is forked by the master, listens on a Unix socket for jobs from the HTTP workers, and takes the next queued job
for an API whenever one of that API's threads is free. Predictor code runs off the event loop (sync predict in a
thread; async predict on the loop), so the loop keeps reading jobs, answering the master and beating.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import dataclasses
import gc
import logging
import os
import pickle
import signal
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil

from .. import metrics
from ..devices import Device
from ..loader import LoadError, instantiate, load_class, warm_up
from ..namespace import namespace_name
from ..protocol import (
    CONTROL,
    Control,
    Failed,
    FrameReader,
    Health,
    Hung,
    Load,
    Loaded,
    LogLevel,
    Problem,
    Started,
    Unload,
    Unloaded,
    control,
)
from ..scoreboard import RunMarks, Scoreboard
from .children import Children
from .jobs import JobRunner
from .lanes import Lanes
from .loaded import LOADING, LoadedApi, in_api, request_problem
from .process import prepare_process

log = logging.getLogger("predictord.model")
HUNG_GRACE = 5.0  # seconds past its request timeout before a running predict counts as hung
DRAIN_QUIET = 0.5
REPORT_EVERY = 1.0  # seconds: at most one request-error report per API to the master
CLOSE_TIMEOUT = 10.0  # seconds a predictor's close() may take at its unload
COLLECT_AFTER = 1.0  # seconds after the last unload before one garbage collection (never one per unload)


def _loop_factory() -> Any:
    """uvloop when installed (uvicorn[standard] brings it): cheaper wake-ups on the job path."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


class ModelWorker:
    """The model worker process's state and event loop."""

    def __init__(self, slot: int, device: Device, ctl: socket.socket, scoreboard: Scoreboard, socket_path: str,
                 threads: int, row: int) -> None:
        self.slot = slot
        self.device = device
        self.ctl = ctl
        self.scoreboard = scoreboard
        self.socket_path = socket_path
        self.torch_threads = threads
        self.row = row
        self.marks = RunMarks(scoreboard, row)
        self.apis: dict[str, LoadedApi] = {}
        self.loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="load")
        self.stopping = False
        self.loop: asyncio.AbstractEventLoop
        self.reported: dict[str, tuple[float, int, Problem | None]] = {}  # API -> (last report, errors since, newest)
        self.children: Children
        self.tidy = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tidy")  # children's looks and ends
        self.health = ThreadPoolExecutor(max_workers=2, thread_name_prefix="health")  # the APIs' health() calls
        self.looking: concurrent.futures.Future[None] | None = None
        self.collect_at: float | None = None

    # -- process set-up -------------------------------------------------------------------------------------------
    def run(self) -> None:
        """Entry point in the forked child; never returns."""
        code = 0
        try:
            self._init_process()
            with asyncio.Runner(loop_factory=_loop_factory()) as runner:
                runner.run(self._serve())
        except Exception:  # noqa: BLE001 - last resort in a child: log and exit with a code the master names
            log.exception("model worker %s (pid %d) crashed", self.device.label, os.getpid())
            code = 1
        finally:
            logging.shutdown()
            os._exit(code)

    def _init_process(self) -> None:
        self.children = prepare_process(self.slot, self.device, self.torch_threads, self.scoreboard, self.row,
                                        Path(self.socket_path).parent)

    async def _serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.loop.add_signal_handler(signal.SIGTERM, self._begin_stop)
        runner = JobRunner(self.apis, self.loop, self._publish_service, self.marks, self._report)
        server = await self.loop.create_unix_server(runner.connection(), self.socket_path)
        self.ctl.setblocking(False)
        reader = FrameReader(self._control_frame)
        self.loop.add_reader(self.ctl.fileno(), self._read_control, reader)
        self.scoreboard.beat(self.slot)
        self._tell_master(Started(os.getpid(), psutil.Process().memory_info().rss))
        while not self.stopping:
            self._beat()
            runner.flush_marks()
            runner.trim(time.monotonic())  # mappings of shared files removed since, or idle; idle answer files
            runner.failures.sweep()  # the count of failures whose tracebacks were not logged
            self._send_reports()
            self._tend()
            self._check_health()
            metrics.tally.flush()
            await asyncio.sleep(0.5)
        server.close()
        await self._drain()
        for api in list(self.apis.values()):
            await self._teardown(api)  # close(), atexit hooks, the processes it started
        await self.loop.run_in_executor(self.tidy, self.children.end_all)
        self._send_reports(force=True)
        runner.failures.sweep(every=True)
        metrics.tally.flush()

    def _tend(self) -> None:
        """With each heartbeat: look at the processes predictors started (off the loop), forget the batch costs of an
        API that is idle here and no call has fed for a while, although its other replicas hold more jobs than one
        batch of this one (a queue this replica could take: costs.py), and the one garbage collection that unloads
        asked for."""
        now = time.monotonic()
        for api in self.apis.values():
            idle = not api.running and not api.queue  # a long batch in progress is not a stale figure
            waiting = idle and self.scoreboard.api_outstanding(api.slot) > api.threads * api.max_batch_size
            if waiting and api.costs.forget_if_stale(now):
                self.scoreboard.set_cost(self.slot, api.slot, 0.0, 0.0)
        if self.looking is None or self.looking.done():
            self.looking = self.tidy.submit(self.children.look)
        if self.collect_at is not None and now >= self.collect_at:
            self.collect_at = None
            gc.collect()
            torch = sys.modules.get("torch")
            if torch is not None and self.device.kind == "gpu" and torch.cuda.is_initialized():
                torch.cuda.empty_cache()

    def _check_health(self) -> None:
        """Each API's health(), every health_interval, in a thread of its own (a slow one holds no predict); a
        raise, False, or no answer within the interval is a failure: the master takes the replica out of the
        routes, and after health_failures in a row the worker loads the same version again (make before break)."""
        now = time.monotonic()
        for api in list(self.apis.values()):
            check = api.health_check
            if check is not None and check.done():
                api.health_check = None
                self._judge_health(api, check)
            elif check is not None and now - api.health_due > max(api.health_interval, 1.0):
                api.health_check = None  # hung: a failure (the call goes on in its thread, unheeded)
                self._health_failed(api, Problem(f"health() did not return within {api.health_interval:g}s",
                                                 kind="health"))
            if api.health_interval and api.health_check is None and not api.reloading and now >= api.health_due:
                api.health_due = now + api.health_interval
                api.health_check = self.health.submit(in_api, api, api.instance.health)

    def _judge_health(self, api: LoadedApi, check: concurrent.futures.Future[Any]) -> None:
        error = check.exception()
        if error is None and check.result() is not False:
            if api.health_failures:
                log.info("API %s version %s is healthy again", api.name, api.version)
                self._tell_master(Health(api.name, api.version, True))
            api.health_failures = 0
            return
        problem = request_problem(api, error, "health()") if error is not None else Problem(
            "health() returned False", kind="health")
        self._health_failed(api, dataclasses.replace(problem, kind="health"))

    def _health_failed(self, api: LoadedApi, problem: Problem) -> None:
        api.health_failures += 1
        reload = api.health_failures >= api.health_limit and api.load is not None
        log.warning("API %s version %s: health check failed (%d in a row): %s%s", api.name, api.version,
                    api.health_failures, problem, "; loading it again" if reload else "")
        self._tell_master(Health(api.name, api.version, False, problem, api.health_failures, reload))
        if reload:
            api.reloading = True
            self.loop.create_task(self._load(api.load))

    def _report(self, api: LoadedApi, problem: Problem) -> None:
        """A request-time error, for the master (GET /NAME, status): sent at once, or with the next heartbeat when
        one was sent less than REPORT_EVERY ago (with how many came meanwhile)."""
        last, count, _ = self.reported.get(api.name, (0.0, 0, None))
        self.reported[api.name] = (last, count + 1, problem)
        if time.monotonic() - last >= REPORT_EVERY:
            self._send_reports(only=api.name)

    def _send_reports(self, only: str | None = None, force: bool = False) -> None:
        now = time.monotonic()
        for name, (last, count, problem) in list(self.reported.items()):
            if problem is None or (only is not None and name != only):
                continue
            if force or now - last >= REPORT_EVERY:
                api = self.apis.get(name)
                self._tell_master(Failed(name, api.version if api else problem.version or "", problem, count))
                self.reported[name] = (now, 0, None)

    def _publish_service(self, api: LoadedApi, took: float, jobs: int) -> None:
        """A predict() of ``jobs`` jobs took ``took`` seconds: the figures dispatch and the rebalancer read."""
        self.scoreboard.set_service(self.slot, api.slot, api.service)
        self.scoreboard.add_busy(self.slot, took)
        if api.costs.observe(jobs, took):
            self.scoreboard.set_cost(self.slot, api.slot, *api.costs.line)

    def _begin_stop(self) -> None:
        self.stopping = True

    async def _drain(self) -> None:
        """Finish what was accepted, and go once no job has come for DRAIN_QUIET seconds (a job sent just before
        the HTTP workers saw the new routes still gets its answer)."""
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < DRAIN_QUIET:
            if any(a.busy for a in self.apis.values()):
                quiet_since = time.monotonic()
            self._beat()
            await asyncio.sleep(0.05)

    def _beat(self) -> None:
        """Stamp the heartbeat, and tell the master of a predict hung past its deadline: a CPU worker goes on
        beating (the master moves its APIs to a new worker, make before break, so the hang costs only its own API);
        a GPU worker stops beating, to be replaced (there may be no room on its GPU for a second worker)."""
        now = time.monotonic()
        hung = False
        for api in self.apis.values():
            for job in api.running:
                if now - job.alive > api.timeout + HUNG_GRACE:
                    hung = True
                    if not job.reported:
                        job.reported = True
                        self._tell_master(Hung(api.name, round(now - job.alive, 1), job.request_id))
        if not hung or self.device.kind == "cpu":
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

    def _tell_master(self, message: Control) -> None:
        try:
            self.ctl.setblocking(True)
            self.ctl.sendall(control(message))
        except OSError:
            pass  # the master is gone; _read_control will notice
        finally:
            self.ctl.setblocking(False)

    def _control_frame(self, kind: int, job_id: int, payload: memoryview) -> None:
        if kind != CONTROL:
            return
        message = pickle.loads(payload)
        if isinstance(message, Load):
            self.loop.create_task(self._load(message))
        elif isinstance(message, Unload):
            self.loop.create_task(self._unload(message.api))
        elif isinstance(message, LogLevel):
            logging.getLogger().setLevel(message.level.upper())

    async def _load(self, m: Load) -> None:
        source = m.source
        started = time.monotonic()
        before, rss_before = self._memory(), psutil.Process().memory_info().rss
        try:
            api = await self.loop.run_in_executor(self.loader, self._load_blocking, m)
        except LoadError as e:
            log.error("model worker %s: API %s version %s failed to load: %s", self.device.label, source.name,
                      m.version, e)
            self._tell_master(Loaded(source.name, m.version, e.problem()))
            # What the failed version allocated (a warm-up batch too large for the GPU, say) is freed with it, but
            # torch keeps freed GPU memory reserved: the collection that unloads ask for gives it back. The
            # processes its import or __init__ started end with it, as an unloaded version's do.
            self.collect_at = time.monotonic() + COLLECT_AFTER
            await self.loop.run_in_executor(self.tidy, self.children.end, namespace_name(source.name, m.version))
            return
        old = self.apis.get(api.name)
        if old is None:
            self.scoreboard.set_service(self.slot, api.slot, 0.0)  # the slot may have served another API before
        self.apis[api.name] = api
        self._regroup()
        if old is not None:
            self.loop.create_task(self._retire(old))
        seconds = time.monotonic() - started
        footprint = max(0, self._memory() - before)
        api.rss = max(0, psutil.Process().memory_info().rss - rss_before)
        log.info("model worker %s (pid %d): API %s version %s loaded in %.2fs", self.device.label, os.getpid(),
                 api.name, api.version, seconds)
        self._tell_master(Loaded(api.name, api.version, None, seconds, footprint, api.signature.as_dict(), api.rss))

    def _regroup(self) -> None:
        """Only a worker's one API may run its predicts on the event loop (see LoadedApi.observe)."""
        alone = len(self.apis) == 1
        for api in self.apis.values():
            api.alone = alone
            if not alone:
                api.inline = False

    def _memory(self) -> int:
        """What a load costs where it matters: torch's reserved GPU memory on a GPU, else resident host memory."""
        torch = sys.modules.get("torch")
        if self.device.kind == "gpu" and torch is not None and torch.cuda.is_initialized():
            return int(torch.cuda.memory_reserved())
        return int(psutil.Process().memory_info().rss)

    def _load_blocking(self, m: Load) -> LoadedApi:
        source = m.source
        LOADING.set(namespace_name(source.name, m.version))  # what its import and __init__ print or start is its
        imported = load_class(source, m.version)
        instance = instantiate(imported, m.config, self.device.torch_device)
        serving = m.serving
        try:
            warm_up(imported, instance, tuple(serving.get("warmup", ())), serving["max_batch_size"])
        except LoadError:
            if imported.signature.has_close:  # dropped like an unloaded version: what __init__ started stops
                self._close_unready(source.name, m.version, instance.close)
            imported.namespace.unload()
            raise
        threads = serving["threads"]
        interval = float(serving.get("health_interval", 0)) if imported.signature.has_health else 0.0
        return LoadedApi(source.name, m.version, instance, imported.signature, threads, serving["timeout"],
                         Lanes(self.loop, threads, f"predict-{source.name}"),
                         max_batch_size=serving["max_batch_size"], batch_wait=serving["batch_wait_ms"] / 1000,
                         slot=m.api_slot, namespace=imported.namespace, load=m, health_interval=interval,
                         health_limit=int(serving.get("health_failures", 3)),
                         health_due=time.monotonic() + interval)

    @staticmethod
    def _close_unready(name: str, version: str, close: Any) -> None:
        """close() of a version whose warm-up failed, in the loader's thread's context (what it prints or starts is
        that version's), bounded by CLOSE_TIMEOUT as at an unload: a close() that hangs holds no later load."""
        context = contextvars.copy_context()

        def run() -> None:
            try:
                context.run(close)
            except Exception:  # noqa: BLE001 - user code, and its load has failed already: say so and go on
                log.exception("API %s version %s: close() raised after its warm-up failed", name, version)

        closing = threading.Thread(target=run, name=f"close-{name}", daemon=True)
        closing.start()
        closing.join(CLOSE_TIMEOUT)
        if closing.is_alive():
            log.error("API %s version %s: close() took longer than %gs; going on without it", name, version,
                      CLOSE_TIMEOUT)

    async def _unload(self, name: str) -> None:
        api = self.apis.get(name)
        if api is not None:
            # HTTP workers that have not read the routes without us yet may still send a job: serve those until
            # none has come for DRAIN_QUIET seconds, as a draining worker does.
            quiet_since = time.monotonic()
            while time.monotonic() - max(quiet_since, api.last_job) < DRAIN_QUIET or api.busy:
                await asyncio.sleep(0.05)
            if self.apis.get(name) is api:
                del self.apis[name]
                self._regroup()
            await self._retire(api)
        self._tell_master(Unloaded(name, psutil.Process().memory_info().rss))

    async def _retire(self, api: LoadedApi) -> None:
        """Let an API's accepted jobs finish, then drop its instance and give its memory back."""
        while api.busy:
            await asyncio.sleep(0.05)
        await self._teardown(api)
        self.collect_at = time.monotonic() + COLLECT_AFTER  # one collection for a burst of unloads, not one each

    async def _teardown(self, api: LoadedApi) -> None:
        """The end of a version here: its close() (bounded by CLOSE_TIMEOUT), its modules and atexit hooks, the
        processes it started."""
        close = getattr(api.instance, "close", None) if api.signature.has_close else None
        if close is not None:
            try:
                await asyncio.wait_for(self.loop.run_in_executor(None, in_api, api, close), CLOSE_TIMEOUT)
            except TimeoutError:
                log.error("API %s version %s: close() took longer than %gs; going on without it", api.name,
                          api.version, CLOSE_TIMEOUT)
            except Exception:  # noqa: BLE001 - user code at unload: say so and go on
                log.exception("API %s version %s: close() raised", api.name, api.version)
        api.lanes.shutdown()
        api.instance = None
        if api.namespace is not None:
            owner = api.namespace.name
            api.namespace.unload()  # its modules, its sys.path entries, its environment changes, its atexit hooks
            api.namespace = None
            await self.loop.run_in_executor(self.tidy, self.children.end, owner)
