"""The HTTP front in-process (starlette's TestClient way, with httpx's ASGI transport): routing, payload parsing and
every answer, against a fake dispatcher and a routing table and status document written by the test."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import pickle
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from predictord import bodies
from predictord.http.dispatch import Dispatcher, PendingJob, WorkerLost
from predictord.http.front import Front
from predictord.http.published import ROUTES_FILE, STATUS_FILE, Published
from predictord.http.routes import status_body
from predictord.http.safety import OUTSIDE, Tokens
from predictord.protocol import JobHeader, Problem, ReplicaRow, ReplyHeader, Route, RoutingTable
from predictord.scoreboard import Scoreboard

PREDICTORS = "/srv/predictors"
JSON_OK = ReplyHeader(200, [(b"content-type", b"application/json")], "v1")
ECHO = Route(slot=0, replicas=(ReplicaRow(0, "/run/m0.sock", 1, "v1"),), timeout=2.0, queue_limit=4,
             wants_headers=False, state="ready")
Canned = Any  # (ReplyHeader, body), (ReplyHeader, [stream parts]), or an exception to raise


class FakeDispatcher(Dispatcher):
    """Answers each job with the next canned reply (a body, a list of stream parts) or raises it."""

    def __init__(self, scoreboard: Scoreboard) -> None:
        super().__init__(scoreboard, 0)
        self.canned: list[Canned] = []
        self.jobs: list[tuple[ReplicaRow, JobHeader, bytes, float]] = []

    async def submit(self, replica: ReplicaRow, api_slot: int, header: JobHeader, body: bytes, timeout: float,
                     on_lost: Any = None) -> tuple[PendingJob, Any]:
        self.jobs.append((replica, header, body, timeout))
        answer = self.canned.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        reply, out = answer
        job = PendingJob(api_slot, asyncio.get_running_loop().create_future(), None, len(self.jobs))  # type: ignore
        if isinstance(out, list):
            job.stream = asyncio.Queue()
            for part in [*out, None]:
                job.stream.put_nowait(part)
            return job, (reply, None)
        return job, (reply, out)


class Daemon:
    """A Front as the master would make it, with what the master would publish, written by the test."""

    def __init__(self, runtime: Path, max_body: int = 1000, tokens: Tokens | None = None,
                 published: bool = True) -> None:
        self.runtime = runtime
        self.board = Scoreboard()
        self.board.beat_master()
        self.dispatcher = FakeDispatcher(self.board)
        self.front = Front(self.board, runtime, max_body, tokens=tokens, dispatcher=self.dispatcher)
        if published:
            self.publish({"echo": ECHO})
            self.publish_status(ready=True)

    def publish(self, apis: dict[str, Route]) -> None:
        (self.runtime / ROUTES_FILE).write_bytes(RoutingTable(apis, PREDICTORS).dumps())
        self.board.bump_routes()

    def publish_status(self, ready: bool = False, apis: dict[str, Any] | None = None, **daemon: Any) -> None:
        document = {"apis": apis or {"echo": {"name": "echo", "state": "ready", "serving": {"timeout": 2.0}}},
                    "workers": [{"slot": 0, "pid": 1, "apis": {"echo": "v1"}}], "series": {}, "devices": [],
                    "events": [{"at": 1.0, "kind": "load", "text": "echo loaded from /etc/private/x.py"}],
                    "decisions": [], "daemon": {"pid": 1, "started_at": 1.0, "predictors_dir": PREDICTORS,
                                                "ready": ready, "not_ready": {}, "workers_down": [], **daemon}}
        (self.runtime / STATUS_FILE).write_text(json.dumps(document))
        self.board.bump_status()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return asyncio.run(self.during(method, path, lambda: None, **kwargs))

    async def during(self, method: str, path: str, meanwhile: Callable[[], Any], after: float = 0.1,
                     **kwargs: Any) -> httpx.Response:
        """One request, with ``meanwhile`` run ``after`` seconds into it (the master publishing, say)."""
        asyncio.get_running_loop().call_later(after, meanwhile)
        transport = httpx.ASGITransport(app=over_tcp(self.front))
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            return await client.request(method, path, **kwargs)


def over_tcp(app: Front) -> Callable[[dict[str, Any], Any, Any], Awaitable[None]]:
    """The app as a TCP listener's requests reach it: with a port in the scope's server (httpx leaves it None, which
    is how the front tells the Unix admin socket); no socket is bound in-process, so port 0 stands for any."""

    async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await app({**scope, "server": ("127.0.0.1", 0)} if scope["type"] == "http" else scope, receive, send)

    return asgi


@pytest.fixture
def d(tmp_path: Path) -> Daemon:
    return Daemon(tmp_path)


def error_of(response: httpx.Response) -> str:
    body = response.json()
    assert body["request_id"] == response.headers["x-request-id"], "every error names its request"
    message: str = body["error"]
    return message


# -- POST /NAME ----------------------------------------------------------------------------------------------------
def test_a_json_body_is_parsed_here_and_the_answer_relayed(d: Daemon) -> None:
    d.dispatcher.canned.append((JSON_OK, b'{"y":2}'))
    r = d.request("POST", "/echo?k=v", json={"x": 1}, headers={"X-Request-ID": "abc"})
    assert r.status_code == 200 and r.json() == {"y": 2}
    assert r.headers["x-request-id"] == "abc" and r.headers["x-predictor-version"] == "v1"
    assert r.headers["content-length"] == "7"
    replica, header, body, timeout = d.dispatcher.jobs[0]
    assert replica == ECHO.replicas[0]
    assert header == JobHeader("echo", None, b"k=v", None, "abc", 2.0), "None: the body is the parsed payload"
    assert pickle.loads(body) == {"x": 1}
    assert 0 < timeout <= 2.0


def test_other_bodies_go_as_they_came_and_headers_only_when_asked(d: Daemon) -> None:
    d.publish({"echo": Route(0, ECHO.replicas, 2.0, 4, True, "ready")})
    d.dispatcher.canned.append((ReplyHeader(201, [(b"content-length", b"2")], ""), b"ok"))
    r = d.request("POST", "/echo", content=b"raw", headers={"content-type": "text/plain"})
    assert r.status_code == 201 and r.text == "ok" and "x-predictor-version" not in r.headers
    header = d.dispatcher.jobs[0][1]
    assert header.content_type == "text/plain" and d.dispatcher.jobs[0][2] == b"raw"
    assert header.headers is not None and (b"content-type", b"text/plain") in header.headers
    assert len(header.request_id) == 32, "a request without X-Request-ID gets one"


@pytest.fixture
def sharing(tmp_path: Path) -> Iterator[Daemon]:
    """A front that puts large bodies in /dev/shm; the files it made are removed after the test."""
    if not bodies.available():
        pytest.skip("no writable /dev/shm here")
    daemon = Daemon(tmp_path, max_body=10**7)
    yield daemon
    pool = daemon.front._pool
    for body in pool.idle if pool is not None else []:
        body.remove()


@pytest.mark.parametrize("room", [True, False], ids=["shared file", "no room in /dev/shm"])
def test_a_large_body_goes_through_a_shared_file_or_else_the_frame(sharing: Daemon, room: bool,
                                                                    monkeypatch: pytest.MonkeyPatch,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    if not room:
        monkeypatch.setattr(bodies.os, "posix_fallocate", full)
    raw = bytes(range(256)) * 1000  # 256 KB: past SHARED_FROM
    text = {"text": "x" * 200_000}
    seen = []
    reader = bodies.Reader()
    for sent, read in [(raw, reader.read), (text, reader.unpickle)] * 2:
        sharing.dispatcher.canned.append((JSON_OK, b"{}"))
        if isinstance(sent, bytes):
            assert sharing.request("POST", "/echo", content=sent).status_code == 200
        else:
            assert sharing.request("POST", "/echo", json=sent).status_code == 200
        _, header, body, _ = sharing.dispatcher.jobs[-1]
        if room:  # the file is read before the next body reuses it
            assert body == b"" and read(header.body_at) == sent
            seen.append(header.body_at.partition(":")[0])
        else:
            assert header.body_at == "" and body == (sent if isinstance(sent, bytes) else pickle.dumps(sent, 5))
    if room:
        assert len(set(seen)) == 1, "one file, reused for each body after its answer"
    else:
        assert not list(bodies.ROOT.glob(f"{bodies.PREFIX}{os.getppid()}-0-*")), "no file left"
        assert caplog.text.count("no room for it in /dev/shm") == 1, "said once, not per request"


def test_a_large_json_null_is_shared_as_the_payload_none(sharing: Daemon) -> None:
    sharing.dispatcher.canned.append((JSON_OK, b"{}"))
    text = b"null" + b" " * 70_000  # valid JSON past SHARED_FROM whose payload is None
    assert sharing.request("POST", "/echo", content=text, headers={"content-type": "application/json"}).status_code \
        == 200
    header = sharing.dispatcher.jobs[-1][1]
    assert header.body_at and bodies.Reader().unpickle(header.body_at) is None


def test_a_stream_is_relayed_part_by_part(d: Daemon) -> None:
    d.dispatcher.canned.append((ReplyHeader(200, [(b"content-type", b"text/plain")], "v1"), [b"a", b"b", b"c"]))
    r = d.request("POST", "/echo", content=b"")
    assert r.status_code == 200 and r.text == "abc" and "content-length" not in r.headers


def test_malformed_json_is_a_400_here(d: Daemon) -> None:
    r = d.request("POST", "/echo", content=b'{"x": ', headers={"content-type": "application/json",
                                                                "x-request-id": "bad-1"})
    assert r.status_code == 400 and r.json()["request_id"] == "bad-1" and error_of(r)
    assert not d.dispatcher.jobs, "a malformed body never reaches a model worker"


def test_an_unknown_api_is_a_404_that_points_at_the_list(d: Daemon) -> None:
    for method, path in (("POST", "/nope"), ("GET", "/nope"), ("POST", "/echo/more"), ("DELETE", "/nope")):
        r = d.request(method, path)
        assert r.status_code == 404, (method, path)
        assert error_of(r) == f"no API named {path[1:]!r} at {path}; GET / lists the APIs"


def test_a_body_over_max_body_is_a_413_that_closes(d: Daemon) -> None:
    too_much = b"x" * 1001
    r = d.request("POST", "/echo", content=too_much)  # Content-Length says so: refused before reading
    assert r.status_code == 413 and r.headers["connection"] == "close"
    assert error_of(r) == "the request body is over 1000 bytes ([server] max_body_bytes)"

    async def chunks() -> Any:  # no Content-Length: refused once the parts pass the bound
        for _ in range(3):
            yield b"x" * 400

    r = d.request("POST", "/echo", content=chunks())
    assert r.status_code == 413 and r.headers["connection"] == "close"
    assert not d.dispatcher.jobs


def test_a_failed_api_is_a_503_naming_file_and_line_redacted(d: Daemon) -> None:
    problem = Problem("cannot open /etc/private/key: denied", f"{PREDICTORS}/bad.py", 7)
    d.publish({"bad": Route(1, (), 2.0, 4, False, "failed", problem)})
    r = d.request("POST", "/bad", json={})
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert error_of(r) == f"API 'bad' failed to load: {PREDICTORS}/bad.py:7: cannot open {OUTSIDE}: denied"


def test_a_loading_api_is_waited_for(d: Daemon) -> None:
    d.publish({"echo": Route(0, (), 2.0, 4, False, "loading")})
    d.dispatcher.canned.append((JSON_OK, b"{}"))
    r = asyncio.run(d.during("POST", "/echo", lambda: d.publish({"echo": ECHO}), json={}))
    assert r.status_code == 200 and len(d.dispatcher.jobs) == 1


def test_an_api_still_loading_at_its_deadline_is_a_503(d: Daemon) -> None:
    d.publish({"echo": Route(0, (), 0.2, 4, False, "loading")})
    r = d.request("POST", "/echo", json={})
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert error_of(r) == "API 'echo' is loading; retry shortly"


def test_a_full_queue_is_a_503_with_retry_after(d: Daemon) -> None:
    d.board.add(0, 0, ECHO.slot, +5)  # 1 running on the one thread, 4 queued: queue_limit reached
    r = d.request("POST", "/echo", json={})
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert error_of(r) == "API 'echo' has 4 requests queued ([serving] queue_limit); retry later"
    assert not d.dispatcher.jobs


def test_a_deadline_passed_is_a_504(d: Daemon) -> None:
    d.dispatcher.canned += [TimeoutError(), (ReplyHeader(504, [], "v1"), b"")]
    r = d.request("POST", "/echo", json={})
    assert r.status_code == 504 and error_of(r) == "API 'echo' did not answer within 2s ([serving] timeout)"
    r = d.request("POST", "/echo", json={})  # the model worker dropped it from its queue, past the deadline
    assert r.status_code == 504 and error_of(r) == "API 'echo' did not answer in time"


def test_a_worker_lost_is_a_502(d: Daemon) -> None:
    d.dispatcher.canned.append(WorkerLost("model worker 0 exited while handling this request", worker=0))
    r = d.request("POST", "/echo", json={})
    assert r.status_code == 502
    assert error_of(r) == ("API 'echo': model worker 0 exited while handling this request; the worker is being "
                           "replaced")


def test_a_refused_connection_waits_for_routes_without_that_worker(d: Daemon) -> None:
    moved = Route(0, (ReplicaRow(1, "/run/m1.sock", 1, "v1"),), 2.0, 4, False, "ready")
    d.dispatcher.canned += [ConnectionRefusedError(111, "Connection refused"), (JSON_OK, b"{}")]
    r = asyncio.run(d.during("POST", "/echo", lambda: d.publish({"echo": moved}), json={}))
    assert r.status_code == 200
    assert [job[0].socket for job in d.dispatcher.jobs] == ["/run/m0.sock", "/run/m1.sock"]


def test_a_refused_connection_with_no_other_worker_is_a_503(d: Daemon) -> None:
    d.publish({"echo": Route(0, ECHO.replicas, 0.2, 4, False, "ready")})
    d.dispatcher.canned.append(ConnectionRefusedError(111, "Connection refused"))
    r = d.request("POST", "/echo", json={})
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert error_of(r) == ("API 'echo': its model worker is not reachable (Connection refused), and no other "
                           "replica took it in time; retry")


def test_a_job_its_dead_worker_never_started_goes_to_the_replacement(d: Daemon) -> None:
    """Jobs a dead worker had received but not started are not lost: they are sent again, once the routes name a
    replica that is not the dead one."""
    replaced = Route(0, (ReplicaRow(0, "/run/m0-2.sock", 1, "v1", 2),), 2.0, 4, False, "ready")
    d.dispatcher.canned += [WorkerLost("model worker 0 exited", worker=0, row=1, started=False), (JSON_OK, b"{}")]
    r = asyncio.run(d.during("POST", "/echo", lambda: d.publish({"echo": replaced}), json={}))
    assert r.status_code == 200
    assert [job[0].socket for job in d.dispatcher.jobs] == ["/run/m0.sock", "/run/m0-2.sock"]


def test_a_job_inside_predict_when_its_worker_died_blames_the_api_that_ended_it(d: Daemon) -> None:
    crash = Route(1, ECHO.replicas, 2.0, 4, False, "ready")
    d.publish({"echo": ECHO, "crash": crash})
    d.board.clear_run(5)
    d.board.set_exit(5, 1, 3)  # API column 1 (crash) called os._exit(3)
    d.dispatcher.canned.append(WorkerLost("model worker 0 exited", worker=0, row=5, started=True))
    r = d.request("POST", "/echo", json={})
    assert r.status_code == 502
    assert error_of(r) == ("API 'echo': model worker 0 was ended by API 'crash' (os._exit(3)) while handling this "
                           "request, which it shares the worker with; the worker is being replaced")
    d.dispatcher.canned.append(WorkerLost("model worker 0 exited", worker=0, row=5, started=True))
    d.publish({"echo": Route(1, ECHO.replicas, 2.0, 4, False, "ready")})
    assert "its own code ended model worker 0 (os._exit(3))" in error_of(d.request("POST", "/echo", json={}))


def test_a_job_of_a_worker_the_daemon_ended_says_why(d: Daemon) -> None:
    d.board.clear_run(6)
    d.board.set_killed(6, 1)
    d.dispatcher.canned.append(WorkerLost("model worker 0 exited", worker=0, row=6, started=True))
    assert error_of(d.request("POST", "/echo", json={})) == (
        "API 'echo': the daemon ended model worker 0 while handling this request: it sent no heartbeat within "
        "[workers] heartbeat_timeout (a predict() hung); the worker is being replaced")


def test_a_job_of_a_worker_that_died_unexplained_names_what_else_it_ran(d: Daemon) -> None:
    d.publish({"echo": ECHO, "other": Route(1, ECHO.replicas, 2.0, 4, False, "ready")})
    d.board.clear_run(7)
    d.board.mark(7, 0, 1, 42)  # API column 1 (other) was in predict()
    d.dispatcher.canned.append(WorkerLost("model worker 0 exited", worker=0, row=7, started=True))
    assert error_of(d.request("POST", "/echo", json={})) == (
        "API 'echo': model worker 0 exited while handling this request (it was also running 'other'); the worker "
        "is being replaced")


def test_while_draining_every_answer_closes_its_connection(d: Daemon) -> None:
    d.front.draining = True
    d.dispatcher.canned.append((JSON_OK, b"{}"))
    assert d.request("POST", "/echo", json={}).headers["connection"] == "close"
    assert d.request("GET", "/healthz").headers["connection"] == "close"


# -- tokens and methods --------------------------------------------------------------------------------------------
@pytest.fixture
def locked(tmp_path: Path) -> Daemon:
    return Daemon(tmp_path, tokens=Tokens(predict=b"predict-token", admin=b"admin-token"))


def test_predict_asks_for_its_token(locked: Daemon) -> None:
    r = locked.request("POST", "/echo", json={})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert error_of(r) == ("this route needs the bearer token of [server] auth_token_file: send 'Authorization: "
                           "Bearer TOKEN'")
    admin = locked.request("POST", "/echo", json={}, headers={"authorization": "Bearer admin-token"})
    assert admin.status_code == 401, "each surface has its own token"
    locked.dispatcher.canned.append((JSON_OK, b"{}"))
    assert locked.request("POST", "/echo", json={}, headers={"authorization": "Bearer predict-token"}).is_success


def test_status_routes_ask_for_the_admin_token_and_probes_do_not(locked: Daemon) -> None:
    for path in ("/", "/metrics", "/openapi.json", "/echo"):
        r = locked.request("GET", path)
        assert r.status_code == 401 and "admin_token_file" in error_of(r), path
    for path in ("/healthz", "/readyz"):
        assert locked.request("GET", path).status_code == 200, path
    r = locked.request("GET", "/echo", headers={"authorization": "Bearer admin-token"})
    assert r.status_code == 200 and r.json()["name"] == "echo"


def test_a_wrong_method_is_a_405_with_allow(locked: Daemon) -> None:
    for method, path in (("POST", "/"), ("PUT", "/healthz"), ("DELETE", "/metrics"), ("POST", "/openapi.json")):
        r = locked.request(method, path)
        assert r.status_code == 405 and r.headers["allow"] == "GET", (method, path)
        assert error_of(r) == f"{path} answers GET only"
    r = locked.request("PUT", "/echo")
    assert r.status_code == 405 and r.headers["allow"] == "GET, POST"
    assert error_of(r) == "/echo answers POST (predict) and GET (status)"


# -- the handler table ---------------------------------------------------------------------------------------------
def test_healthz(d: Daemon) -> None:
    r = d.request("GET", "/healthz", headers={"x-request-id": "probe"})
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.headers["x-request-id"] == "probe"


def test_healthz_is_503_when_the_masters_loop_stops_ticking(d: Daemon) -> None:
    d.board.cells[2] = int((time.time() - 30) * 1000)  # the master's last tick, 30 s ago
    r = d.request("GET", "/healthz")
    assert r.status_code == 503 and r.json()["status"] == "stuck"
    assert "has not ticked for 30s" in r.json()["error"]
    d.board.beat_master()
    assert d.request("GET", "/healthz").status_code == 200


def test_readyz_says_why_not(d: Daemon) -> None:
    assert d.request("GET", "/readyz").json() == {"ready": True}
    d.publish_status(ready=False, not_ready={"b": "failed", "a": "loading"}, workers_down=[1])
    r = d.request("GET", "/readyz")
    assert r.status_code == 503
    assert r.json() == {"ready": False, "error": "API a is loading; model worker 1 is not up",
                        "not_ready": {"b": "failed", "a": "loading"}}


def test_a_failed_api_leaves_the_host_ready_and_fails_its_own_check(d: Daemon) -> None:
    bad = Route(slot=1, replicas=(), timeout=1.0, queue_limit=1, wants_headers=False, state="failed",
                problem=Problem(f"{PREDICTORS}/bad.py: boom in /etc/private/x", None))
    d.publish({"echo": ECHO, "bad": bad})
    d.publish_status(ready=True, not_ready={"bad": "failed"})
    r = d.request("GET", "/readyz")
    assert r.status_code == 200 and r.json() == {"ready": True, "failed": {"bad": "failed"}}
    assert d.request("GET", "/readyz?api=echo").json() == {"ready": True, "api": "echo", "replicas": 1}
    refused = d.request("GET", "/readyz?api=bad")
    assert refused.status_code == 503 and refused.json()["state"] == "failed"
    assert "boom" in refused.json()["error"] and "/etc/private" not in refused.json()["error"], "redacted"
    missing = d.request("GET", "/readyz?api=nope")
    assert missing.status_code == 404 and missing.json()["error"] == "no API named 'nope' here"
    d.front.draining = True
    assert d.request("GET", "/readyz?api=echo").status_code == 503, "a draining host leaves the balancer at once"


def test_before_the_master_published_anything(tmp_path: Path) -> None:
    d = Daemon(tmp_path, published=False)
    r = d.request("GET", "/readyz")
    assert r.status_code == 503 and r.json()["error"] == "the daemon is starting"
    assert d.request("POST", "/echo", json={}).status_code == 404
    assert d.request("GET", "/").json()["apis"] == {}


def test_get_name_is_the_status_document_plus_outstanding_redacted(d: Daemon) -> None:
    error = {"message": "failed reading /etc/private/key", "file": f"{PREDICTORS}/echo.py", "line": 3}
    d.publish_status(apis={"echo": {"name": "echo", "state": "ready", "error": error}})
    d.board.add(0, 0, ECHO.slot, +2)
    r = d.request("GET", "/echo")
    assert r.status_code == 200
    assert r.json() == {"name": "echo", "state": "ready", "outstanding": 2,
                        "error": {**error, "message": f"failed reading {OUTSIDE}"}}
    assert d.request("HEAD", "/echo").status_code == 200


def test_get_root_is_the_status_document_redacted_or_the_page(d: Daemon) -> None:
    body = d.request("GET", "/").json()
    assert list(body) == ["apis", "workers", "devices", "decisions", "events", "daemon", "series"]
    assert body["events"][0]["text"] == f"echo loaded from {OUTSIDE}"
    page = d.request("GET", "/", headers={"accept": "text/html,*/*"})
    assert page.headers["content-type"] == "text/html; charset=utf-8" and page.headers["cache-control"] == "no-cache"
    assert page.text.startswith("<!doctype html>")


def test_admin_status_only_on_the_unix_socket_and_unredacted(d: Daemon) -> None:
    assert d.request("GET", "/admin/status").status_code == 404, "over TCP it names no API"
    messages: list[dict[str, Any]] = []
    scope = {"type": "http", "method": "GET", "path": "/admin/status", "headers": [], "query_string": b"",
             "server": ("/run/predictord/admin.sock", None)}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    asyncio.run(d.front(scope, receive, send))
    assert messages[0]["status"] == 200
    body = json.loads(messages[1]["body"])
    assert body["events"][0]["text"] == "echo loaded from /etc/private/x.py", "the host's own tool sees it all"
    assert body == status_body(json.loads((d.runtime / STATUS_FILE).read_text()))


def test_openapi_lists_the_apis_of_the_status_document(d: Daemon) -> None:
    doc = d.request("GET", "/openapi.json").json()
    assert "/echo" in doc["paths"] and "Requests past 2s get 504." in doc["paths"]["/echo"]["post"]["description"]


def test_metrics_has_the_live_rows(d: Daemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    d.board.add(0, 0, ECHO.slot, +3)
    r = d.request("GET", "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert 'predictord_in_flight_requests{api="echo"} 3.0' in r.text
    assert 'predictord_queued_requests{api="echo"} 2.0' in r.text


def test_lifespan_starts_and_stops(d: Daemon) -> None:
    async def run() -> list[str]:
        inbox: asyncio.Queue[dict[str, str]] = asyncio.Queue()
        for kind in ("lifespan.startup", "lifespan.shutdown"):
            inbox.put_nowait({"type": kind})
        sent: list[str] = []

        async def send(message: dict[str, str]) -> None:
            sent.append(message["type"])

        await d.front({"type": "lifespan"}, inbox.get, send)
        return sent

    assert asyncio.run(run()) == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


# -- the published files -------------------------------------------------------------------------------------------
def test_each_file_is_re_read_only_when_its_counter_moved(tmp_path: Path) -> None:
    board = Scoreboard()
    published = Published(board, tmp_path)
    assert published.routes() == RoutingTable() and published.status()["daemon"]["ready"] is False
    (tmp_path / ROUTES_FILE).write_bytes(RoutingTable({"echo": ECHO}, PREDICTORS).dumps())
    (tmp_path / STATUS_FILE).write_text(json.dumps({"apis": {}, "daemon": {"ready": True}}))
    first = published.routes()
    assert first.apis == {"echo": ECHO}, "the first read takes whatever is there"
    board.bump_status()
    assert published.status()["daemon"]["ready"] is True
    (tmp_path / ROUTES_FILE).write_bytes(RoutingTable({}, PREDICTORS).dumps())
    board.bump_status()
    assert published.routes() is first, "a status change does not make the routes be re-read"
    board.bump_routes()
    assert published.routes().apis == {}



def test_get_name_between_the_routes_and_the_status_document_still_has_the_error(d: Daemon) -> None:
    """The master writes the routes, then the status document: a GET /NAME in between finds the API in the routes
    only, and must still carry the keys a client reads (a CI run once read a refused API's status without "error")."""
    problem = Problem("cannot read /etc/private/x.toml: is a FIFO", f"{PREDICTORS}/bad.toml", None)
    d.publish({"echo": ECHO, "bad": Route(1, (), 2.0, 4, False, "failed", problem)})
    body = d.request("GET", "/bad").json()
    assert body["state"] == "failed" and body["health"] is None
    assert body["error"] == {**problem.as_dict(), "message": f"cannot read {OUTSIDE}: is a FIFO"}
    d.publish({"echo": ECHO, "sick": Route(2, (), 2.0, 4, False, "unhealthy",
                                                            Problem("health check read /etc/private/x"))})
    body = d.request("GET", "/sick").json()
    assert body["error"] is None and body["health"]["message"] == f"health check read {OUTSIDE}", "redacted too"
