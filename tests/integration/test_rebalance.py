"""The rebalancer driving a real daemon: CPU workers added and taken away from queueing, and a replica moved off a
(simulated) GPU that another process saturates, all under load with no failed request.

The GPU samples come from a trace file (``[rebalance] gpu_trace``), the one fake allowed here: this machine has no
GPU. The real NVML sampler runs on the GPU machine (see bench/gpu_rebalance.py)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness import Daemon, Load, wait_until

TORCH_PRELOADED = True  # the model path, as production runs it (harness.TORCH)

GIB = 1 << 30
SLOW = '''
import time


class PythonPredictor:
    def __init__(self, config):
        pass

    def predict(self, payload):
        time.sleep(0.03)
        return {"ok": True}
'''
QUICK = "[predictors]\ndebounce = 0.3\n[rebalance]\ninterval = 0.3\nwindow = 3\ncooldown = 1\nqueue_high = 1.5\n"


def replicas(d: Daemon, name: str) -> list[dict[str, Any]]:
    return d.get(f"/{name}").json()["replicas"]  # type: ignore[no-any-return]


def test_a_queueing_api_gets_a_second_cpu_worker_and_gives_it_back_when_idle(
        make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon({"slow.py": SLOW, "other.py": SLOW.replace("0.03", "0")},
                    # the load generator shares this machine's 2 cores: the host-CPU limit is the unit tests' business
                    QUICK + "idle_after = 3\ncpu_busy = 100\n[workers]\ncpu = 1\ncpu_max = 2\n")
    d.wait_settled()
    assert len(d.status()["workers"]) == 1
    with Load(d, {"slow": 6, "other": 1}, seconds=90) as load:
        wait_until(lambda: len(replicas(d, "slow")) == 2, 60, "a second replica of slow")
        d.wait_for_log(r"rebalance: \+1 replica of slow on cpu: queue \d+, host CPU \d+%, available [\d.]+ GiB")
        served = wait_until(lambda: {r["worker"] for r in replicas(d, "slow")}, 5, "the replicas")
        workers = wait_until(lambda: [w for w in d.status()["workers"] if w["busy"] is not None], 5, "a sample")
        assert any(w["busy"] > 0 and w["latency_ms"] > 0 for w in workers), workers
        assert [w["added"] for w in d.status()["workers"]].count(True) == 1
        wait_until(lambda: load.count("slow") > 100, 60, "requests to go through both replicas")
    assert load.failures("slow") == [] and load.failures("other") == []
    assert len(served) == 2
    d.wait_for_log(r"rebalance: -1 replica of slow from cpu \(worker \d+\): no requests for \d+s; "
                   r"1 replica\(s\) stay", 60)
    d.wait_for_log(r"rebalance: retiring worker \d+ \(cpu\): no API is placed on it", 30)
    wait_until(lambda: len(d.status()["workers"]) == 1, 30, "the added worker to exit")
    retired = [e["text"] for e in d.status()["events"] if e["kind"] == "retire"]
    assert retired and "retired: the rebalancer retired it: no API is placed on it" in retired[-1], d.status()["events"]
    assert d.post("/slow", json={}).status_code == 200
    s = d.status()
    # (a refusal may come between: with both workers busy the queue can stay high, and cpu_max = 2 is reached)
    assert [x["action"] for x in s["decisions"] if x["action"] != "refuse"] == ["add", "remove", "retire"]
    assert any(dev["name"] == "host" for dev in s["devices"])
    cmd = [sys.executable, "-m", "predictord", "status", "--config", str(d.config_path)]
    table = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True).stdout
    assert re.search(r"^host +ok +\d+% +[\d.]+/[\d.]+ GiB available +- +1$", table, re.M), table
    assert re.search(r"^REBALANCING\n(.+\n)*.*\+1 replica of slow on cpu: queue", table, re.M), table
    metrics = d.get("/metrics").text
    assert 'predictord_rebalance_decisions_total{action="add"} 1.0' in metrics
    assert 'predictord_device_utilization_percent{device="host"}' in metrics


def write_trace(path: Path, gpu0: dict[str, Any]) -> None:
    gpus = [{"index": 0, "util": 10, "memory_used": 2 * GIB, "memory_total": 80 * GIB, **gpu0},
            {"index": 1, "util": 5, "memory_used": 1 * GIB, "memory_total": 80 * GIB}]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"gpus": gpus}) + "\n")
    tmp.replace(path)


def test_a_replica_leaves_a_gpu_that_another_process_saturates_and_a_lost_gpu_drains(
        make_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    trace = tmp_path / "gpus.jsonl"
    write_trace(trace, {})
    d = make_daemon({"mlp.py": SLOW.replace("0.03", "0.005"), "mlp.toml": '[serving]\ndevice = "gpu"\n'},
                    QUICK + f'gpu_trace = "{trace}"\n[workers]\ncpu = 0\ngpus = "all"\n', start=False)
    d.start()
    d.wait_settled()
    assert [r["device"] for r in replicas(d, "mlp")] == ["gpu0"]
    with Load(d, {"mlp": 2}, seconds=90) as load:
        wait_until(lambda: load.count("mlp") > 20, 30, "traffic")
        write_trace(trace, {"util": 97, "foreign_util": 92, "memory_used": 40 * GIB, "foreign_memory": 37 * GIB})
        d.wait_for_log(r"rebalance: moving a replica of mlp from worker 0 to gpu1: gpu0: other processes use 92% "
                       r"of it; gpu1: util 5%, free 79.0 GiB", 30)
        wait_until(lambda: [r["device"] for r in replicas(d, "mlp")] == ["gpu1"], 30, "mlp served from gpu1 only")
        moved_at = load.count("mlp")
        wait_until(lambda: load.count("mlp") > moved_at + 20, 30, "traffic served from gpu1")
        write_trace(trace, {"healthy": False, "error": "NVML: GPU is lost"})  # and then gpu0 falls off the bus
        d.wait_for_log(r"rebalance: draining gpu0: NVML: GPU is lost", 30)
        wait_until(lambda: [w["device"] for w in d.status()["workers"]] == ["gpu1"], 30, "gpu0's worker to go")
    assert load.failures("mlp") == []
    devices = {dev["name"]: dev for dev in d.status()["devices"]}
    assert devices["gpu0"]["state"] == "drained" and devices["gpu1"]["state"] == "ok"
    assert d.post("/mlp", json={}).status_code == 200


def test_a_replica_that_does_not_fit_any_gpu_is_refused_with_a_clear_status(
        make_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    """gpu1 is full (someone else's memory); when gpu0 is lost, mlp's measured footprint fits nowhere: GET /mlp
    says so, and the daemon goes on serving the other API."""
    trace = tmp_path / "gpus.jsonl"
    write_trace(trace, {})
    full = {"index": 1, "util": 5, "memory_used": 80 * GIB, "memory_total": 80 * GIB, "foreign_memory": 10 * GIB}
    big = SLOW.replace("pass", "self.weights = bytearray(64 << 20)")  # a footprint the worker measures at load
    d = make_daemon({"mlp.py": big, "mlp.toml": '[serving]\ndevice = "gpu"\n', "small.py": SLOW.replace("0.03", "0"),
                     "small.toml": '[serving]\ndevice = "cpu"\n'},
                    QUICK + f'gpu_trace = "{trace}"\n[workers]\ncpu = 1\ngpus = "all"\n')
    d.wait_settled()
    assert d.get("/mlp").json()["rebalance"]["footprint"] >= 64 << 20
    trace.write_text(json.dumps({"gpus": [{"index": 0, "healthy": False, "error": "NVML: GPU is lost"}, full]}) + "\n")
    d.wait_for_log(r"rebalance: draining gpu0", 30)
    status = wait_until(lambda: (s := d.get("/mlp").json())["error"] and s, 30, "mlp's placement error")
    assert "not placed: 0.1 GiB (its measured footprint) does not fit in the room left on gpu1" in \
        status["error"]["message"], status["error"]
    assert d.post("/small", json={}).status_code == 200
    assert d.get("/healthz").status_code == 200
