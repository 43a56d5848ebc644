"""Streamed answers: a generator's parts sent to the HTTP worker as they come, no further ahead of the client than
protocol.STREAM_WINDOW.

The HTTP worker says SENT as the client's connection takes the parts; a stream a window ahead waits for it, so a
client that reads slowly holds the generator back (a sync one is simply not asked for its next part) instead of
filling the HTTP worker's memory with the rest, and one that reads nothing for the API's ``[serving] timeout`` is cut
and its generator closed. The timeout bounds each part, not the stream: a stream is hung only if its next part takes
longer (``Job.alive``), never while it waits for its client.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from typing import Any

from .. import payload as pl
from ..protocol import ABORT, CHUNK, END, PART_COST, START, STREAM_WINDOW, ReplyHeader, with_header
from .loaded import Job, LoadedApi, in_api, next_part

log = logging.getLogger("predictord.model")


def wake(job: Job) -> None:
    """A stream waiting for room looks again: the client read some, or the stream should stop."""
    if job.room is not None:
        job.room.set()


async def room(job: Job, stall: float) -> bool:
    """Wait until the client has read enough of a stream for its next part; False if it read none for ``stall``
    seconds. True at once if the stream should stop anyway (the client left, or the HTTP worker): the caller sees."""
    while job.unsent >= STREAM_WINDOW and not (job.conn.closed or job.cancelled):
        if job.room is None:
            job.room = asyncio.Event()
        job.room.clear()
        job.alive = math.inf  # waiting for the client is no hang of the predictor's (the stall is bounded here)
        try:
            await asyncio.wait_for(job.room.wait(), stall)
        except TimeoutError:
            return False
        finally:
            job.alive = time.monotonic()
    return True


def send_part(job: Job, data: bytes) -> None:
    job.conn.send(CHUNK, job.job_id, data)
    job.unsent += len(data) + PART_COST
    job.alive = time.monotonic()  # a stream is hung only if its next part takes longer than the API's timeout


async def relay(api: LoadedApi, job: Job, reply: pl.Reply, failed: Callable[..., None]) -> None:
    """Send a generator's parts as they come; a failure midway aborts the response (and goes to ``failed``, the
    runner's: logged as failures.py says, and reported); a client that
    left, or read nothing for the API's timeout (or an HTTP worker gone), stops it, and the generator is closed so
    that its cleanup runs."""
    conn, job_id = job.conn, job.job_id
    conn.send(START, job_id, *with_header(ReplyHeader(reply.status, reply.headers, api.version)))
    stream = reply.stream
    finished = stalled = False
    try:
        if hasattr(stream, "__anext__"):
            async for part in stream:  # type: ignore[union-attr]
                if conn.closed or job.cancelled:
                    break
                send_part(job, pl.chunk_bytes(part))
                if job.unsent >= STREAM_WINDOW and not await room(job, api.timeout):
                    stalled = True
                    break
            else:
                finished = True
        else:
            done = object()
            while not (conn.closed or job.cancelled):
                if job.unsent >= STREAM_WINDOW and not await room(job, api.timeout):
                    stalled = True
                    break
                part = await api.lanes.run(next_part, api, stream, done)
                if part is done:
                    finished = True
                    break
                send_part(job, pl.chunk_bytes(part))
    except (Exception, SystemExit) as e:  # noqa: BLE001 - user code failed midway: log it, cut the response
        text = f"the streamed response failed: {type(e).__name__}: {e}"
        failed(api, e, "its streamed response", job.request_id, text)
        if not conn.closed:
            conn.send(ABORT, job_id, str(e).encode())
        return
    if finished:
        if not conn.closed:
            conn.send(END, job_id)
        return
    if stalled:
        why = f"its client read none of it for {api.timeout:g}s ([serving] timeout)"
        log.warning("API %s request %s: the stream is cut: %s; closing its generator", api.name, job.request_id, why)
    else:
        why = "the HTTP worker went away" if conn.closed else "the client left"
        log.info("API %s request %s: nobody reads the stream any more (%s); closing its generator", api.name,
                 job.request_id, why)
    await close(api, stream)
    if not conn.closed:
        conn.send(ABORT, job_id, f"cut: {why}".encode() if stalled else b"cancelled: the client left")


async def close(api: LoadedApi, stream: Any) -> None:
    """Run a generator's cleanup (its finally blocks, with blocks): an async one here, a sync one in a thread."""
    try:
        if hasattr(stream, "aclose"):
            await stream.aclose()
        elif hasattr(stream, "close"):
            await api.lanes.run(in_api, api, stream.close)
    except Exception:  # noqa: BLE001 - user code; the response is over already
        log.exception("API %s: closing a stream raised", api.name)
