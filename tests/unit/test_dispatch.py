"""The dispatcher in-process: the choice of a replica from typed rows, the queue count, and jobs over a real Unix
socket to a fake model worker that speaks the wire protocol."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from predictord.http.dispatch import Dispatcher, WorkerLost
from predictord.protocol import (
    CANCEL,
    JOB,
    REPLY,
    START,
    FrameProtocol,
    JobHeader,
    ReplicaRow,
    ReplyHeader,
    Route,
    split_header,
    with_header,
)
from predictord.scoreboard import Scoreboard

HEADER = JobHeader("echo", None, b"", None, "rid", 1.0)


def test_one_replica_is_chosen_without_looking() -> None:
    only = ReplicaRow(3, "/run/m3.sock", 2, "v1")
    assert Dispatcher(Scoreboard(), 0).choose((only,), 0) is only


def test_the_replica_that_finishes_first_is_chosen() -> None:
    board = Scoreboard()
    slow, fast = ReplicaRow(0, "/run/m0.sock", 1, "v1"), ReplicaRow(1, "/run/m1.sock", 1, "v1")
    board.set_cost(0, 5, 0.0, 0.010)
    board.set_cost(1, 5, 0.0, 0.001)
    dispatcher = Dispatcher(board, 0)
    assert {dispatcher.choose((slow, fast), 5) for _ in range(4)} == {fast}
    board.add(0, 1, 5, +20)  # 20 jobs ahead on the fast one: 21 ms there, 10 ms on the slow one
    assert dispatcher.choose((slow, fast), 5) is slow


def test_lanes_divide_the_jobs_ahead_and_a_batch_is_one_lane() -> None:
    board = Scoreboard()
    one, four = ReplicaRow(0, "/a", 1, "v1"), ReplicaRow(1, "/b", 4, "v1", lanes=4)
    board.add(0, 0, 0, +2)
    board.add(0, 1, 0, +4)  # 2 ahead on one lane, 1 per lane on four: the same service time
    assert Dispatcher(board, 0).choose((one, four), 0) is four
    batching = ReplicaRow(1, "/b", 8, "v1", lanes=1)  # batches of 8 on one lane: 4 ahead is 4 jobs' time
    assert Dispatcher(board, 0).choose((one, batching), 0) is one


def test_a_batch_is_priced_at_what_a_batch_of_that_size_costs_there() -> None:
    board = Scoreboard()
    gpu = ReplicaRow(0, "/g", 8, "v1", lanes=1)  # batches of 8: 10 ms a call, 0.1 ms more a job
    cpu = ReplicaRow(1, "/c", 1, "v1", lanes=1)  # one at a time, 12 ms each
    board.set_cost(0, 2, 0.010, 0.0001)
    board.set_cost(1, 2, 0.0, 0.012)
    board.add(0, 0, 2, +6)  # 6 ahead on the GPU: the new job rides in their batch (10.7 ms) rather than 12 ms
    assert Dispatcher(board, 0).choose((gpu, cpu), 2) is gpu
    board.add(0, 0, 2, +2)  # 8 ahead: a full batch, then the new one's (20.9 ms)
    assert Dispatcher(board, 0).choose((gpu, cpu), 2) is cpu


def test_a_replica_that_has_not_run_yet_is_priced_as_the_cheapest() -> None:
    board = Scoreboard()
    known, fresh = ReplicaRow(0, "/a", 1, "v1"), ReplicaRow(1, "/b", 1, "v1")
    board.set_cost(0, 3, 0.0, 0.005)
    board.add(0, 0, 3, +1)
    assert Dispatcher(board, 0).choose((known, fresh), 3) is fresh  # 1 ahead there, none on the fresh one
    board.add(0, 1, 3, +2)
    assert Dispatcher(board, 0).choose((known, fresh), 3) is known


def test_queued_is_outstanding_beyond_capacity() -> None:
    board = Scoreboard()
    route = Route(7, (ReplicaRow(0, "/a", 2, "v1"), ReplicaRow(1, "/b", 3, "v1")), 1.0, 10, False, "ready")
    assert Dispatcher(board, 0).queued(route) == -5
    board.add(0, 0, 7, +8)
    assert Dispatcher(board, 0).queued(route) == 3


class FakeModel(FrameProtocol):
    """A model worker that answers each job as ``answer`` says and records what it was sent."""

    def __init__(self, answer: Callable[[FakeModel, int, JobHeader, bytes], None], seen: list[object]) -> None:
        super().__init__()
        self.answer = answer
        self.seen = seen

    def frame_received(self, kind: int, job_id: int, payload: memoryview) -> None:
        if kind == JOB:
            header, body = split_header(payload)
            header = JobHeader._make(header)  # typed headers cross the wire as plain tuples
            self.seen.append(header)
            self.answer(self, job_id, header, body)
        else:
            self.seen.append(kind)


async def exchange(tmp_path: Path, answer: Callable[[FakeModel, int, JobHeader, bytes], None],
                   timeout: float = 2.0) -> tuple[object, list[object], int]:
    """One job through a Dispatcher to a fake model worker: what submit gave (or raised), what the worker saw, and
    the jobs still outstanding on the scoreboard."""
    seen: list[object] = []
    path = str(tmp_path / "m0.sock")
    server = await asyncio.get_running_loop().create_unix_server(lambda: FakeModel(answer, seen), path)
    board = Scoreboard()
    dispatcher = Dispatcher(board, 0)
    try:
        _, got = await dispatcher.submit(ReplicaRow(0, path, 1, "v1"), 4, HEADER, b"body", timeout)
        result: object = got
    except (TimeoutError, WorkerLost) as e:
        result = e
    if isinstance(result, TimeoutError):  # the dispatcher sends CANCEL: wait for the worker to read it
        deadline = time.monotonic() + 10
        while CANCEL not in seen and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
    server.close()
    return result, seen, board.api_outstanding(4)


@pytest.mark.parametrize("typed", [True, False], ids=["ReplyHeader", "plain tuple"])
def test_a_reply_arrives_as_a_reply_header(tmp_path: Path, typed: bool) -> None:
    def answer(conn: FakeModel, job_id: int, header: JobHeader, body: bytes) -> None:
        head = (201, [(b"content-type", b"text/plain")], "v1")
        conn.send(REPLY, job_id, *with_header(ReplyHeader(*head) if typed else head, body.upper()))

    got, seen, outstanding = asyncio.run(exchange(tmp_path, answer))
    assert seen == [HEADER] and isinstance(seen[0], JobHeader) and outstanding == 0
    assert got == (ReplyHeader(201, [(b"content-type", b"text/plain")], "v1"), b"BODY")
    assert isinstance(got[0], ReplyHeader)  # type: ignore[index]


def test_a_stream_start_has_no_body(tmp_path: Path) -> None:
    def answer(conn: FakeModel, job_id: int, header: JobHeader, body: bytes) -> None:
        conn.send(START, job_id, *with_header(ReplyHeader(200, [], "v2")))

    got, _, outstanding = asyncio.run(exchange(tmp_path, answer))
    assert got == (ReplyHeader(200, [], "v2"), None) and outstanding == 1, "until the stream's END"


def test_a_deadline_cancels_the_job_on_the_worker(tmp_path: Path) -> None:
    got, seen, outstanding = asyncio.run(exchange(tmp_path, lambda *_: None, timeout=0.05))
    assert isinstance(got, TimeoutError) and seen == [HEADER, CANCEL]
    assert outstanding == 1, "counted until the worker answers: it may be running it"


def test_a_worker_that_closes_fails_its_jobs(tmp_path: Path) -> None:
    def answer(conn: FakeModel, job_id: int, header: JobHeader, body: bytes) -> None:
        conn.transport.close()

    got, _, outstanding = asyncio.run(exchange(tmp_path, answer))
    assert isinstance(got, WorkerLost) and "model worker 0 exited" in str(got) and outstanding == 0


def test_a_worker_that_closes_before_the_job_is_added_fails_it_at_once(tmp_path: Path) -> None:
    """The connection can close in the loop turns between the connect and the job's send (a worker dying as it
    accepts): the job must not go on a link whose connection_lost has already run, or it waits for its deadline."""

    class Closing(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            transport.close()

    async def run() -> object:
        path = str(tmp_path / "m0.sock")
        server = await asyncio.get_running_loop().create_unix_server(Closing, path)
        dispatcher = Dispatcher(Scoreboard(), 0)
        connect = dispatcher.link

        async def link_seen_closing(slot: int, path: str, row: int = -1) -> object:
            link = await connect(slot, path, row)
            deadline = time.monotonic() + 10
            while not link.lost and time.monotonic() < deadline:  # the window, held open until it has closed
                await asyncio.sleep(0.01)
            return link

        dispatcher.link = link_seen_closing  # type: ignore[method-assign,assignment]
        try:
            return await dispatcher.submit(ReplicaRow(0, path, 1, "v1", row=2), 4, HEADER, b"body", 30.0)
        except WorkerLost as e:
            return e
        finally:
            server.close()

    got = asyncio.run(asyncio.wait_for(run(), 10))
    assert isinstance(got, WorkerLost) and not got.started, "never sent: safe to send elsewhere"
