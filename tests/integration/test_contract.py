"""The predictor contract (DESIGN.md section 1) against a real daemon: arguments, payloads, returns, errors.

The tests named in ``SHARED`` use only what `predictord ray` serves too (``POST /NAME`` and its answers):
tests/ray/test_contract_on_ray.py runs those very functions against a Ray Serve deployment of the same predictors.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import random
import re
import socket
import subprocess
import sys
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest
from harness import TORCH, Daemon, wait_until

from predictord.model.failures import LINES
from predictord.protocol import STREAM_WINDOW

TORCH_PRELOADED = True  # the model path, as production runs it (harness.TORCH)

PREDICTORS = {
    "echo.py": '''
class PythonPredictor:
    def __init__(self, config):
        self.config = config
        self.weights = b"w" * (32 * 2**20)  # stands in for a model: 32 MiB, touched, so resident

    def predict(self, payload, query_params, headers):
        return {"payload": payload if not isinstance(payload, bytes) else {"bytes": payload.hex()},
                "type": type(payload).__name__,
                "query": dict(query_params), "tag": headers.get("x-tag"), "config": self.config}
''',
    "echo.toml": '[config]\ncolor = "blue"\nsizes = [1, 2]\n',
    "form.py": '''
class PythonPredictor:
    def __init__(self, config):
        pass

    async def predict(self, payload):
        out = {}
        for key, value in payload.multi_items():
            out[key] = value if isinstance(value, str) else {"filename": value.filename,
                                                             "data": (await value.read()).decode()}
        return out
''',
    "kinds.py": '''
import random
import re

import numpy as np
import torch
from starlette.exceptions import HTTPException
from starlette.responses import Response, StreamingResponse


async def events(n):
    for i in range(n):
        yield f"data: token{i}\\n\\n"


class PythonPredictor:
    def __init__(self, config):
        pass

    def predict(self, payload):
        kind = payload["kind"]
        if kind == "list":
            return [1, "two", 3.5, None]
        if kind == "number":
            return 42
        if kind == "numpy":
            return {"array": np.arange(3, dtype=np.float32), "scalar": np.int64(7), "mean": np.float32(0.5)}
        if kind == "torch":
            return {"tensor": torch.tensor([[1.0, 2.0]]), "scalar": torch.tensor(3)}
        if kind == "str":
            return "plain text"
        if kind == "bytes":
            return b"\\x00\\x01binary"
        if kind == "response":
            return Response("teapot", status_code=418, headers={"x-custom": "yes"}, media_type="text/plain")
        if kind == "http-error":
            raise HTTPException(status_code=422, detail="kind must be sensible")
        if kind == "crash":
            raise ValueError("secret internal detail")
        if kind == "stream":
            return (f"part{i}\\n" for i in range(3))
        if kind == "broken-stream":
            def parts():
                yield "part0\\n"
                yield "part1\\n"
                raise RuntimeError("the third part cannot be made")
            return parts()
        if kind == "sse":
            return StreamingResponse(events(payload["n"]), status_code=201, media_type="text/event-stream",
                                     headers={"cache-control": "no-cache"})
        if kind == "large":
            return random.Random(payload["seed"]).randbytes(payload["size"])
        if kind == "large-stream":
            return (random.Random(payload["seed"] + i).randbytes(payload["size"]) for i in range(3))
        if kind == "nan":
            return float("nan")
        if kind == "object":
            return object()
        return {"unknown": kind}
''',
    "post.py": '''
from pathlib import Path


class PythonPredictor:
    def __init__(self, config, predictor_dir):
        self.dir = Path(predictor_dir)

    def predict(self, payload):
        return {"n": payload["n"]}

    def post_predict(self, response, payload):
        (self.dir / f"post-{response['n']}.log").write_text(repr(payload))
''',
    "files/predictor.py": '''
import shutil
import tempfile
from pathlib import Path

from helpers import amark, mark  # a sibling module of the folder
from starlette.background import BackgroundTask
from starlette.responses import FileResponse, JSONResponse


class PythonPredictor:
    def __init__(self, config, predictor_dir):
        self.dir = Path(predictor_dir)
        self.scratch = Path(tempfile.mkdtemp(prefix="files-"))  # not in the predictors directory: a new version
        self.big = self.scratch / "big.bin"
        with open(self.big, "wb") as f:
            for i in range(18):
                f.write(bytes([i]) * 2**20)

    def predict(self, payload):
        kind = payload["kind"]
        if kind == "small":
            return FileResponse(self.dir / "cat.txt", filename="cat.txt")
        if kind == "big":
            return FileResponse(self.big, media_type="application/x-big")
        if kind == "missing":
            return FileResponse(self.dir / "nope.bin")
        if kind == "folder":
            return FileResponse(self.dir)
        if kind == "background":
            return JSONResponse({"ok": 1}, background=BackgroundTask(mark, payload["to"], "sync"))
        if kind == "file-background":
            return FileResponse(self.dir / "cat.txt", background=BackgroundTask(amark, payload["to"], "async"))
        return JSONResponse({"ok": 2}, background=BackgroundTask(lambda: 1 / 0))

    def close(self):
        shutil.rmtree(self.scratch)
''',
    "files/cat.txt": "meow\n",
    "files/predictor.toml": '[serving]\nwarmup = ["samples/warm.json"]\n',  # a sample among the folder's files
    "files/samples/warm.json": '{"kind": "small"}',
    "files/helpers.py": '''
from pathlib import Path


def mark(path, text):
    Path(path).write_text(text)


async def amark(path, text):
    Path(path).write_text(text)
''',
    "aio.py": '''
import asyncio


class PythonPredictor:
    def __init__(self, config, device, predictor_dir):
        self.device = device
        self.dir = predictor_dir

    async def predict(self, payload):
        await asyncio.sleep(0.01)
        return {"async": True, "device": self.device, "dir": self.dir, "got": payload}
''',
}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("contract"), TORCH)
    for rel, text in PREDICTORS.items():
        d.write(rel, text)
    d.start()
    d.wait_settled()
    yield d
    d.stop()


def test_every_api_ready(daemon: Daemon) -> None:
    status = daemon.status()
    names = ["aio", "echo", "files", "form", "kinds", "post"]
    assert {n: a["state"] for n, a in status["apis"].items()} == dict.fromkeys(names, "ready")
    assert daemon.get("/readyz").status_code == 200
    assert daemon.get("/healthz").json()["status"] == "ok"


def test_json_payload_query_headers_and_config(daemon: Daemon) -> None:
    r = daemon.post("/echo?a=1&b=two", json={"x": [1, 2]}, headers={"X-Tag": "t1"})
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    assert r.json() == {"payload": {"x": [1, 2]}, "type": "dict", "query": {"a": "1", "b": "two"}, "tag": "t1",
                        "config": {"color": "blue", "sizes": [1, 2]}}


def test_text_payload_honours_charset(daemon: Daemon) -> None:
    latin = {"Content-Type": "text/plain; charset=latin-1"}
    r = daemon.post("/echo", content="caf\xe9".encode("latin-1"), headers=latin)
    assert r.json()["payload"] == "café" and r.json()["type"] == "str"
    r = daemon.post("/echo", content="naïve".encode(), headers={"Content-Type": "text/plain"})
    assert r.json()["payload"] == "naïve"


def test_other_content_types_are_bytes(daemon: Daemon) -> None:
    r = daemon.post("/echo", content=b"\x00\xffraw", headers={"Content-Type": "application/octet-stream"})
    assert r.json()["payload"] == {"bytes": "00ff726177"} and r.json()["type"] == "bytes"
    r = daemon.post("/echo", content=b"no type")
    assert r.json()["type"] == "bytes"


def test_form_and_multipart(daemon: Daemon) -> None:
    r = daemon.post("/form", data={"a": "1", "b": "x y"})
    assert r.json() == {"a": "1", "b": "x y"}
    r = daemon.post("/form", data={"a": "1"}, files={"f": ("notes.txt", b"hello file", "text/plain")})
    assert r.json() == {"a": "1", "f": {"filename": "notes.txt", "data": "hello file"}}


def test_a_compressed_body_arrives_decoded(daemon: Daemon) -> None:
    r = daemon.post("/echo", content=gzip.compress(b'{"x": [1, 2]}'), headers={"Content-Type": "application/json",
                                                                                "Content-Encoding": "gzip"})
    assert r.json()["payload"] == {"x": [1, 2]}
    r = daemon.post("/form", content=zlib.compress(b"a=1&b=x+y"),
                    headers={"Content-Type": "application/x-www-form-urlencoded", "Content-Encoding": "deflate"})
    assert r.json() == {"a": "1", "b": "x y"}
    r = daemon.post("/echo", content=b"\x00\xff", headers={"Content-Encoding": "zstd"})
    assert (r.status_code, r.headers["accept-encoding"]) == (415, "gzip, deflate")
    assert r.json()["error"] == "Content-Encoding 'zstd' is not supported; send the body as is, or as gzip or deflate"


@pytest.mark.parametrize("body", [b"{not json", b"", b'{"a": 1', b"\xff\xfe"])
def test_malformed_json_is_400_with_json_error(daemon: Daemon, body: bytes) -> None:
    r = daemon.post("/echo", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    assert r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    assert "JSON" in error or "json" in error


@pytest.mark.parametrize("kind,status,content_type,expected", [
    ("list", 200, "application/json", [1, "two", 3.5, None]),
    ("number", 200, "application/json", 42),
    ("numpy", 200, "application/json", {"array": [0.0, 1.0, 2.0], "scalar": 7, "mean": 0.5}),
    ("torch", 200, "application/json", {"tensor": [[1.0, 2.0]], "scalar": 3}),
])
def test_json_returns(daemon: Daemon, kind: str, status: int, content_type: str, expected: object) -> None:
    r = daemon.post("/kinds", json={"kind": kind})
    assert (r.status_code, r.headers["content-type"]) == (status, content_type)
    assert r.json() == expected


def test_str_bytes_and_response_returns(daemon: Daemon) -> None:
    r = daemon.post("/kinds", json={"kind": "str"})
    assert r.headers["content-type"].startswith("text/plain") and r.text == "plain text"
    r = daemon.post("/kinds", json={"kind": "bytes"})
    assert r.headers["content-type"] == "application/octet-stream" and r.content == b"\x00\x01binary"
    r = daemon.post("/kinds", json={"kind": "response"})
    assert r.status_code == 418 and r.headers["x-custom"] == "yes" and r.text == "teapot"
    assert r.headers.get_list("content-length") == ["6"], "its own Content-Length, once"


def last_error(daemon: Daemon, api: str) -> str:
    """The message of the API's last request error, as GET /NAME shows it ("" if none)."""
    return str((daemon.get(f"/{api}").json()["request_error"] or {}).get("message", ""))


