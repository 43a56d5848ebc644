"""Running jobs inside a model worker: per-API queues, threads, batches, and turning results into replies.

A job waits in its API's queue until one of the API's ``threads`` runners is free. A runner of a batching API
(``max_batch_size > 1``) takes up to that many queued jobs, waits at most ``batch_wait_ms`` for more (on an event,
not a thread), and calls ``predict`` once with lists. Sync predictors run in the API's thread pool, async ones on
the loop; either way the loop keeps reading jobs.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

from starlette.background import BackgroundTask
from starlette.datastructures import Headers, QueryParams
from starlette.responses import FileResponse

from .. import bodies, metrics
from .. import payload as pl
from ..bodies import SHARED_FROM, Reader, SharedBody
from ..protocol import (
    CANCEL,
    JOB,
    RELEASE,
    REPLY,
    SENT,
    SENT_BYTES,
    FrameProtocol,
    JobHeader,
    Problem,
    ReplyHeader,
    split_header,
    with_header,
)
from ..scoreboard import RunMarks
from . import streams
from .failures import COUNT, LINE, TRACEBACK, FailureLog
from .loaded import CURRENT, Job, LoadedApi, error_reply, in_api, request_problem

log = logging.getLogger("predictord.model")


class JobConnection(FrameProtocol):
    """One HTTP worker's connection: jobs in, replies out."""

    def __init__(self, runner: JobRunner) -> None:
        super().__init__()
        self.runner = runner
        self.closed = False

    def frame_received(self, kind: int, job_id: int, payload: memoryview) -> None:
        if kind == JOB:
            header, body = split_header(payload)
            job = Job(self, job_id, JobHeader._make(header), body)
            if job.header.counted:
                self.runner.board.taken(self.runner.row)
            self.runner.submit(job)
        elif kind == CANCEL:
            self.runner.cancel(self, job_id)
        elif kind == RELEASE:
            self.runner.give_back(self, job_id)
        elif kind == SENT:
            self.runner.sent(self, job_id, SENT_BYTES.unpack(payload)[0])

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.runner.discard(self)

    def reply(self, job_id: int, status: int, headers: list[pl.Header], body: bytes, version: str = "") -> None:
        """A whole answer; one of SHARED_FROM bytes or more goes through a shared file (JobRunner.lend)."""
        if not self.closed:
            ref = self.runner.lend(self, job_id, body) if len(body) >= SHARED_FROM else ""
            self.send(REPLY, job_id, *with_header(ReplyHeader(status, headers, version, ref), b"" if ref else body))

    def flushed(self) -> None:
        if self.runner.unflushed:  # the replies of this turn are in the transport now: their jobs may be unmarked
            self.runner.flush_marks()


