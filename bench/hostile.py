"""Figures for RELIABILITY.md's "Hostile directories and predictors": what a hostile predictors directory or
predictor costs the rest of the daemon, measured against a real daemon on loopback.

    .venv/bin/python bench/hostile.py [--only NAME ...] [--apis 500] [--torch 16] [--deletes 100]

Prints one Markdown table: per case, the figure measured and the neighbours' requests (count, failed, p50/p99).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))
from harness import HOSTILE_REASONS, Daemon, Load, Outcome, plant_hostile, wait_until  # noqa: E402

OK = "class PythonPredictor:\n    def predict(self, payload):\n        return {'ok': True}\n"
PID = ("import os\n\n\nclass PythonPredictor:\n    def __init__(self, config):\n"
       "        self.g = config.get('g', 0)\n\n    def predict(self, payload):\n"
       "        return {'pid': os.getpid(), 'g': self.g}\n")
SLOW = ("import threading, time\n\n\nclass PythonPredictor:\n    def predict(self, payload):\n"
        "        if payload.get('hang'):\n            threading.Event().wait()\n"
        "        time.sleep(payload.get('sleep', 0))\n        return {'done': True}\n")


class Daemons:
    """Daemons in a temp directory, all stopped at the end."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="predictord-hostile-"))
        self.started: list[Daemon] = []

    def __call__(self, predictors: dict[str, str], config: str = "") -> Daemon:
        d = Daemon(self.root / f"d{len(self.started)}", config)
        for rel, text in predictors.items():
            d.write(rel, text)
        self.started.append(d)
        return d.start()

    def close(self) -> None:
        for d in self.started:
            d.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def latency(outcomes: list[Outcome]) -> str:
    """count, failed, p50 / p99 ms of a set of requests."""
    if not outcomes:
        return "-"
    ms = sorted((o.done - o.sent) * 1000 for o in outcomes)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    failed = sum(o.status != 200 for o in outcomes)
    return f"{len(ms)} requests, {failed} failed, p50 {statistics.median(ms):.1f} ms / p99 {p99:.1f} ms"


def hostile_files(make: Daemons, _: argparse.Namespace) -> tuple[str, str]:
    d = make({"ok.py": PID, "other.py": PID}, "[predictors]\ndebounce = 0.3\n[server]\ngraceful_timeout = 5\n")
    d.wait_settled()
    with Load(d, {"ok": 1}, seconds=120) as load:
        start = time.monotonic()
        plant_hostile(d, OK)
        for name in HOSTILE_REASONS:
            wait_until(lambda n=name: (r := d.get(f"/{n}")).status_code == 200 and r.json()["error"], 60,
                       f"{name} refused")
        refused = time.monotonic() - start
        edit = time.monotonic()
        d.write("other.toml", "[config]\ng = 2\n")
        wait_until(lambda: d.post("/other", json={}).json()["g"] == 2, 60, "the edit")
        edited = time.monotonic() - edit
        pid = d.post("/ok", json={}).json()["pid"]
        kill = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: (r := d.post("/ok", json={})).status_code == 200 and r.json()["pid"] != pid, 60, "new")
        replaced = time.monotonic() - kill
    assert d.proc is not None
    term = time.monotonic()
    d.stop()
    stopped = time.monotonic() - term
    return (f"all 4 refused or noted {refused:.1f} s after they appeared; an edit of another API served "
            f"{edited:.2f} s after the save; a killed worker replaced in {replaced:.2f} s; SIGTERM to exit "
            f"{stopped:.2f} s (graceful_timeout 5 s)", latency(load.of("ok")))


def stuck_master(make: Daemons, _: argparse.Namespace) -> tuple[str, str]:
    d = make({"ok.py": PID})
    d.wait_settled()
    assert d.proc is not None
    with Load(d, {"ok": 1}, seconds=120) as load:
        wait_until(lambda: load.count("ok") > 50, 30, "load")
        stop = time.monotonic()
        os.kill(d.proc.pid, signal.SIGSTOP)
        try:
            wait_until(lambda: d.get("/healthz").status_code == 503, 60, "healthz 503")
            stuck = time.monotonic() - stop
        finally:
            os.kill(d.proc.pid, signal.SIGCONT)
        wait_until(lambda: d.get("/healthz").status_code == 200, 60, "healthz 200")
    window = [o for o in load.of("ok") if o.sent >= stop]
    return f"/healthz 503 {stuck:.1f} s after the master's SIGSTOP", latency(window)