def test_a_file_response_sends_its_file_whole_or_streamed(daemon: Daemon) -> None:
    """starlette's FileResponse, as starlette sends it: its file (read whole, or past 16 MiB streamed in parts), its
    media type, Content-Length, ETag, Last-Modified and Content-Disposition; a path that is no file is a 500 that
    names it, shown as the API's last error."""
    r = daemon.post("/files", json={"kind": "small"})
    assert (r.status_code, r.content, r.headers["content-length"]) == (200, b"meow\n", "5")
    assert r.headers["content-type"].startswith("text/plain")
    assert r.headers["content-disposition"] == 'attachment; filename="cat.txt"'
    assert r.headers["etag"].startswith('"') and r.headers["last-modified"].endswith("GMT")
    with daemon.client.stream("POST", daemon.url("/files"), json={"kind": "big"}) as r:
        assert (r.status_code, r.headers["content-type"]) == (200, "application/x-big")
        assert r.headers["content-length"] == str(18 * 2**20)
        assert b"".join(r.iter_bytes()) == b"".join(bytes([i]) * 2**20 for i in range(18))
    for kind, why in (("missing", "No such file or directory"), ("folder", "is not a file")):
        r = daemon.post("/files", json={"kind": kind})
        assert r.status_code == 500 and r.json()["api"] == "files", r.text
        message = wait_until(lambda why=why: why in (m := last_error(daemon, "files")) and m, 10, f"'{why}' shown")
        assert message.startswith("predict() raised RuntimeError: FileResponse: "), message


