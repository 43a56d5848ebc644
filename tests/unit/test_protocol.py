from __future__ import annotations

import pickle
import random

import pytest

from predictord.protocol import (
    BIG_FRAME,
    CONTROL,
    JOB,
    READ_SIZE,
    REPLY,
    FrameReader,
    control,
    frame,
    split_header,
    split_header_view,
    with_header,
)
from predictord.scoreboard import Scoreboard


def test_frames_survive_any_split() -> None:
    data = b"".join(frame(JOB, 7, *with_header(("api", "ct"), b"x" * 1000)))
    data += control({"op": "started"})
    for step in (1, 3, 64, len(data)):
        got: list[tuple[int, int, bytes]] = []
        reader = FrameReader(lambda k, j, p, got=got: got.append((k, j, bytes(p))))
        for i in range(0, len(data), step):
            reader.feed(data[i:i + step])
        assert [(k, j) for k, j, _ in got] == [(JOB, 7), (CONTROL, 0)]
        header, body = split_header(memoryview(got[0][2]))
        assert header == ("api", "ct") and body == b"x" * 1000
        assert pickle.loads(got[1][2]) == {"op": "started"}


def read_into(reader: FrameReader, data: bytes, sizes: random.Random, reads: tuple[int, ...] = (1, 7, 13, 4096, 65536,
              READ_SIZE, 10 * 2**20)) -> None:
    """What a BufferedProtocol's socket does: read into the reader's buffer, as much as came (at most what fits)."""
    at = 0
    while at < len(data):
        buffer = reader.buffer()
        assert len(buffer) > 0, "the reader always has room for the next read"
        n = min(len(buffer), len(data) - at, sizes.choice(reads))
        buffer[:n] = data[at : at + n]
        del buffer  # the transport lets go of it before it reports the read
        reader.filled(n)
        at += n


@pytest.mark.parametrize("seed", range(6))
def test_frames_read_into_the_buffer_survive_any_split_and_large_ones_keep_their_own_buffer(seed: int) -> None:
    rng = random.Random(seed)
    sizes = [0, 1, 100, BIG_FRAME - 40, BIG_FRAME - 1, BIG_FRAME, BIG_FRAME + 1, READ_SIZE - 13, READ_SIZE,
             READ_SIZE + 5, 3 * 2**20]
    bodies = [rng.randbytes(rng.choice(sizes)) for _ in range(40)]
    data = b"".join(b"".join(frame(REPLY, i, *with_header((i, "h"), body))) for i, body in enumerate(bodies))
    got: list[tuple[int, int, memoryview]] = []
    reader = FrameReader(lambda k, j, p: got.append((k, j, p)))
    read_into(reader, data, rng)
    assert [(k, j) for k, j, _ in got] == [(REPLY, i) for i in range(len(bodies))]
    for i, (_, _, payload) in enumerate(got):  # checked only now: no later read overwrote an earlier frame's view
        header, body = split_header_view(payload)
        assert header == (i, "h") and body == bodies[i], f"frame {i} ({len(bodies[i])} bytes)"
    assert reader.buffer().nbytes == READ_SIZE, "nothing left over: the buffer is empty again"


def test_a_large_frame_is_handed_on_in_a_buffer_of_its_own_without_a_copy() -> None:
    body = random.Random(1).randbytes(BIG_FRAME * 3)
    data = b"".join(frame(REPLY, 9, *with_header((200, [], "v"), body)))
    got: list[memoryview] = []
    reader = FrameReader(lambda k, j, p: got.append(p))
    read_into(reader, data, random.Random(2), (4096,))  # it arrives in parts, as a socket gives a large one
    (payload,) = got
    assert type(payload.obj) is bytearray and payload.nbytes == len(data) - 13, "the frame's own buffer, whole"
    head, view = split_header_view(payload)
    assert head == (200, [], "v") and view.obj is payload.obj and view == body, "the body is a view of it"


def test_scoreboard_sums_over_http_workers() -> None:
    s = Scoreboard()
    s.http_slots = 3
    s.add(0, 5, 2, +1)
    s.add(2, 5, 2, +1)
    s.add(1, 4, s.apis - 1, +1)
    assert (s.outstanding(5), s.outstanding(4), s.api_outstanding(2)) == (2, 1, 2)
    s.clear_model(0, 5, {2: 1})
    assert (s.outstanding(5), s.api_outstanding(2)) == (1, 1)
    s.clear_http(2)
    assert (s.outstanding(5), s.api_outstanding(2), s.api_outstanding(s.apis - 1)) == (0, 0, 1)
    v = s.routes_version
    assert s.bump_routes() == v + 1
