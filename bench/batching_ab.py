"""Batching on against off for one predictor, alternating daemons so that drift in the machine hits both.

    .venv/bin/python bench/batching_ab.py [--case mlp|encoder] [--connections 1,8] [--seconds 5] [--reps 3] [--bare]
        [--replicas 2|1,2] [--settings off,on]

Each run starts a daemon as `make bench` does (2 CPU model workers, torch_threads = 1, 2 replicas; the MLP with
batching 32 / 2 ms or none, the encoder with 8 / 5 ms or none), warms it for 2 s, then runs `wrk` (bench/run.py's)
and prints requests/s, p50, the server's CPU per request and that CPU by process (microseconds; the busiest first).
``--bare`` adds bare starlette (bench/apps/bare.py, as `make bench` runs it) to each round, for the ratios.
``--replicas`` sets the API's replicas (both model workers run either way; several: a daemon for each, in the same
rounds); ``--settings`` picks the daemons.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "integration"))
from per_process import cpu_by_process  # noqa: E402
from run import (  # noqa: E402
    ENCODER_BODY,
    ENCODER_OFF,
    ENCODER_ON,
    MLP_BODY,
    TWO_WORKERS,
    Predictord,
    Server,
    bare,
    wrk,
)


def layouts(case: str, replicas: int = 2) -> dict[str, dict[str, str]]:
    """The predictor files of each setting, as bench/run.py writes them (with ``replicas`` instead of its 2)."""
    return {setting: {path: text.replace("replicas = 2", f"replicas = {replicas}") for path, text in files.items()}
            for setting, files in _layouts(case).items()}


def _layouts(case: str) -> dict[str, dict[str, str]]:
    if case == "encoder":
        code = (REPO / "bench" / "apps" / "encoder.py").read_text()
        return {"off": {"encoder/predictor.py": code, "encoder/predictor.toml": ENCODER_OFF},
                "on": {"encoder/predictor.py": code, "encoder/predictor.toml": ENCODER_ON}}
    code = (REPO / "predictors" / "mlp" / "predictor.py").read_text()
    single = code.replace("    def predict(self, payload):",
                          "    def predict(self, payload):\n        return self.predict_many([payload])[0]"
                          "\n\n    def predict_many(self, payload):")
    return {"off": {"mlp.py": single, "mlp.toml": "[serving]\nmax_batch_size = 1\nreplicas = 2\n"},
            "on": {"mlp.py": code,
                   "mlp.toml": "[serving]\nmax_batch_size = 32\nbatch_wait_ms = 2\nreplicas = 2\n"}}


def servers(case: str, with_bare: bool, replicas: tuple[int, ...] = (2,),
            settings: tuple[str, ...] = ("off", "on")) -> list[Server]:
    """Fresh servers for one round: predictord with batching off and on (and bare starlette)."""
    out: list[Server] = []
    for n in replicas:
        named = f", {n} replica{'s' if n > 1 else ''}" if replicas != (2,) else ""
        out += [Predictord(f"predictord, batching {setting}{named}", files, TWO_WORKERS)
                for setting, files in layouts(case, n).items() if setting in settings]
    return [*out, bare()] if with_bare else out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", choices=("mlp", "encoder"), default="mlp")
    ap.add_argument("--connections", default="1,8")
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--bare", action="store_true", help="bare starlette too, in the same rounds (ratios to it)")
    ap.add_argument("--replicas", default="2", help="the API's replicas (make bench: 2); several: 1,2")
    ap.add_argument("--settings", default="off,on", help="which daemons: batching off, on, or both")
    args = ap.parse_args()
    body = ENCODER_BODY if args.case == "encoder" else MLP_BODY
    print("| server | load | run | req/s | p50 | server CPU / request | by process (us) |")
    print("|---|---|---|---|---|---|---|")
    for rep in range(1, args.reps + 1):
        for server in servers(args.case, args.bare, tuple(int(n) for n in args.replicas.split(",")),
                              tuple(args.settings.split(","))):
            server.start()
            try:
                for c in (int(x) for x in args.connections.split(",")):
                    url = server.url + f"/{args.case}"
                    wrk(url, body, c, 2)  # warm-up
                    before = cpu_by_process(server.pid)
                    r = wrk(url, body, c, args.seconds)
                    after = cpu_by_process(server.pid)
                    used = sorted(((after[pid] - before.get(pid, 0.0)) * 1e6 / r["requests"] for pid in after),
                                  reverse=True)
                    busy = " + ".join(f"{us:.0f}" for us in used if us >= 1)
                    print(f"| {server.name} | c={c} | {rep} | {r['rps']:,.0f} | {r['p50']:.2f} ms | "
                          f"{sum(used) / 1000:.3f} ms | {busy} |", flush=True)
            finally:
                server.stop()


if __name__ == "__main__":
    main()
