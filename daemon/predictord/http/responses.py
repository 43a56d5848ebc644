"""How the front answers when it is not relaying a model worker: a status, a body, and the headers every answer
carries (Content-Type, Content-Length, X-Request-ID); every error is JSON with ``error`` and ``request_id``."""

from __future__ import annotations

import json
from typing import Any, NamedTuple

Header = tuple[bytes, bytes]
Send = Any  # the ASGI send callable
JSON = b"application/json"
RETRY = ((b"retry-after", b"1"),)


class Response(NamedTuple):
    """A whole answer: its status, body, media type and any headers beyond the three every answer has."""

    status: int
    body: bytes
    content_type: bytes = JSON
    headers: tuple[Header, ...] = ()


def dumps(obj: Any) -> bytes:
    """Compact JSON; what JSON cannot hold (a path, a time) as its str()."""
    return json.dumps(obj, default=str, separators=(",", ":")).encode()


def ok(obj: Any) -> Response:
    """200 with ``obj`` as JSON."""
    return Response(200, dumps(obj))


def error(status: int, message: str, request_id: str, headers: tuple[Header, ...] = ()) -> Response:
    """An error answer: its message says what went wrong and what to do, beside the request's id."""
    return Response(status, dumps({"error": message, "request_id": request_id}), JSON, headers)


def unauthorized(setting: str, request_id: str) -> Response:
    """401 for a route behind the bearer token of ``[server] setting``."""
    return error(401, f"this route needs the bearer token of [server] {setting}: send 'Authorization: Bearer "
                 "TOKEN'", request_id, ((b"www-authenticate", b"Bearer"),))


async def send_response(send: Send, response: Response, request_id: str) -> None:
    """Send ``response`` whole: its head, then its body."""
    await send({"type": "http.response.start", "status": response.status, "headers": [
        (b"content-type", response.content_type), (b"content-length", str(len(response.body)).encode()),
        (b"x-request-id", request_id.encode("latin-1")), *response.headers]})
    await send({"type": "http.response.body", "body": response.body})