def test_a_responses_background_task_runs_after_it_is_sent(daemon: Daemon, tmp_path: Path) -> None:
    """A starlette Response's ``background`` runs once the response is out, as under starlette: a sync function (in a
    thread) and an async one; one that raises is logged and shown as the API's last error."""
    sync, async_ = tmp_path / "sync.txt", tmp_path / "async.txt"
    r = daemon.post("/files", json={"kind": "background", "to": str(sync)})
    assert r.json() == {"ok": 1}
    r = daemon.post("/files", json={"kind": "file-background", "to": str(async_)})
    assert r.content == b"meow\n"
    wait_until(lambda: sync.exists() and sync.read_text() == "sync", 10, "the sync background task")
    wait_until(lambda: async_.exists() and async_.read_text() == "async", 10, "the async background task")
    r = daemon.post("/files", json={"kind": "raising"}, headers={"X-Request-ID": "bg-1"})
    assert r.json() == {"ok": 2}
    daemon.wait_for_log(r"API files request bg-1: the response's background task raised")
    wait_until(lambda: "the response's background task raised ZeroDivisionError" in last_error(daemon, "files"), 10,
               "the background task's error to be shown")


def test_generator_streams(daemon: Daemon) -> None:
    with daemon.client.stream("POST", daemon.url("/kinds"), json={"kind": "stream"}) as r:
        assert r.status_code == 200
        assert "content-length" not in r.headers
        assert b"".join(r.iter_bytes()) == b"part0\npart1\npart2\n"


