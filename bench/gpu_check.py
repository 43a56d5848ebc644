"""`make gpu-check`: every GPU path of the daemon, proved on a real NVIDIA GPU in one go, in at most 8 minutes.

    python3 bench/gpu_check.py [--report docs/gpu-check.md] [--trace tests/unit/traces/nvml_foreign.jsonl]
                               [--seconds 4]

Each step prints a progress line and adds a section to one Markdown report (date, driver, GPU model, commit):

1. discovery and pinning: NVML finds every GPU; one model worker per GPU with CUDA_VISIBLE_DEVICES set to that GPU
   alone (read from /proc/PID/environ), plus the CPU workers;
2. the master never initialises CUDA: NVML's compute processes are model workers only, never the master, an HTTP
   worker or a probe, and the master's /proc/PID/maps holds no libcuda;
3. a torch predictor on the GPU answers with tensors on cuda, its measured footprint (torch.cuda.memory_reserved)
   is in GET /NAME, and a replica whose footprint cannot fit is refused with the figures, not a CUDA OOM;
4. throughput against the physical limit: an MLP (256->1024->10) and a 4096-wide model through the daemon at batch
   1, 8 and 32 (server-side batching), each beside a raw torch loop in one process on the same GPU;
5. the rebalancer against real NVML: a foreign torch loop saturating the GPU is seen (utilization and memory) within
   one window; what the policy does; whether nvmlDeviceGetProcessUtilization is supported; a JSON-lines trace of it
   for tests/unit/traces/;
6. a GPU worker SIGKILLed while it holds memory: NVML shows the memory freed before the replacement has loaded.

Without a GPU it says so in one line and exits 2. The pieces that need none (the report, the raw loop on the CPU,
the findings, the trace format) are unit-tested in `make test` (tests/unit/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "daemon"), str(REPO / "tests" / "integration")]
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "daemon"), os.environ.get("PYTHONPATH")]))

MLP = ("torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 10))", 256)
WIDE = ("torch.nn.Sequential(torch.nn.Linear(4096, 4096), torch.nn.ReLU(), torch.nn.Linear(4096, 4096), "
        "torch.nn.ReLU(), torch.nn.Linear(4096, 10))", 4096)
PREDICTOR = '''
import torch


class PythonPredictor:
    def __init__(self, config, device):
        torch.manual_seed(0)
        self.device = device
        self.model = {model}.to(device).eval()

    def predict(self, payload):
        batch = payload if isinstance(payload, list) else [payload]
        x = torch.tensor([p["x"] for p in batch], dtype=torch.float32, device=self.device)
        with torch.inference_mode():
            y = self.model(x)
        out = [{{"label": int(i), "device": str(y.device)}} for i in y.argmax(dim=1).tolist()]
        return out if isinstance(payload, list) else out[0]
'''
HOG = '''
import time

import torch


class PythonPredictor:
    def __init__(self, config, device):
        self.block = torch.empty(int(config["bytes"]), dtype=torch.uint8, device=device)

    def predict(self, payload):
        time.sleep(0.05)  # slow enough that 8 clients queue: the rebalancer wants a second replica
        return {"device": str(self.block.device)}
'''
TOO_LARGE = '''
import torch


class PythonPredictor:
    def __init__(self, config, device):
        self.device, self.per_item = device, int(config["per_item"])

    def predict(self, payload):
        block = torch.ones(self.per_item * len(payload), dtype=torch.uint8, device=self.device)
        return [int(block[0]) for _ in payload]
'''
FOREIGN = '''
import sys, time, torch
x = torch.randn(8192, 8192, device="cuda")
hold = torch.empty(int(sys.argv[2]), dtype=torch.uint8, device="cuda")
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    y = x @ x
torch.cuda.synchronize()
'''


# -- the report (no GPU needed) -----------------------------------------------------------------------------------
@dataclass
class Step:
    """One step's outcome: passed or not, a one-line summary, and its Markdown body."""

    title: str
    ok: bool = False
    summary: str = ""
    lines: list[str] = field(default_factory=list)
    seconds: float = 0.0


