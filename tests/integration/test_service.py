"""Running as a system service: units, the notify protocol, socket activation, signals, a guarded directory."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from broken import OK, SLOW
from harness import HELD, Daemon, free_port, wait_until

REPO = Path(__file__).resolve().parents[2]
ANALYZE = shutil.which("systemd-analyze")
needs_systemd_tools = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


def unit_with_local_exec(tmp_path: Path) -> Path:
    """The service unit as installed, but starting this checkout's predictord (verify checks the executable)."""
    text = (REPO / "systemd" / "predictord.service").read_text()
    local = Path(sys.executable).parent / "predictord"
    unit = tmp_path / "predictord.service"
    unit.write_text(text.replace("/opt/predictord/venv/bin/predictord", str(local)))
    shutil.copy(REPO / "systemd" / "predictord.socket", tmp_path / "predictord.socket")
    return unit


@needs_systemd_tools
def test_units_verify_with_empty_stderr(tmp_path: Path) -> None:
    unit = unit_with_local_exec(tmp_path)
    r = subprocess.run([ANALYZE, "verify", str(unit), str(tmp_path / "predictord.socket")], capture_output=True,
                       text=True, timeout=60)
    assert (r.returncode, r.stderr) == (0, ""), r.stderr  # verify exits 0 on parse errors: stderr is the verdict


@needs_systemd_tools
def test_security_exposure_is_in_the_ok_band(tmp_path: Path) -> None:
    r = subprocess.run([ANALYZE, "security", "--offline=true", str(unit_with_local_exec(tmp_path))],
                       capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for predictord.service: ([\d.]+) (\w+)", r.stdout)
    assert m, r.stdout[-2000:] + r.stderr
    assert float(m.group(1)) <= 2.0 and m.group(2) in ("SAFE", "OK"), m.group(0)


def test_install_files_stage_the_fhs_layout(tmp_path: Path) -> None:
    r = subprocess.run(["make", "-s", "install-files", f"DESTDIR={tmp_path}"], cwd=REPO, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    units = "etc/systemd/system/predictord"
    for path, mode in [(f"{units}.service", 0o644), (f"{units}.socket", 0o644), ("etc/predictord/config.toml", 0o644),
                       ("var/lib/predictord/predictors", 0o755), ("var/lib/predictord/predictors/hello.py", 0o644)]:
        assert (tmp_path / path).exists(), path
        assert (tmp_path / path).stat().st_mode & 0o777 == mode, path
    config = (tmp_path / "etc/predictord/config.toml").read_text()
    assert "check_permissions = true" in config and 'dir = "/var/lib/predictord/predictors"' in config
    check = subprocess.run([sys.executable, "-m", "predictord", "options"], capture_output=True, text=True)
    assert check.returncode == 0


class NotifySocket:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET: it records every message with its time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self.closed = False
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while not self.closed:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode()))

    def find(self, key: str) -> list[float]:
        return [t for t, m in self.messages if key in m.splitlines()]

    def close(self) -> None:
        self.closed = True
        self.thread.join(2)
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    n = NotifySocket(tmp_path / "notify.sock")
    yield n
    n.close()


SLOW_INIT = HELD + '''

class PythonPredictor:
    def __init__(self, config):
        held(config["gate"])  # loads until the test opens the gate

    def predict(self, payload):
        return {"ready": True}
'''


def slow_init(d: Daemon) -> Path:
    """The gated predictor in ``d``; returns its gate (a file to create when its __init__ may finish)."""
    gate = d.root / "gate"
    d.write("slow.py", SLOW_INIT)
    d.write("slow.toml", f'[config]\ngate = "{gate}"\n')
    return gate


