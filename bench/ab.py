"""A/B of the request path: this tree's predictord against another commit's, same machine, same wrk load.

    .venv/bin/python bench/ab.py --base REV [--seconds 6] [--reps 2]

The other commit's daemon/ is taken with `git archive` into a temp folder and put first on PYTHONPATH of its daemon
(same venv, same dependencies). Each run: one echo API, 2 s of warm-up, then `wrk -t2` at 8 and 64 connections.
Prints one Markdown table; runs alternate between the two trees so that drift in the machine hits both.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "integration"))
from harness import Daemon  # noqa: E402

ECHO = "class PythonPredictor:\n    def __init__(self, config):\n        pass\n\n    def predict(self, payload):\n" \
       "        return payload\n"
BODY = json.dumps({"x": [1, 2, 3], "text": "hello"})


def wrk(url: str, script: Path, connections: int, seconds: int) -> tuple[float, str, str]:
    """Requests/s, p50 and non-2xx answers of one wrk run."""
    subprocess.run(["wrk", "-t2", f"-c{connections}", "-d2s", "-s", str(script), url], capture_output=True, check=True)
    out = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script), url],
                         capture_output=True, text=True, check=True).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p50 = re.search(r"50%\s+([\d.]+\w+)", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    assert rps and p50, out
    return float(rps.group(1)), p50.group(1), errors.group(1) if errors else "0"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True, help="the commit to compare with (e.g. main)")
    ap.add_argument("--seconds", type=int, default=6)
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="predictord-ab-"))
    archive = subprocess.run(["git", "-C", str(REPO), "archive", args.base, "daemon"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(work)], input=archive.stdout, check=True)
    script = work / "post.lua"
    script.write_text(f'wrk.method = "POST"\nwrk.body = {json.dumps(BODY)}\n'
                      'wrk.headers["Content-Type"] = "application/json"\n')
    trees = {args.base: {"PYTHONPATH": str(work / "daemon")}, "this tree": {}}
    print("| tree | load | run | req/s | p50 | non-2xx |")
    print("|---|---|---|---|---|---|")
    try:
        for rep in range(1, args.reps + 1):
            for name, env in trees.items():
                d = Daemon(work / f"{len(list(work.iterdir()))}", "", env=env)
                d.write("echo.py", ECHO)
                d.start()
                try:
                    d.wait_settled()
                    for connections in (8, 64):
                        rps, p50, errors = wrk(d.url("/echo"), script, connections, args.seconds)
                        print(f"| {name} | c={connections} | {rep} | {rps:,.0f} | {p50} | {errors} |", flush=True)
                finally:
                    d.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
