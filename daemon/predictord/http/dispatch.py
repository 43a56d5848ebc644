"""The HTTP worker's side of dispatch: connections to model workers, the choice of a replica, and job futures.

A request goes to the replica with the fewest outstanding jobs per thread, counted over all HTTP workers through
the scoreboard (least-outstanding with a global view). The job carries the payload as the front made it (see
protocol.py). When a model worker's connection closes, every job this HTTP worker had on it is settled at once: the
scoreboard's marks tell the jobs that never started (``WorkerLost.started`` False: safe to send again, elsewhere)
from those that were inside ``predict()`` (they fail).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..bodies import Reader
from ..costs import expected_finish
from ..protocol import (
    ABORT,
    BIG_FRAME,
    CANCEL,
    CHUNK,
    END,
    JOB,
    RELEASE,
    REPLY,
    SENT,
    SENT_BYTES,
    START,
    FrameProtocol,
    JobHeader,
    ReplicaRow,
    ReplyHeader,
    Route,
    split_header,
    split_header_view,
    with_header,
)
from ..scoreboard import Scoreboard, job_ids_of

log = logging.getLogger("predictord.http")


Answer = tuple[ReplyHeader, bytes | memoryview | None]  # the reply's header and its body (None: a stream follows)


class WorkerLost(Exception):
    """The model worker holding a job went away before it answered; ``started``: the job may have run (it was
    marked as started, or the worker lost count), so it must not be sent again."""

    def __init__(self, message: str, worker: int = -1, row: int = -1, started: bool = True) -> None:
        super().__init__(message)
        self.worker = worker
        self.row = row
        self.started = started


class ClientGone(Exception):
    """The client closed its connection before its answer: nobody is left to answer."""


@dataclass
class PendingJob:
    """A job sent to a model worker and not yet settled."""

    api_slot: int
    future: asyncio.Future[Answer]
    link: ModelLink
    job_id: int
    stream: asyncio.Queue[bytes | memoryview | BaseException | None] | None = None

    def cancel(self) -> None:
        """Tell the model worker nobody wants this job any more: it leaves the queue, or a stream stops."""
        if not self.link.lost and self.job_id in self.link.jobs:
            self.link.send(CANCEL, self.job_id)

    def sent(self, size: int) -> None:
        """Tell the model worker that ``size`` more bytes of this stream reached the client's connection: it may
        send as many more (protocol.STREAM_WINDOW)."""
        if not self.link.lost and self.job_id in self.link.jobs:
            self.link.send(SENT, self.job_id, SENT_BYTES.pack(size))


class ModelLink(FrameProtocol):
    """This HTTP worker's connection to one model worker."""

    def __init__(self, dispatcher: Dispatcher, slot: int, path: str, row: int = -1) -> None:
        super().__init__()
        self.dispatcher = dispatcher
        self.slot = slot
        self.path = path  # a replacement worker in the same slot listens on a new path
        self.row = row  # the worker process's row of job marks in the scoreboard
        self.jobs: dict[int, PendingJob] = {}
        self.lost = False

    def frame_received(self, kind: int, job_id: int, payload: memoryview) -> None:
        job = self.jobs.get(job_id)
        if job is None:
            return
        if kind == REPLY:
            self._settle(job_id, job)
            head, body = split_header(payload) if len(payload) < BIG_FRAME else split_header_view(payload)
            reply = _reply_header(head)  # a large body stays in the buffer it was read into (protocol.FrameReader)
            if reply.body_at:  # or it is in the model worker's shared file: copied out, and the file given back
                try:
                    if not job.future.done():  # unread if nobody waits for it (deadline, or the client left)
                        body = self.dispatcher.answers.read(reply.body_at)
                except (OSError, ValueError) as e:  # its worker exited and the master removed its files
                    job.future.set_exception(WorkerLost(f"model worker {self.slot} exited while its answer was on "
                                                        f"its way ({e})", self.slot, self.row))
                finally:
                    self.send(RELEASE, job_id)
            if not job.future.done():
                job.future.set_result((reply, body))
        elif kind == START:
            head, _ = split_header(payload)
            job.stream = asyncio.Queue()
            if not job.future.done():
                job.future.set_result((_reply_header(head), None))
        elif kind == CHUNK and job.stream is not None:  # a large part: as it was read (no one reuses its buffer)
            job.stream.put_nowait(bytes(payload) if len(payload) < BIG_FRAME else payload)
        elif kind in (END, ABORT):
            self._settle(job_id, job)
            if job.stream is not None:
                job.stream.put_nowait(None if kind == END else WorkerLost(bytes(payload).decode(errors="replace")))

    def _settle(self, job_id: int, job: PendingJob) -> None:
        del self.jobs[job_id]
        d = self.dispatcher
        d.scoreboard.add(d.http_slot, self.slot, job.api_slot, -1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        d = self.dispatcher
        if d.links.get(self.slot) is self:
            del d.links[self.slot]
        counts: dict[int, int] = {}
        _, started, lost_count = d.scoreboard.running(self.row) if self.row >= 0 else ({}, set(), True)
        for job_id, job in self.jobs.items():
            counts[job.api_slot] = counts.get(job.api_slot, 0) + 1
            ran = lost_count or job_id in started or job.future.done()
            error = WorkerLost(f"model worker {self.slot} exited while handling this request", self.slot, self.row,
                               ran)
            if not job.future.done():
                job.future.set_exception(error)
            elif job.stream is not None:
                job.stream.put_nowait(error)
        d.scoreboard.clear_model(d.http_slot, self.slot, counts)
        self.jobs.clear()


def _reply_header(head: ReplyHeader | tuple[Any, ...]) -> ReplyHeader:
    """A REPLY or START header as the typed record (a model worker may send it as a plain tuple: it pickles
    several times faster than a NamedTuple)."""
    return head if type(head) is ReplyHeader else ReplyHeader(*head)  # body_at may be left out


def _expire(future: asyncio.Future[Answer]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())


def _client_gone(future: asyncio.Future[Answer]) -> None:
    if not future.done():
        future.set_exception(ClientGone())


class Dispatcher:
    """This HTTP worker's links to the model workers, and the choice of a replica for each job."""

    def __init__(self, scoreboard: Scoreboard, http_slot: int) -> None:
        self.scoreboard = scoreboard
        self.http_slot = http_slot
        self.links: dict[int, ModelLink] = {}
        self.connecting: dict[tuple[int, str], asyncio.Future[ModelLink]] = {}
        self.job_ids = itertools.count(job_ids_of(http_slot))  # unique over HTTP workers: the model worker marks them
        self.answers = Reader()  # the model workers' shared files of large answers, mapped (bodies.py)
        self.turn = 0

    async def link(self, slot: int, path: str, row: int = -1) -> ModelLink:
        link = self.links.get(slot)
        if link is not None and not link.lost:
            if link.path == path:
                return link
            link.transport.close()  # the routes name a new worker in this slot: the old link is stale
        key = (slot, path)
        pending = self.connecting.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._connect(slot, path, row))
            self.connecting[key] = pending
            pending.add_done_callback(lambda _: self.connecting.pop(key, None))
        return await asyncio.shield(pending)

    async def _connect(self, slot: int, path: str, row: int) -> ModelLink:
        loop = asyncio.get_running_loop()
        _, link = await loop.create_unix_connection(lambda: ModelLink(self, slot, path, row), path)
        self.links[slot] = link
        return link

    def choose(self, replicas: Sequence[ReplicaRow], api_slot: int) -> ReplicaRow:
        """The replica where a new job should finish first (shortest expected delay, over all HTTP workers): the
        jobs ahead of it there, in batches at what a batch of that size costs on that replica (measured per batch
        size, costs.py; a CPU batch of 8 costs about 8 of 1, a GPU batch about 1), then its own batch. Ties go to
        the fewest jobs ahead per lane, then round-robin. A replica that has not run a job yet is priced as the
        cheapest one that has."""
        if len(replicas) == 1:
            return replicas[0]
        board = self.scoreboard
        lines = [board.cost(r.worker, api_slot) for r in replicas]
        known = [line for line in lines if line[0] or line[1]]
        default = min(known, key=sum) if known else (0.0, 1.0)
        self.turn += 1
        n = len(replicas)
        best, best_key = replicas[0], (float("inf"), float("inf"))
        for i in range(n):
            k = (self.turn + i) % n
            r = replicas[k]
            fixed, per_job = lines[k] if (lines[k][0] or lines[k][1]) else default
            ahead = board.outstanding(r.worker)
            key = (expected_finish(ahead, r.lanes, r.threads // max(1, r.lanes), fixed, per_job), ahead / r.lanes)
            if key < best_key:
                best, best_key = r, key
        return best

    def queued(self, route: Route) -> int:
        """Jobs for an API beyond what its replicas are running, over all HTTP workers."""
        return self.scoreboard.api_outstanding(route.slot) - route.capacity

    async def submit(self, replica: ReplicaRow, api_slot: int, header: JobHeader, body: bytes, timeout: float,
                     on_lost: list[Callable[[], None]] | None = None) -> tuple[PendingJob, Answer]:
        """Send a job and wait for its first answer; TimeoutError past the deadline, WorkerLost if it dies,
        ClientGone if the client's connection closes first (``on_lost``: its callbacks, run by guard.py)."""
        link = self.links.get(replica.worker)
        if link is None or link.lost or link.path != replica.socket:
            link = await self.link(replica.worker, replica.socket, replica.row)
            if link.lost:  # it closed between the connect and now: its connection_lost settled nothing of ours
                raise WorkerLost(f"model worker {link.slot} closed its connection", link.slot, link.row, False)
        job_id = next(self.job_ids)
        loop = asyncio.get_running_loop()
        job = PendingJob(api_slot, loop.create_future(), link, job_id)
        link.jobs[job_id] = job
        self.scoreboard.add(self.http_slot, link.slot, api_slot, +1)
        sent: tuple[Any, ...] = header
        if link.row >= 0 and replica.threads > replica.lanes:  # a batching replica waits only for what is on its way
            self.scoreboard.toward(self.http_slot, link.row)
            sent = (*header[:-1], True)  # JobHeader.counted (its last field): its worker counts it as taken
        link.send(JOB, job_id, *with_header(sent, body))
        # A plain timer rather than wait_for(shield(...)): two fewer tasks and futures on every request.
        timer = loop.call_later(max(timeout, 0.0), _expire, job.future)
        gone = functools.partial(_client_gone, job.future)
        if on_lost is not None:
            on_lost.append(gone)
        try:
            return job, await job.future
        except (TimeoutError, ClientGone):  # drop it from the worker's queue if it has not started
            job.cancel()
            raise
        finally:
            timer.cancel()
            if on_lost is not None:
                on_lost.remove(gone)