def test_a_stream_that_fails_midway_is_cut_and_its_error_shown(daemon: Daemon) -> None:
    got = b""
    with pytest.raises(httpx.RemoteProtocolError), daemon.client.stream(  # noqa: PT012 - the parts, then the cut
            "POST", daemon.url("/kinds"), json={"kind": "broken-stream"}, headers={"X-Request-ID": "cut-1"}) as r:
        assert r.status_code == 200
        for part in r.iter_bytes():
            got += part
    assert got == b"part0\npart1\n", "the parts made before the failure arrive; the response is left unfinished"
    daemon.wait_for_log(r"API kinds request cut-1: the streamed response failed: RuntimeError: the third part cannot "
                        r"be made")
    wait_until(lambda: "its streamed response raised RuntimeError: the third part cannot be made" in
               last_error(daemon, "kinds"), 10, "the error shown at GET /kinds")


def test_a_streaming_response_keeps_its_status_headers_and_media_type(daemon: Daemon) -> None:
    """starlette's StreamingResponse (server-sent events, as a token stream is served)."""
    with daemon.client.stream("POST", daemon.url("/kinds"), json={"kind": "sse", "n": 3}) as r:
        assert r.status_code == 201 and r.headers["cache-control"] == "no-cache"
        assert r.headers["content-type"].startswith("text/event-stream") and "content-length" not in r.headers
        assert b"".join(r.iter_bytes()) == b"data: token0\n\ndata: token1\n\ndata: token2\n\n"


