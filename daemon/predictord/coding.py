"""Request bodies sent compressed (``Content-Encoding: gzip`` or ``deflate``), decoded before anything reads them.

Clients compress large payloads (Triton's client, ``requests`` with a gzip hook, ``curl --data-binary @x.json.gz``);
nginx and most proxies pass a request's coding through untouched. Decoded here, the predictor sees the body as if it
had been sent plain, and a coding the daemon does not know is a 415 that names the ones it does (RFC 9110, 15.5.16)
rather than a 400 about bad JSON. The decoded size counts against ``max_body_bytes``: a small body that would
inflate past it (a "zip bomb") is a 413, found without inflating more than one byte past the limit.
"""

from __future__ import annotations

import asyncio
import zlib

Header = tuple[bytes, bytes]
ACCEPTED = b"gzip, deflate"  # the Accept-Encoding of a 415
DECODE_IN_THREAD = 16 * 1024  # bytes: a compressed body this large is decoded off the loop (it may inflate 1000x)
_GZIP = 16 + zlib.MAX_WBITS  # a gzip header and trailer around the deflate stream
_ZLIB = zlib.MAX_WBITS  # HTTP's "deflate" is the zlib format (RFC 9110, 8.4.1.2)
_RAW = -zlib.MAX_WBITS  # the bare deflate stream some clients send as "deflate" all the same
_WBITS = {"gzip": _GZIP, "x-gzip": _GZIP, "deflate": _ZLIB}


class CodingError(Exception):
    """A body that is not what its coding says: a 400 (the subclasses: another status)."""

    status = 400
    headers: tuple[Header, ...] = ()


class Unsupported(CodingError):
    """A coding the daemon does not decode: a 415 that says which it does."""

    status = 415
    headers = ((b"accept-encoding", ACCEPTED),)


class Inflated(CodingError):
    """A body larger than the limit once decoded: a 413."""

    status = 413


def codings(header: bytes) -> list[str]:
    """The codings of a Content-Encoding header in the order the client applied them, ``identity`` left out;
    Unsupported names the first one not decoded here."""
    found = []
    for token in header.decode("latin-1").split(","):
        coding = token.strip().lower()
        if coding in ("", "identity"):
            continue
        if coding not in _WBITS:
            raise Unsupported(f"Content-Encoding {coding!r} is not supported; send the body as is, or as gzip or "
                              "deflate")
        found.append(coding)
    return found


async def decode_body(body: bytes, applied: list[str], limit: int) -> bytes:
    """``decode``, in a thread for a body of DECODE_IN_THREAD bytes or more (the loop keeps its other requests)."""
    if len(body) >= DECODE_IN_THREAD:
        return await asyncio.to_thread(decode, body, applied, limit)
    return decode(body, applied, limit)


def plain_headers(headers: list[Header], size: int) -> list[Header]:
    """A decoded request's headers as predict() sees them: no Content-Encoding, the decoded Content-Length."""
    kept = [(k, v) for k, v in headers if k not in (b"content-encoding", b"content-length")]
    kept.append((b"content-length", str(size).encode()))
    return kept


def decode(body: bytes, applied: list[str], limit: int) -> bytes:
    """``body`` with ``applied`` undone (the last applied first); Inflated if a layer decodes past ``limit`` bytes,
    CodingError if one does not decode. An empty body stays empty."""
    if not body:
        return body
    for coding in reversed(applied):
        body = _inflate(body, coding, limit)
    return body


def _inflate(data: bytes, coding: str, limit: int) -> bytes:
    wbits = _WBITS[coding]
    if wbits == _ZLIB and data[:1] and (data[0] & 0x0F != 8 or int.from_bytes(data[:2]) % 31):
        wbits = _RAW  # no zlib header: a raw deflate stream
    out: list[bytes] = []
    size = 0
    while True:  # a gzip body may be several members one after the other (RFC 1952, 2.2)
        inflater = zlib.decompressobj(wbits)
        try:
            part = inflater.decompress(data, limit - size + 1)
        except zlib.error as e:
            raise CodingError(f"the body is not valid {coding}: {e}") from None
        size += len(part)
        if size > limit:
            raise Inflated(f"the request body is over {limit} bytes once decoded from {coding} "
                           "([server] max_body_bytes)")
        out.append(part)
        if not inflater.eof:
            raise CodingError(f"the {coding} body is cut short")
        data = inflater.unused_data
        if not data or wbits != _GZIP:
            if data:
                raise CodingError(f"the {coding} body has {len(data)} bytes after its end")
            return b"".join(out) if len(out) > 1 else out[0]
