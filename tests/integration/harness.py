"""A real predictord as a subprocess: its own temp directory, an ephemeral port, logs to a file, deadlines."""

from __future__ import annotations

import os
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil

# Past the daemon's longest bounded wait (front.WAIT_AT_MOST, 30 s for a load or a reroute): a request the daemon
# gave up on shows as its 503, and only one it lost shows as a client timeout.
CLIENT_TIMEOUT = 40.0

# Predictor code that waits on a test's gate file: prepend it to a predictor, call held(path) where it should wait.
HELD = '''
import os
import time


def held(gate, until_exists=True):
    """Until the test opens the gate: creates the file (until_exists=False: removes it); at most 60 s."""
    deadline = time.monotonic() + 60
    while os.path.exists(gate) != until_exists:
        if time.monotonic() > deadline:
            raise TimeoutError("the test never opened the gate")
        time.sleep(0.01)
'''


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def cmdline(p: psutil.Process) -> list[str]:
    """A process's command line; empty once it has ended or is a zombie not yet reaped (a listed child may be)."""
    try:
        return list(p.cmdline())
    except psutil.Error:
        return []


def free_port() -> int:
    """A loopback port free now (for a server that must be told its port before it starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def exchange(port: int, data: bytes, timeout: float = 10) -> tuple[bytes, bool]:
    """Send raw bytes on a new connection; what came back, and whether the server closed it within ``timeout``. A
    server that answers and closes before it has read all the bytes (a 431, a 413) may break the send: what it
    answered is still there to read."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                return out, True
            except TimeoutError:
                return out, False
            if not chunk:
                return out, True
            out += chunk


def process_figures(pid: int) -> dict[int, tuple[int, int]]:
    """(RSS bytes, open fds) of a process and each of its descendants, by pid."""
    figures = {}
    root = psutil.Process(pid)
    for p in [root, *root.children(recursive=True)]:
        try:
            figures[p.pid] = (p.memory_info().rss, p.num_fds())
        except psutil.NoSuchProcess:
            continue
    return figures


# The production default, preloading torch in the master (2.3 s a start here): the suites of the model path run with it
# (``TORCH_PRELOADED = True`` in the module, or this in a daemon's config); the others start without it.
TORCH = '[workers]\npreload = ["torch"]\n'


class Daemon:
    """Start, query and stop one predictord process group."""

    def __init__(self, root: Path, config: str = "", env: dict[str, str] | None = None) -> None:
        self.root = root
        self.predictors = root / "predictors"
        self.predictors.mkdir(parents=True, exist_ok=True)
        self.config_path = root / "config.toml"
        self.log_path = root / "daemon.log"
        self.config_text = config
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.client = httpx.Client(timeout=CLIENT_TIMEOUT)
        self.open_files: tuple[int, int] | None = None  # (soft, hard) RLIMIT_NOFILE to start the daemon with

    def write(self, relpath: str, text: str) -> Path:
        path = self.predictors / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    def write_config(self) -> None:
        base = {"server": f'host = "127.0.0.1"\nport = 0\nhttp_workers = 2\nlog_level = "info"\n'
                          f'admin_socket = "{self.root / "admin.sock"}"\n',
                "predictors": 'dir = "predictors"\nload_timeout = 20\n',
                "workers": 'cpu = 1\ngpus = "none"\npreload = []\n'}
        tables = {t: self._keys(v) for t, v in base.items()}
        for t, v in self._tables(self.config_text).items():
            tables.setdefault(t, {}).update(self._keys(v))  # the test's keys override the base
        text = "".join(f"[{t}]\n" + "".join(lines.values()) + "\n" for t, lines in tables.items())
        self.config_path.write_text(text)

    def start(self) -> Daemon:
        self.write_config()
        before = len(self.logs()) if self.log_path.exists() else 0  # a restart appends to the same log
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.env)
        env.pop("PREDICTORD_CONFIG", None)
        self.log = self.log_path.open("ab")
        limit = self.open_files
        self.proc = subprocess.Popen([sys.executable, "-m", "predictord", "--config", str(self.config_path)],
                                     stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                     cwd=self.root, start_new_session=True,
                                     preexec_fn=None if limit is None else
                                     lambda: resource.setrlimit(resource.RLIMIT_NOFILE, limit))
        match = self.wait_for_log(r"predictord listening on http://127\.0\.0\.1:(\d+)", 60, after=before)
        self.port = int(match.group(1))
        return self

    @staticmethod
    def _keys(text: str) -> dict[str, str]:
        return {line.split("=")[0].strip(): line + "\n" for line in text.splitlines() if "=" in line}

    @staticmethod
    def _tables(text: str) -> dict[str, str]:
        tables: dict[str, str] = {}
        current = None
        for line in text.strip().splitlines():
            m = re.match(r"\s*\[(\w+)\]\s*$", line)
            if m:
                current = m.group(1)
                tables.setdefault(current, "")
            elif current:
                tables[current] += line.strip() + "\n"
        return tables

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, pattern: str, timeout: float = 30, after: int = 0) -> re.Match[str]:
        def found() -> re.Match[str] | None:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"the daemon exited ({self.proc.returncode}):\n{self.logs()[-3000:]}")
            return re.search(pattern, self.logs()[after:])

        return wait_until(found, timeout, f"log line /{pattern}/")  # type: ignore[no-any-return]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return self.client.get(self.url(path), **kw)

    def post(self, path: str, **kw: Any) -> httpx.Response:
        return self.client.post(self.url(path), **kw)

    def status(self) -> dict[str, Any]:
        return self.get("/").json()  # type: ignore[no-any-return]

    def wait_state(self, name: str, state: str, timeout: float = 60) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            r = self.get(f"/{name}")
            return r.json() if r.status_code == 200 and r.json()["state"] == state else None

        return wait_until(check, timeout, f"API {name} to be {state}")  # type: ignore[no-any-return]

    def wait_settled(self, timeout: float = 60) -> dict[str, Any]:
        """Every API ready or failed, every model worker up."""

        def check() -> dict[str, Any] | None:
            s = self.status()
            settled = all(a["state"] in ("ready", "failed") for a in s["apis"].values())
            published = "pid" in s["daemon"]  # the master has written its first routing table
            return s if published and settled and not s["daemon"]["workers_down"] else None

        return wait_until(check, timeout, "every API to be ready or failed")  # type: ignore[no-any-return]

    def wait_replicas(self, name: str, count: int, timeout: float = 60) -> dict[str, Any]:
        """Settled, with ``count`` replicas of an API in the routes: an API is ready at its first replica, and
        wait_settled returns then, while the others may still be loading."""

        def check() -> dict[str, Any] | None:
            s = self.wait_settled(timeout)
            return s if len(s["apis"][name]["replicas"]) == count else None

        return wait_until(check, timeout, f"{count} replicas of API {name}")  # type: ignore[no-any-return]

    def worker_pids(self) -> dict[int, int]:
        return {w["slot"]: w["pid"] for w in self.status()["workers"]}

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        """Signal the master as systemd would; then SIGKILL its process group (ours: a new session) if need be."""
        self.client.close()
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        try:  # anything left in the group (an orphaned worker) is ours too
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.log.close()
        return self.proc.returncode