def test_large_answers_arrive_whole_side_by_side(daemon: Daemon) -> None:
    """Answers of 64 KiB and up reach the HTTP worker in buffers of their own (protocol.FrameReader) and go to their
    clients from there: eight at once, of sizes around the cut-offs and up to 9 MB, each byte as the predictor made
    it; and a stream of large parts."""
    sizes = [65_535, 65_536, 65_550, 262_144, 300_001, 1_000_000, 3_000_000, 9_000_000]

    def fetch(seed: int) -> bool:
        size = sizes[seed % len(sizes)]
        with httpx.Client(timeout=60) as client:
            r = client.post(daemon.url("/kinds"), json={"kind": "large", "size": size, "seed": seed})
        return r.status_code == 200 and r.content == random.Random(seed).randbytes(size)

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(fetch, range(24)))
    for size in (65_000, 65_500, 65_535):  # bodies just under SHARED_FROM go in frames; these are large frames too
        body = random.Random(size).randbytes(size)
        r = daemon.post("/echo", content=body, headers={"content-type": "application/octet-stream"})
        assert r.status_code == 200 and r.json()["payload"] == {"bytes": body.hex()}
    with daemon.client.stream("POST", daemon.url("/kinds"), json={"kind": "large-stream", "size": 2_000_000,
                                                                 "seed": 5}) as r:
        assert r.status_code == 200
        assert b"".join(r.iter_bytes()) == b"".join(random.Random(5 + i).randbytes(2_000_000) for i in range(3))


def test_async_predict_and_init_extras(daemon: Daemon) -> None:
    r = daemon.post("/aio", json=[1])
    assert r.json() | {"dir": None} == {"async": True, "device": "cpu", "dir": None, "got": [1]}
    assert Path(r.json()["dir"]).is_absolute()


def test_predictor_dir_is_the_users_folder(daemon: Daemon) -> None:
    assert daemon.post("/aio", json=[1]).json()["dir"] == str(daemon.predictors)


def test_post_predict_runs_after_the_response(daemon: Daemon) -> None:
    r = daemon.post("/post", json={"n": 5})
    assert r.json() == {"n": 5}
    log = daemon.predictors / "post-5.log"
    # the parsed payload, as predict() saw it (poll the content: the file exists before it is written)
    wait_until(lambda: log.exists() and log.read_text() == "{'n': 5}", 10, "post_predict to write its file")


def test_status_command_prints_apis_and_workers(daemon: Daemon) -> None:
    cmd = [sys.executable, "-m", "predictord", "status", "--config", str(daemon.config_path)]
    table = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:4] == ["API", "STATE", "VERSION", "WHERE"]
    echo = next(line for line in lines if line.startswith("echo "))
    assert "ready" in echo and "cpu#0" in echo
    pid = daemon.proc.pid if daemon.proc is not None else 0
    assert re.search(rf"^daemon pid {pid}, up \d+m\d\ds, serving {re.escape(str(daemon.predictors))}$",
                     table.stdout, re.M), table.stdout
    raw = subprocess.run([*cmd, "--json"], capture_output=True, text=True, timeout=30)
    assert set(json.loads(raw.stdout)["apis"]) == set(daemon.status()["apis"])


def test_http_exception_keeps_its_status(daemon: Daemon) -> None:
    r = daemon.post("/kinds", json={"kind": "http-error"})
    assert r.status_code == 422
    assert r.json()["error"] == "kind must be sensible"


def test_exception_is_500_naming_api_and_request_without_traceback(daemon: Daemon) -> None:
    r = daemon.post("/kinds", json={"kind": "crash"}, headers={"X-Request-ID": "req-123"})
    assert r.status_code == 500
    body = r.json()
    assert body["api"] == "kinds" and body["request_id"] == "req-123"
    assert "ValueError" in body["error"] and "secret internal detail" not in r.text
    assert "Traceback" not in r.text


def test_an_exception_is_logged_with_the_api_and_the_request(daemon: Daemon) -> None:
    assert daemon.post("/kinds", json={"kind": "crash"}, headers={"X-Request-ID": "req-124"}).status_code == 500
    daemon.wait_for_log(r"API kinds request req-124: predict\(\) raised ValueError: secret internal detail")


FAILS = '''
class PythonPredictor:
    def __init__(self, config):
        pass

    def predict(self, payload):
        raise ValueError(f"bad input {payload['n']}")
'''


