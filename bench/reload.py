"""Reload benchmark: time from a file's last write to the first answer from the new version, and what the other
API's clients see meanwhile.

    .venv/bin/python bench/reload.py [--reloads 20] [--debounce 1.0] [--swap]

Starts a real daemon on loopback (ephemeral port, temp directory), puts API `a` and API `b` under keep-alive load
(one client each, bounded in time), saves a new version of `a` N times, and prints one Markdown table. With
``--swap``, the predictors directory is a link to a release folder, and each new version of `a` comes in a new
release (with `b` unchanged, which is loaded again from there) that the link is swapped to, as release tools deploy.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))
from harness import Daemon, wait_until  # noqa: E402

PREDICTOR = '''
class PythonPredictor:
    def __init__(self, config):
        self.generation = {n}

    def predict(self, payload):
        return {{"generation": self.generation}}
'''


def release(root: Path, n: int) -> None:
    """Release n (a's generation n, b as ever) in a folder of its own, then the link ``current`` swapped to it."""
    folder = root / "releases" / str(n)
    folder.mkdir(parents=True)
    (folder / "a.py").write_text(PREDICTOR.format(n=n))
    (folder / "b.py").write_text(PREDICTOR.format(n=100))
    os.symlink(f"releases/{n}", root / "current.new")
    os.replace(root / "current.new", root / "current")


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reloads", type=int, default=20)
    ap.add_argument("--debounce", type=float, default=1.0)
    ap.add_argument("--swap", action="store_true", help="deploy each version as a release behind a swapped link")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="predictord-bench-"))
    where = 'dir = "current"\n' if args.swap else ""
    d = Daemon(root, f"[predictors]\ndebounce = {args.debounce}\n{where}[workers]\ncpu = 2\n")
    if args.swap:
        release(root, 0)
    else:
        d.write("a.py", PREDICTOR.format(n=0))
        d.write("b.py", PREDICTOR.format(n=100))
    d.start()
    d.wait_settled()
    stop = threading.Event()
    first_seen: dict[int, float] = {}
    b_latency: list[tuple[float, float]] = []  # (when, seconds)
    failures = {"a": 0, "b": 0}

    def client_a() -> None:
        with httpx.Client(timeout=30) as c:
            while not stop.is_set():
                r = c.post(d.url("/a"), json={})
                if r.status_code != 200:
                    failures["a"] += 1
                    continue
                first_seen.setdefault(r.json()["generation"], time.monotonic())

    def client_b() -> None:
        with httpx.Client(timeout=30) as c:
            while not stop.is_set():
                t = time.monotonic()
                r = c.post(d.url("/b"), json={})
                b_latency.append((t, time.monotonic() - t))
                failures["b"] += r.status_code != 200

    threads = [threading.Thread(target=f, daemon=True) for f in (client_a, client_b)]
    for t in threads:
        t.start()
    time.sleep(3)  # baseline for b, before any reload
    baseline_end = time.monotonic()
    delays = []
    reload_windows = []
    for n in range(1, args.reloads + 1):
        if args.swap:
            release(root, n)
        else:
            tmp = d.predictors / ".a.py.tmp"
            tmp.write_text(PREDICTOR.format(n=n))
            os.replace(tmp, d.predictors / "a.py")
        written = time.monotonic()
        wait_until(lambda n=n: n in first_seen, 60, f"generation {n}")
        delays.append(first_seen[n] - written)
        reload_windows.append((written, first_seen[n]))
        time.sleep(0.2)
    stop.set()
    for t in threads:
        t.join(10)
    d.stop()
    base = [s for t, s in b_latency if t < baseline_end]
    during = [s for t, s in b_latency if any(w0 <= t <= w1 for w0, w1 in reload_windows)]
    print("| reloads | debounce | save -> new version p50 | p99 | max | failed a | failed b | "
          "b p50 baseline | b p50 during reloads | b p99 baseline | b p99 during reloads |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    what = f"{args.reloads} release swaps" if args.swap else str(args.reloads)
    print(f"| {what} | {args.debounce:g} s | {statistics.median(delays):.2f} s | {pct(delays, 99):.2f} s | "
          f"{max(delays):.2f} s | {failures['a']} | {failures['b']} | {statistics.median(base) * 1000:.2f} ms | "
          f"{statistics.median(during) * 1000:.2f} ms | {pct(base, 99) * 1000:.2f} ms | "
          f"{pct(during, 99) * 1000:.2f} ms |")


if __name__ == "__main__":
    main()
