"""The rebalancer on a real GPU: the real NVML sampler, a torch predictor on the GPU, and a foreign process (a
plain torch loop started here) saturating that GPU. Prints the samples, the policy's decisions and what the clients
saw. Needs an NVIDIA GPU and a CUDA build of torch; on a machine without one it says so and exits 2.

    .venv/bin/python bench/gpu_rebalance.py [--seconds 40] [--record trace.jsonl]

``--record`` also writes the NVML samples as a trace (the format ``[rebalance] gpu_trace`` replays), so a real
run can become a unit test's input.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))
from harness import Daemon, wait_until  # noqa: E402

MLP = '''
import torch


class PythonPredictor:
    def __init__(self, config, device):
        self.device = device
        self.model = torch.nn.Sequential(torch.nn.Linear(4096, 4096), torch.nn.ReLU(),
                                         torch.nn.Linear(4096, 10)).to(device).eval()

    def predict(self, payload):
        with torch.inference_mode():
            x = torch.randn(64, 4096, device=self.device)
            return {"sum": float(self.model(x).sum())}
'''
FOREIGN = '''
import sys, time, torch
x = torch.randn(8192, 8192, device="cuda")
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    y = x @ x
torch.cuda.synchronize()
'''


def nvml_samples(seconds: float, every: float, record: Path | None, ours: set[int]) -> list[dict[str, Any]]:
    """The real sampler, read directly (what the daemon's master reads)."""
    import pynvml

    from predictord.devices import NvmlGpus

    pynvml.nvmlInit()
    reader = NvmlGpus(list(range(pynvml.nvmlDeviceGetCount())))
    rows = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        gpus = reader.read(ours)
        rows.append({"at": round(time.time(), 2), "gpus": [g.__dict__ for g in gpus]})
        time.sleep(every)
    reader.close()
    if record is not None:
        record.write_text("".join(json.dumps({"gpus": r["gpus"]}) + "\n" for r in rows))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=40)
    ap.add_argument("--record", type=Path)
    args = ap.parse_args()
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as e:  # noqa: BLE001 - any NVML failure means: no GPU here
        print(f"no GPU here ({e}); this benchmark needs one")
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        d = Daemon(Path(tmp), "[workers]\ncpu = 0\ngpus = \"all\"\n[rebalance]\ninterval = 1\nwindow = 3\n"
                              "cooldown = 5\n[predictors]\nload_timeout = 120\n")
        d.write("mlp.py", MLP)
        d.write("mlp.toml", '[serving]\ndevice = "gpu"\n')
        d.start()
        try:
            d.wait_settled(120)
            ok, failed = [0], [0]
            stop = threading.Event()

            def client() -> None:
                with httpx.Client(timeout=30) as c:
                    while not stop.is_set():
                        r = c.post(d.url("/mlp"), json={})
                        (ok if r.status_code == 200 else failed)[0] += 1

            threads = [threading.Thread(target=client, daemon=True) for _ in range(4)]
            for t in threads:
                t.start()
            ours = set(d.worker_pids().values())
            foreign = subprocess.Popen([sys.executable, "-c", FOREIGN, str(args.seconds / 2)])
            rows = nvml_samples(args.seconds, 1.0, args.record, ours)
            foreign.wait(60)
            stop.set()
            for t in threads:
                t.join(30)
            status = d.status()
            for r in rows:
                print(json.dumps(r))
            print("devices:", json.dumps(status["devices"], indent=1))
            print("decisions:", json.dumps(status["decisions"], indent=1))
            print(f"requests: {ok[0]} ok, {failed[0]} failed; mlp replicas now "
                  f"{[r['device'] for r in d.get('/mlp').json()['replicas']]}")
            wait_until(lambda: d.get("/healthz").status_code == 200, 10, "the daemon to answer")
        finally:
            d.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