def test_a_predictor_that_fails_every_request_does_not_flood_the_log(tmp_path: Path) -> None:
    """Per kind of failure and minute: one traceback, then a line each for failures.LINES more, then a count."""
    d = Daemon(tmp_path / "d")
    path = d.write("fails.py", FAILS)
    d.start()
    try:
        d.wait_settled()
        for n in range(LINES + 30):
            assert d.post("/fails", json={"n": n}, headers={"X-Request-ID": f"r{n}"}).status_code == 500
        wait_until(lambda: d.get("/fails").json()["request_errors"] == LINES + 30, 10, "every failure reported")
    finally:
        d.stop()
    logs = d.logs()
    assert logs.count("Traceback") == 1 and "ValueError: bad input 0\n" in logs.split("Traceback")[1][:3000]
    assert len(re.findall(r"API fails request r\d+: predict\(\) raised ValueError: bad input \d+", logs)) == LINES + 1
    assert f"API fails request r{LINES}: predict() raised ValueError: bad input {LINES} (at {path}:7)" in logs
    assert re.search(rf"API fails: 29 more requests failed with ValueError at {re.escape(str(path))}:7 in the last "
                     rf"\d+s, not logged one by one \(the last: request r{LINES + 29}, ValueError: bad input "
                     rf"{LINES + 29}\)", logs), logs[-3000:]


@pytest.mark.parametrize("kind", ["nan", "object"])
def test_unserializable_return_is_500(daemon: Daemon, kind: str) -> None:
    r = daemon.post("/kinds", json={"kind": kind})
    assert r.status_code == 500 and r.json()["api"] == "kinds"


def test_request_id_echoed_or_generated(daemon: Daemon) -> None:
    for path in ("/echo", "/nope"):
        r = daemon.post(path, headers={"X-Request-ID": "abc-1"}, json={})
        assert r.headers["x-request-id"] == "abc-1", path
        first, second = (daemon.post(path, json={}).headers["x-request-id"] for _ in range(2))
        assert len(first) >= 32 and first != second, path
    crash = daemon.post("/kinds", json={"kind": "crash"})
    assert crash.json()["request_id"] == crash.headers["x-request-id"], "the body names the request its header does"
    assert daemon.post("/kinds", json={"kind": "number"}).headers["x-predictor-version"]


def test_request_id_on_every_response_and_the_version_that_answered(daemon: Daemon) -> None:
    for path, method in [("/echo", "POST"), ("/nope", "POST"), ("/", "GET"), ("/echo", "GET"), ("/healthz", "GET")]:
        r = daemon.client.request(method, daemon.url(path), headers={"X-Request-ID": "abc-1"}, json={})
        assert r.headers["x-request-id"] == "abc-1", path
        r = daemon.client.request(method, daemon.url(path), json={})
        assert len(r.headers["x-request-id"]) == 32, path
    r = daemon.post("/kinds", json={"kind": "number"})
    assert r.headers["x-predictor-version"] == daemon.get("/kinds").json()["version"]["wanted"]


def test_unknown_api_is_404_json(daemon: Daemon) -> None:
    for path in ["/nope", "/echo/extra", "/../etc/passwd"]:
        r = daemon.post(path, json={})
        assert r.status_code == 404
        assert "GET / lists the APIs" in r.json()["error"]


def test_other_methods_are_405(daemon: Daemon) -> None:
    r = daemon.client.put(daemon.url("/echo"), json={})
    assert r.status_code == 405 and r.headers["allow"] == "GET, POST"
    assert r.json()["error"] == "/echo answers POST (predict) and GET (status)"


def test_the_daemons_own_routes_answer_get_only(daemon: Daemon) -> None:
    assert daemon.post("/healthz").status_code == 405


