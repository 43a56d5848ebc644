"""Properties of the payload parser and serializer, over inputs hypothesis makes up (and shrinks when one fails)."""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from predictord.payload import BadPayload, chunk_bytes, is_form, media_type, parse_body, parse_form, to_json, to_reply

# JSON as it travels: finite floats, ints within Python's digit limit, any unicode (lone surrogates cannot be
# encoded as UTF-8, so they are not text a client can send).
TEXT = st.text(st.characters(exclude_categories=("Cs",)))
SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | TEXT
JSON_VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(TEXT, inner,
                                                                                                 max_size=5),
                           max_leaves=30)
CONTENT_TYPES = st.sampled_from(["application/json", "application/vnd.x+json", "text/plain",
                                 "text/plain; charset=latin-1", "text/plain; charset=utf-16", "text/plain; charset=no",
                                 "application/octet-stream", "", "image/png"]) | TEXT


@given(JSON_VALUES)
@example(-9223372036854775809)  # past int64's least, 19 digits: orjson read it as a float (hypothesis found it)
@example(18446744073709551616)  # past uint64's most
def test_json_round_trips(value: Any) -> None:
    assert parse_body("application/json", json.dumps(value).encode()) == value
    assert parse_body("application/json; charset=utf-8", json.dumps(value, ensure_ascii=False).encode()) == value
    assert json.loads(to_json(value)) == value


@given(CONTENT_TYPES, st.binary(max_size=200))
@example("application/json", b"1" * 5000)
@example("application/json", b"[NaN]")
@example("application/json", b"[" * 5000)
@example("application/json", b"\xef\xbb\xbf{}")
@example("text/plain; charset=utf-16", b"\xff")
@example("text/plain; charset=undefined", b"x")  # found by reading codecs: UnicodeError, not UnicodeDecodeError
@example("text/plain; charset=punycode", b"a-\xff")
def test_any_body_parses_or_is_a_bad_payload(content_type: str, body: bytes) -> None:
    """Whatever a client sends, the parser returns a payload or raises BadPayload (a 400), nothing else."""
    try:
        payload = parse_body(content_type, body)
    except BadPayload as e:
        assert str(e)
        return
    kind = media_type(content_type)[0]
    if kind == "text/plain":
        assert isinstance(payload, str)
    elif kind not in ("application/json",) and not kind.endswith("+json"):
        assert payload == body


@given(TEXT)
def test_media_type_never_raises_and_lowercases(content_type: str) -> None:
    kind, params = media_type(content_type)
    assert kind == kind.lower().strip() and all(k == k.lower() for k in params)


@settings(max_examples=50, deadline=None)
@given(st.sampled_from(["application/x-www-form-urlencoded", "multipart/form-data", "multipart/form-data; boundary=B"]),
       st.binary(max_size=200) | st.builds(lambda s: b"--B\r\n" + s + b"\r\n--B--\r\n", st.binary(max_size=100)))
def test_any_form_body_parses_or_is_a_bad_payload(content_type: str, body: bytes) -> None:
    assert is_form(content_type)
    try:
        asyncio.run(parse_form(content_type, body))
    except BadPayload as e:
        assert str(e).startswith("malformed form data")


@given(JSON_VALUES | st.binary() | st.floats() | st.sets(st.integers()) | st.tuples(st.integers(), TEXT))
def test_any_result_is_a_reply_or_a_clear_type_error(result: Any) -> None:
    """A predictor's return value becomes a response, or a TypeError whose message says what was wrong."""
    try:
        reply = to_reply(result)
    except TypeError as e:
        assert isinstance(result, float) and not math.isfinite(result) or "JSON" in str(e), e
        return
    assert 200 <= reply.status < 600
    content_type = dict(reply.headers)[b"content-type"]
    if content_type == b"application/json":
        json.loads(reply.body)
    elif isinstance(result, bytes):
        assert reply.body == result


@given(JSON_VALUES | st.binary())
def test_stream_parts_are_bytes(part: Any) -> None:
    out = chunk_bytes(part)
    assert isinstance(out, bytes)
    if not isinstance(part, (bytes, str)):
        assert out.endswith(b"\n") and json.loads(out) == part
