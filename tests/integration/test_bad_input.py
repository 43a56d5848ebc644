"""Hostile and broken input against a real daemon: each gets a defined answer, and the daemon stays healthy.

One daemon for the module, with small limits so that each limit is cheap to reach: 100 kB bodies, 8 KiB heads,
2 s to send a request, and one HTTP worker (so a slow client that pinned it would stall everyone).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterator

import httpx
import pytest
from broken import SLOW
from harness import HELD, Daemon, exchange, process_figures, wait_until
from prometheus_client.parser import text_string_to_metric_families

from predictord import metrics

ECHO = '''
class PythonPredictor:
    def __init__(self, config):
        pass

    def predict(self, payload):
        return {"type": type(payload).__name__, "repr": repr(payload)[:80]}
'''
BATCH = '''
class PythonPredictor:
    def __init__(self, config):
        pass

    def predict(self, payload):
        return [{"type": type(p).__name__} for p in payload]
'''
GATED = HELD + '''

class PythonPredictor:
    def __init__(self, config):
        self.gate = config["gate"]

    def predict(self, payload):
        held(self.gate)  # until the test opens the gate
        return {"passed": True}
'''
DIGEST = '''
import hashlib


class PythonPredictor:
    def __init__(self, config):
        pass

    def predict(self, payload, headers):
        body = payload if isinstance(payload, bytes) else repr(payload).encode()
        return {"type": type(payload).__name__, "sha256": hashlib.sha256(body).hexdigest(),
                "content_encoding": headers.get("content-encoding"), "content_length": headers.get("content-length")}
'''
LIMITS = "[server]\nhttp_workers = 1\nmax_body_bytes = 100000\nmax_header_bytes = 8192\nread_timeout = 2\n"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("bad-input"), LIMITS + "[workers]\ncpu = 2\n")
    d.write("echo.py", ECHO)
    d.write("batch.py", BATCH)
    d.write("digest.py", DIGEST)
    d.write("batch.toml", "[serving]\nmax_batch_size = 4\nbatch_wait_ms = 1\ntimeout = 10\n")
    d.write("slow.py", SLOW)
    d.write("slow.toml", "[serving]\nthreads = 4\n")
    d.write("gated.py", GATED)
    d.write("gated.toml", f'[config]\ngate = "{d.root / "gate"}"\n[serving]\nthreads = 4\n')
    d.start()
    d.wait_settled()
    yield d
    assert "Traceback" not in d.logs(), "nothing in this module should reach the log as a crash"
    d.stop()


def healthy(d: Daemon) -> None:
    """The daemon still answers, from every API."""
    assert d.post("/echo", json={"a": 1}).json() == {"type": "dict", "repr": "{'a': 1}"}
    assert d.post("/batch", json={}).json() == {"type": "dict"}
    assert d.get("/healthz").status_code == 200


def head(response: bytes) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of one raw HTTP/1.1 response."""
    top, _, body = response.partition(b"\r\n\r\n")
    lines = top.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


DEEP = b"[" * 40000 + b"]" * 40000


@pytest.mark.parametrize("api", ["echo", "batch"])
@pytest.mark.parametrize("content_type,body,says", [
    ("application/json", b"{not json", "malformed JSON"),
    ("application/json", b"", "the body is empty"),
    ("application/json", b"  \n", "the body is empty"),
    ("application/json", b'{"a": "\xff"}', "not valid UTF-8"),
    ("application/json", DEEP, "nested too deeply"),
    ("application/json", b"1" * 5000, "4300 digits"),
    ("application/json", b'{"x": NaN}', "NaN is not a JSON number"),
    ("application/json", b"[-Infinity]", "-Infinity is not a JSON number"),
    ("text/plain", b"caf\xe9", "not valid utf-8"),
    ("text/plain; charset=utf-7777", b"x", "unknown charset 'utf-7777'"),
    ("text/plain; charset=undefined", b"x", "cannot be decoded as undefined"),
    ("application/x-www-form-urlencoded", b"a=%zz&" * 10, ""),  # lenient: starlette parses it
    ("multipart/form-data", b"--x\r\n", "malformed form data"),
])
def test_bad_bodies_get_400_with_a_json_error(daemon: Daemon, api: str, content_type: str, body: bytes,
                                              says: str) -> None:
    r = daemon.post(f"/{api}", content=body, headers={"Content-Type": content_type})
    if not says:
        assert r.status_code == 200, r.text
        return
    assert r.status_code == 400, r.text
    assert r.headers["content-type"] == "application/json"
    assert says in r.json()["error"] and r.json()["request_id"] == r.headers["x-request-id"]
    healthy(daemon)