def test_api_status_document(daemon: Daemon) -> None:
    s = daemon.get("/echo").json()
    assert s["state"] == "ready"
    assert s["version"]["serving"] == [s["version"]["wanted"]]
    assert s["replicas"][0]["device"] == "cpu"
    assert s["signature"]["predict"] == ["payload", "query_params", "headers"]
    assert s["serving"] == {"device": "any", "replicas": 1, "max_replicas": 0, "timeout": 60.0, "queue_limit": 128,
                            "threads": 1, "max_batch_size": 1, "batch_wait_ms": 5.0, "isolation": "shared",
                            "health_interval": 10.0, "health_failures": 3, "warmup": []}
    assert s["rebalance"]["replicas"] is None and s["rebalance"]["note"] is None
    assert s["rebalance"]["footprint"] >= 32 * 2**20, "the memory its load took (its 32 MiB), measured in the worker"
    assert s["error"] is None
    assert json.loads(json.dumps(s)) == s


def test_body_over_limit_is_413(tmp_path: Path) -> None:
    d = Daemon(tmp_path, TORCH + "[server]\nmax_body_bytes = 1000\n")
    d.write("echo.py", PREDICTORS["echo.py"])
    d.start()
    try:
        d.wait_state("echo", "ready")
        r = d.post("/echo", content=b"x" * 5000, headers={"Content-Type": "application/octet-stream"})
        assert r.status_code == 413 and "max_body_bytes" in r.json()["error"]
        assert d.post("/echo", content=b"x" * 900).status_code == 200
    finally:
        d.stop()


STREAMS = '''
import asyncio
import pathlib
import time


class PythonPredictor:
    def __init__(self, config):
        self.closed = pathlib.Path(config["closed"])

    def predict(self, payload):
        if payload["kind"] == "sync":
            def parts():
                try:
                    for n in range(10**9):  # endless: only a reader that leaves ends it
                        yield f"part {n}\\n"
                        time.sleep(0.01)
                finally:
                    self.closed.write_text("sync")
        else:
            async def parts():
                try:
                    for n in range(10**9):
                        yield f"part {n}\\n"
                        await asyncio.sleep(0.01)
                finally:
                    self.closed.write_text("async")
        return parts()
'''


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_stream_whose_client_leaves_is_stopped_and_its_generator_closed(tmp_path: Path, kind: str) -> None:
    closed = tmp_path / "closed"
    d = Daemon(tmp_path / "d", TORCH + "[workers]\ncpu = 1\n")
    d.write("streams.py", STREAMS)
    d.write("streams.toml", f'[config]\nclosed = "{closed}"\n')
    d.start()
    try:
        d.wait_settled()
        with httpx.Client(timeout=10) as client, client.stream("POST", d.url("/streams"), json={"kind": kind}) as r:
            parts = r.iter_lines()
            assert [next(parts), next(parts)] == ["part 0", "part 1"]
        # the client has gone: the generator's finally block runs, and the job is over everywhere
        wait_until(closed.exists, 10, "the generator to be closed")
        assert closed.read_text() == kind
        wait_until(lambda: d.get("/streams").json()["outstanding"] == 0, 10, "no job left outstanding")
        d.wait_for_log(r"nobody reads the stream any more \(the client left\); closing its generator")
        with d.client.stream("POST", d.url("/streams"), json={"kind": kind}) as r:  # the API serves on
            assert next(r.iter_lines()) == "part 0"
    finally:
        d.stop()


BULK = '''
import pathlib
import time


class PythonPredictor:
    def __init__(self, config):
        self.made = pathlib.Path(config["made"])

    def predict(self, payload):
        def parts():
            for n in range(payload["parts"]):
                time.sleep(payload.get("every", 0))
                self.made.write_text(str(n + 1))  # how many parts the generator has made
                yield bytes([n % 256]) * payload.get("size", 2**20)
        return parts()
'''


def http_rss(d: Daemon) -> int:
    """The HTTP workers' resident memory, in bytes, all together (their pids from the log: `[PID http0]`)."""
    total = 0
    for pid in {int(m) for m in re.findall(r"\[(\d+) http\d+\]", d.logs())}:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += psutil.Process(pid).memory_info().rss
    return total


