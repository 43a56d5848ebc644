"""Fault scenarios against a real daemon under load, each returning what the clients saw.

Shared by tests/integration/test_faults.py (which asserts what must hold: only the requests inside the faulty
process fail, each with a clear 5xx, other APIs never fail, service comes back) and bench/faults.py (which runs
them longer and prints the figures in RELIABILITY.md). Loads are a few client threads on loopback, bounded by a
stop event and by each scenario's own deadlines.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import psutil
from harness import Daemon, Load, Outcome, cmdline, wait_until

MakeDaemon = Callable[..., Daemon]

SLEEPY = '''
import threading
import time


class PythonPredictor:
    def __init__(self, config):
        time.sleep(config.get("init", 0))
        self.generation = config.get("generation", 0)

    def predict(self, payload):
        if payload.get("hang"):
            threading.Event().wait()  # never set: a predict() that never returns
        time.sleep(payload.get("sleep", 0))
        return {"generation": self.generation}
'''
LEAKY = '''
class PythonPredictor:
    def __init__(self, config):
        self.kept = []

    def predict(self, payload):
        block = bytearray(payload.get("mib", 0) * 2**20)
        block[::4096] = b"x" * len(block[::4096])  # touch every page, so it is resident
        self.kept.append(block)
        return {"kept_mib": sum(len(b) for b in self.kept) >> 20}
'''

CRASHER = '''
import os


class PythonPredictor:
    def predict(self, payload):
        os._exit(3)
'''


@dataclass
class Figures:
    """What a scenario measured."""

    case: str
    outcomes: list[Outcome]
    faulty_api: str
    faults: list[float] = field(default_factory=list)  # when each fault was injected (monotonic)
    note: str = ""

    def of(self, api: str) -> list[Outcome]:
        return [o for o in self.outcomes if api in ("*", o.api)]

    def failed(self, api: str) -> list[Outcome]:
        return [o for o in self.of(api) if o.status != 200]

    @property
    def failed_share(self) -> float:
        return len(self.failed(self.faulty_api)) / max(1, len(self.of(self.faulty_api)))

    @property
    def others_failed(self) -> int:
        return sum(1 for o in self.outcomes if self.faulty_api not in ("*", o.api) and o.status != 200)

    @property
    def codes(self) -> Counter[str]:
        return Counter(str(o.status) if o.status else o.error for o in self.failed(self.faulty_api))

    def recovery(self) -> list[float]:
        """Per fault: seconds until a request to the faulty API sent after it succeeded."""
        out = []
        for t in self.faults:
            ok = [o.done for o in self.of(self.faulty_api) if o.sent >= t and o.status == 200]
            if ok:
                out.append(min(ok) - t)
        return out


def replica_pid(d: Daemon, api: str) -> int:
    def ready() -> int | None:
        a = d.status()["apis"][api]
        return a["replicas"][0]["pid"] if a["state"] == "ready" and a["replicas"] else None

    return wait_until(ready, 60, f"API {api} to have a ready replica")  # type: ignore[no-any-return]


def http_worker_pids(d: Daemon, models: set[int]) -> list[int]:
    """The master's live children that are neither model workers nor probes (a killed one not yet reaped is a
    zombie, whose command line cannot be read: not counted)."""
    assert d.proc is not None
    master = psutil.Process(d.proc.pid)
    return [c.pid for c in master.children() if c.pid not in models and cmdline(c) == master.cmdline()]


def _two_apis(make: MakeDaemon, config: str, extra: dict[str, str] | None = None) -> Daemon:
    """API a (the one hurt) and API b (the bystander), on two model workers."""
    d: Daemon = make({"a.py": SLEEPY, "b.py": SLEEPY, **(extra or {})}, "[workers]\ncpu = 2\n" + config)
    d.wait_settled()
    assert replica_pid(d, "a") != replica_pid(d, "b"), "placement puts the two APIs on two workers"
    return d


def kill_model_worker(make: MakeDaemon, kills: int = 3, every: float = 0.0) -> Figures:
    """SIGKILL API a's model worker again and again under load: each time once the replacement has served 20
    requests and ``every`` seconds have passed since the last kill."""
    d = _two_apis(make, "")
    faults = []
    with Load(d, {"a": (4, {"sleep": 0.02}), "b": (1, {})}) as load:
        wait_until(lambda: load.served_since("a", 0, 20), 30, "load on a")
        for _ in range(kills):
            pid = replica_pid(d, "a")
            faults.append(time.monotonic())
            os.kill(pid, signal.SIGKILL)
            wait_until(lambda: load.served_since("a", faults[-1], 20) and time.monotonic() - faults[-1] >= every, 60,
                       "a to serve again after the kill")
    return Figures("SIGKILL a model worker under load", load.outcomes, "a", faults)


def kill_http_worker(make: MakeDaemon) -> Figures:
    """SIGKILL one of the two HTTP workers while both carry requests in flight."""
    d = _two_apis(make, "")
    with Load(d, {"a": (4, {"sleep": 0.05}), "b": (4, {"sleep": 0.05})}, keepalive=False) as load:
        wait_until(lambda: load.served_since("a", 0, 10) and load.served_since("b", 0, 10), 30, "load on a and b")
        models = set(d.worker_pids().values())
        victim = http_worker_pids(d, models)[0]
        fault = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        d.client.close()  # its kept-alive connection may have been on the victim
        d.client = httpx.Client(timeout=30)
        wait_until(lambda: victim not in http_worker_pids(d, models) and len(http_worker_pids(d, models)) == 2, 30,
                   "gunicorn to replace the HTTP worker")
        replaced = time.monotonic() - fault
        since = time.monotonic()
        wait_until(lambda: load.served_since("a", since, 10), 30, "a served after the replacement")
    wait_until(lambda: d.get("/a").json()["outstanding"] == 0, 30, "a's outstanding count back to 0")
    figures = Figures("SIGKILL an HTTP worker under load", load.outcomes, "a", [fault])
    figures.note = (f"a and b both go through the killed HTTP worker, so counted over both; the other HTTP worker "
                    f"kept answering; the replacement was up {replaced:.2f} s after the kill")
    figures.faulty_api = "*"
    return figures


def stop_model_worker(make: MakeDaemon) -> Figures:
    """SIGSTOP API a's model worker (a hang) past a's 1 s deadline; the heartbeat (3 s) has it replaced."""
    d = _two_apis(make, "heartbeat_timeout = 3\n", {"a.toml": "[serving]\ntimeout = 1\n"})
    with Load(d, {"a": (2, {"sleep": 0.02}), "b": (1, {})}) as load:
        wait_until(lambda: load.served_since("a", 0, 10), 30, "load on a")
        pid = replica_pid(d, "a")
        fault = time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        d.wait_for_log(rf"model worker \d \(cpu\) pid {pid} sent no heartbeat", 30)
        d.wait_for_log(rf"pid {pid} was killed by the daemon: it sent no heartbeat within \[workers\] "
                       r"heartbeat_timeout \(a predict\(\) hung\) \(silent \d+s\)", 30)
        wait_until(lambda: load.served_since("a", fault, 10), 60, "a served by the replacement")
    return Figures("SIGSTOP a model worker past the deadline", load.outcomes, "a", [fault])


def leak_memory(make: MakeDaemon, headroom_mib: int = 300) -> Figures:
    """API a keeps 10 MiB per request; [workers] max_rss_mib (the worker's start-up RSS + headroom) has it
    killed and replaced."""
    probe = make({"b.py": SLEEPY}, "[workers]\ncpu = 1\n")
    probe.wait_settled()
    limit = (psutil.Process(replica_pid(probe, "b")).memory_info().rss >> 20) + headroom_mib
    probe.stop()
    d = _two_apis(make, f"max_rss_mib = {limit}\n", {"a.py": LEAKY})
    with Load(d, {"a": (1, {"mib": 10}), "b": (1, {})}) as load:
        pid = replica_pid(d, "a")
        fault = time.monotonic()  # the leak starts with the load
        d.wait_for_log(rf"model worker \d \(cpu\) pid {pid} uses \d+ MiB, over \[workers\] max_rss_mib", 60)
        wait_until(lambda: replica_pid(d, "a") != pid, 30, "a replacement worker")
        d.wait_for_log(rf"pid {pid} was killed by the daemon: its memory passed \[workers\] max_rss_mib \(\d+ MiB > "
                       rf"{limit} MiB; APIs: [a-z, ]+\)", 30)
        since = time.monotonic()
        wait_until(lambda: load.served_since("a", since, 3), 30, "a served by the replacement")
    figures = Figures("predictor leaks memory until killed", load.outcomes, "a", [])
    killed = d.wait_for_log(rf"pid {pid} uses (\d+) MiB")
    figures.note = f"limit {limit} MiB (start-up RSS + {headroom_mib}); killed at {killed.group(1)} MiB"
    figures.faults = [fault]
    return figures


def hang_forever(make: MakeDaemon) -> Figures:
    """One request whose predict() never returns (timeout 1 s): it gets 504; once it is hung past the grace, its
    CPU worker is replaced make before break (its APIs move to a new one, the old one is killed after
    graceful_timeout, 5 s here); the other API never notices."""
    d = _two_apis(make, "[server]\ngraceful_timeout = 5\n", {"a.toml": "[serving]\ntimeout = 1\nthreads = 2\n"})
    with Load(d, {"a": (1, {"sleep": 0.02}), "b": (1, {})}) as load:
        wait_until(lambda: load.served_since("a", 0, 10), 30, "load on a")
        pid = replica_pid(d, "a")
        fault = time.monotonic()
        hung = d.post("/a", json={"hang": True})
        load.outcomes.append(Outcome("a", fault, time.monotonic(), hung.status_code))
        d.wait_for_log(r"API a predict\(\) has run \d+s .*; its APIs move to a new worker", 60)
        wait_until(lambda: replica_pid(d, "a") != pid, 60, "a on the new worker")
        since = time.monotonic()
        replaced = since - fault
        wait_until(lambda: load.served_since("a", since, 10), 60, "a served by the replacement")
        wait_until(lambda: not psutil.pid_exists(pid), 30, "the hung worker killed after graceful_timeout")
    figures = Figures("predict() sleeps for ever", load.outcomes, "a", [fault])
    figures.note = f"the hung request: {hung.status_code}; a served by a new worker {replaced:.1f} s after it began"
    return figures


def sigterm_mid_reload(make: MakeDaemon) -> tuple[Figures, Daemon, float]:
    """SIGTERM the master while a new version of a (2 s __init__) is loading: accepted requests finish, the
    daemon exits 0 with nothing left behind. Returns the figures, the daemon and the seconds it took to exit."""
    d = make({"a.py": SLEEPY, "b.py": SLEEPY}, "[predictors]\ndebounce = 0.2\n[workers]\ncpu = 2\n")
    d.wait_settled()
    assert d.proc is not None
    load = Load(d, {"a": (3, {"sleep": 0.05}), "b": (1, {"sleep": 0.05})})
    with load:
        wait_until(lambda: load.served_since("a", 0, 10), 30, "load on a")
        d.write("a.toml", "[config]\ninit = 2\ngeneration = 1\n")
        d.wait_for_log(r"loading API a version \w+ on model worker", 30)
        fault = time.monotonic()
        os.kill(d.proc.pid, signal.SIGTERM)
        d.proc.wait(60)
        took = time.monotonic() - fault
    figures = Figures("master gets SIGTERM mid-reload", load.outcomes, "*", [fault])
    figures.note = f"exit {d.proc.returncode} {took:.2f} s after SIGTERM"
    return figures, d, took


def daemon_cpu(d: Daemon) -> float:
    """CPU seconds the daemon has used: the master, its live children, and the children it has reaped."""
    assert d.proc is not None
    master = psutil.Process(d.proc.pid)
    total = sum(master.cpu_times()[:4])
    for child in master.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.NoSuchProcess:
            continue
    return total


def crash_loop(make: MakeDaemon, limit: int = 3, seconds: float = 20.0) -> Figures:
    """API crash calls os._exit(3) in every predict(), one client sending as fast as it is answered, beside a and
    b (2 clients each) on the same model worker. With [workers] crash_limit it is quarantined; with 0 it is not,
    and the worker's restarts back off."""
    d = make({"crash.py": CRASHER, "a.py": SLEEPY, "b.py": SLEEPY},
             f"[workers]\ncpu = 1\ncrash_limit = {limit}\ncrash_window = 60\n")
    d.wait_settled()
    cpu = daemon_cpu(d)
    with Load(d, {"a": (2, {}), "b": (2, {}), "crash": (1, {})}, seconds=seconds) as load:
        start = time.monotonic()
        if limit:
            d.wait_state("crash", "failed", 60)
            quarantined = time.monotonic() - start
        while time.monotonic() - start < seconds:
            load.stop.wait(0.5)
    used = daemon_cpu(d) - cpu
    restarts = sum(1 for e in d.status()["events"] if e["kind"] == "restart")
    crashes = d.get("/crash").json()["crashes"]
    figures = Figures(f"predict() calls os._exit, crash_limit = {limit}", load.outcomes, "crash", [])
    figures.faulty_api = "crash"
    figures.note = (f"{restarts} worker restarts and {crashes} crashes blamed on crash in {seconds:.0f} s"
                    + (f", quarantined {quarantined:.1f} s after the first" if limit else ", never quarantined")
                    + f"; the daemon used {used:.1f} CPU-s over the run")
    return figures
