"""Where the echo's CPU goes, process by process: the master, each HTTP worker, each model worker, in microseconds
of CPU (user + system, psutil) per request over a wrk run, and requests/s.

    .venv/bin/python bench/per_process.py [--connections 1,8,64] [--seconds 6] [--layout alone|shared|isolated]

``alone``: the echo is its model worker's only API (a short predict runs on the worker's loop); ``shared``: an idle
second API shares the worker (every predict runs in the API's thread); ``isolated``: the same two APIs with the echo
at ``isolation = "process"``. One daemon per run, on loopback, wrk on the same machine.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "integration"))
from harness import Daemon  # noqa: E402
from run import ECHO, ECHO_BODY, wrk  # noqa: E402

LAYOUTS = {
    "alone": {"echo.py": ECHO},
    "shared": {"echo.py": ECHO, "other.py": ECHO},
    "isolated": {"echo.py": ECHO, "echo.toml": '[serving]\nisolation = "process"\n', "other.py": ECHO},
}


def cpu_by_process(root: int) -> dict[int, float]:
    out = {}
    for p in [psutil.Process(root), *psutil.Process(root).children(recursive=True)]:
        try:
            t = p.cpu_times()
            out[p.pid] = t.user + t.system
        except psutil.Error:
            pass
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--connections", default="1,8,64")
    ap.add_argument("--seconds", type=int, default=6)
    ap.add_argument("--layout", choices=sorted(LAYOUTS), default="alone")
    args = ap.parse_args()
    d = Daemon(Path(tempfile.mkdtemp(prefix="predictord-per-process-")))
    for name, text in LAYOUTS[args.layout].items():
        d.write(name, text)
    d.start()
    try:
        status = d.wait_settled()
        assert d.proc is not None
        model = {w["pid"]: f"model {w['slot']} ({', '.join(sorted(w['apis'])) or 'no API'})" for w in status["workers"]}
        print("| layout | load | req/s | master | HTTP workers | model workers (us of CPU a request) |")
        print("|---|---|---|---|---|---|")
        for c in (int(x) for x in args.connections.split(",")):
            wrk(d.url("/echo"), ECHO_BODY, c, 2)  # warm-up
            before = cpu_by_process(d.proc.pid)
            r = wrk(d.url("/echo"), ECHO_BODY, c, args.seconds)
            after = cpu_by_process(d.proc.pid)
            used = {pid: (after[pid] - before.get(pid, 0.0)) * 1e6 / r["requests"] for pid in after}
            master = used.pop(d.proc.pid, 0.0)
            models = [f"{model[pid]}: {us:.0f}" for pid, us in used.items() if pid in model]
            http = [f"{us:.0f}" for pid, us in used.items() if pid not in model and us >= 1]
            print(f"| {args.layout} | c={c} | {r['rps']:,.0f} | {master:.0f} | {' + '.join(http)} | "
                  f"{'; '.join(models)} |", flush=True)
    finally:
        d.stop()


if __name__ == "__main__":
    main()