def hung_mount(make: Daemons, _: argparse.Namespace) -> tuple[str, str]:
    gate = make.root / "hung-mount"
    d = Daemon(make.root / f"d{len(make.started)}", "[predictors]\ndebounce = 0.2\n")
    d.write("ok.py", PID)
    d.write("other.py", PID)
    d.env["PREDICTORD_TEST_READ_GATE"] = str(gate)  # the reader's test gate: a reading hangs while it exists
    make.started.append(d)
    d.start().wait_settled()
    with Load(d, {"ok": 1}, seconds=120) as load:
        wait_until(lambda: load.count("ok") > 50, 30, "load")
        begin = time.monotonic()
        gate.touch()
        d.write("other.toml", "[config]\ng = 2\n")
        pid = d.post("/ok", json={}).json()["pid"]
        kill = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: (r := d.post("/ok", json={})).status_code == 200 and r.json()["pid"] != pid, 60, "new")
        replaced = time.monotonic() - kill
        d.wait_for_log(r"has taken \d+s \(a hung mount\?\)", 60)
        said = time.monotonic() - begin
        gate.unlink()
        answered = time.monotonic()
        wait_until(lambda: d.post("/other", json={}).json()["g"] == 2, 60, "the edit")
        loaded = time.monotonic() - answered
    window = [o for o in load.of("ok") if o.sent >= begin]
    return (f"while a reading hung: a killed worker replaced in {replaced:.2f} s, the log said so {said:.0f} s "
            f"in; the edit served {loaded:.2f} s after the reading answered", latency(window))


def slow_and_hung(make: Daemons, _: argparse.Namespace) -> tuple[str, str]:
    d = make({"slow.py": SLOW, "slow.toml": "[serving]\ntimeout = 2\nthreads = 2\n", "ok.py": PID},
             "[workers]\nheartbeat_timeout = 60\n")
    d.wait_settled()
    with Load(d, {"ok": 2}, seconds=120) as load:
        wait_until(lambda: load.count("ok") > 100, 30, "load")
        begin = time.monotonic()
        threading.Thread(target=d.post, args=("/slow",), kwargs={"json": {"sleep": 3}}, daemon=True).start()
        time.sleep(3.5)  # the slow call's own duration: the window measured
        hung = d.post("/slow", json={"hang": True}).status_code
        before = d.post("/ok", json={}).json()["pid"]
        wait_until(lambda: d.post("/ok", json={}).json()["pid"] != before, 60, "ok moved")
        moved = time.monotonic() - begin
        load.stop.wait(3)
    window = [o for o in load.of("ok") if o.sent >= begin]
    return (f"a 3 s predict, then a hung one (its request: {hung}); the worker replaced make before break "
            f"{moved:.1f} s after the slow call began", latency(window))


def deletes(make: Daemons, args: argparse.Namespace) -> tuple[str, str]:
    files = {f"api{i:03d}.py": OK for i in range(args.deletes)}
    d = make({**files, "ok.py": PID}, "[predictors]\ndebounce = 0.3\n")
    d.wait_settled(600)
    with Load(d, {"ok": 2}, seconds=300) as load:
        wait_until(lambda: load.count("ok") > 100, 30, "load")
        begin = time.monotonic()
        for name in files:
            (d.predictors / name).unlink()
        wait_until(lambda: len(d.status()["apis"]) == 1, 120, "every API gone")
        gone = time.monotonic() - begin
        load.stop.wait(2)
    window = [o for o in load.of("ok") if o.sent >= begin]
    return f"{args.deletes} APIs deleted at once, all gone in {gone:.1f} s", latency(window)


def torch_probes(make: Daemons, args: argparse.Namespace) -> tuple[str, str]:
    files = {f"t{i:02d}.py": "import torch\n" + OK for i in range(args.torch)}
    d = make({"ok.py": OK})
    d.wait_settled()
    assert d.proc is not None
    master = psutil.Process(d.proc.pid)
    base = tree_rss(master)
    peak_rss, peak_probes = base, 0
    for rel, text in files.items():
        d.write(rel, text)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        peak_probes = max(peak_probes, sum("predictord.probe" in cmdline(c) for c in master.children()))
        peak_rss = max(peak_rss, tree_rss(master))
        apis = d.status()["apis"]
        if len(apis) == args.torch + 1 and all(a["state"] == "ready" for a in apis.values()):
            break
        time.sleep(0.05)
    limit = d.status()["daemon"]["probes"]
    return (f"{args.torch} predictors importing torch added at once: at most {peak_probes} probes seen at once "
            f"(limit {limit['limit']}, the master's count {limit['peak']}); the daemon's memory (RSS, all "
            f"processes) peaked {(peak_rss - base) >> 20} MiB above its level", "-")


def cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return ""


def tree_rss(p: psutil.Process) -> int:
    total = 0
    for q in [p, *p.children(recursive=True)]:
        try:
            total += q.memory_info().rss
        except psutil.Error:
            continue
    return total


def many_apis(make: Daemons, args: argparse.Namespace) -> tuple[str, str]:
    files = {f"a{i:04d}.py": OK for i in range(args.apis)}
    started = time.monotonic()
    d = make(files)
    status = d.wait_settled(900)
    took = time.monotonic() - started
    ready = sum(a["state"] == "ready" for a in status["apis"].values())
    assert d.proc is not None
    return (f"{args.apis} APIs at start: {ready} ready {took:.0f} s after the start; the daemon's RSS (all "
            f"processes) {tree_rss(psutil.Process(d.proc.pid)) >> 20} MiB", "-")


def reload_memory(make: Daemons, _: argparse.Namespace) -> tuple[str, str]:
    out = []
    hoarder = ("import threading\n\n\nclass PythonPredictor:\n    def __init__(self, config):\n"
               "        self.block = bytearray(50 * 2**20)\n"
               "        self.block[::4096] = b'x' * len(self.block[::4096])\n"
               "        self.stop = threading.Event()\n"
               "        threading.Thread(target=self.hold, daemon=True).start()\n\n"
               "    def hold(self):\n        self.stop.wait(3600)\n\n"
               "    def predict(self, payload):\n        return {}\n")
    closes = hoarder + "\n    def close(self):\n        self.stop.set()\n"
    for label, source, config in (("close()", closes, "[workers]\nrecycle_mib = 0\n"),
                                  ("neither", hoarder, "[workers]\nrecycle_mib = 0\n"),
                                  ("recycle_mib = 64", hoarder, "[workers]\nrecycle_mib = 64\n")):
        d = make({"hoard.py": source}, "[predictors]\ndebounce = 0.2\n" + config)
        d.wait_settled()
        start = worker_rss(d)
        for g in range(1, 11):
            old = d.get("/hoard").json()["version"]["serving"]
            d.write("hoard.toml", f"[config]\ng = {g}\n")
            wait_until(lambda o=old, d=d: (v := d.get("/hoard").json()["version"])["serving"] == [v["wanted"]] != o,
                       60, "reload")
        time.sleep(8)  # the worker's memory is weighed 5 s after the last reload; let a recycle finish
        out.append(f"{label}: {(worker_rss(d) - start) >> 20:+d} MiB")
        d.stop()
    return "worker memory after 10 reloads of a predictor that keeps a thread and 50 MB: " + ", ".join(out), "-"


def worker_rss(d: Daemon) -> int:
    pid = wait_until(lambda: (r := d.get("/hoard").json()["replicas"]) and r[0]["pid"], 60, "a replica")
    return int(psutil.Process(pid).memory_info().rss)


CASES: dict[str, Callable[[Daemons, argparse.Namespace], tuple[str, str]]] = {
    "hostile_files": hostile_files,
    "slow_and_hung": slow_and_hung,
    "deletes": deletes,
    "torch_probes": torch_probes,
    "many_apis": many_apis,
    "stuck_master": stuck_master,
    "hung_mount": hung_mount,
    "reload_memory": reload_memory,
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--apis", type=int, default=500)
    ap.add_argument("--torch", type=int, default=16)
    ap.add_argument("--deletes", type=int, default=100)
    args = ap.parse_args()
    print("| case | what was measured | the neighbours' requests meanwhile |")
    print("|---|---|---|")
    for name, case in CASES.items():
        if args.only and name not in args.only:
            continue
        make = Daemons()
        try:
            figure, neighbours = case(make, args)
            print(f"| {name} | {figure} | {neighbours} |", flush=True)
        except Exception as e:  # noqa: BLE001 - one case failing still prints the others
            print(f"| {name} | failed: {type(e).__name__}: {e} | - |", flush=True)
        finally:
            make.close()


if __name__ == "__main__":
    main()