class Report:
    """docs/gpu-check.md: the machine, then a summary table and a section per step."""

    def __init__(self, machine: dict[str, str]) -> None:
        self.machine = machine
        self.steps: list[Step] = []

    def markdown(self) -> str:
        head = ["# `make gpu-check`", "", *[f"- {k}: {v}" for k, v in self.machine.items()], "",
                "| step | result | summary | time |", "|---|---|---|---|"]
        head += [f"| {i}. {s.title} | {'pass' if s.ok else 'FAIL'} | {s.summary} | {s.seconds:.0f} s |"
                 for i, s in enumerate(self.steps, 1)]
        body = []
        for i, s in enumerate(self.steps, 1):
            body += ["", f"## {i}. {s.title}", "", *s.lines]
        return "\n".join(head + body) + "\n"

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.markdown())


def table(header: Iterable[str], rows: Iterable[Iterable[Any]]) -> list[str]:
    header = list(header)
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *["| " + " | ".join(str(c) for c in r) + " |" for r in rows]]


# -- findings: pure, unit-tested ----------------------------------------------------------------------------------
def environ_of(raw: bytes) -> dict[str, str]:
    """/proc/PID/environ as a dict."""
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def pinning(workers: list[dict[str, Any]], environ: Callable[[int], dict[str, str]], gpus: list[int],
            cpu_workers: int) -> tuple[bool, list[list[Any]]]:
    """One model worker per GPU, pinned to it alone, and the CPU workers pinned to none."""
    rows, ok, seen = [], True, []
    for w in workers:
        visible = environ(w["pid"]).get("CUDA_VISIBLE_DEVICES")
        want = "" if w["device"] == "cpu" else w["device"].removeprefix("gpu")
        good = visible == want
        ok &= good
        seen.append(w["device"])
        rows.append([w["slot"], w["pid"], w["device"], repr(visible), "ok" if good else f"expected {want!r}"])
    ok &= sorted(d for d in seen if d != "cpu") == [f"gpu{i}" for i in sorted(gpus)]
    ok &= seen.count("cpu") == cpu_workers
    return ok, rows


def compute_processes(on_gpu: dict[int, list[int]], model: set[int], others: dict[str, int]) -> tuple[bool, list[str]]:
    """NVML's compute processes are model workers only: never the master, an HTTP worker or a probe."""
    lines, ok = [], True
    for gpu, pids in sorted(on_gpu.items()):
        strangers = [p for p in pids if p not in model]
        named = [f"{name} ({pid})" for name, pid in others.items() if pid in pids]
        ok &= not named
        verdict = f"**not ours: {strangers}**" if strangers else "all ours"
        lines.append(f"- gpu{gpu}: compute processes {sorted(pids)}; model workers {sorted(model)}; {verdict}"
                     + (f"; **{named}**" if named else ""))
    return ok, lines


def maps_hold_cuda(maps: str) -> bool:
    """A process has loaded the CUDA driver library."""
    return any("libcuda.so" in line for line in maps.splitlines())


def raw_loop(model: Any, width: int, batch: int, device: str, seconds: float) -> float:
    """Items per second of one process doing what a request does, in a loop: a tensor from a list, the forward pass,
    the labels back as a list (torch imported by the caller; the same work as the daemon's predictor)."""
    import torch

    rows = [[(i % 97) / 97.0] * width for i in range(batch)]
    done, start = 0, time.perf_counter()
    with torch.inference_mode():
        while time.perf_counter() - start < seconds:
            x = torch.tensor(rows, dtype=torch.float32, device=device)
            model(x).argmax(dim=1).tolist()
            done += batch
    return done / (time.perf_counter() - start)


