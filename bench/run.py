"""The benchmark suite: predictord beside bare starlette (gunicorn + uvicorn) and LitServe, same machine, same load.

    .venv/bin/python bench/run.py [--seconds 8] [--reps 2]
        [--only echo,mlp,encoder,bodies,replies,tail,balance,overload]

Each system starts on loopback (an ephemeral port), is warmed, driven by wrk (or, for the balance and overload
cases, a bounded Python client), and stopped. The systems of one workload run side by side, each point measured on
each in turn (``side_by_side``), so that the machine's drift hits both sides of a ratio. One Markdown table per
workload goes to stdout: requests/s, p50, p99, errors, server CPU per request (user+system of every server process,
over the run), total PSS (shared pages split among every process that maps them, those of the servers beside it
too) and peak RSS.
LitServe lives in its own venv (bench/.venv-litserve, made on first use); it never becomes a predictord dependency.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO / "tests" / "integration"))
from harness import Daemon, wait_until  # noqa: E402

LIT_VENV = BENCH / ".venv-litserve"
LIT_VERSION = "0.2.19"
ECHO_BODY = json.dumps({"x": [1, 2, 3], "text": "hello"})
MLP_BODY = json.dumps({"x": [round(i / 256, 4) for i in range(256)]})

ECHO = "class PythonPredictor:\n    def __init__(self, config):\n        pass\n\n    def predict(self, payload):\n" \
       "        return payload\n"
SLEEPER = '''
import os
import time


class PythonPredictor:
    def __init__(self, config):
        slot = int(os.environ["PREDICTORD_WORKER"].split(":")[0])
        self.slot = slot
        self.seconds = config["slow"] if slot == config["slow_slot"] else config["fast"]

    def predict(self, payload):
        time.sleep(self.seconds)
        return {"worker": self.slot}
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def cpu_seconds(pid: int) -> float:
    total = 0.0
    for p in tree(pid):
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def rss_shmem(pid: int) -> int:
    """A process's resident pages of shared memory (its mappings of tmpfs files and shared anonymous memory)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssShmem:"):
                return int(line.split()[1]) * 1024
    return 0


def shm_bytes(master: int) -> int:
    """What predictord's body files in /dev/shm hold (allocated blocks: they are allocated whole)."""
    total = 0
    for path in Path("/dev/shm").glob(f"predictord-{master}-*"):
        try:
            total += path.stat().st_blocks * 512
        except FileNotFoundError:
            pass
    return total


def pss_mib(pid: int) -> float:
    total = 0
    for p in tree(pid):
        try:
            total += p.memory_full_info().pss
        except psutil.Error:
            pass
    return total / 2**20


class Server:
    """A server under test: a process tree listening on ``url``."""

    name = "server"
    pid = 0
    url = ""
    busy_when_idle = False  # it uses the CPU while it serves nothing: measured alone, never beside the others

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError


class Predictord(Server):
    def __init__(self, name: str, predictors: dict[str, str], config: str = "") -> None:
        self.name = name
        self.daemon = Daemon(Path(tempfile.mkdtemp(prefix="predictord-bench-")),
                             config)
        for rel, text in predictors.items():
            self.daemon.write(rel, text)

    def start(self) -> None:
        try:
            self.daemon.start()
            self.daemon.wait_settled()
        except BaseException:
            self.daemon.stop()  # never leave a daemon behind
            raise
        assert self.daemon.proc is not None
        self.pid = self.daemon.proc.pid
        self.url = self.daemon.url("")

    def stop(self) -> None:
        self.daemon.stop()


