"""Request bodies into payloads, and predictor results into responses.

Small JSON bodies are parsed in the HTTP worker (``parse_json``), which sends the parsed payload pickled (``pack``;
the model worker's ``load`` unpickles it): parsing is most of a small model's cost per request, and the HTTP workers
run beside each other while one model worker runs every request of its APIs. Large bodies (bodies.py) and forms and
other bodies are parsed in the model worker, once.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import pickle
import stat
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.background import BackgroundTask
from starlette.datastructures import FormData, Headers, QueryParams
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, Response, StreamingResponse

Header = tuple[bytes, bytes]
FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")
WHOLE_FILE_BELOW = 16 * 2**20  # a FileResponse's file smaller than this is read whole; a larger one is streamed
FILE_PART = 2**20  # in parts of this size


class BadPayload(Exception):
    """The request body does not match its Content-Type: a 400 for the client."""


def media_type(content_type: str) -> tuple[str, dict[str, str]]:
    """``text/plain; charset=latin-1`` -> ``("text/plain", {"charset": "latin-1"})``."""
    head, _, rest = content_type.partition(";")
    params = {}
    for part in rest.split(";"):
        key, eq, value = part.strip().partition("=")
        if eq:
            params[key.strip().lower()] = value.strip().strip('"')
    return head.strip().lower(), params


def is_form(content_type: str) -> bool:
    return media_type(content_type)[0] in FORM_TYPES


def is_json(content_type: str) -> bool:
    kind = media_type(content_type)[0]
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number (RFC 8259)")


# 20 digits in a row may be an integer past 64 bits: the standard library reads it exactly, orjson as a float. Found
# by turning every digit into 0 and looking for twenty of them (0.6 ns a byte; a regular expression takes 12).
_DIGITS = bytes.maketrans(b"123456789", b"000000000")
_LONG_RUN = b"0" * 19  # orjson reads an integer past int64's least (19 digits: -9223372036854775809) as a float
WALK_FROM = 64 * 1024  # bytes: a larger body's parsed values are looked at instead of its digits
WALK_AT_MOST = 1024  # values looked at; past them the digits are


def _big_float(value: Any) -> bool | None:
    """Whether a parsed document holds a float that may have been an integer past 64 bits (None: too many values
    to look at them all)."""
    stack, seen = [value], 0
    while stack:
        v = stack.pop()
        seen += 1
        if seen > WALK_AT_MOST:
            return None
        if type(v) is float:
            if abs(v) >= 9.2e18 and v.is_integer():
                return True
        elif type(v) is dict:
            stack.extend(v.values())
        elif type(v) is list:
            stack.extend(v)
    return False
# Python's json accepts NaN and Infinity, which JSON does not; a shared decoder keeps the C scanner's fast path.
_DECODER = json.JSONDecoder(parse_constant=_no_constants)


def parse_json(body: bytes | memoryview) -> Any:
    """A JSON body (any UTF of RFC 8259, detected) parsed; BadPayload says what is wrong with it. orjson parses
    (2-4x faster than the standard library, BENCHMARKS.md); what it refuses (another UTF, a document too deep, an
    error) and what it might have read inexactly (an integer past 64 bits, which orjson turns into a float) go to
    the standard library, for its value or for a message that names the problem."""
    body = body if type(body) is bytes else bytes(body)
    if len(body) < WALK_FROM:  # small: look for a long run of digits first (2.6 us for 2 KB)
        if body.translate(_DIGITS).find(_LONG_RUN) < 0:
            try:
                return orjson.loads(body)
            except orjson.JSONDecodeError:
                pass
    else:  # large: parse, then look at the result's few values, or failing that at the digits
        try:
            value = orjson.loads(body)
            suspect = _big_float(value)
            if suspect is None:
                suspect = body.translate(_DIGITS).find(_LONG_RUN) >= 0
            if not suspect:
                return value
        except orjson.JSONDecodeError:
            pass
    if not body or (body[:1].isspace() and not body.strip()):  # (strip copies: only when it may be all blank)
        raise BadPayload("the body is empty; Content-Type application/json needs a JSON document")
    try:
        return _DECODER.decode(body.decode(json.detect_encoding(body), "surrogatepass"))
    except UnicodeDecodeError as e:
        raise BadPayload(f"the body is not valid UTF-8 JSON: {e.reason} at byte {e.start}") from None
    except json.JSONDecodeError as e:
        raise BadPayload(f"malformed JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise BadPayload("the JSON document is nested too deeply") from None
    except ValueError as e:  # an integer past Python's digit limit, or NaN/Infinity (see _no_constants)
        raise BadPayload(f"the JSON document holds a number it cannot carry: {e}") from None


def parse_body(content_type: str, body: bytes) -> Any:
    """The payload for a body: JSON -> parsed, text/plain -> str, anything else -> bytes (forms: see parse_form)."""
    kind, params = media_type(content_type)
    if is_json(kind):
        return parse_json(body)
    if kind == "text/plain":
        charset = params.get("charset", "utf-8")
        try:
            return body.decode(charset)
        except LookupError:
            raise BadPayload(f"unknown charset {charset!r} in Content-Type") from None
        except UnicodeDecodeError as e:
            raise BadPayload(f"the body is not valid {charset}: {e.reason} at byte {e.start}") from None
        except UnicodeError as e:  # a codec that fails in its own way (charset=undefined, punycode)
            raise BadPayload(f"the body cannot be decoded as {charset}: {e}") from None
    return body


def pack(payload: Any) -> bytes:
    """A payload parsed in the HTTP worker, for the model worker (both are this daemon's processes: pickle is safe)."""
    return pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)