def test_notify_ready_after_models_load_reloading_and_stopping(tmp_path: Path, notify: NotifySocket) -> None:
    d = Daemon(tmp_path / "d", env={"NOTIFY_SOCKET": str(notify.path)})
    gate = slow_init(d)
    d.start()
    try:
        wait_until(lambda: any("1 loading" in m for _, m in notify.messages), 30, "a STATUS line while it loads")
        gate.touch()
        ready = wait_until(lambda: notify.find("READY=1"), 60, "READY=1")[0]
        loaded = d.wait_for_log(r"API slow version \w+ ready on model worker")
        assert loaded and d.get("/slow").json()["state"] == "ready"
        listening = [t for t, m in notify.messages if "STATUS=" in m]
        assert listening and min(listening) < ready, "STATUS lines came while it loaded"
        assert any("1 APIs ready, 0 loading, 0 failed" in m for _, m in notify.messages)
        assert d.proc is not None
        os.kill(d.proc.pid, signal.SIGHUP)
        reloading = wait_until(lambda: notify.find("RELOADING=1"), 30, "RELOADING=1")[0]
        wait_until(lambda: any(t > reloading for t in notify.find("READY=1")), 30, "READY=1 after the reload")
        assert len(notify.find("READY=1")) == 2, "exactly one READY per start or reload: gunicorn's own is gone"
    finally:
        code = d.stop(signal.SIGTERM)
    assert notify.find("STOPPING=1") and code == 0


def test_watchdog_pings_when_systemd_asks_and_sigquit_stops_at_once(tmp_path: Path, notify: NotifySocket) -> None:
    d = Daemon(tmp_path / "d", env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "1000000"})
    d.write("slow.py", SLOW)
    d.start()
    d.wait_settled()
    wait_until(lambda: len(notify.find("WATCHDOG=1")) >= 3, 30, "three WATCHDOG=1 pings")
    result: list[int | str] = []
    t = threading.Thread(target=lambda: result.append(_status(d, "/slow", {"sleep": 20})))
    t.start()
    wait_until(lambda: d.get("/slow").json()["outstanding"] == 1, 10, "a request in flight")
    assert d.proc is not None
    started = time.monotonic()
    os.kill(d.proc.pid, signal.SIGQUIT)
    d.proc.wait(15)
    assert time.monotonic() - started < 15, "SIGQUIT does not wait for the 20 s request"
    t.join(30)
    assert result and result[0] != 200
    d.stop()


def _status(d: Daemon, path: str, body: object) -> int | str:
    try:
        return httpx.post(d.url(path), json=body, timeout=30).status_code
    except httpx.HTTPError as e:
        return repr(e)


def test_ready_waits_for_a_slow_init_before_it_is_sent(tmp_path: Path, notify: NotifySocket) -> None:
    d = Daemon(tmp_path / "d", env={"NOTIFY_SOCKET": str(notify.path)})
    gate = slow_init(d)
    d.start()
    try:
        wait_until(lambda: d.get("/slow").json()["state"] == "loading", 30, "its __init__ to be running")
        assert not notify.find("READY=1"), "READY=1 came before the __init__ finished"
        opened = time.monotonic()
        gate.touch()
        ready = wait_until(lambda: notify.find("READY=1"), 60, "READY=1")[0]
        assert ready >= opened, "READY=1 came before the __init__ finished"
    finally:
        d.stop()


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None, reason="systemd-socket-activate missing")
def test_socket_activation_answers_the_first_request(tmp_path: Path) -> None:
    d = Daemon(tmp_path / "d")
    gate = slow_init(d)
    d.write_config()
    port = free_port()
    log = d.log_path.open("ab")
    proc = subprocess.Popen(["systemd-socket-activate", "-l", f"127.0.0.1:{port}", sys.executable, "-m",
                             "predictord", "--config", str(d.config_path)], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=d.root)
    try:
        wait_until(lambda: "Listening on 127.0.0.1" in d.logs(), 10, "systemd-socket-activate to listen")
        # The daemon is not running yet: this request starts it, waits in the backlog, and gets the real answer
        # once the API has loaded (its __init__ is held until the daemon has found it).
        opener = threading.Thread(target=lambda: (wait_until(lambda: "API slow found" in d.logs(), 30, "the load"),
                                                  gate.touch()))
        opener.start()
        r = httpx.post(f"http://127.0.0.1:{port}/slow", json={}, timeout=60)
        opener.join()
        assert r.status_code == 200 and r.json() == {"ready": True}
        assert "Execing" in d.logs()
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            log.close()


