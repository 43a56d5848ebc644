"""Compressed request bodies (coding.py): what each coding decodes to, and the limit on what it inflates to."""

from __future__ import annotations

import asyncio
import gzip
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from predictord.coding import (
    DECODE_IN_THREAD,
    CodingError,
    Inflated,
    Unsupported,
    codings,
    decode,
    decode_body,
    plain_headers,
)

TEXT = b'{"x": [' + b"0.5, " * 2000 + b"1]}"


def raw_deflate(data: bytes) -> bytes:
    packer = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return packer.compress(data) + packer.flush()


@pytest.mark.parametrize(("header", "expected"), [
    (b"gzip", ["gzip"]),
    (b"GZip", ["gzip"]),
    (b"x-gzip", ["x-gzip"]),
    (b"identity", []),
    (b"", []),
    (b"gzip, identity, deflate", ["gzip", "deflate"]),
    (b" deflate ,gzip", ["deflate", "gzip"]),
])
def test_the_header_lists_the_codings_in_the_order_applied(header: bytes, expected: list[str]) -> None:
    assert codings(header) == expected


@pytest.mark.parametrize("header", [b"br", b"zstd", b"gzip, compress", b"gzip;q=1"])
def test_a_coding_not_decoded_here_is_a_415_that_names_it_and_those_that_are(header: bytes) -> None:
    with pytest.raises(Unsupported) as caught:
        codings(header)
    assert caught.value.status == 415
    assert dict(caught.value.headers) == {b"accept-encoding": b"gzip, deflate"}
    assert "is not supported; send the body as is, or as gzip or deflate" in str(caught.value)


@pytest.mark.parametrize(("encoded", "applied"), [
    (gzip.compress(TEXT), ["gzip"]),
    (gzip.compress(TEXT), ["x-gzip"]),
    (zlib.compress(TEXT), ["deflate"]),  # HTTP's deflate: the zlib format
    (raw_deflate(TEXT), ["deflate"]),  # what some clients send as deflate all the same
    (gzip.compress(TEXT[:100]) + gzip.compress(TEXT[100:]), ["gzip"]),  # two gzip members, one after the other
    (zlib.compress(gzip.compress(TEXT)), ["gzip", "deflate"]),  # gzip applied first: undone last
])
def test_each_coding_decodes_to_the_body_sent(encoded: bytes, applied: list[str]) -> None:
    assert decode(encoded, applied, len(TEXT)) == TEXT


def test_the_limit_holds_the_decoded_size_to_the_byte() -> None:
    encoded = gzip.compress(TEXT)
    assert decode(encoded, ["gzip"], len(TEXT)) == TEXT
    with pytest.raises(Inflated) as caught:
        decode(encoded, ["gzip"], len(TEXT) - 1)
    assert caught.value.status == 413
    assert str(caught.value) == (f"the request body is over {len(TEXT) - 1} bytes once decoded from gzip "
                                 "([server] max_body_bytes)")
    with pytest.raises(Inflated):  # the limit counts every member
        decode(gzip.compress(TEXT) + gzip.compress(b"x"), ["gzip"], len(TEXT))


def test_a_bomb_is_refused_without_inflating_it() -> None:
    bomb = gzip.compress(bytes(200 * 2**20))  # 200 MiB of zeros in about 200 KB
    assert len(bomb) < 2**20
    with pytest.raises(Inflated):
        decode(bomb, ["gzip"], 2**20)


@pytest.mark.parametrize(("encoded", "applied", "message"), [
    (b"not gzip at all", ["gzip"], "the body is not valid gzip: Error -3 while decompressing data: incorrect header "
                                   "check"),
    (gzip.compress(TEXT)[:-20], ["gzip"], "the gzip body is cut short"),
    (zlib.compress(TEXT)[:50], ["deflate"], "the deflate body is cut short"),
    (zlib.compress(TEXT) + b"extra", ["deflate"], "the deflate body has 5 bytes after its end"),
    (gzip.compress(TEXT) + b"extra", ["gzip"], "the body is not valid gzip: Error -3 while decompressing data: "
                                               "incorrect header check"),
])
def test_a_body_that_is_not_what_its_coding_says_is_a_400_that_says_so(encoded: bytes, applied: list[str],
                                                                       message: str) -> None:
    with pytest.raises(CodingError) as caught:
        decode(encoded, applied, 10 * len(TEXT))
    assert caught.value.status == 400
    assert str(caught.value) == message


def test_an_empty_body_stays_empty() -> None:
    assert decode(b"", ["gzip"], 10) == b""


def test_large_bodies_are_decoded_in_a_thread_small_ones_on_the_loop() -> None:
    async def both() -> tuple[bytes, bytes]:
        small = await decode_body(gzip.compress(b"small"), ["gzip"], 100)
        large_text = bytes(range(256)) * 4 * DECODE_IN_THREAD  # incompressible enough to stay past the threshold
        large = gzip.compress(large_text, compresslevel=1)
        assert len(large) >= DECODE_IN_THREAD
        return small, await decode_body(large, ["gzip"], len(large_text)) == large_text

    assert asyncio.run(both()) == (b"small", True)


def test_predict_sees_the_headers_of_the_decoded_body() -> None:
    sent = [(b"content-type", b"application/json"), (b"content-encoding", b"gzip"), (b"content-length", b"31"),
            (b"x-trace", b"1")]
    assert plain_headers(sent, 1000) == [(b"content-type", b"application/json"), (b"x-trace", b"1"),
                                        (b"content-length", b"1000")]


@given(st.binary(max_size=5000), st.lists(st.sampled_from(["gzip", "deflate"]), min_size=1, max_size=3),
       st.integers(min_value=0, max_value=9))
def test_whatever_is_encoded_decodes_back(body: bytes, applied: list[str], level: int) -> None:
    layers = [body]
    for coding in applied:
        layers.append(gzip.compress(layers[-1], level) if coding == "gzip" else zlib.compress(layers[-1], level))
    assert decode(layers[-1], applied, max(map(len, layers[:-1]))) == body  # each layer decoded counts to the limit
