"""The HTTP workers' connections: uvicorn's httptools protocol with bounds on what a client may send.

httptools puts no bound on a request's head, and uvicorn arms no timer before a connection's first request nor while
a head or body trickles in (every byte resets its keep-alive timer). So a client could pin memory with megabytes of
headers, or hold connections for ever by sending a byte now and then (slowloris). This protocol:
- answers 431 and closes when the request line and headers pass ``[server] max_header_bytes``;
- answers 408 and closes when a request's head and body have not all arrived within ``[server] read_timeout`` of its
  first byte (or of the connection's opening; a connection that sent nothing is just closed);
- answers a request it cannot parse with 400, and every one of these with a JSON ``error``, like the app's errors;
- tells the app when a client goes away while its request waits for a model worker (``scope["extensions"]``), so
  the job is dropped from the worker's queue rather than run for nobody;
- answers a connection past the worker's share of open files (openfiles.py) with 503 and Retry-After, rather than
  letting libuv close it unanswered once the files run out.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from .. import openfiles

log = logging.getLogger("predictord.http")
LINGER = 0.5  # seconds a refused connection is read (and its data dropped) before it is closed
LINGER_AT_MOST = 16  # refused connections lingering at once; past them one is closed at once (a flood's files)


@dataclass(frozen=True)
class Limits:
    """What one request may send: head size in bytes, and seconds from its first byte to its last; and how many
    connections one HTTP worker holds at once (0: no bound)."""

    max_header_bytes: int
    read_timeout: float
    max_connections: int = 0


def raw_error(status: int, message: str, extra: bytes = b"") -> bytes:
    """A whole HTTP/1.1 error response with a JSON body, for answers written below the ASGI app; ``extra``: more
    header lines, each ending in CRLF."""
    request_id = os.urandom(16).hex()
    body = json.dumps({"error": message, "request_id": request_id}, separators=(",", ":")).encode()
    return b"".join([STATUS_LINE[status], b"content-type: application/json\r\ncontent-length: ",
                     str(len(body)).encode(), b"\r\nx-request-id: ", request_id.encode(), b"\r\n", extra,
                     b"connection: close\r\n\r\n", body])


class CoalescingTransport:
    """A transport whose writes within one turn of the loop go out as one ``writelines``.

    uvicorn writes a response's head and its body separately: two send() calls, and on loopback two packets for the
    client to read. Held until the end of the loop turn, they leave together. Everything else is the transport's.
    """

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._held:
            self._loop.call_soon(self.flush)
        self._held.append(data)

    def flush(self) -> None:
        if self._held:
            held, self._held = self._held, []
            if not self._transport.is_closing():
                self._transport.writelines(held)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(map(len, self._held))

    def __getattr__(self, name: str) -> Any:
        """The transport's own; a method is kept on this object, so that uvicorn's next call (is_closing on every
        request) finds it without a miss: each miss raises an AttributeError first, about 1 us."""
        value = getattr(self._transport, name)
        if callable(value):
            self.__dict__[name] = value
        return value


class Chunks:
    """A request's body chunks waiting for the app, in place of uvicorn's ``cycle.body`` bytearray: ``+=`` keeps each
    chunk as httptools made it (the bytearray copied every chunk into itself, and its ``bytes()`` copied the whole
    again), ``len`` is what uvicorn's flow control reads, and ``bytes()`` joins them (a lone chunk as it is)."""

    __slots__ = ("parts", "size")

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0

    def __iadd__(self, chunk: bytes) -> Chunks:
        self.parts.append(chunk)
        self.size += len(chunk)
        return self

    def __len__(self) -> int:
        return self.size

    def __bytes__(self) -> bytes:
        return self.parts[0] if len(self.parts) == 1 else b"".join(self.parts)