def test_sigterm_under_load_finishes_accepted_requests_and_leaves_no_orphans(
        make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon({"slow.py": SLOW, "ok.py": OK}, "[workers]\ncpu = 2\n")
    d.wait_settled()
    assert d.proc is not None
    results: list[int | str] = []

    def call() -> None:
        try:
            results.append(httpx.post(d.url("/slow"), json={"sleep": 1.5}, timeout=30).status_code)
        except httpx.HTTPError as e:
            results.append(repr(e))

    threads = [threading.Thread(target=call) for _ in range(6)]
    for t in threads:
        t.start()
    wait_until(lambda: d.get("/slow").json()["outstanding"] == 6, 10, "6 requests in flight")
    os.kill(d.proc.pid, signal.SIGTERM)
    for t in threads:
        t.join(30)
    assert results == [200] * 6, results
    assert d.proc.wait(30) == 0
    assert "SIGTERM: draining in-flight requests" in d.logs()
    assert "Error while closing socket" not in d.logs(), "a listener closed twice (gunicorn's wrapper, then uvloop)"
    with pytest.raises(ProcessLookupError):
        os.killpg(d.proc.pid, 0)  # nothing of the daemon's process group is left


def test_unsafe_predictor_files_are_refused_with_the_fix(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon({"good.py": OK, "world.py": OK, "group.py": OK, "foreign.py": OK, "folder/predictor.py": OK},
                    "[predictors]\ncheck_permissions = true\n", start=False)
    p = d.predictors
    os.chmod(p / "world.py", 0o666)
    os.chmod(p / "group.py", 0o664)
    os.chown(p / "group.py", 0, 65534)  # a group that is not the service's
    os.chown(p / "foreign.py", 65534, 0)  # another unprivileged user
    os.chmod(p / "folder", 0o777)
    d.start()
    status = d.wait_settled()
    errors = {n: (a["error"] or {}).get("message", "") for n, a in status["apis"].items()}
    assert status["apis"]["good"]["state"] == "ready" and d.post("/good", json={}).status_code == 200
    assert f"{p / 'world.py'}: mode 0666 lets anyone write it. Fix: chmod o-w {p / 'world.py'}" == errors["world"]
    assert re.match(rf"{p / 'group.py'}: mode 0664 lets group \w+ write it, which is not the service's group",
                    errors["group"])
    assert f"{p / 'foreign.py'}: owned by nobody, not by root or the service user root" in errors["foreign"]
    assert "Fix: chown root" in errors["foreign"]
    assert f"{p / 'folder'}: mode 0777 lets anyone write it" in errors["folder"]
    for name in ("world", "group", "foreign", "folder"):
        assert d.post(f"/{name}", json={}).status_code == 503
        d.wait_for_log(rf"API {name} refused: ")
    os.chmod(p / "world.py", 0o644)  # the fix the message gave: the watcher sees the chmod and checks again
    wait_until(lambda: d.post("/world", json={}).status_code == 200, 30, "world to load once fixed")


def test_a_second_daemon_leaves_a_live_admin_socket_alone(make_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    """Two daemons given one admin socket (the default path, say): the second must not take the first's."""
    shared = f'[server]\nadmin_socket = "{tmp_path / "admin.sock"}"\n'
    first = make_daemon({"first.py": OK}, shared)
    first.wait_settled()
    second = make_daemon({"second.py": OK}, shared)
    second.wait_settled()
    second.wait_for_log(r"another predictord answers on its admin socket .*admin\.sock; this one has none")
    cmd = [sys.executable, "-m", "predictord", "status", "--json", "--config", str(first.config_path)]

    def apis() -> set[str]:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True).stdout
        return set(json.loads(out)["apis"])

    assert apis() == {"first"}
    second.stop()  # its exit leaves the first's socket in place
    assert apis() == {"first"}
    first.stop()  # a socket whose daemon is gone is stale: the next daemon takes it
    third = make_daemon({"third.py": OK}, shared)
    third.wait_settled()
    assert apis() == {"third"}


def test_drain_delay_takes_the_host_out_of_rotation_before_it_stops_serving(
        make_daemon: Callable[..., Daemon]) -> None:
    # Behind a balancer, a host that closed its listener at once would reset the connections still in its accept
    # queue; with drain_delay it first answers /readyz 503 (so the balancer's checks take it out) and keeps serving.
    d = make_daemon({"ok.py": OK}, "[server]\ndrain_delay = 4\n")
    d.wait_settled()
    assert d.proc is not None
    assert httpx.get(d.url("/readyz"), timeout=5).status_code == 200
    os.kill(d.proc.pid, signal.SIGTERM)
    seen = wait_until(lambda: (r := httpx.get(d.url("/readyz?api=ok"), timeout=5)).status_code == 503 and r, 10,
                      "/readyz to answer 503 after SIGTERM")
    assert seen.json() == {"ready": False, "error": "the daemon is stopping"}
    assert d.proc.poll() is None, "the daemon still runs during its drain_delay"
    fresh = httpx.post(d.url("/ok"), json={}, timeout=5)  # a new connection: the listener is still open
    assert fresh.status_code == 200
    assert d.proc.wait(30) == 0
    logs = d.logs()
    assert "SIGTERM: /readyz answers 503 for 4s ([server] drain_delay)" in logs
    assert logs.index("drain_delay over") > logs.index("SIGTERM: /readyz answers 503")


def limits_of(pid: int) -> tuple[int, int]:
    """A process's (soft, hard) limit on open files, as /proc says."""
    line = next(ln for ln in Path(f"/proc/{pid}/limits").read_text().splitlines() if ln.startswith("Max open files"))
    soft, hard = line.split()[3:5]
    return int(soft), int(hard)


def test_every_process_gets_the_hard_open_file_limit(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon({"ok.py": OK}, start=False)
    d.open_files = (256, 2048)  # systemd's 1024 / 524288, smaller
    d.start().wait_settled()
    assert d.proc is not None
    processes = [psutil.Process(d.proc.pid), *psutil.Process(d.proc.pid).children(recursive=True)]
    assert len(processes) >= 4, "the master, two HTTP workers and a model worker"
    assert {p.pid: limits_of(p.pid) for p in processes} == {p.pid: (2048, 2048) for p in processes}
    assert "open files: raised the limit from 256 to 2048" in d.logs()
    assert ("open files are limited to 2048 per process: each HTTP worker holds at most 1728 connections at once "
            "and answers more with 503") in d.logs()


def test_connections_past_the_open_file_limit_get_503_and_none_an_empty_reply(
        make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon({"ok.py": OK}, "[server]\nhttp_workers = 1\n", start=False)
    d.open_files = (200, 200)  # nothing to raise: the worker holds openfiles.connections_for(200) = 111
    d.start().wait_settled()
    assert d.post("/ok", json={}).status_code == 200
    # idle: they never send a request; more than the worker's 200 files, which left it dropping connections unanswered
    held = [socket.create_connection(("127.0.0.1", d.port)) for _ in range(250)]
    try:
        r = httpx.post(d.url("/ok"), json={}, timeout=10)  # a new client, past the worker's connections
        assert (r.status_code, r.headers["retry-after"], r.headers["connection"]) == (503, "1", "close")
        assert r.json()["error"] == ("this HTTP worker holds 111 connections, as many as its open-file limit allows; "
                                     "retry shortly")
        answered = []  # the held connections past the bound were answered at once; the others wait, unanswered
        for s in held:
            s.setblocking(False)
            try:
                answered.append(s.recv(4096))
            except BlockingIOError:
                pass
        assert 250 - 111 <= len(answered) <= 250 - 111 + 2, len(answered)  # (+ the harness's keep-alive client)
        assert all(a.startswith(b"HTTP/1.1 503 ") and b"retry-after: 1" in a for a in answered), answered
    finally:
        for s in held:
            s.close()
    wait_until(lambda: d.post("/ok", json={}).status_code == 200, 10, "served again once the connections closed")
    assert re.search(r"HTTP worker pid \d+ holds 111 connections, as many as its open-file limit \(200\) allows: "
                     r"new ones get 503 until some close", d.logs())

    def refused() -> int:  # (the workers' counts reach /metrics within metrics.FLUSH_EVERY)
        found = re.search(r'predictord_requests_total\{api="-",class="5xx",code="503"\} ([\d.]+)',
                          d.get("/metrics").text)
        return int(float(found.group(1))) if found else 0

    wait_until(lambda: refused() == len(answered) + 1, 10, "each refused connection counted as a 503")


def test_keepalive_sets_how_long_an_idle_connection_stays_open(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon({"ok.py": OK}, "[server]\nkeepalive = 1\n")
    d.wait_settled()
    with socket.create_connection(("127.0.0.1", d.port)) as s:
        s.sendall(b"POST /ok HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
        assert s.recv(65536).startswith(b"HTTP/1.1 200 ")
        s.settimeout(0.1)

        def closed() -> bool:
            try:
                return s.recv(1) == b""
            except TimeoutError:
                return False

        # the default (5 s) would still hold it: closed well before, after the configured second
        wait_until(closed, 4, "the idle connection closed by the daemon")