def test_numbers_past_a_float_arrive_as_infinity_and_other_types_as_bytes(daemon: Daemon) -> None:
    assert daemon.post("/echo", content=b"[1e999, 12345678901234567890]",
                       headers={"Content-Type": "application/json"}).json()["repr"] == "[inf, 12345678901234567890]"
    for content_type in ("text/xml", "application/jsonx", "image/png; charset=nope", ";;;="):
        r = daemon.post("/echo", content=b'{"a": 1}', headers={"Content-Type": content_type})
        assert r.json() == {"type": "bytes", "repr": "b'{\"a\": 1}'"}, content_type
    raw, _ = exchange(daemon.port, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Type: \xff\xfe\r\nContent-Length: 1\r\n"
                                   b"Connection: close\r\n\r\nx")
    assert head(raw)[0] == 200 and json.loads(head(raw)[2])["type"] == "bytes"


def test_body_over_the_limit_is_413_before_it_is_read(daemon: Daemon) -> None:
    # 10 GB announced, 1 kB sent: the answer comes at once and the connection is closed, so nothing is read.
    raw, closed = exchange(daemon.port, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000000\r\n\r\n"
                                        + b"x" * 1000)
    status, headers, body = head(raw)
    assert (status, headers["connection"], closed) == (413, "close", True)
    assert "max_body_bytes" in json.loads(body)["error"]
    # chunked, with no length announced: read up to the limit, then the same answer
    chunk = b"10000\r\n" + b"x" * 0x10000 + b"\r\n"
    raw, closed = exchange(daemon.port, b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                                        + chunk * 3)
    assert head(raw)[0] == 413 and closed
    assert daemon.post("/echo", content=b"x" * 99000).json()["type"] == "bytes"
    healthy(daemon)


@pytest.mark.parametrize(("coding", "encode"), [
    ("gzip", gzip.compress),
    ("x-gzip", gzip.compress),
    ("deflate", zlib.compress),
    ("deflate", lambda data: zlib.compress(data, wbits=-zlib.MAX_WBITS)),  # a raw deflate stream, as some send it
    ("gzip, deflate", lambda data: zlib.compress(gzip.compress(data))),
    ("identity", lambda data: data),
])
def test_compressed_bodies_arrive_as_sent_before_compression(daemon: Daemon, coding: str,
                                                             encode: Callable[[bytes], bytes]) -> None:
    sent = {"x": [0.25] * 1000, "name": "é"}
    r = daemon.post("/echo", content=encode(json.dumps(sent).encode()),
                    headers={"Content-Type": "application/json", "Content-Encoding": coding})
    assert r.json() == {"type": "dict", "repr": repr(sent)[:80]}, r.text
    raw = random.Random(coding).randbytes(90_000)  # decoded past bodies.SHARED_FROM: through a shared file
    r = daemon.post("/digest", content=encode(raw), headers={"Content-Encoding": coding})
    seen = "identity" if coding == "identity" else None  # decoded: predict() sees no Content-Encoding
    assert r.json() == {"type": "bytes", "sha256": hashlib.sha256(raw).hexdigest(), "content_encoding": seen,
                        "content_length": "90000"}, r.text
    text = "naïve " * 100
    r = daemon.post("/digest", content=iter([encode(text.encode())]),  # chunked: no Content-Length
                    headers={"Content-Type": "text/plain", "Content-Encoding": coding})
    assert r.json()["sha256"] == hashlib.sha256(repr(text).encode()).hexdigest()


