"""The parts of `make gpu-check` (bench/gpu_check.py) that need no GPU: the report, the findings, the raw torch loop
on the CPU, and the trace it records, which the daemon's GPU simulation replays."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from predictord.devices import GpuSample, TraceGpus

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import gpu_check  # noqa: E402


def test_the_report_has_the_machine_a_summary_and_a_section_per_step(tmp_path: Path) -> None:
    report = gpu_check.Report({"GPU": "1 x H100 (79 GiB)", "driver": "575.1", "commit": "abc123"})
    report.steps = [gpu_check.Step("discovery", True, "1 GPU", ["| a |", "|---|"], 3.2),
                    gpu_check.Step("throughput", False, "61% at batch 32", [], 40)]
    report.write(tmp_path / "docs" / "gpu-check.md")
    text = (tmp_path / "docs" / "gpu-check.md").read_text()
    assert text.startswith("# `make gpu-check`\n\n- GPU: 1 x H100 (79 GiB)\n- driver: 575.1\n- commit: abc123\n")
    assert "| 1. discovery | pass | 1 GPU | 3 s |" in text
    assert "| 2. throughput | FAIL | 61% at batch 32 | 40 s |" in text
    assert "## 1. discovery\n\n| a |" in text and "## 2. throughput" in text


def test_pinning_wants_one_worker_per_gpu_with_that_gpu_alone_and_cpu_workers_with_none() -> None:
    workers = [{"slot": 0, "pid": 10, "device": "gpu0"}, {"slot": 1, "pid": 11, "device": "gpu1"},
               {"slot": 2, "pid": 12, "device": "cpu"}]
    environs = {10: {"CUDA_VISIBLE_DEVICES": "0"}, 11: {"CUDA_VISIBLE_DEVICES": "1"}, 12: {"CUDA_VISIBLE_DEVICES": ""}}
    ok, rows = gpu_check.pinning(workers, environs.__getitem__, [0, 1], 1)
    assert ok and [r[-1] for r in rows] == ["ok", "ok", "ok"]
    environs[11] = {"CUDA_VISIBLE_DEVICES": "0,1"}
    ok, rows = gpu_check.pinning(workers, environs.__getitem__, [0, 1], 1)
    assert not ok and rows[1][-1] == "expected '1'"
    assert not gpu_check.pinning(workers[:1] + workers[2:], environs.__getitem__, [0, 1], 1)[0], "a GPU lacks a worker"
    assert gpu_check.environ_of(b"A=1\0CUDA_VISIBLE_DEVICES=0\0EMPTY=\0") == {"A": "1", "CUDA_VISIBLE_DEVICES": "0",
                                                                             "EMPTY": ""}


def test_compute_processes_must_be_model_workers_and_the_master_must_not_load_libcuda() -> None:
    ok, lines = gpu_check.compute_processes({0: [10, 99]}, {10}, {"master": 1})
    assert ok and "not ours: [99]" in lines[0], "a foreign process is noted, not a failure"
    ok, lines = gpu_check.compute_processes({0: [10, 1]}, {10}, {"master": 1})
    assert not ok and "master (1)" in lines[0]
    assert gpu_check.maps_hold_cuda("7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libcuda.so.575.1\n")
    assert not gpu_check.maps_hold_cuda("7f00-7f01 r-xp 0 08:01 1 /opt/venv/lib/libtorch_cpu.so\n")


def test_the_raw_loop_runs_on_the_cpu() -> None:
    model = eval(gpu_check.MLP[0], {"torch": torch}).eval()  # noqa: S307 - the check's own model text
    assert gpu_check.raw_loop(model, gpu_check.MLP[1], 8, "cpu", 0.2) > 0


def test_a_recorded_trace_replays_in_the_daemons_gpu_simulation(tmp_path: Path) -> None:
    samples = [[GpuSample(0, True, 35.0, 10 * 2**30, 80 * 2**30, 6 * 2**30, 30.0, None, ((123, 6 * 2**30, False),))],
               [GpuSample(0, True, 97.0, 50 * 2**30, 80 * 2**30, 44 * 2**30, 95.0)]]
    path = tmp_path / "trace.jsonl"
    gpu_check.write_trace(samples, path)
    replay = TraceGpus(path)
    assert [g.index for g in replay.gpus()] == [0]
    assert replay.read(()) == samples[0] and replay.read(()) == samples[1]


@pytest.mark.skipif(Path("/dev/nvidia0").exists(), reason="a GPU is here: the command would run for real")
def test_without_a_gpu_it_says_so_in_one_line_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    sys.argv = ["gpu_check.py"]
    assert gpu_check.main() == 2
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("gpu-check: no NVIDIA GPU here")