def write_trace(samples: Iterable[list[Any]], path: Path) -> None:
    """GPU samples (devices.GpuSample lists) as a JSON-lines trace that [rebalance] gpu_trace replays."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"gpus": [{**s.__dict__, "processes": [list(p) for p in s.processes]} for s in gpus]})
             for gpus in samples]
    path.write_text("\n".join(lines) + "\n")


# -- the GPU steps -------------------------------------------------------------------------------------------------
class Check:
    """The run: the daemon under test, NVML, and the report."""

    def __init__(self, args: argparse.Namespace) -> None:
        import pynvml

        self.args, self.nvml = args, pynvml
        self.gpus = list(range(pynvml.nvmlDeviceGetCount()))
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        name = pynvml.nvmlDeviceGetName(h)
        driver = pynvml.nvmlSystemGetDriverVersion()
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=REPO).stdout.strip() or "unknown"
        self.total = int(pynvml.nvmlDeviceGetMemoryInfo(h).total)
        self.report = Report({"date": time.strftime("%Y-%m-%d %H:%M %Z"), "GPU": f"{len(self.gpus)} x "
                              f"{name if isinstance(name, str) else name.decode()} ({self.total >> 30} GiB)",
                              "driver": driver if isinstance(driver, str) else driver.decode(), "commit": commit,
                              "command": " ".join(["python3", *sys.argv])})
        self.root = Path(tempfile.mkdtemp(prefix="predictord-gpu-check-"))
        self.daemons: list[Any] = []

    def daemon(self, files: dict[str, str], config: str = "") -> Any:
        from harness import Daemon

        d = Daemon(self.root / f"d{len(self.daemons)}", '[workers]\ncpu = 1\ngpus = "all"\n[predictors]\n'
                                                         "load_timeout = 300\n" + config)
        for rel, text in files.items():
            d.write(rel, text)
        self.daemons.append(d)
        d.start()
        d.wait_settled(300)
        return d

    def on_gpu(self) -> dict[int, list[int]]:
        out = {}
        for i in self.gpus:
            h = self.nvml.nvmlDeviceGetHandleByIndex(i)
            out[i] = [p.pid for p in self.nvml.nvmlDeviceGetComputeRunningProcesses(h)]
        return out

    def run(self, steps: list[tuple[str, Callable[[Step], None]]]) -> int:
        for i, (title, fn) in enumerate(steps, 1):
            step = Step(title)
            print(f"[{i}/{len(steps)}] {title} ...", flush=True)
            start = time.monotonic()
            try:
                fn(step)
            except Exception as e:  # noqa: BLE001 - one step's failure is written down; the others still run
                step.ok, step.summary = False, f"{type(e).__name__}: {e}"[:300]
                step.lines.append(f"The step failed: `{type(e).__name__}: {e}`")
            step.seconds = time.monotonic() - start
            self.report.steps.append(step)
            print(f"[{i}/{len(steps)}] {title}: {'pass' if step.ok else 'FAIL'} in {step.seconds:.0f}s: {step.summary}",
                  flush=True)
            self.report.write(self.args.report)
        for d in self.daemons:
            d.stop()
        print(f"report: {self.args.report}")
        return 0 if all(s.ok for s in self.report.steps) else 1

    # 1 + 2 + 3: one daemon with a torch predictor on the GPU
    def discovery(self, step: Step) -> None:
        self.main = self.daemon({"mlp.py": PREDICTOR.format(model=MLP[0]), "mlp.toml": '[serving]\ndevice = "gpu"\n'},
                                "[rebalance]\ninterval = 0.5\nwindow = 3\ncooldown = 2\n")
        workers = self.main.status()["workers"]
        ok, rows = pinning(workers, lambda pid: environ_of(Path(f"/proc/{pid}/environ").read_bytes()), self.gpus, 1)
        step.ok, step.summary = ok, f"{len(self.gpus)} GPU(s), {len(workers)} model workers"
        step.lines += table(["worker", "pid", "device", "CUDA_VISIBLE_DEVICES", "check"], rows)

    def master_cuda(self, step: Step) -> None:
        d = self.main
        for _ in range(20):
            d.post("/mlp", json={"x": [0.1] * MLP[1]})
        import psutil

        master = psutil.Process(d.proc.pid)
        model = {w["pid"] for w in d.status()["workers"] if w["device"] != "cpu"}
        others = {"master": master.pid, **{f"http/other {c.pid}": c.pid for c in master.children() if c.pid not in
                                           {w["pid"] for w in d.status()["workers"]}}}
        ok, lines = compute_processes(self.on_gpu(), model, others)
        cuda = maps_hold_cuda(Path(f"/proc/{master.pid}/maps").read_text())
        step.ok = ok and not cuda
        step.summary = "compute processes: model workers only; master has " + ("libcuda!" if cuda else "no libcuda")
        step.lines += lines + [f"- the master's /proc/{master.pid}/maps {'HOLDS' if cuda else 'holds no'} libcuda"]

    def torch_on_gpu(self, step: Step) -> None:
        d = self.main
        answer = d.post("/mlp", json={"x": [0.1] * MLP[1]}).json()
        footprint = d.get("/mlp").json()["rebalance"]["footprint"]
        big = int(self.total * 0.6)
        d.write("hog.py", HOG)
        d.write("hog.toml", f'[config]\nbytes = {big}\n[serving]\ndevice = "gpu"\n')
        from harness import wait_until

        wait_until(lambda: d.get("/hog").status_code == 200 and d.get("/hog").json()["state"] == "ready", 120, "hog")
        measured = d.get("/hog").json()["rebalance"]["footprint"]
        loader = threading.Thread(target=lambda: asyncio.run(load(d.url("/hog"), "{}", 8, 40)), daemon=True)
        loader.start()  # its queue makes the rebalancer want a second replica, which cannot fit beside the first
        note = wait_until(lambda: d.get("/hog").json()["rebalance"]["note"], 60, "the second replica refused")
        loader.join(60)
        step.ok = answer["device"].startswith("cuda") and footprint > 0 and measured >= big and "needed" in note
        step.summary = f"answers on {answer['device']}; footprint {footprint >> 20} MiB; 2nd hog replica refused"
        step.lines += [f"- `POST /mlp` answered `{answer}`", f"- `GET /mlp` footprint: {footprint} bytes",
                       f"- hog (torch.empty of {big >> 20} MiB) measured {measured >> 20} MiB; under load the "
                       f"rebalancer wanted a second replica and said: `{note}`"]
        (d.predictors / "hog.py").unlink()

    # 4: throughput against a raw loop
    def throughput(self, step: Step) -> None:
        import torch

        rows, ratios = [], []
        for name, (model_src, width) in (("MLP 256-1024-10", MLP), ("4096-wide, 3 layers", WIDE)):
            model = eval(model_src, {"torch": torch}).to("cuda").eval()  # noqa: S307 - our own model text
            for batch in (1, 8, 32):
                raw = raw_loop(model, width, batch, "cuda", self.args.seconds)
                served = self.served(model_src, width, batch)
                ratios.append((name, batch, served / raw))
                rows.append([name, batch, f"{raw:,.0f}", f"{served:,.0f}", f"{served / raw:.0%}"])
            del model
            torch.cuda.empty_cache()
        at32 = [r for n, b, r in ratios if b == 32 and n.startswith("4096")]
        step.ok = bool(at32) and at32[0] >= 0.9
        step.summary = f"4096-wide at batch 32: {at32[0]:.0%} of the raw loop (goal 90%)" if at32 else "no figure"
        step.lines += table(["model", "batch", "raw loop items/s", "through the daemon items/s", "ratio"], rows)

    def served(self, model_src: str, width: int, batch: int) -> float:
        d = self.daemon({"m.py": PREDICTOR.format(model=model_src),
                         "m.toml": f'[serving]\ndevice = "gpu"\nmax_batch_size = {batch}\nbatch_wait_ms = 2\n'
                                   f"queue_limit = 1024\n"}, "[workers]\ncpu = 0\n")
        try:
            body = json.dumps({"x": [0.1] * width})
            clients = max(4, 2 * batch)
            return asyncio.run(load(d.url("/m"), body, clients, self.args.seconds))
        finally:
            d.stop()
            self.daemons.remove(d)

    # 5: the rebalancer against real NVML
    def rebalancer(self, step: Step) -> None:
        from predictord.devices import NvmlGpus

        d = self.main
        supported = self.process_util_supported()
        ours = {w["pid"] for w in d.status()["workers"]}
        reader = NvmlGpus(self.gpus)
        hold = int(self.total * 0.55)
        foreign = subprocess.Popen([sys.executable, "-c", FOREIGN, "30", str(hold)])
        samples, appeared, seen_at, start = [], None, None, time.monotonic()
        try:
            while time.monotonic() - start < 25:
                gpus = reader.read(ours)
                samples.append(gpus)
                if appeared is None and any(p == foreign.pid for g in gpus for p, _, _ in g.processes):
                    appeared = time.monotonic()  # its CUDA context is up: from here on it should be seen
                if appeared is not None and seen_at is None and any(
                        g.foreign_memory >= hold * 0.9 and g.foreign_util > 0 for g in gpus):
                    seen_at = time.monotonic() - appeared
                time.sleep(1.0)
        finally:
            foreign.send_signal(signal.SIGTERM)
            foreign.wait(30)
            reader.close()
        write_trace(samples, self.args.trace)
        status = d.status()
        decisions = [x["text"] for x in status["decisions"]]
        notes = [a["rebalance"]["note"] for a in status["apis"].values() if a["rebalance"]["note"]]
        window = 5 * 2.0  # the default [rebalance] window x interval: what the policy needs to act
        step.ok = seen_at is not None and seen_at <= window
        step.summary = (f"foreign load seen {seen_at:.0f}s after it appeared" if seen_at is not None
                        else "foreign load not seen") \
            + f"; per-process utilization {'supported' if supported else 'NOT supported'}"
        step.lines += [f"- nvmlDeviceGetProcessUtilization: {'supported' if supported else 'not supported'}",
                       f"- foreign process (8192x8192 matmuls, {hold >> 20} MiB held) seen as foreign utilization and "
                       f"memory {seen_at}s after NVML first listed it (one default window: {window:g}s)",
                       f"- trace of {len(samples)} samples written to `{self.args.trace}`",
                       "- the policy's decisions: " + ("; ".join(decisions) or "none"),
                       "- notes on the APIs: " + ("; ".join(notes) or "none"),
                       "", "Samples (util %, foreign util %, foreign memory MiB):", "",
                       *table(["t", *[f"gpu{i}" for i in self.gpus]],
                              [[n, *[f"{g.util:.0f} / {g.foreign_util:.0f} / {g.foreign_memory >> 20}" for g in gpus]]
                               for n, gpus in enumerate(samples)])]

    def process_util_supported(self) -> bool:
        h = self.nvml.nvmlDeviceGetHandleByIndex(0)
        try:
            self.nvml.nvmlDeviceGetProcessUtilization(h, 0)
        except self.nvml.NVMLError_NotSupported:
            return False
        except self.nvml.NVMLError:
            return True  # NotFound: supported, nothing sampled yet
        return True

    # 6: a GPU worker killed
    def killed_worker(self, step: Step) -> None:
        d = self.main
        victim = next(w for w in d.status()["workers"] if w["device"] == "gpu0")
        held = {p: m for p, m, _ in self.processes(0)}.get(victim["pid"], 0)
        killed = time.monotonic()
        os.kill(victim["pid"], signal.SIGKILL)
        freed = ready = None
        while (freed is None or ready is None) and time.monotonic() - killed < 120:
            now = time.monotonic() - killed
            if freed is None and victim["pid"] not in {p for p, _, _ in self.processes(0)}:
                freed = now
            replicas = d.get("/mlp").json()["replicas"]
            if ready is None and replicas and replicas[0]["pid"] != victim["pid"]:
                ready = now
            time.sleep(0.02)
        step.ok = freed is not None and ready is not None and freed <= ready
        step.summary = f"{held >> 20} MiB freed after {freed}s; the replacement serving after {ready}s"
        step.lines += [f"- killed model worker pid {victim['pid']} holding {held >> 20} MiB on gpu0",
                       f"- NVML no longer listed it after {freed}s; the replacement served after {ready}s "
                       "(polled every 20 ms)"]

    # 7: a warm-up batch too large for the GPU
    def warm_up_too_large(self, step: Step) -> None:
        """A batching API whose warm-up batch of max_batch_size needs more than the GPU has: the load fails, named,
        and the model worker gives back what the smaller batches left reserved in torch's cache."""
        from harness import wait_until

        d = self.main
        h = self.nvml.nvmlDeviceGetHandleByIndex(0)

        def used() -> int:
            return int(self.nvml.nvmlDeviceGetMemoryInfo(h).used)

        free = int(self.nvml.nvmlDeviceGetMemoryInfo(h).free)
        before, per_item = used(), int(free * 0.3)  # batches of 1 and 2 fit; one of 4 cannot
        d.write("big/s.json", "{}")
        d.write("big/predictor.py", TOO_LARGE)
        d.write("big/predictor.toml", f'[config]\nper_item = {per_item}\n[serving]\ndevice = "gpu"\n'
                                      'max_batch_size = 4\nwarmup = ["s.json"]\n')
        api = wait_until(lambda: (a := d.status()["apis"].get("big")) and a["state"] == "failed" and a, 120,
                         "the load of big to fail")
        failed, peak = time.monotonic(), used()
        after = wait_until(lambda: (u := used()) - before < free * 0.1 and u, 30, "gpu0's memory given back")
        message = (api.get("error") or {}).get("message", "")
        step.ok = "warm-up batch of 4" in message and "OutOfMemory" in message
        step.summary = f"failed at its warm-up batch of 4; gpu0 back to {after >> 20} MiB used"
        step.lines += [f"- free on gpu0 before: {free >> 20} MiB; a batch of n takes {per_item >> 20} MiB x n",
                       f"- the load failed: `{message[:300]}`",
                       f"- gpu0 used {before >> 20} MiB before the load, {peak >> 20} MiB when it failed, "
                       f"{after >> 20} MiB {time.monotonic() - failed:.1f}s later (NVML)"]

    def processes(self, gpu: int) -> list[tuple[int, int, bool]]:
        h = self.nvml.nvmlDeviceGetHandleByIndex(gpu)
        return [(p.pid, int(p.usedGpuMemory or 0), True) for p in self.nvml.nvmlDeviceGetComputeRunningProcesses(h)]