ON_LOST = "predictord.on_lost"  # scope["extensions"] key: callbacks run when the client's connection closes


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a head-size limit and a read deadline per request.

    The deadline is kept by one sweep per connection (a timer every ``read_timeout / 4``, at most 1 s), not by a
    timer per request: a request costs a clock read, and keep-alive connections carry many.
    """

    refused_at = 0.0  # when a connection was last refused for the open-file bound, and logged (once a minute)
    lingering = 0  # refused connections of this worker not closed yet

    def __init__(self, *args: Any, limits: Limits, on_refused: Callable[[], None] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self.on_refused = on_refused
        self.refused = False
        self.max_head = limits.max_header_bytes
        self.head_bytes = 0  # request line and headers of the request being read
        self.in_head = True  # waiting for a request's line and headers (httptools buffers a header until it ends)
        self.head_raw = 0  # bytes received while in_head: bounds a header that never ends
        self.too_large = False
        self.due = True  # a request must arrive by began + read_timeout (from the connection, or its first byte)
        self.receiving = False  # a request has begun and not all of it has arrived
        self.began = 0.0
        self.sweep: asyncio.TimerHandle | None = None
        self.on_lost: list[Callable[[], None]] = []  # the app's, for the requests it is waiting on
        self.extensions: dict[str, dict[object, object]] = {ON_LOST: {"callbacks": self.on_lost}}  # ASGI: dicts

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]
        if 0 < self.limits.max_connections < len(self.connections):  # (uvicorn counted this one)
            self._refuse()
            return
        self.began = self.loop.time()
        self.sweep = self.loop.call_later(self._period(), self._sweep)

    def _refuse(self) -> None:
        """A 503 before the request is read, the writing side shut, and whatever the client sends within LINGER
        seconds read and dropped (closing at once could reset the connection before the client read the answer),
        unless LINGER_AT_MOST others linger: their files are the ones a flood of clients would run out."""
        self.refused = True
        cap = self.limits.max_connections
        self.transport.write(raw_error(503, f"this HTTP worker holds {cap} connections, as many as its open-file "
                                            "limit allows; retry shortly", b"retry-after: 1\r\n"))
        if GuardedHttpProtocol.lingering < LINGER_AT_MOST:
            GuardedHttpProtocol.lingering += 1
            self.transport.flush()  # type: ignore[attr-defined]
            self.transport.write_eof()
            self.loop.call_later(LINGER, self._linger_over)
        else:
            self.transport.close()
        if self.on_refused is not None:
            self.on_refused()
        now = time.monotonic()
        if now - GuardedHttpProtocol.refused_at > 60 or not GuardedHttpProtocol.refused_at:
            GuardedHttpProtocol.refused_at = now
            log.warning("HTTP worker pid %d holds %d connections, as many as its open-file limit (%d) allows: new "
                        "ones get 503 until some close; raise the limit (systemd: LimitNOFILE=; a shell: ulimit -n)",
                        os.getpid(), cap, openfiles.current())

    def connection_lost(self, exc: Exception | None) -> None:
        if self.sweep is not None:
            self.sweep.cancel()
            self.sweep = None
        for callback in list(self.on_lost):
            callback()
        super().connection_lost(exc)

    def _linger_over(self) -> None:
        GuardedHttpProtocol.lingering -= 1
        self.transport.close()

    def _period(self) -> float:
        return min(1.0, self.limits.read_timeout / 4)

    def _sweep(self) -> None:
        self.sweep = None
        if self.due and self.loop.time() - self.began > self.limits.read_timeout:
            self._read_expired()
        elif not self.transport.is_closing():
            self.sweep = self.loop.call_later(self._period(), self._sweep)

    def _read_expired(self) -> None:
        if self.transport.is_closing():
            return
        cycle = self.cycle
        answered = cycle is not None and cycle.response_started and not cycle.response_complete
        if self.receiving and not answered:
            self.transport.write(raw_error(408, f"the request did not arrive within {self.limits.read_timeout:g}s "
                                                "of its first byte ([server] read_timeout)"))
        self.transport.close()  # the app, if it was reading the body, sees the client go

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return
        if self.in_head:
            self.head_raw += len(data)
        super().data_received(data)
        if self.in_head and self.head_raw > self.max_head and not self.transport.is_closing():
            self.too_large = True
            self.send_400_response("")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope["extensions"] = self.extensions
        self.head_bytes = 0
        self.receiving = True
        if not self.due:  # a fresh connection's deadline runs from its opening
            self.due = True
            self.began = self.loop.time()

    def on_url(self, url: bytes) -> None:
        self.head_bytes += len(url)
        if self.head_bytes > self.max_head:
            self._too_large()
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_bytes += len(name) + len(value) + 4
        if self.head_bytes > self.max_head:
            self._too_large()
        super().on_header(name, value)

    def _too_large(self) -> None:
        self.too_large = True
        raise ValueError("request head over the limit")  # httptools stops parsing: uvicorn calls send_400_response

    def on_headers_complete(self) -> None:
        self.in_head = False
        self.head_raw = 0
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        cycle = self.cycle
        if type(cycle.body) is bytearray:  # a new request's, or uvicorn's receive() has just handed one over
            cycle.body = Chunks()  # type: ignore[assignment]
        super().on_body(body)

    def on_message_complete(self) -> None:
        self.receiving = False
        self.due = False
        self.in_head = True
        super().on_message_complete()

    def send_400_response(self, msg: str) -> None:
        if self.too_large:
            answer = raw_error(431, f"the request line and headers are over {self.limits.max_header_bytes} bytes "
                                    "([server] max_header_bytes)")
        else:
            answer = raw_error(400, "the request is not valid HTTP/1.1")
        self.transport.write(answer)
        self.transport.close()
