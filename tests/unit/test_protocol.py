from __future__ import annotations

import pickle

from predictord.protocol import CONTROL, JOB, FrameReader, control, frame, split_header, with_header
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
