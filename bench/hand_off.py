"""The cost of handing a call to a thread and back on an asyncio loop: ``loop.run_in_executor`` against the model
worker's ``Lanes`` (daemon/predictord/model/lanes.py), for a call that does nothing, at 1 and 8 callers at once.

    .venv/bin/python bench/hand_off.py [--calls 20000] [--rounds 2]

Prints microseconds of wall time and of process CPU per call (both threads' CPU counted).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "daemon"))
from predictord.model.lanes import Lanes  # noqa: E402


def nothing(x: int) -> int:
    return x


async def measure(mode: str, callers: int, calls: int) -> tuple[float, float]:
    loop = asyncio.get_running_loop()
    executor = ThreadPoolExecutor(1)
    lanes = Lanes(loop, 1, "bench")
    each = calls // callers

    async def caller() -> None:
        for i in range(each):
            if mode == "run_in_executor":
                await loop.run_in_executor(executor, nothing, i)
            else:
                await lanes.run(nothing, i)

    wall, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(caller() for _ in range(callers)))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    executor.shutdown()
    lanes.shutdown()
    return wall / calls * 1e6, cpu / calls * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    print("| hand-off | callers | round | us wall / call | us CPU / call |")
    print("|---|---|---|---|---|")
    for callers in (1, 8):
        for round_ in range(1, args.rounds + 1):
            for mode in ("run_in_executor", "Lanes"):
                wall, cpu = asyncio.run(measure(mode, callers, args.calls))
                print(f"| {mode} | {callers} | {round_} | {wall:.1f} | {cpu:.1f} |", flush=True)


if __name__ == "__main__":
    main()