async def load(url: str, body: str, clients: int, seconds: float) -> float:
    """Requests/s answered 200 by ``clients`` connections posting ``body`` for ``seconds`` (after a 1 s warm-up)."""
    import httpx

    done = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=60, limits=limits) as c:
        async def client(until: float, count: bool) -> None:
            nonlocal done
            while time.monotonic() < until:
                r = await c.post(url, content=body, headers={"content-type": "application/json"})
                done += count and r.status_code == 200

        await asyncio.gather(*[client(time.monotonic() + 1, False) for _ in range(clients)])
        start = time.monotonic()
        await asyncio.gather(*[client(start + seconds, True) for _ in range(clients)])
        return done / (time.monotonic() - start)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--report", type=Path, default=REPO / "docs" / "gpu-check.md")
    ap.add_argument("--trace", type=Path, default=REPO / "tests" / "unit" / "traces" / "nvml_foreign.jsonl")
    ap.add_argument("--seconds", type=float, default=4.0, help="seconds per throughput point")
    args = ap.parse_args()
    try:
        import pynvml

        pynvml.nvmlInit()
        if pynvml.nvmlDeviceGetCount() < 1:
            raise RuntimeError("NVML sees no GPU")
    except Exception as e:  # noqa: BLE001 - any NVML failure means: no GPU here
        print(f"gpu-check: no NVIDIA GPU here ({e}); it needs one")
        return 2
    check = Check(args)
    return check.run([("discovery and pinning", check.discovery), ("the master never initialised CUDA",
                       check.master_cuda), ("a torch predictor on the GPU", check.torch_on_gpu),
                      ("throughput against a raw torch loop", check.throughput),
                      ("the rebalancer against real NVML", check.rebalancer),
                      ("a GPU worker killed while it holds memory", check.killed_worker),
                      ("a warm-up batch too large for the GPU", check.warm_up_too_large)])


if __name__ == "__main__":
    sys.exit(main())