async def load(content_type: str | None, body: bytes | memoryview) -> Any:
    """A job's payload in the model worker: ``content_type`` None means the HTTP worker parsed it (see ``pack``);
    ``body`` may be a shared body's mapping (bodies.py), which the payload must not keep."""
    if content_type is None:
        return pickle.loads(body)
    if is_form(content_type):
        return await parse_form(content_type, bytes(body))
    if is_json(content_type):
        return parse_json(body)
    return parse_body(content_type, bytes(body))


async def parse_form(content_type: str, body: bytes) -> FormData:
    """A form or multipart body, parsed by starlette into FormData."""
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {"type": "http", "method": "POST", "headers": [(b"content-type", content_type.encode("latin-1"))]}
    try:
        return await Request(scope, receive).form()
    except Exception as e:  # noqa: BLE001 - starlette raises several kinds for a bad form; all mean 400
        raise BadPayload(f"malformed form data: {e}") from None


def _json_default(value: Any) -> Any:
    """numpy and torch values, sets and tuples become plain JSON."""
    tolist = getattr(value, "tolist", None)
    if callable(tolist):  # numpy arrays and scalars, torch tensors
        return tolist()
    item = getattr(value, "item", None)
    if callable(item):
        return item()
    if isinstance(value, (set, frozenset)):
        return list(value)
    raise TypeError(f"predict() returned a {type(value).__name__}, which is not JSON-serializable")