def test_a_stream_to_a_slow_client_is_held_back_not_buffered_and_cut_once_nothing_is_read(tmp_path: Path) -> None:
    made = tmp_path / "made"
    d = Daemon(tmp_path / "d", "[server]\nhttp_workers = 1\n")
    d.write("bulk.py", BULK)
    d.write("bulk.toml", f'[config]\nmade = "{made}"\n[serving]\ntimeout = 3\n')
    d.start()
    try:
        d.wait_settled()
        before = http_rss(d)
        # 120 MiB to a slow client, which takes its next part only once the generator is a window (8 parts of 1 MiB,
        # protocol.STREAM_WINDOW) ahead of it: it arrives whole, and the HTTP worker holds a window of it rather than
        # all that the generator can make meanwhile
        ahead = STREAM_WINDOW // 2**20
        peak, got = 0, 0
        with d.client.stream("POST", d.url("/bulk"), json={"parts": 120}) as r:
            for n, chunk in enumerate(r.iter_bytes(2**20)):
                assert chunk == bytes([n % 256]) * 2**20, f"part {n} whole and in order"
                got += len(chunk)
                wait_until(lambda n=n: int(made.read_text() or 0) >= min(120, n + 1 + ahead), 10,  # ('': mid-write)
                           "the generator a window ahead of the client")
                if n % 8 == 0:
                    peak = max(peak, http_rss(d))
        assert got == 120 * 2**20
        assert peak - before < 40 * 2**20, f"the HTTP worker grew by {(peak - before) >> 20} MiB"
        # a client that reads none of it: the generator stops a window ahead, and after [serving] timeout the
        # stream is cut and its generator closed; the API serves on
        with socket.create_connection(("127.0.0.1", d.port)) as s:
            s.sendall(b"POST /bulk HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 14\r\n"
                      b"\r\n{\"parts\": 300}")
            d.wait_for_log(r"request \S+: the stream is cut: its client read none of it for 3s \(\[serving\] timeout\)",
                           30)
        assert 8 <= int(made.read_text()) < 40, f"the generator made {made.read_text()} parts of 300"
        assert "hung" not in d.logs()
        wait_until(lambda: d.get("/bulk").json()["outstanding"] == 0, 10, "no job left outstanding")
        assert d.post("/bulk", json={"parts": 2, "size": 3}).content == b"\x00\x00\x00\x01\x01\x01"
    finally:
        d.stop()


def test_a_stream_may_last_longer_than_the_timeout_while_its_parts_come(tmp_path: Path) -> None:
    made = tmp_path / "made"
    d = Daemon(tmp_path / "d")
    d.write("bulk.py", BULK)
    d.write("bulk.toml", f'[config]\nmade = "{made}"\n[serving]\ntimeout = 1\n')
    d.start()
    try:
        pid = d.wait_settled()["workers"][0]["pid"]
        # 8 s of parts, one every 0.25 s, against a 1 s timeout (hung past it and model/worker.py's HUNG_GRACE of
        # 5 s): the timeout bounds each part, not the stream
        r = d.post("/bulk", json={"parts": 32, "every": 0.25, "size": 1})
        assert (r.status_code, len(r.content)) == (200, 32)
        assert "hung" not in d.logs() and d.status()["workers"][0]["pid"] == pid, "the worker was not replaced"
    finally:
        d.stop()


# What `predictord ray` serves too: tests/ray/test_contract_on_ray.py runs these against Ray Serve.
SHARED = ("test_json_payload_query_headers_and_config", "test_text_payload_honours_charset",
          "test_other_content_types_are_bytes", "test_form_and_multipart", "test_a_compressed_body_arrives_decoded",
          "test_malformed_json_is_400_with_json_error",
          "test_json_returns", "test_str_bytes_and_response_returns", "test_generator_streams",
          "test_a_streaming_response_keeps_its_status_headers_and_media_type",
          "test_async_predict_and_init_extras", "test_http_exception_keeps_its_status",
          "test_exception_is_500_naming_api_and_request_without_traceback", "test_unserializable_return_is_500",
          "test_request_id_echoed_or_generated", "test_unknown_api_is_404_json", "test_other_methods_are_405")