@dataclass
class Outcome:
    """One request as its client saw it."""

    api: str
    sent: float
    done: float
    status: int | None  # None: no HTTP answer (connection error)
    error: str = ""  # what a failure said: the body's `error`, or the exception's name
    version: str = ""  # X-Predictor-Version
    body: Any = None  # the JSON of a 200
    client: int = 0


class Load:
    """Client threads that call their APIs in a loop until stopped, recording every answer (bounded: a deadline
    and a request cap per client). ``plan``: API -> clients, or (clients, JSON body)."""

    def __init__(self, d: Daemon, plan: Mapping[str, int | tuple[int, dict[str, Any]]], keepalive: bool = True,
                 seconds: float = 120, cap: int = 200_000) -> None:
        self.d = d
        self.keepalive = keepalive
        self.stop_at = time.monotonic() + seconds
        self.cap = cap
        self.stop = threading.Event()
        self.outcomes: list[Outcome] = []
        self.lock = threading.Lock()
        clients = [(api, *((spec, {}) if isinstance(spec, int) else spec)) for api, spec in plan.items()]
        jobs = [(api, body) for api, n, body in clients for _ in range(n)]
        self.threads = [threading.Thread(target=self._client, args=(i, api, body), daemon=True)
                        for i, (api, body) in enumerate(jobs)]

    def _client(self, index: int, api: str, body: dict[str, Any]) -> None:
        headers = {} if self.keepalive else {"Connection": "close"}
        with httpx.Client(timeout=CLIENT_TIMEOUT, headers=headers) as client:
            for _ in range(self.cap):
                if self.stop.is_set() or time.monotonic() > self.stop_at:
                    return
                sent = time.monotonic()
                status: int | None = None
                error, version, answer = "", "", None
                try:
                    r = client.post(self.d.url(f"/{api}"), json=body)
                    status, version = r.status_code, r.headers.get("x-predictor-version", "")
                    if status == 200:
                        answer = r.json()
                    else:
                        try:
                            error = str(r.json()["error"])
                        except (ValueError, KeyError, TypeError):
                            error = r.text
                except httpx.HTTPError as e:
                    error = type(e).__name__
                with self.lock:
                    self.outcomes.append(Outcome(api, sent, time.monotonic(), status, error, version, answer, index))
                if status is None:
                    self.stop.wait(0.05)  # a refused connection answers at once: no busy loop

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)

    def of(self, api: str) -> list[Outcome]:
        with self.lock:
            return [o for o in self.outcomes if o.api == api]

    def failures(self, api: str) -> list[Outcome]:
        return [o for o in self.of(api) if o.status != 200]

    def count(self, api: str) -> int:
        return len(self.of(api))

    def clients(self, api: str) -> list[list[Outcome]]:
        """What each client of ``api`` saw, in order."""
        seen: dict[int, list[Outcome]] = {}
        for o in self.of(api):
            seen.setdefault(o.client, []).append(o)
        return list(seen.values())

    def served_since(self, api: str, since: float, n: int = 1) -> bool:
        """At least ``n`` requests to ``api`` sent after ``since`` succeeded."""
        return sum(1 for o in self.of(api) if o.sent >= since and o.status == 200) >= n


HOSTILE_REASONS = {"fifo": "is a FIFO, not a regular file", "zero": "is a character device, not a regular file",
                   "big": "2147483648 bytes; a code or settings file may have at most 16 MiB"}


def plant_hostile(d: Daemon, api_source: str) -> None:
    """Files a careless or malicious user might drop: a FIFO, a link to /dev/zero and a 2 GB file as settings of
    three APIs (reasons in HOSTILE_REASONS), and a link to /."""
    d.write("fifo.py", api_source)
    os.mkfifo(d.predictors / "fifo.toml")
    d.write("zero.py", api_source)
    (d.predictors / "zero.toml").symlink_to("/dev/zero")
    d.write("big.py", api_source)
    with (d.predictors / "big.toml").open("wb") as f:
        f.truncate(2 * 2**30)  # sparse: 2 GB that take no disk
    (d.predictors / "rootlink").symlink_to("/")
