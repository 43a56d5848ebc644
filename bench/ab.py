"""A/B of the request path: this tree's predictord against another commit's, same machine, same wrk load.

    .venv/bin/python bench/ab.py --base REV [--case echo|shared|mlp|mlp-replicas|mlp-warm|encoder|bytes|json|replies
                                |stream]
                                [--body-kb 1000] [--seconds 6] [--reps 2] [--connections 1,8,64]

The other commit's daemon/ is taken with `git archive` into a temp folder and put first on PYTHONPATH of its daemon
(same venv, same dependencies). Each run: one API (``echo``, or ``mlp``: predictors/mlp with its batching), 2 s of
warm-up, then bench/run.py's `wrk` (echo at 8 and 64 connections, mlp at 64; mlp-replicas, make bench's MLP with
batching 32 / 2 ms on two replicas, at 1, 8 and 64; mlp-warm, the same with its request body as a warm-up
sample, at 8 and 64; encoder, bench/apps/encoder.py batching
8 / 5 ms on two replicas as in `make bench`, at 8 and 64; shared, the echo beside an idle second API in its model
worker, at 1, 8 and 64; bytes and json, bodies of --body-kb to a predictor that returns their length, at 8 and 64;
replies, a small JSON request and an answer of --body-kb (100, 1000 or 8000) bytes, made once, at 1 and 8; stream,
the same with the answer streamed by a generator in parts of 1 MiB, at 1 and 8).
Prints one Markdown table with the server's CPU per request and the peak RSS of its processes (summed, sampled every
50 ms, shared memory counted once: run.Peak); runs alternate between the two trees so that drift in the machine hits
both.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "integration"))
from batching_ab import layouts  # noqa: E402
from harness import Daemon  # noqa: E402
from run import (  # noqa: E402
    BLOB,
    ECHO,
    ECHO_BODY,
    ENCODER_BODY,
    ENCODER_ON,
    MLP_BODY,
    REPLY_KB,
    SIZE,
    TWO_WORKERS,
    Peak,
    body_of,
    cpu_seconds,
    wrk,
)

CASES = {  # name: (body, connections)
    "echo": (ECHO_BODY, (8, 64)),
    "mlp": (MLP_BODY, (64,)),
    "mlp-replicas": (MLP_BODY, (1, 8, 64)),  # make bench's "batching 32 / 2 ms" MLP: 2 replicas on 2 CPU workers
    "mlp-warm": (MLP_BODY, (8, 64)),  # the same with a warm-up sample (its request body)
    "encoder": (ENCODER_BODY, (8, 64)),
    "bytes": ("", (8, 64)),  # raw bodies of --body-kb kilobytes (bench/run.py's body_of) to a predictor of their length
    "shared": (ECHO_BODY, (1, 8, 64)),  # the echo beside an idle second API in its model worker
    "json": ("", (8, 64)),  # JSON text of --body-kb kilobytes ({"text": "xx..."}) to the same predictor
    "replies": (ECHO_BODY, (1, 8)),  # answers of --body-kb kilobytes (run.py's BLOB)
    "stream": (ECHO_BODY, (1, 8)),  # streamed answers of --body-kb kilobytes, in parts of 1 MiB (STREAM)
}
STREAM = '''
class PythonPredictor:
    def __init__(self, config):
        self.part = bytes(range(256)) * 4096  # 1 MiB, made once

    def predict(self, query_params):
        def parts(left):
            while left > 0:
                yield self.part if left >= len(self.part) else self.part[:left]
                left -= len(self.part)
        return parts(int(query_params["kb"]) * 1000)
'''


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True, help="the commit to compare with (e.g. main)")
    ap.add_argument("--case", choices=sorted(CASES), default="echo")
    ap.add_argument("--seconds", type=int, default=6)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--body-kb", type=int, default=1000, help="the bytes case's body size")
    ap.add_argument("--connections", help="comma-separated loads to run instead of the case's (e.g. 1,8,64)")
    args = ap.parse_args()
    if args.case == "replies" and args.body_kb not in REPLY_KB:
        ap.error(f"--body-kb: the replies case answers {', '.join(map(str, REPLY_KB))} KB")
    work = Path(tempfile.mkdtemp(prefix="predictord-ab-"))
    archive = subprocess.run(["git", "-C", str(REPO), "archive", args.base, "daemon"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(work)], input=archive.stdout, check=True)
    body, loads = CASES[args.case]
    if args.connections:
        loads = tuple(int(c) for c in args.connections.split(","))
    kind = "raw" if args.case == "bytes" else "json"
    if args.case in ("bytes", "json"):
        body = body_of(kind, args.body_kb * 1000)
    trees = {args.base: {"PYTHONPATH": str(work / "daemon")}, "this tree": {}}
    print("| tree | load | run | req/s | p50 | errors | server CPU / request | peak RSS |")
    print("|---|---|---|---|---|---|---|---|")
    try:
        for rep in range(1, args.reps + 1):
            for name, env in trees.items():
                d = Daemon(work / f"{len(list(work.iterdir()))}",
                           TWO_WORKERS if args.case in ("encoder", "mlp-replicas") else "", env=env)
                if args.case in ("echo", "shared"):
                    d.write("echo.py", ECHO)
                    if args.case == "shared":
                        d.write("other.py", ECHO)
                elif args.case in ("bytes", "json"):
                    d.write(f"{args.case}.py", SIZE)
                elif args.case == "replies":
                    d.write("blob.py", BLOB)
                elif args.case == "stream":
                    d.write("stream.py", STREAM)
                elif args.case == "mlp-replicas":
                    for file, text in layouts("mlp")["on"].items():
                        d.write(file, text)
                elif args.case == "mlp-warm":
                    code, toml = layouts("mlp")["on"].values()
                    d.write("mlp/predictor.py", code)
                    d.write("mlp/predictor.toml", toml + 'warmup = ["sample.json"]\n')
                    d.write("mlp/sample.json", MLP_BODY)
                elif args.case == "encoder":
                    d.write("encoder/predictor.py", (REPO / "bench" / "apps" / "encoder.py").read_text())
                    d.write("encoder/predictor.toml", ENCODER_ON)
                else:
                    for part in ("predictor.py", "predictor.toml"):
                        d.write(f"mlp/{part}", (REPO / "predictors" / "mlp" / part).read_text())
                d.start()
                try:
                    d.wait_settled()
                    assert d.proc is not None
                    paths = {"shared": "/echo", "mlp-replicas": "/mlp", "mlp-warm": "/mlp",
                             "replies": f"/blob?kb={args.body_kb}", "stream": f"/stream?kb={args.body_kb}"}
                    url = d.url(paths.get(args.case, f"/{args.case}"))
                    for connections in loads:
                        wrk(url, body, connections, 2, kind)  # warm-up
                        before, peak = cpu_seconds(d.proc.pid), Peak(d.proc.pid)
                        r = wrk(url, body, connections, args.seconds, kind)
                        cpu = (cpu_seconds(d.proc.pid) - before) * 1000 / max(1, r["requests"])
                        print(f"| {name} | c={connections} | {rep} | {r['rps']:,.0f} | {r['p50']:.2f} ms | "
                              f"{r['errors']} | {cpu:.3f} ms | {peak.stop():,.0f} MiB |", flush=True)
                finally:
                    d.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
