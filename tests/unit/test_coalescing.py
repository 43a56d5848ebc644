"""CoalescingTransport: the writes of one loop turn leave as one writelines; close() sends what is held first. Chunks:
a request body as uvicorn hands it to the app, without the copies of its bytearray."""

from __future__ import annotations

import asyncio
from typing import Any

from predictord.http.guard import Chunks, CoalescingTransport


class Recorder:
    """The transport below: records what reached it, in order."""

    def __init__(self) -> None:
        self.calls: list[Any] = []
        self.closing = False

    def writelines(self, parts: list[bytes]) -> None:
        self.calls.append(list(parts))

    def close(self) -> None:
        self.calls.append("close")
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str) -> str:
        return f"info:{name}"


def test_one_turn_of_writes_leaves_together_and_close_flushes_first() -> None:
    async def scenario() -> list[Any]:
        below = Recorder()
        t = CoalescingTransport(below, asyncio.get_running_loop())  # type: ignore[arg-type]
        t.write(b"HTTP/1.1 200 OK\r\n\r\n")
        t.write(b"body")
        assert below.calls == [] and t.get_write_buffer_size() == len(b"HTTP/1.1 200 OK\r\n\r\nbody")
        await asyncio.sleep(0)  # the end of the turn
        t.write(b"second")
        t.close()  # held bytes go before the close
        await asyncio.sleep(0)  # the flush scheduled for "second" finds nothing left to send
        t.write(b"late")
        await asyncio.sleep(0)  # written after close: dropped, as a closing transport drops writes
        assert t.get_extra_info("peername") == "info:peername"  # the rest is the real transport's
        assert vars(t)["get_extra_info"] == below.get_extra_info  # kept: the next call finds it without a miss
        return below.calls

    assert asyncio.run(scenario()) == [[b"HTTP/1.1 200 OK\r\n\r\n", b"body"], [b"second"], "close"]


def test_body_chunks_are_kept_as_they_came_and_joined_once() -> None:
    chunks = Chunks()
    assert len(chunks) == 0 and bytes(chunks) == b""
    first = b"a" * 70_000
    chunks += first
    assert len(chunks) == 70_000 and bytes(chunks) is first  # a lone chunk is handed over as it is, not copied
    chunks += b"bc"
    assert len(chunks) == 70_002 and bytes(chunks) == first + b"bc"