def _wake_waiter(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class JobRunner:
    """Queues, runners and replies for the APIs loaded in one model worker."""

    def __init__(self, apis: dict[str, LoadedApi], loop: asyncio.AbstractEventLoop,
                 publish: Callable[[LoadedApi, float, int], None], marks: RunMarks,
                 report: Callable[[LoadedApi, Problem], None]) -> None:
        self.apis = apis
        self.loop = loop
        self.publish = publish
        self.marks = marks
        self.board, self.row = marks.board, marks.row
        self.report = report
        self.unflushed: list[Job] = []  # answered jobs whose reply has not left this process (held, or buffered)
        self.bodies = Reader()  # the HTTP workers' shared files, mapped
        self.answers: bodies.Pool | None = None  # this worker's shared files for large answers, made on first use
        self.share_answers = bodies.available()
        self.lent: dict[tuple[JobConnection, int], SharedBody] = {}  # answers an HTTP worker has yet to read
        self.background: set[asyncio.Task[None]] = set()  # responses' background tasks, running
        self.failures = FailureLog()  # which failures of predictor code get a traceback in the log
        self.unshared_at = -math.inf  # when an answer last went through the socket for want of room in /dev/shm

    def connection(self) -> Callable[[], JobConnection]:
        return lambda: JobConnection(self)

    def submit(self, job: Job) -> None:
        api = self.apis.get(job.header.api)
        if job.header.counted:  # one fewer on its way here: every waiting batch looks again (it may be theirs)
            self.recheck(self.apis.values())
        if api is None:
            reply = error_reply(503, f"API {job.header.api!r} is not loaded on this worker; retry", job)
            job.conn.reply(job.job_id, reply.status, reply.headers + [(b"retry-after", b"1")], reply.body)
            return
        job.arrived = api.last_job = time.monotonic()
        api.queue.append(job)
        if not job.header.counted:
            self.recheck((api,))
        self.start_runners(api)

    @staticmethod
    def recheck(apis: Iterable[LoadedApi]) -> None:
        """Wake the batches of these APIs that wait for more jobs: each takes what queued and decides again."""
        for api in apis:
            waiter = api.waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    def cancel(self, conn: JobConnection, job_id: int) -> None:
        """The HTTP worker gave up on a job (deadline, or its client left): drop it if it has not started; a
        running stream stops before its next part. A running predict() cannot be stopped: it finishes unread."""
        for api in self.apis.values():
            for job in api.queue:
                if job.conn is conn and job.job_id == job_id:
                    api.queue.remove(job)
                    conn.reply(job_id, 504, [], b"")
                    return
        running = self._running(conn, job_id)
        if running is not None:
            running.cancelled = True
            streams.wake(running)

    def sent(self, conn: JobConnection, job_id: int, size: int) -> None:
        """The HTTP worker wrote ``size`` more bytes of a stream to its client: the stream may send as many more."""
        job = self._running(conn, job_id)
        if job is not None:
            job.unsent -= size
            streams.wake(job)

    def _running(self, conn: JobConnection, job_id: int) -> Job | None:
        for api in self.apis.values():
            for job in api.running:
                if job.conn is conn and job.job_id == job_id:
                    return job
        return None

    def lend(self, conn: JobConnection, job_id: int, body: bytes) -> str:
        """Put a large answer into one of this worker's shared files (bodies.py) and return its reference for the
        reply's header, or "" to send it in the frame (no /dev/shm, or no room there). The file is the HTTP
        worker's to read until it sends RELEASE for the job (``give_back``), or its connection closes."""
        if not self.share_answers:
            return ""
        if self.answers is None:
            self.answers = bodies.Pool(os.getppid(), bodies.answers_of(os.getpid()))  # the master removes them
        shared = self.answers.take()
        try:
            shared.write(body)
        except OSError as e:
            shared.remove()
            now = time.monotonic()
            if now - self.unshared_at > 60:  # once a minute at most: a full /dev/shm would otherwise log every answer
                self.unshared_at = now
                log.warning("a %d-byte answer goes through the socket: no room for it in /dev/shm (%s)", len(body), e)
            return ""
        self.lent[(conn, job_id)] = shared
        return shared.ref

    def give_back(self, conn: JobConnection, job_id: int) -> None:
        """The HTTP worker has read the answer it was lent: its file may take the next one."""
        shared = self.lent.pop((conn, job_id), None)
        if shared is not None and self.answers is not None:
            self.answers.give(shared)

    def trim(self, now: float) -> None:
        """With each heartbeat: let go of idle mappings of the HTTP workers' files, and of idle answer files."""
        self.bodies.sweep(now)
        if self.answers is not None:
            self.answers.trim(now)

    def discard(self, conn: JobConnection) -> None:
        """An HTTP worker went away (killed): its queued jobs have nobody to answer; drop them, unrun. The answers
        it had yet to read are nobody's now."""
        for key in [key for key in self.lent if key[0] is conn]:
            self.give_back(*key)
        for api in self.apis.values():
            for job in api.running:
                if job.conn is conn:
                    streams.wake(job)  # a stream waiting for its client to read stops
            kept = [job for job in api.queue if job.conn is not conn]
            if len(kept) != len(api.queue):
                log.warning("API %s: dropped %d queued requests of an HTTP worker that went away", api.name,
                            len(api.queue) - len(kept))
                api.queue.clear()
                api.queue.extend(kept)

    def start_runners(self, api: LoadedApi) -> None:
        while api.queue and api.runners < api.threads:
            api.runners += 1  # the job leaves the queue now, so the next loop turn sees the true queue
            self.loop.create_task(self._runner(api, api.queue.popleft()))

    async def _runner(self, api: LoadedApi, first: Job) -> None:
        """Answer jobs (or batches) until the queue is empty: one task per burst, not one per request."""
        CURRENT.set(api)  # this task's context: inline and async predicts run in it
        batch = [first]
        try:
            while True:
                if api.max_batch_size > 1:
                    await self._fill(api, batch)
                now = time.monotonic()
                queue_wait, predict_time, batch_size = api.observers()
                for job in batch:
                    job.started = job.alive = now
                    job.mark = self.marks.start(api.slot, job.job_id)  # before predict: a crash finds it marked
                    api.running.add(job)
                    metrics.tally.observe(queue_wait, now - job.arrived)
                try:
                    if api.max_batch_size > 1:
                        await self._answer_batch(api, batch)
                    else:
                        await self._answer(api, batch[0])
                finally:
                    for job in batch:
                        api.running.discard(job)
                        self._unmark(job)
                    took = time.monotonic() - now
                    metrics.tally.observe(predict_time, took)
                    metrics.tally.observe(batch_size, len(batch))
                    per_job = took / len(batch)
                    api.service = per_job if api.service == 0 else api.service + (per_job - api.service) * 0.2
                    self.publish(api, took, len(batch))
                if not api.queue or api.runners > api.threads:  # threads lowered by a reload: this one stops
                    return
                batch = [api.queue.popleft()]
        finally:
            api.runners -= 1
            self.start_runners(api)

    async def _payload(self, job: Job) -> Any:
        """A job's payload, from its frame or from the shared file its HTTP worker wrote (bodies.py: raw bytes, or a
        payload it parsed, pickled), through this worker's mapping of that file."""
        header = job.header
        if not header.body_at:
            return await pl.load(header.content_type, job.body)
        try:
            if header.content_type is None:
                return self.bodies.unpickle(header.body_at)
            body = self.bodies.read(header.body_at)
        except (OSError, ValueError) as e:
            raise pl.BadPayload(f"the request body is gone ({e}); its client was answered already") from None
        return await pl.load(header.content_type, body)

    def _unmark(self, job: Job) -> None:
        """A job is done once its reply is out of this process (in the socket, a dead worker's reply still arrives);
        until then it stays marked, so an HTTP worker never sends a job again that may have run."""
        conn = job.conn
        transport = getattr(conn, "transport", None)
        if conn.closed or transport is None or not (conn.holding() or transport.get_write_buffer_size()):
            self.marks.end(job.mark)
        else:
            self.unflushed.append(job)

    def flush_marks(self) -> None:
        """Unmark the answered jobs whose replies have left since (after each flush of held replies, and with every
        heartbeat for those the socket's buffer held)."""
        pending, self.unflushed = self.unflushed, []
        for job in pending:
            self._unmark(job)

    def _failed(self, api: LoadedApi, job: Job, e: BaseException) -> pl.Reply:
        """The reply for a predictor that raised (payload.exception_reply); a failure of its own is logged with its
        traceback and reported to the master (GET /NAME and status show it)."""
        if not pl.client_error(e):
            hint = " (sys.exit in predict() ends the request, not the worker)" if isinstance(e, SystemExit) else ""
            self.failed(api, e, "predict()", job.request_id, f"predict() raised {type(e).__name__}: {e}{hint}")
        return pl.exception_reply(e, api.name, job.request_id)

    def failed(self, api: LoadedApi, e: BaseException, doing: str, request_id: str, text: str) -> None:
        """A failure of predictor code while answering: logged (with its traceback once a minute per kind, then on
        a line, then counted: failures.py), and reported to the master. On the loop."""
        problem = request_problem(api, e, doing)
        where = f"{problem.file}:{problem.line}" if problem.file else ""
        how = self.failures.how(api.name, e, where, request_id)
        if how != COUNT:
            log.error("API %s request %s: %s%s", api.name, request_id, text, f" (at {where})" if how == LINE and
                      where else "", exc_info=e if how == TRACEBACK else None)
        self.report(api, problem)

    async def _fill(self, api: LoadedApi, batch: list[Job]) -> None:
        """Take more queued jobs into the batch, and wait for more (at most batch_wait) only while some are on their
        way to this worker: when none is, waiting cannot help, and the batch runs now (so batching never makes a
        light load wait: batch_wait is a bound, not a delay). Only the jobs of batching APIs count as on their way
        (``JobHeader.counted``), so a busy API without batching beside this one never makes its batches wait; each
        one that arrives wakes every waiting batch, so a batch stops waiting once what was on its way turns out to
        be another batching API's."""
        deadline = time.monotonic() + api.batch_wait
        while len(batch) < api.max_batch_size:
            while api.queue and len(batch) < api.max_batch_size:
                batch.append(api.queue.popleft())
            remaining = deadline - time.monotonic()
            if len(batch) >= api.max_batch_size or remaining <= 0 or self.board.in_transit(self.row) <= 0:
                return
            waiter = api.waiter = self.loop.create_future()  # a future and a timer: cheaper than wait_for's task
            timer = self.loop.call_later(remaining, _wake_waiter, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                api.waiter = None

    # -- one request ----------------------------------------------------------------------------------------------
    async def _answer(self, api: LoadedApi, job: Job) -> None:
        query, headers = job.header.query_string, job.header.headers
        result: Any = None
        payload: Any = None
        try:
            payload = await self._payload(job)
            if api.signature.is_async:
                result = await api.instance.predict(**pl.offer(api.signature.predict_args, payload, query, headers))
                # a FileResponse reads its file: off the loop
                reply = await asyncio.to_thread(pl.to_reply, result) if isinstance(result, FileResponse) else \
                    pl.to_reply(result)
            elif api.inline:
                result, reply = self._predict_sync(api, job, payload)
            else:
                result, reply = await api.lanes.run(self._predict_sync, api, job, payload)
        except (Exception, SystemExit) as e:  # noqa: BLE001 - user code: every failure becomes a clear reply
            reply = self._failed(api, job, e)
        if reply.stream is None:
            job.conn.reply(job.job_id, reply.status, reply.headers, reply.body, api.version)
        else:
            await streams.relay(api, job, reply, self.failed)
        if reply.background is not None:
            self._background(api, job, reply.background)
        if api.signature.post_predict_args is not None and reply.status < 500:
            api.lanes.run(self._post_predict, api, job, payload, result)

    def _predict_sync(self, api: LoadedApi, job: Job, payload: Any) -> tuple[Any, pl.Reply]:
        CURRENT.set(api)
        query, headers = job.header.query_string, job.header.headers
        started = time.perf_counter()
        try:
            result = api.instance.predict(**pl.offer(api.signature.predict_args, payload, query, headers))
            return result, pl.to_reply(result)
        finally:
            api.observe(time.perf_counter() - started)

    def _post_predict(self, api: LoadedApi, job: Job, payload: Any, result: Any) -> None:
        CURRENT.set(api)
        query, headers = job.header.query_string, job.header.headers
        try:
            asked = api.signature.post_predict_args or ()
            api.instance.post_predict(**pl.offer(asked, payload, query, headers, result))
        except (Exception, SystemExit) as e:  # noqa: BLE001 - the response is gone already: log it, report it
            self.loop.call_soon_threadsafe(self.failed, api, e, "post_predict()", job.request_id,
                                           f"post_predict() raised {type(e).__name__}: {e}")

    # -- a batch --------------------------------------------------------------------------------------------------
    async def _answer_batch(self, api: LoadedApi, batch: list[Job]) -> None:
        """Load each payload (a bad one fails alone), call predict once with lists, answer each request."""
        good: list[Job] = []
        payloads: list[Any] = []
        for job in batch:
            try:
                payloads.append(await self._payload(job))
                good.append(job)
            except pl.BadPayload as e:
                self._send(api, job, error_reply(400, str(e), job))
        if not good:
            return
        try:
            if api.signature.is_async:
                results = await api.instance.predict(**self._batch_args(api, good, payloads))
            else:
                started = time.perf_counter()
                args = self._batch_args(api, good, payloads)
                if api.inline:  # short batches, alone on the worker: on the loop (see LoadedApi.observe_batch)
                    results = api.instance.predict(**args)
                else:
                    results = await api.lanes.run(in_api, api, lambda: api.instance.predict(**args))
                api.observe_batch(time.perf_counter() - started)
            if not isinstance(results, (list, tuple)) or len(results) != len(good):
                got = f"{len(results)} results" if isinstance(results, (list, tuple)) else type(results).__name__
                raise TypeError(f"predict() returned {got} for a batch of {len(good)}; a batching predictor must "
                                "return a list with one result per payload")
            if any(isinstance(r, FileResponse) for r in results):  # each reads its file: off the loop
                replies = await asyncio.to_thread(lambda: [pl.to_reply(r) for r in results])
            else:
                replies = [pl.to_reply(r) for r in results]
        except (Exception, SystemExit) as e:  # noqa: BLE001 - the whole batch failed: each gets the clear reply
            replies = [self._failed(api, job, e) for job in good]
            results = None
        for job, reply in zip(good, replies, strict=True):
            if reply.stream is not None:
                reply = error_reply(500, "a batched predict() cannot stream its results", job, api=api.name)
            self._send(api, job, reply)
        if api.signature.post_predict_args is not None and results is not None:
            api.lanes.run(self._post_predict_batch, api, good, payloads, list(results))

    def _post_predict_batch(self, api: LoadedApi, jobs: list[Job], payloads: list[Any], results: list[Any]) -> None:
        """post_predict of a batching predictor gets lists, like its predict."""
        CURRENT.set(api)
        offered = {**self._batch_args(api, jobs, payloads), "payload": payloads, "response": results}
        try:
            api.instance.post_predict(**{n: offered.get(n) for n in api.signature.post_predict_args or ()})
        except (Exception, SystemExit) as e:  # noqa: BLE001 - the responses are gone already: log it, report it
            text = f"post_predict() raised {type(e).__name__} after a batch of {len(jobs)}: {e}"
            self.loop.call_soon_threadsafe(self.failed, api, e, "post_predict()", jobs[-1].request_id, text)

    def _batch_args(self, api: LoadedApi, jobs: list[Job], payloads: list[Any]) -> dict[str, Any]:
        args: dict[str, Any] = {}
        for name in api.signature.predict_args:
            if name == "payload":
                args[name] = payloads
            elif name == "query_params":
                args[name] = [QueryParams(j.header.query_string) for j in jobs]
            elif name == "headers":
                args[name] = [Headers(raw=j.header.headers or []) for j in jobs]
        return args

    def _send(self, api: LoadedApi, job: Job, reply: pl.Reply) -> None:
        job.conn.reply(job.job_id, reply.status, reply.headers, reply.body, api.version)
        if reply.background is not None:
            self._background(api, job, reply.background)

    def _background(self, api: LoadedApi, job: Job, task: BackgroundTask) -> None:
        """A starlette Response's background task, as starlette runs it once the response is sent: on this loop (a
        sync function in starlette's thread pool), after the reply leaves in this turn's flush. A failure is logged
        and shown as the API's last error, as post_predict()'s is."""
        async def run() -> None:
            CURRENT.set(api)
            try:
                await task()
            except (Exception, SystemExit) as e:  # noqa: BLE001 - user code; the response is gone already
                self.failed(api, e, "the response's background task", job.request_id,
                            f"the response's background task raised {type(e).__name__}: {e}")

        running = self.loop.create_task(run())
        self.background.add(running)  # the loop keeps only a weak reference to a task
        running.add_done_callback(self.background.discard)