def to_json(value: Any) -> bytes:
    """A result as JSON. orjson first (8-10x faster on a small result); whatever it cannot say exactly as the
    standard library would goes to the standard library: orjson writes NaN and infinity as ``null`` (so a ``null``
    anywhere takes the slow path, which refuses them), and refuses keys that are not strings, integers past 64 bits
    and deep nesting, which the standard library handles."""
    try:
        out = orjson.dumps(value, default=_json_default, option=orjson.OPT_SERIALIZE_NUMPY)
    except TypeError:  # orjson.JSONEncodeError; the standard library says it again, or succeeds
        out = b"null"
    if b"null" not in out:
        return out
    try:
        text = json.dumps(value, default=_json_default, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        return text.encode()
    except ValueError as e:
        if "Out of range float" in str(e):
            raise TypeError("predict() returned NaN or infinity, which JSON cannot carry") from None
        raise


@dataclass
class Reply:
    """A predictor's result made ready to send: status, headers, and either a body or a stream of parts."""

    status: int
    headers: list[Header]
    body: bytes = b""
    stream: Iterator[Any] | AsyncIterator[Any] | None = None
    background: BackgroundTask | None = None  # a starlette Response's: run once the answer has been sent


def _headers(media: str, extra: list[Header] | None = None) -> list[Header]:
    return [(b"content-type", media.encode()), *(extra or [])]


def to_reply(result: Any) -> Reply:
    """A predictor's return value as a response, following the contract (README, "Writing a predictor")."""
    if isinstance(result, FileResponse):
        return file_reply(result)
    if isinstance(result, StreamingResponse):
        return Reply(result.status_code, list(result.raw_headers), stream=aiter(result.body_iterator),
                     background=result.background)
    if isinstance(result, Response):
        return Reply(result.status_code, list(result.raw_headers), bytes(result.body), background=result.background)
    if isinstance(result, (bytes, bytearray, memoryview)):
        return Reply(200, _headers("application/octet-stream"), bytes(result))
    if isinstance(result, str):
        return Reply(200, _headers("text/plain; charset=utf-8"), result.encode())
    if inspect.isgenerator(result) or inspect.isasyncgen(result):
        return Reply(200, _headers("application/octet-stream"), stream=result)
    if isinstance(result, float) and not math.isfinite(result):
        raise TypeError("predict() returned NaN or infinity, which JSON cannot carry")
    return Reply(200, _headers("application/json"), to_json(result))


def file_reply(result: FileResponse) -> Reply:
    """A FileResponse as starlette answers a POST with it (no ranges): Content-Length, Last-Modified and ETag from the
    file, which is read whole below WHOLE_FILE_BELOW and streamed in parts past it. A path that is not a file is a
    RuntimeError, as in starlette: the request's 500, shown as the API's last error."""
    path = os.fspath(result.path)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # before open(): a FIFO would block it
            raise RuntimeError(f"FileResponse: {path!r} is not a file")
        file = open(path, "rb")  # noqa: SIM115 - closed here, or by the stream that reads it
    except OSError as e:
        raise RuntimeError(f"FileResponse: cannot open {path!r}: {e.strerror}") from None
    try:
        opened = os.fstat(file.fileno())
        if result.stat_result is None:
            result.set_stat_headers(opened)
        if opened.st_size < WHOLE_FILE_BELOW:
            data = file.read()  # its length is what the HTTP worker sends as Content-Length, if the file changed
            headers = [h for h in result.raw_headers if h[0] != b"content-length"]
            return Reply(result.status_code, headers, data, background=result.background)
    except BaseException:
        file.close()
        raise
    return Reply(result.status_code, list(result.raw_headers), stream=_file_parts(file), background=result.background)


def _file_parts(file: Any) -> Iterator[bytes]:
    with file:
        while part := file.read(FILE_PART):
            yield part


def chunk_bytes(part: Any) -> bytes:
    """One streamed part: bytes as is, str as UTF-8, anything else as a JSON line."""
    if isinstance(part, (bytes, bytearray, memoryview)):
        return bytes(part)
    if isinstance(part, str):
        return part.encode()
    return to_json(part) + b"\n"


def error_body(message: str, **extra: Any) -> bytes:
    return to_json({"error": message, **extra})


JSON_HEADERS: list[Header] = [(b"content-type", b"application/json")]


def error_reply(status: int, message: str, request_id: str, **extra: Any) -> Reply:
    """A JSON error: ``{"error": message, "request_id": ..., ...}``."""
    return Reply(status, list(JSON_HEADERS), error_body(message, request_id=request_id, **extra))


def exception_reply(e: BaseException, api: str, request_id: str) -> Reply:
    """A request that failed: a payload that does not parse is a 400; the predictor's starlette HTTPException keeps
    its status and headers; anything else is a 500 that names the API and the request, with no internals (its
    traceback goes to the log)."""
    if isinstance(e, BadPayload):
        return error_reply(400, str(e), request_id)
    if isinstance(e, HTTPException):
        reply = error_reply(e.status_code, str(e.detail), request_id)
        reply.headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (e.headers or {}).items()]
        return reply
    return error_reply(500, f"API {api!r} failed while handling this request ({type(e).__name__}); the traceback "
                            "is in the server's log", request_id, api=api)


def client_error(e: BaseException) -> bool:
    """The request's own fault (a bad payload, the predictor's HTTPException): answered, not logged as a failure."""
    return isinstance(e, (BadPayload, HTTPException))


def offer(names: tuple[str, ...], payload: Any, query: bytes, headers: Any, response: Any = None) -> dict[str, Any]:
    """The arguments a predictor method asked for, by name."""
    kwargs: dict[str, Any] = {}
    for name in names:
        if name == "payload":
            kwargs[name] = payload
        elif name == "query_params":
            kwargs[name] = QueryParams(query)
        elif name == "headers":
            kwargs[name] = Headers(raw=headers or [])
        elif name == "response":
            kwargs[name] = response
    return kwargs