class Command(Server):
    """A server started from a command line (bare starlette, LitServe)."""

    def __init__(self, name: str, argv: list[str], ready_path: str, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.port = free_port()
        self.argv = [a.replace("{port}", str(self.port)) for a in argv]
        self.ready_path = ready_path
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(self.argv, stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO,
                                     env=dict(os.environ, **self.env), start_new_session=True)
        self.pid = self.proc.pid
        self.url = f"http://127.0.0.1:{self.port}"

        def up() -> bool:
            try:
                return httpx.get(self.url + self.ready_path, timeout=2).status_code < 500
            except httpx.HTTPError:
                return False

        try:
            wait_until(up, 120, f"{self.name} to listen")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def bare() -> Server:
    return Command("bare starlette", [sys.executable, "-m", "gunicorn", "-w", "2", "-k",
                                      "uvicorn_worker.UvicornWorker", "bench.apps.bare:app", "-b",
                                      "127.0.0.1:{port}", "--log-level", "warning"], "/")


def litserve(api: str, batch: int = 1) -> Server:
    if not (LIT_VENV / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(LIT_VENV)], check=True)
        subprocess.run([str(LIT_VENV / "bin" / "pip"), "install", "-q", "torch==2.13.0", f"litserve=={LIT_VERSION}"],
                       check=True)
    name = f"LitServe {LIT_VERSION}" + (f" (batch {batch})" if batch > 1 else "")
    server = Command(name, [str(LIT_VENV / "bin" / "python"), str(BENCH / "apps" / "lit.py"), "--api", api,
                            "--port", "{port}", "--batch", str(batch)], "/health")
    server.busy_when_idle = batch > 1  # its batching workers poll: 28 % of a core with no request (0.4 % without)
    return server


def wrk(url: str, body: str, connections: int, seconds: int, kind: str = "json") -> dict[str, Any]:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        f.write(body)
    media = "application/json" if kind == "json" else "application/octet-stream"
    out = subprocess.run(["wrk", f"-t{min(2, connections)}", f"-c{connections}", f"-d{seconds}s", "-s",
                          str(BENCH / "post.lua"), "--latency", url], capture_output=True, text=True,
                         env=dict(os.environ, WRK_BODY=f.name, WRK_TYPE=media), timeout=seconds + 60).stdout
    os.unlink(f.name)

    def ms(label: str) -> float:
        m = re.search(rf"{label}\s+([\d.]+)(us|ms|s)\b", out)
        if not m:
            return float("nan")
        return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]

    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = (int(non2xx.group(1)) if non2xx else 0) + (sum(map(int, sock.groups())) if sock else 0)
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
            "p50": ms("50%"), "p99": ms("99%"), "errors": errors, "requests": requests}


def measure(server: Server, path: str, body: str, connections: int, seconds: int,
            kind: str = "json") -> dict[str, Any]:
    wrk(server.url + path, body, connections, 2, kind)  # warm-up
    before = cpu_seconds(server.pid)
    peak = Peak(server.pid)
    result = wrk(server.url + path, body, connections, seconds, kind)
    result["cpu_ms"] = (cpu_seconds(server.pid) - before) * 1000 / max(1, result["requests"])
    result["pss"] = pss_mib(server.pid)
    result["rss_peak"] = peak.stop()
    return result


