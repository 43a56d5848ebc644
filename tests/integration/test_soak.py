"""Soak: mixed load on several APIs (keep-alive and new connections, some errors) with reloads, for a while.

60 s in `make test`; `make soak` runs it for 10 minutes (PREDICTORD_SOAK_SECONDS=600). Asserts 0 unexpected
answers, every process of the daemon kept (no restarts), RSS of each within SOAK_RSS_MIB of its level after the
warm-up, and open fds back where they were once the load stops. Prints the figures for RELIABILITY.md.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from typing import Any

import httpx
import psutil
from harness import Daemon, process_figures, wait_until

TORCH_PRELOADED = True  # the model path, as production runs it (harness.TORCH)

SECONDS = float(os.environ.get("PREDICTORD_SOAK_SECONDS", "60"))
RELOAD_EVERY = min(30.0, SECONDS / 4)
WARMUP = min(60.0, SECONDS / 6)
SOAK_RSS_MIB = 20  # the bound on each process's RSS growth after the warm-up
PACE = 0.01  # seconds between one client's requests: about 400 requests/s in all, half the 2 cores

GENERATION = '''
class PythonPredictor:
    def __init__(self, config):
        self.generation = {n}

    def predict(self, payload):
        return {{"generation": self.generation, "echo": payload}}
'''
PREDICTORS = {
    "gen.py": GENERATION.format(n=0),
    "text.py": '''
class PythonPredictor:
    def __init__(self, config):
        pass

    def predict(self, payload):
        return "x" * int(payload.get("n", 10))
''',
    "batch.py": '''
class PythonPredictor:
    def __init__(self, config):
        pass

    def predict(self, payload):
        return [{"sum": sum(p["x"])} for p in payload]
''',
    "batch.toml": "[serving]\nmax_batch_size = 8\nbatch_wait_ms = 2\n",
    "picky.py": '''
from starlette.exceptions import HTTPException


class PythonPredictor:
    def __init__(self, config):
        pass

    def predict(self, payload):
        if payload.get("bad"):
            raise HTTPException(422, "bad is not allowed")
        if payload.get("crash"):
            raise RuntimeError("asked to crash")
        return {"ok": True}
''',
}
# (api or path, body, expected status): what each client cycles through
MIXES: dict[str, list[tuple[str, Any, int]]] = {
    "keepalive": [("/gen", {"a": 1}, 200), ("/text", {"n": 5000}, 200), ("/batch", {"x": [1, 2]}, 200),
                  ("/picky", {}, 200)],
    "errors": [("/picky", {"bad": True}, 422), ("/nope", {}, 404), ("/gen", b"{broken", 400),
               ("/picky", {"crash": True}, 500)],
}


class Clients:
    """Client threads cycling through their mix until stopped; counts answers by (path, status)."""

    def __init__(self, d: Daemon) -> None:
        self.d = d
        self.stop = threading.Event()
        self.answers: Counter[tuple[str, int | str]] = Counter()
        self.unexpected: list[str] = []
        self.lock = threading.Lock()
        plan = [("keepalive", True), ("keepalive", True), ("keepalive", False), ("errors", True)]
        self.threads = [threading.Thread(target=self._run, args=(mix, keep), daemon=True) for mix, keep in plan]

    def _run(self, mix: str, keepalive: bool) -> None:
        headers = {} if keepalive else {"Connection": "close"}
        with httpx.Client(timeout=30, headers=headers) as client:
            i = 0
            while not self.stop.wait(PACE):
                path, body, expected = MIXES[mix][i % len(MIXES[mix])]
                i += 1
                try:
                    kw: dict[str, Any] = {"content": body} if isinstance(body, bytes) else {"json": body}
                    r = client.post(self.d.url(path), headers={"Content-Type": "application/json"}, **kw)
                    got: int | str = r.status_code
                except httpx.HTTPError as e:
                    got = type(e).__name__
                with self.lock:
                    self.answers[(path, got)] += 1
                    if got != expected:
                        self.unexpected.append(f"{path} -> {got}, expected {expected}")


def _figures(d: Daemon) -> dict[int, tuple[int, int]]:
    """RSS and fds of the master and its workers (probes, which come and go with reloads, left out)."""
    assert d.proc is not None
    cmdline = psutil.Process(d.proc.pid).cmdline()
    figures = process_figures(d.proc.pid)
    return {pid: f for pid, f in figures.items() if _cmdline(pid) == cmdline}


def _cmdline(pid: int) -> list[str]:
    try:
        return psutil.Process(pid).cmdline()  # type: ignore[no-any-return]
    except psutil.NoSuchProcess:
        return []


def _run(d: Daemon, seconds: float, reload_every: float | None = None) -> tuple[Clients, list[Any], int]:
    """Load for ``seconds`` (reloading gen every ``reload_every``), sampling every process every 5 s."""
    clients = Clients(d)
    for t in clients.threads:
        t.start()
    started = time.monotonic()
    samples: list[tuple[float, dict[int, tuple[int, int]]]] = []
    reloads = 0
    next_reload = started + (reload_every or float("inf"))
    try:
        while time.monotonic() - started < seconds:
            clients.stop.wait(min(5.0, max(0.0, next_reload - time.monotonic()), started + seconds - time.monotonic()))
            samples.append((time.monotonic() - started, _figures(d)))
            if reload_every and time.monotonic() >= next_reload:
                reloads += 1
                tmp = d.predictors / ".gen.py.tmp"
                tmp.write_text(GENERATION.format(n=reloads))
                os.replace(tmp, d.predictors / "gen.py")
                next_reload += reload_every
    finally:
        clients.stop.set()
        for t in clients.threads:
            t.join(30)
    return clients, samples, reloads


def _settled_fds(d: Daemon) -> dict[int, int]:
    """Open fds per process once the clients' connections have closed (two equal looks 0.5 s apart)."""
    last: list[dict[int, int]] = []

    def stable() -> dict[int, int] | None:
        now = {pid: fds for pid, (_, fds) in _figures(d).items()}
        last.append(now)
        return now if len(last) > 1 and last[-2] == now else None

    return wait_until(stable, 30, "open fds to settle", interval=0.5)  # type: ignore[no-any-return]


