"""Where the echo's CPU goes, process by process: the master, each HTTP worker, each model worker, in microseconds
of CPU (user + system, psutil) per request over a wrk run, and requests/s.

    .venv/bin/python bench/per_process.py [--connections 1,8,64] [--seconds 6] [--layout alone|shared|isolated]
        [--body json|bytes --body-kb N] [--http-workers 2]

``alone``: the echo is its model worker's only API (a short predict runs on the worker's loop); ``shared``: an idle
second API shares the worker (every predict runs in the API's thread); ``isolated``: the same two APIs with the echo
at ``isolation = "process"``. ``--body``: instead of the echo, make bench's large-body predictor (it answers the
body's length) with a body of that kind and size. ``--http-workers``: the daemon's ``[server] http_workers``. One
daemon per run, on loopback, wrk on the same machine.
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
from run import ECHO, ECHO_BODY, SIZE, body_of, wrk  # noqa: E402

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
    ap.add_argument("--body", choices=["json", "bytes"], help="a large body of this kind, to the size predictor")
    ap.add_argument("--body-kb", type=int, default=1000)
    ap.add_argument("--http-workers", type=int, default=2)
    args = ap.parse_args()
    d = Daemon(Path(tempfile.mkdtemp(prefix="predictord-per-process-")),
               f"[server]\nhttp_workers = {args.http_workers}\n")
    for name, text in LAYOUTS[args.layout].items():
        d.write(name, SIZE if args.body and name == "echo.py" else text)
    body, kind = (body_of(args.body, args.body_kb * 1000), args.body) if args.body else (ECHO_BODY, "json")
    case = f"{args.layout}, {args.body} {args.body_kb} KB" if args.body else args.layout
    d.start()
    try:
        status = d.wait_settled()
        assert d.proc is not None
        model = {w["pid"]: f"model {w['slot']} ({', '.join(sorted(w['apis'])) or 'no API'})" for w in status["workers"]}
        print("| layout | load | req/s | master | HTTP workers | model workers (us of CPU a request) |")
        print("|---|---|---|---|---|---|")
        for c in (int(x) for x in args.connections.split(",")):
            wrk(d.url("/echo"), body, c, 2, kind)  # warm-up
            before = cpu_by_process(d.proc.pid)
            r = wrk(d.url("/echo"), body, c, args.seconds, kind)
            after = cpu_by_process(d.proc.pid)
            used = {pid: (after[pid] - before.get(pid, 0.0)) * 1e6 / r["requests"] for pid in after}
            master = used.pop(d.proc.pid, 0.0)
            models = [f"{model[pid]}: {us:.0f}" for pid, us in used.items() if pid in model]
            http = [f"{us:.0f}" for pid, us in used.items() if pid not in model and us >= 1]
            print(f"| {case} | c={c} | {r['rps']:,.0f} | {master:.0f} | {' + '.join(http)} | "
                  f"{'; '.join(models)} |", flush=True)
    finally:
        d.stop()


if __name__ == "__main__":
    main()
