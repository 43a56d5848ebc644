"""Wire format between HTTP workers and model workers, and the master's control messages.

A frame is ``u32 length | u8 kind | u64 job id | body``. Job frames carry a pickled header tuple and the request
body: a JSON body parsed once, by the HTTP worker, and pickled (the header's content type is then None), any other
body raw, for the model worker to parse; reply frames carry a pickled ``(status, headers)`` and the response body.
Both ends are processes of this daemon, so pickle is safe here and is the fastest stdlib codec for small tuples.
No client bytes are ever unpickled: a client's content type is a string, never None.
"""

from __future__ import annotations

import asyncio
import pickle
import struct
from collections.abc import Callable
from typing import Any

PREFIX = struct.Struct("!IBQ")  # length of (kind + job id + body), kind, job id
HEADER_LEN = struct.Struct("!I")

# HTTP worker -> model worker
JOB = 1
CANCEL = 2
# model worker -> HTTP worker
REPLY = 10  # a whole response: header + body
START = 11  # a streamed response begins: header
CHUNK = 12  # a streamed body part
END = 13  # a streamed response ends
ABORT = 14  # a streamed response failed midway (body: message)
# master <-> model worker
CONTROL = 20


def frame(kind: int, job_id: int, *parts: bytes) -> list[bytes]:
    """The pieces of one frame, for ``transport.writelines`` (no copy of a large body)."""
    size = 9 + sum(len(p) for p in parts)
    return [PREFIX.pack(size, kind, job_id), *parts]


def with_header(header: Any, body: bytes = b"") -> tuple[bytes, bytes, bytes]:
    """A pickled header, its length, and the body: the payload of JOB, REPLY and START frames."""
    h = pickle.dumps(header, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER_LEN.pack(len(h)), h, body


def split_header(payload: memoryview) -> tuple[Any, bytes]:
    """Inverse of ``with_header``."""
    (n,) = HEADER_LEN.unpack_from(payload)
    return pickle.loads(payload[4 : 4 + n]), bytes(payload[4 + n :])


def control(message: dict[str, Any]) -> bytes:
    """A control message from or to the master, as one frame."""
    return b"".join(frame(CONTROL, 0, pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)))


class FrameReader:
    """Splits a byte stream into frames; feed it what the socket gave, it calls back once per whole frame."""

    def __init__(self, on_frame: Callable[[int, int, memoryview], None]) -> None:
        self._buf = bytearray()
        self._on_frame = on_frame

    def feed(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        pos = 0
        end = len(buf)
        frames = []
        while end - pos >= PREFIX.size:
            size, kind, job_id = PREFIX.unpack_from(buf, pos)
            if end - pos - 4 < size:
                break
            frames.append((kind, job_id, bytes(buf[pos + PREFIX.size : pos + 4 + size])))
            pos += 4 + size
        if pos:
            del buf[:pos]
        for kind, job_id, body in frames:
            self._on_frame(kind, job_id, memoryview(body))


class FrameProtocol(asyncio.Protocol):
    """An asyncio protocol speaking frames; subclasses implement ``frame_received``."""

    transport: asyncio.Transport

    def __init__(self) -> None:
        self._reader = FrameReader(self.frame_received)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio.Transport

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)

    def frame_received(self, kind: int, job_id: int, payload: memoryview) -> None:
        raise NotImplementedError

    def send(self, kind: int, job_id: int, *parts: bytes) -> None:
        self.transport.writelines(frame(kind, job_id, *parts))