class Peak:
    """The largest memory of a server's processes while a run goes on, sampled every 50 ms: their RSS summed, with
    the pages of shared memory (tmpfs, where predictord's large bodies travel) counted once, not once for each process
    that maps them: each process's RSS less its RssShmem, plus what the daemon's body files in /dev/shm hold."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self.done = pid, 0, threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while not self.done.wait(0.05):
            total = shm_bytes(self.pid)
            for p in tree(self.pid):
                try:
                    total += p.memory_info().rss - rss_shmem(p.pid)
                except (psutil.Error, OSError):
                    pass
            self.peak = max(self.peak, total)

    def stop(self) -> float:
        self.done.set()
        self.thread.join()
        return self.peak / 2**20


def row(system: str, load: str, rep: int, r: dict[str, Any]) -> str:
    return (f"| {system} | {load} | {rep} | {r['rps']:,.0f} | {r['p50']:.2f} ms | {r['p99']:.2f} ms | {r['errors']} | "
            f"{r['cpu_ms']:.3f} ms | {r['pss']:.0f} MiB | {r['rss_peak']:.0f} MiB |")


HEADER = ("| system | load | run | req/s | p50 | p99 | errors | server CPU / request | PSS | peak RSS |\n"
          "|---|---|---|---|---|---|---|---|---|---|")


def run_wrk_cases(title: str, cases: list[tuple[Server, str, str, list[int]]], seconds: int, reps: int) -> None:
    print(f"\n### {title}\n\n{HEADER}", flush=True)
    side_by_side(cases, seconds, reps, "json", lambda path, body, c: f"c={c}")


def side_by_side(cases: list[tuple[Server, str, str, list[int]]], seconds: int, reps: int, kind: str,
                 load: Callable[[str, str, int], str]) -> None:
    """Measure every case, its servers running side by side: all are started first (an idle one costs under 1 % of
    a core), then each point (a body, a concurrency, a run) is measured on every server in turn, so that this VM's
    drift (bare starlette's echo gave 16,003 and 22,588 req/s in two runs an hour apart) hits both sides of a ratio
    alike. A server busy when idle (LitServe's batching workers poll) is measured alone, after. Rows are printed
    grouped by case, in the order of ``cases``; each also goes to stderr as it is measured."""
    rows: list[list[str]] = [[] for _ in cases]
    together = [i for i, (server, *_) in enumerate(cases) if not server.busy_when_idle]
    for group in [together, *([i] for i in range(len(cases)) if i not in together)]:
        servers = list({id(cases[i][0]): cases[i][0] for i in group}.values())
        sizes = list(dict.fromkeys(len(cases[i][2]) for i in group))
        points = sorted({(sizes.index(len(cases[i][2])), c, rep) for i in group for c in cases[i][3]
                         for rep in range(1, reps + 1)})
        with contextlib.ExitStack() as running:
            for server in servers:
                server.start()
                running.callback(server.stop)
            for size, c, rep in points:
                for i in group:
                    server, path, body, conns = cases[i]
                    if c in conns and len(body) == sizes[size]:
                        r = measure(server, path, body, c, seconds, kind)
                        rows[i].append(row(server.name, load(path, body, c), rep, r))
                        print(rows[i][-1], file=sys.stderr, flush=True)
    for case_rows in rows:
        for line in case_rows:
            print(line, flush=True)


def balance(seconds: int, reps: int) -> None:
    """Two model workers, one 3x slower, capacity-1 predictors: throughput against the ideal sum, split by speed."""
    fast, slow = 0.010, 0.030
    config = f"[config]\nfast = {fast}\nslow = {slow}\nslow_slot = 1\n[serving]\nreplicas = 2\ndevice = \"cpu\"\n"
    server = Predictord("predictord", {"sleep.py": SLEEPER, "sleep.toml": config}, "[workers]\ncpu = 2\n")
    ideal = 1 / fast + 1 / slow
    print("\n### Balance: two model workers, one 3x slower (10 ms and 30 ms per request, one at a time each)\n")
    print("| run | clients | req/s | ideal | fraction of ideal | split fast:slow | p50 | p99 | errors |")
    print("|---|---|---|---|---|---|---|---|---|")
    server.start()
    try:
        for rep in range(1, reps + 1):
            counts: Counter[int] = Counter()
            latencies: list[float] = []
            errors = [0]
            stop_at = time.monotonic() + seconds

            def client() -> None:
                with httpx.Client(timeout=30) as c:
                    while time.monotonic() < stop_at:
                        t = time.monotonic()
                        r = c.post(server.url + "/sleep", json={})
                        latencies.append(time.monotonic() - t)
                        if r.status_code == 200:
                            counts[r.json()["worker"]] += 1
                        else:
                            errors[0] += 1

            threads = [threading.Thread(target=client) for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            rps = sum(counts.values()) / seconds
            latencies.sort()
            p99 = latencies[int(0.99 * (len(latencies) - 1))] * 1000
            print(f"| {rep} | 8 | {rps:.1f} | {ideal:.1f} | {rps / ideal:.0%} | {counts[0]}:{counts[1]} "
                  f"({counts[0] / max(1, counts[1]):.1f}:1) | {statistics.median(latencies) * 1000:.1f} ms | "
                  f"{p99:.1f} ms | {errors[0]} |", flush=True)
    finally:
        server.stop()


def overload(seconds: int, reps: int) -> None:
    """4x overload, open loop: excess requests get 503 + Retry-After quickly, accepted ones keep a steady p99."""
    service = 0.020  # one worker, one at a time: capacity 50 req/s
    rate = 4 / service
    config = f"[config]\nfast = {service}\nslow = {service}\nslow_slot = -1\n[serving]\nqueue_limit = 8\n"
    server = Predictord("predictord", {"sleep.py": SLEEPER, "sleep.toml": config})
    print(f"\n### Overload: {rate:.0f} req/s offered to an API that serves {1 / service:.0f} req/s (queue_limit 8)\n")
    print("| run | offered | accepted (200) | rejected (503) | other | 503 with Retry-After | 503 p50 | 200 p50 | "
          "200 p99 | RSS before | RSS after |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    server.start()
    try:
        for rep in range(1, reps + 1):
            rss_before = sum(p.memory_info().rss for p in tree(server.pid)) / 2**20
            results: list[tuple[int, float, bool]] = []

            async def one(client: httpx.AsyncClient) -> None:
                t = time.monotonic()
                try:
                    r = await client.post(server.url + "/sleep", json={})
                    results.append((r.status_code, time.monotonic() - t, "retry-after" in r.headers))
                except httpx.HTTPError:
                    results.append((0, time.monotonic() - t, False))

            async def drive() -> None:
                limits = httpx.Limits(max_connections=400, max_keepalive_connections=400)
                async with httpx.AsyncClient(timeout=30, limits=limits) as client:
                    for phase_seconds, keep in ((2, False), (seconds, True)):  # warm the client's connections first
                        tasks = []
                        start = time.monotonic()
                        for i in range(int(rate * phase_seconds)):
                            delay = start + i / rate - time.monotonic()
                            if delay > 0:
                                await asyncio.sleep(delay)
                            tasks.append(asyncio.create_task(one(client)))
                        await asyncio.gather(*tasks)
                        if not keep:
                            results.clear()

            asyncio.run(drive())
            rss_after = sum(p.memory_info().rss for p in tree(server.pid)) / 2**20
            ok = sorted(s for c, s, _ in results if c == 200)
            busy = sorted(s for c, s, _ in results if c == 503)
            with_retry = sum(1 for c, _, h in results if c == 503 and h)
            other = sum(1 for c, _, _ in results if c not in (200, 503))
            print(f"| {rep} | {len(results)} | {len(ok)} | {len(busy)} | {other} | {with_retry} | "
                  f"{statistics.median(busy) * 1000:.1f} ms | {statistics.median(ok) * 1000:.1f} ms | "
                  f"{ok[int(0.99 * (len(ok) - 1))] * 1000:.1f} ms | {rss_before:.0f} MiB | {rss_after:.0f} MiB |",
                  flush=True)
    finally:
        server.stop()


SIZE = ("import json\n\n\nclass PythonPredictor:\n    def predict(self, payload):\n"
        "        if isinstance(payload, dict):\n            return {'length': len(payload['text'])}\n"
        "        return {'length': len(payload)}\n")
ENCODER_BODY = json.dumps({"tokens": list(range(1, 17))})
REPLY_KB = (100, 1000, 8000)  # the large answers' sizes (bench/apps/bare.py makes the same)
BLOB = (f"BLOBS = {{kb: b'x' * (kb * 1000) for kb in {REPLY_KB}}}\n\n\nclass PythonPredictor:\n"
        "    def predict(self, query_params):\n        return BLOBS[int(query_params['kb'])]\n")
TWO_WORKERS = "[workers]\ncpu = 2\ntorch_threads = 1\n"  # two model workers: both cores, as bare's two workers
ENCODER_OFF = "[serving]\nreplicas = 2\ntimeout = 120\nqueue_limit = 1024\n"
ENCODER_ON = ENCODER_OFF + "max_batch_size = 8\nbatch_wait_ms = 5\n[config]\nbatched = true\n"


def body_of(kind: str, size: int) -> str:
    """A body of about ``size`` bytes: JSON text ({"text": "xx..."}) or raw bytes (sent as a file by wrk)."""
    return json.dumps({"text": "x" * (size - 12)}) if kind == "json" else "x" * size


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--only", default="echo,mlp,encoder,bodies,replies,tail,balance,overload")
    args = ap.parse_args()
    only = set(args.only.split(","))
    mlp_dir = REPO / "predictors" / "mlp"
    mlp_code = (mlp_dir / "predictor.py").read_text()
    two = TWO_WORKERS
    print(f"predictord bench, {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores; "
          f"`{' '.join(sys.argv)}`; {args.seconds} s per point after a 2 s warm-up; wrk -t2 on the same machine")
    if "echo" in only:
        run_wrk_cases("Echo JSON (a trivial predictor)", [
            (bare(), "/echo", ECHO_BODY, [1, 8, 64]),
            (Predictord("predictord", {"echo.py": ECHO}), "/echo", ECHO_BODY, [1, 8, 64]),
            (litserve("echo"), "/predict", ECHO_BODY, [8, 64]),
        ], args.seconds, args.reps)
    if "mlp" in only:
        off = "[serving]\nmax_batch_size = 1\nreplicas = 2\n"
        on = "[serving]\nmax_batch_size = 32\nbatch_wait_ms = 2\nreplicas = 2\n"
        # The example takes lists (batching); without batching, predict() wraps one payload into a list of one.
        single = mlp_code.replace("    def predict(self, payload):",
                                  "    def predict(self, payload):\n        return self.predict_many([payload])[0]"
                                  "\n\n    def predict_many(self, payload):")
        run_wrk_cases("Small torch MLP (256 -> 1024 -> 10)", [
            (bare(), "/mlp", MLP_BODY, [1, 8, 64]),
            (Predictord("predictord, no batching", {"mlp.py": single, "mlp.toml": off}, two), "/mlp", MLP_BODY,
             [1, 8, 64]),
            (Predictord("predictord, batching 32 / 2 ms", {"mlp.py": mlp_code, "mlp.toml": on}, two), "/mlp",
             MLP_BODY, [1, 8, 64]),
            (litserve("mlp", 32), "/predict", MLP_BODY, [8, 64]),
        ], args.seconds, args.reps)
    if "encoder" in only:
        encoder = (BENCH / "apps" / "encoder.py").read_text()
        off, on = ENCODER_OFF, ENCODER_ON
        run_wrk_cases("A transformer encoder (6 layers, width 384, 16 tokens; bench/apps/encoder.py)", [
            (bare(), "/encoder", ENCODER_BODY, [1, 8, 64]),
            (Predictord("predictord, no batching", {"encoder/predictor.py": encoder, "encoder/predictor.toml": off},
                        two), "/encoder", ENCODER_BODY, [1, 8, 64]),
            (Predictord("predictord, batching 8 / 5 ms", {"encoder/predictor.py": encoder,
                                                         "encoder/predictor.toml": on}, two), "/encoder",
             ENCODER_BODY, [1, 8, 64]),
        ], args.seconds, args.reps)
    if "bodies" in only:
        for kind in ("json", "raw"):
            cases: list[tuple[Server, str, str, list[int]]] = []
            for server in (bare(), Predictord("predictord", {"size.py": SIZE})):
                for size in (100_000, 1_000_000, 8_000_000):
                    cases.append((server, "/size", body_of(kind, size), [8, 64]))
            run_bodies(f"Large bodies: {'JSON text' if kind == 'json' else 'raw bytes'} of 100 KB, 1 MB, 8 MB", cases,
                       kind, max(2, args.seconds // 2), args.reps)
    if "replies" in only:
        run_replies(max(2, args.seconds // 2), args.reps)
    if "tail" in only:
        run_wrk_cases("Tail at 256 clients (echo)", [
            (bare(), "/echo", ECHO_BODY, [256]),
            (Predictord("predictord", {"echo.py": ECHO, "echo.toml": "[serving]\nqueue_limit = 1024\n"}), "/echo",
             ECHO_BODY, [256]),
        ], args.seconds, args.reps)
    if "balance" in only:
        balance(args.seconds, args.reps)
    if "overload" in only:
        overload(args.seconds, args.reps)


def run_bodies(title: str, cases: list[tuple[Server, str, str, list[int]]], kind: str, seconds: int,
               reps: int) -> None:
    """Like run_wrk_cases, with the body's size in the load column and its Content-Type by kind."""
    print(f"\n### {title}\n\n{HEADER.replace('| load |', '| body, load |')}", flush=True)
    side_by_side(cases, seconds, reps, kind, lambda path, body, c: f"{len(body) / 1e6:g} MB, c={c}")


def run_replies(seconds: int, reps: int) -> None:
    """Large answers: a small JSON request, a reply of 100 KB, 1 MB or 8 MB of bytes (made once, at start)."""
    cases: list[tuple[Server, str, str, list[int]]] = []
    for server in (bare(), Predictord("predictord", {"blob.py": BLOB})):
        for kb in REPLY_KB:
            cases.append((server, f"/blob?kb={kb}", ECHO_BODY, [8]))
    print(f"\n### Large answers: raw bytes of 100 KB, 1 MB, 8 MB\n\n{HEADER.replace('| load |', '| answer, load |')}",
          flush=True)
    side_by_side(cases, seconds, reps, "json",
                 lambda path, body, c: f"{int(path.rsplit('=', 1)[1]) / 1000:g} MB, c={c}")


if __name__ == "__main__":
    main()
