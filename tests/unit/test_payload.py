from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from starlette.responses import JSONResponse

from predictord.payload import (
    BadPayload,
    chunk_bytes,
    is_json,
    load,
    media_type,
    pack,
    parse_body,
    parse_form,
    to_reply,
)


def test_media_type() -> None:
    assert media_type("Text/Plain; charset=\"Latin-1\"") == ("text/plain", {"charset": "Latin-1"})
    assert media_type("") == ("", {})


def test_parse_by_content_type() -> None:
    assert parse_body("application/json", b'{"a": [1]}') == {"a": [1]}
    assert parse_body("application/vnd.api+json", b"[1]") == [1]
    assert parse_body("text/plain; charset=latin-1", "é".encode("latin-1")) == "é"
    assert parse_body("text/plain", "é".encode()) == "é"
    assert parse_body("image/png", b"\x89PNG") == b"\x89PNG"
    assert parse_body("", b"raw") == b"raw"


def test_json_is_parsed_in_the_http_worker_and_loaded_as_is_in_the_model_worker() -> None:
    assert is_json("application/json; charset=utf-8") and is_json("application/problem+json")
    assert not is_json("text/plain") and not is_json("application/x-www-form-urlencoded") and not is_json("")
    payload = parse_body("application/json", b'{"x": [0.5, 1, "a", null, {"b": true}]}')
    assert asyncio.run(load(None, pack(payload))) == payload  # None: the body is the packed, parsed payload
    assert asyncio.run(load("text/plain", b"hi")) == "hi"  # any other body is parsed where the predictor runs
    assert asyncio.run(load("application/octet-stream", b"\x00")) == b"\x00"
    assert asyncio.run(load("application/x-www-form-urlencoded", b"a=1"))["a"] == "1"


@pytest.mark.parametrize("content_type,body,message", [
    ("application/json", b"", "the body is empty"),
    ("application/json", b"{", "malformed JSON"),
    ("application/json", b"\xff", "not valid UTF-8"),
    ("application/json", b"[" * 100000 + b"]" * 100000, "nested too deeply"),
    ("text/plain", b"\xff", "not valid utf-8"),
    ("text/plain; charset=nope", b"x", "unknown charset 'nope'"),
])
def test_bad_bodies_are_bad_payloads(content_type: str, body: bytes, message: str) -> None:
    with pytest.raises(BadPayload, match=message):
        parse_body(content_type, body)


def test_forms() -> None:
    form = asyncio.run(parse_form("application/x-www-form-urlencoded", b"a=1&b=x+y"))
    assert dict(form) == {"a": "1", "b": "x y"}
    body = b'--B\r\nContent-Disposition: form-data; name="f"; filename="t.txt"\r\n\r\nhi\r\n--B--\r\n'
    form = asyncio.run(parse_form("multipart/form-data; boundary=B", body))
    assert form["f"].filename == "t.txt"


def test_replies() -> None:
    r = to_reply({"a": np.arange(2), "b": torch.tensor(1.5), "c": np.float64(2.0)})
    assert (r.status, r.body) == (200, b'{"a":[0,1],"b":1.5,"c":2.0}')
    assert to_reply("hé").headers == [(b"content-type", b"text/plain; charset=utf-8")]
    assert to_reply("hé").body == "hé".encode()
    assert to_reply(b"\x00").headers == [(b"content-type", b"application/octet-stream")]
    r = to_reply(JSONResponse({"e": 1}, status_code=400))
    assert r.status == 400 and r.body == b'{"e":1}'
    assert to_reply(x for x in "ab").stream is not None
    with pytest.raises(TypeError, match="NaN"):
        to_reply(float("nan"))
    with pytest.raises(TypeError, match="not JSON-serializable"):
        to_reply({"x": object()})


def test_stream_parts() -> None:
    assert chunk_bytes(b"a") == b"a" and chunk_bytes("é") == "é".encode() and chunk_bytes({"k": 1}) == b'{"k":1}\n'