def test_soak_mixed_load_with_reloads(make_daemon: Any) -> None:
    d: Daemon = make_daemon(PREDICTORS, "[predictors]\ndebounce = 0.3\n[workers]\ncpu = 2\n")
    d.wait_settled()
    assert d.proc is not None
    warmup, _, _ = _run(d, WARMUP)  # links between workers, metric files, allocator pools: opened once
    quiet = _settled_fds(d)
    rss = {pid: f[0] for pid, f in _figures(d).items()}
    clients, samples, reloads = _run(d, SECONDS - WARMUP, RELOAD_EVERY)
    wait_until(lambda: d.post("/gen", json={}).json()["generation"] == reloads, 30, "the last reload to serve")
    total = sum(clients.answers.values())
    growth = {pid: max(f[pid][0] for _, f in samples if pid in f) - base for pid, base in rss.items()}
    print(f"\nsoak {SECONDS:g}s ({WARMUP:g}s warm-up): {total} requests after the warm-up, "
          f"{len(clients.unexpected) + len(warmup.unexpected)} unexpected, {reloads} reloads; answers "
          f"{dict(clients.answers)}")
    models = set(d.worker_pids().values())
    role = {pid: "master" if pid == d.proc.pid else "model worker" if pid in models else "HTTP worker" for pid in rss}
    for pid in sorted(rss):
        print(f"{role[pid]} {pid}: RSS {rss[pid] / 2**20:.1f} MiB after the warm-up, max growth "
              f"{growth[pid] / 2**20:+.1f} MiB; {quiet[pid]} fds before the load")
    assert warmup.unexpected == [] and clients.unexpected == [], (warmup.unexpected + clients.unexpected)[:20]
    assert total > (SECONDS - WARMUP) * 50, "the load ran"
    assert set(_figures(d)) == set(quiet), "no process of the daemon was replaced"
    assert all(g < SOAK_RSS_MIB * 2**20 for g in growth.values()), {p: g >> 20 for p, g in growth.items()}
    after = _settled_fds(d)
    print("fds after the load: " + ", ".join(f"{role[pid]} {after[pid]} ({after[pid] - quiet[pid]:+d})"
                                             for pid in sorted(quiet)))
    assert all(after[pid] <= quiet[pid] + 2 for pid in quiet), (quiet, after)
