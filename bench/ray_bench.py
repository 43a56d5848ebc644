"""The price of the cluster path: echo and the MLP through `predictord ray` (Ray Serve on a one-node Ray cluster on
loopback, 2 CPUs, one replica per CPU) beside the daemon (2 HTTP workers, 2 CPU model workers), same machine, same
wrk load. Needs the ray extra (run it with .venv-ray/bin/python, which `make ray-test` builds).

    .venv-ray/bin/python bench/ray_bench.py [--seconds 5] [--connections 8,64]

Prints Markdown tables for BENCHMARKS.md. Ray's processes are not children of the driver, so no CPU-per-request
figure is given for it.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent / "tests" / "integration"))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # a cluster on loopback (cluster.before_ray)
from harness import wait_until  # noqa: E402
from run import ECHO, ECHO_BODY, MLP_BODY, Predictord, Server, free_port, wrk  # noqa: E402

MLP = (BENCH.parent / "predictors" / "mlp" / "predictor.py").read_text()
SINGLE = MLP.replace("    def predict(self, payload):", "    def predict(self, payload):\n        return "
                     "self.predict_many([payload])[0]\n\n    def predict_many(self, payload):")
CASES = {  # name: (files, body)
    "echo": ({"echo.py": ECHO, "echo.toml": "[serving]\nreplicas = 2\n"}, ECHO_BODY),
    "mlp, no batching": ({"mlp.py": SINGLE, "mlp.toml": "[serving]\nreplicas = 2\n"}, MLP_BODY),
    "mlp, batching 32 / 2 ms": ({"mlp.py": MLP, "mlp.toml": "[serving]\nreplicas = 2\nmax_batch_size = 32\n"
                                                       "batch_wait_ms = 2\n"}, MLP_BODY),
}


class RayServe(Server):
    """`predictord ray` on a fresh one-node Ray cluster of 2 CPUs."""

    def __init__(self, name: str, predictors: dict[str, str]) -> None:
        self.name = name
        self.root = Path(tempfile.mkdtemp(prefix="predictord-raybench-"))
        for rel, text in predictors.items():
            (self.root / "predictors" / rel).parent.mkdir(parents=True, exist_ok=True)
            (self.root / "predictors" / rel).write_text(text)
        self.port = free_port()
        (self.root / "config.toml").write_text(f'[server]\nport = {self.port}\n[predictors]\ndir = "predictors"\n'
                                               "check_permissions = false\n[workers]\ntorch_threads = 1\n")

    def start(self) -> None:
        from ray.cluster_utils import Cluster

        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 2, "node_ip_address": "127.0.0.1", "include_dashboard": False,
            "object_store_memory": 200 * 2**20})
        self.log = (self.root / "driver.log").open("wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "predictord", "ray", "--address", self.cluster.address,
                                      "--config", str(self.root / "config.toml"), "--replica-cpus", "1"],
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env=dict(os.environ, OMP_NUM_THREADS="1"))
        self.pid = self.proc.pid
        self.url = f"http://127.0.0.1:{self.port}"
        name = next(iter(p.stem for p in (self.root / "predictors").glob("*.py")))

        def up() -> bool:
            try:
                return httpx.post(f"{self.url}/{name}", content=MLP_BODY if name == "mlp" else ECHO_BODY,
                                  headers={"content-type": "application/json"}, timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, 300, f"{name} on Ray")

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(60)
        self.cluster.shutdown()
        self.log.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--connections", default="8,64")
    args = ap.parse_args()
    conns = [int(c) for c in args.connections.split(",")]
    two = "[workers]\ncpu = 2\ntorch_threads = 1\n"
    print(f"predictord ray bench, {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores; `{' '.join(sys.argv)}`;"
          f" {args.seconds} s per point after a 2 s warm-up; wrk -t2 on the same machine")
    print("\n| workload | system | load | req/s | p50 | p99 | errors |\n|---|---|---|---|---|---|---|")
    for case, (files, body) in CASES.items():
        path = "/" + next(iter(files)).removesuffix(".py")
        for server in (Predictord("predictord (daemon)", files, two), RayServe("predictord ray (Ray Serve)", files)):
            server.start()
            try:
                for c in conns:
                    wrk(server.url + path, body, c, 2)
                    r = wrk(server.url + path, body, c, args.seconds)
                    print(f"| {case} | {server.name} | c={c} | {r['rps']:,.0f} | {r['p50']:.2f} ms | "
                          f"{r['p99']:.2f} ms | {r['errors']} |", flush=True)
            finally:
                server.stop()


if __name__ == "__main__":
    main()