def test_compressed_bodies_that_are_too_large_unknown_or_broken_get_a_clear_answer(daemon: Daemon) -> None:
    bomb = gzip.compress(bytes(10 * 2**20))  # 10 MiB of zeros in 10 kB: the limit is 100 kB
    assert len(bomb) < 100_000
    r = daemon.post("/digest", content=bomb, headers={"Content-Encoding": "gzip"})
    assert r.status_code == 413
    assert r.json()["error"] == "the request body is over 100000 bytes once decoded from gzip ([server] max_body_bytes)"
    r = daemon.post("/echo", content=b'{"a": 1}', headers={"Content-Type": "application/json",
                                                           "Content-Encoding": "br"})
    assert (r.status_code, r.headers["accept-encoding"], r.headers["connection"]) == (415, "gzip, deflate", "close")
    assert r.json()["error"] == "Content-Encoding 'br' is not supported; send the body as is, or as gzip or deflate"
    for body, says in ((b'{"a": 1}', "the body is not valid gzip: Error -3 while decompressing data: incorrect "
                                     "header check"),
                       (gzip.compress(b'{"a": 1}')[:-3], "the gzip body is cut short")):
        r = daemon.post("/echo", content=body, headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
        assert (r.status_code, r.json()["error"]) == (400, says)
        assert r.json()["request_id"] == r.headers["x-request-id"]
    healthy(daemon)


@pytest.mark.parametrize("headers", [
    b"X-Big: " + b"a" * 1_000_000 + b"\r\n",
    b"".join(b"X-%d: a\r\n" % i for i in range(5000)),
    b"X-Never-Ends: " + b"a" * 1_000_000,
], ids=["one-huge-header", "many-headers", "a-header-that-never-ends"])
def test_header_flood_is_431_and_the_connection_closes(daemon: Daemon, headers: bytes) -> None:
    raw, closed = exchange(daemon.port, b"POST /echo HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n"
                           if headers.endswith(b"\r\n") else b"POST /echo HTTP/1.1\r\nHost: x\r\n" + headers)
    status, out, body = head(raw)
    assert (status, out["content-type"], closed) == (431, "application/json", True)
    assert "max_header_bytes" in json.loads(body)["error"]
    healthy(daemon)


def test_a_long_url_counts_toward_the_head_limit(daemon: Daemon) -> None:
    raw, closed = exchange(daemon.port, b"GET /" + b"a" * 10000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert head(raw)[0] == 431 and closed


def test_garbage_is_400_json(daemon: Daemon) -> None:
    for garbage in (b"\x00\x01\x02 nonsense\r\n\r\n", b"POST /echo HTTP/9.9\r\n\r\n", b"GET / HTTP/1.1\r\nA\r\n\r\n"):
        raw, closed = exchange(daemon.port, garbage)
        status, headers, body = head(raw)
        assert (status, headers["content-type"], closed) == (400, "application/json", True), garbage
        assert json.loads(body)["error"] == "the request is not valid HTTP/1.1"
    healthy(daemon)


@pytest.mark.parametrize("path,name", [
    ("/../echo", "../echo"), ("/%2e%2e/echo", "../echo"), ("/echo%2F..", "echo/.."), ("/echo%00", "echo\x00"),
    ("//echo", "/echo"), ("/echo/", "echo/"), ("/ECHO", "ECHO"), ("/%ff", "\ufffd"), ("/admin/status", "admin/status"),
    ("/admin%2Fstatus", "admin/status"), ("/..%2f..%2fetc%2fpasswd", "../../etc/passwd"),
])
def test_path_tricks_are_404_and_reach_nothing(daemon: Daemon, path: str, name: str) -> None:
    raw, _ = exchange(daemon.port, f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n"
                                   "\r\n{}".encode())
    status, headers, body = head(raw)
    assert (status, headers["content-type"]) == (404, "application/json"), raw
    assert json.loads(body)["error"].startswith(f"no API named {name!r}")
    near = "; the API is at /echo;" in json.loads(body)["error"]
    assert near == (path in ("//echo", "/echo/", "/ECHO")), "a slip of slashes or capitals is told the API's path"


def _fds(d: Daemon) -> int:
    assert d.proc is not None
    return sum(fds for _, fds in process_figures(d.proc.pid).values())


def test_slow_clients_are_cut_at_read_timeout_and_never_pin_the_worker(daemon: Daemon) -> None:
    healthy(daemon)  # links and metric files opened, so that the fd count below is a baseline
    before = _fds(daemon)
    slow: list[socket.socket] = []
    for i in range(30):  # 10 that send nothing, 10 trickling a head, 10 trickling a body
        s = socket.create_connection(("127.0.0.1", daemon.port), timeout=10)
        if i >= 10:
            s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\n")
        if i >= 20:
            s.sendall(b"Content-Length: 1000\r\n\r\n{")
        slow.append(s)
    wait_until(lambda: _fds(daemon) >= before + 30, 10, "the 30 slow connections to be accepted")
    stop = threading.Event()

    def trickle() -> None:  # a byte a second on each, fast enough to reset any idle timer
        while not stop.wait(1.0):
            for i, s in enumerate(slow[10:]):
                try:
                    s.send(b"X" if i < 10 else b" ")
                except OSError:
                    pass

    t = threading.Thread(target=trickle)
    t.start()
    try:
        # the one HTTP worker serves others meanwhile, on new and kept-alive connections
        with httpx.Client(timeout=10) as client:
            for _ in range(20):
                assert client.post(daemon.url("/echo"), json={}).status_code == 200
                assert httpx.post(daemon.url("/echo"), json={}, timeout=10).status_code == 200
        answers = []
        for s in slow:
            s.settimeout(15)
            data = b""
            try:
                while chunk := s.recv(65536):
                    data += chunk
            except ConnectionResetError:  # the trickle's bytes that reached a closed socket: TCP answers RST
                pass
            answers.append(head(data)[0] if data else None)
    finally:
        stop.set()
        t.join()
        for s in slow:
            s.close()
    assert answers == [None] * 10 + [408] * 20  # idle ones are closed; begun requests get 408
    wait_until(lambda: _fds(daemon) <= before + 2, 15, "the daemon's open fds to come back down")
    healthy(daemon)


def _count(d: Daemon, name: str, **labels: str) -> float:
    """The sum of a metric's samples from GET /metrics whose labels include ``labels``."""
    return sum(sample.value for family in text_string_to_metric_families(d.get("/metrics").text)
               for sample in family.samples if sample.name == name and labels.items() <= sample.labels.items())


def _settled_count(d: Daemon, name: str, **labels: str) -> float:
    """A count once every observation made so far has reached /metrics: nonzero and unchanged for longer than a model
    worker takes to flush (metrics.FLUSH_EVERY, checked at its 0.5 s heartbeats)."""
    last: list[float] = [-1.0, time.monotonic()]  # value, since when

    def settled() -> float | None:
        value = _count(d, name, **labels)
        if value != last[0]:
            last[:] = [value, time.monotonic()]
        return value if value and time.monotonic() - last[1] > metrics.FLUSH_EVERY + 0.5 else None

    return wait_until(settled, 15, f"{name} to settle")  # type: ignore[no-any-return]


def test_malformed_json_is_answered_at_once_while_every_predict_thread_is_busy(daemon: Daemon) -> None:
    """JSON is parsed once, in the HTTP worker: a malformed body is a 400 there and never queues behind predicts."""
    gate = daemon.root / "gate"
    gate.unlink(missing_ok=True)
    codes: list[int] = []
    held = [threading.Thread(target=lambda: codes.append(daemon.post("/gated", json={}, timeout=30).status_code))
            for _ in range(4)]
    for t in held:
        t.start()
    try:
        wait_until(lambda: daemon.get("/gated").json()["outstanding"] == 4, 10, "all 4 predict threads held")
        r = daemon.post("/gated", content=b'{"x": [1, 2', headers={"content-type": "application/json"}, timeout=10)
        assert r.status_code == 400, r.text
        assert r.json()["error"].startswith("malformed JSON") and r.json()["request_id"]
        assert daemon.get("/gated").json()["outstanding"] == 4  # it never reached the model worker
    finally:
        gate.touch()
        for t in held:
            t.join(30)
    assert codes == [200] * 4


def test_clients_that_disconnect_mid_request_leave_nothing_behind(daemon: Daemon) -> None:
    gate = daemon.root / "gate"
    gate.touch()
    assert daemon.post("/gated", json={}).status_code == 200  # its link and metric files opened once
    ran = _settled_count(daemon, "predictord_predict_seconds_count", api="gated")  # the last test's predicts too
    gate.unlink()
    before = _fds(daemon)
    for _ in range(5):  # gone mid-body: the request never reaches a model worker
        with socket.create_connection(("127.0.0.1", daemon.port)) as s:
            s.sendall(b"POST /gated HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{")
    held = [socket.create_connection(("127.0.0.1", daemon.port)) for _ in range(12)]
    for s in held:
        s.sendall(b"POST /gated HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
    wait_until(lambda: daemon.get("/gated").json()["outstanding"] == 12, 10, "4 requests running and 8 queued")
    for s in held:  # gone while their predict() runs or waits: the waiting ones are dropped from the queue
        s.close()
    wait_until(lambda: daemon.get("/gated").json()["outstanding"] == 4, 10, "the 8 queued jobs dropped")
    gate.touch()
    wait_until(lambda: daemon.get("/gated").json()["outstanding"] == 0, 10, "the 4 running ones to finish")
    wait_until(lambda: _count(daemon, "predictord_requests_total", api="gated", code="499") == 17, 10,
               "all 17 counted as gone (499)")
    wait_until(lambda: _count(daemon, "predictord_predict_seconds_count", api="gated") - ran == 4, 10,
               "the 4 that ran to be counted")
    wait_until(lambda: _fds(daemon) <= before + 2, 15, "the daemon's open fds to come back down")
    assert daemon.post("/gated", json={}).json() == {"passed": True}
    assert "Exception in ASGI application" not in daemon.logs()
    healthy(daemon)


def test_expect_100_continue_and_pipelining_work(daemon: Daemon) -> None:
    one = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
    raw, _ = exchange(daemon.port, one * 3 + b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert raw.count(b"HTTP/1.1 200 OK") == 4
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as s:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 100 Continue")
        s.sendall(b"{}")
        deadline = time.monotonic() + 10
        data = b""
        while b'"type"' not in data and time.monotonic() < deadline:
            data += s.recv(65536)
        assert head(data)[0] == 200
