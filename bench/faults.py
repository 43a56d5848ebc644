"""Fault figures for RELIABILITY.md: each scenario of tests/integration/faults.py against a real daemon on loopback.

    .venv/bin/python bench/faults.py [--kills 10] [--every 3] [--only NAME ...]

Prints one Markdown table: per case, the requests sent to the API that was hurt, how many failed and how (status
codes, or the client's error when no HTTP answer came), requests to the other API that failed, and the seconds
from each fault until a request sent after it succeeded (full service back).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))
import faults  # noqa: E402
from faults import Figures  # noqa: E402
from harness import Daemon  # noqa: E402


class Daemons:
    """make_daemon for a script: each daemon in its own temp directory, all stopped at the end."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="predictord-faults-"))
        self.started: list[Daemon] = []

    def __call__(self, predictors: dict[str, str], config: str = "", start: bool = True) -> Daemon:
        d = Daemon(self.root / f"d{len(self.started)}", config)
        for rel, text in predictors.items():
            d.write(rel, text)
        self.started.append(d)
        return d.start() if start else d

    def close(self) -> None:
        for d in self.started:
            d.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def row(f: Figures, extra: str = "") -> str:
    hurt = f.of(f.faulty_api)
    rec = f.recovery()
    recovery = f"{statistics.median(rec):.2f} / {max(rec):.2f}" if rec else "never" if f.faults else "n/a (it stops)"
    codes = ", ".join(f"{n}x {c[:60]}" for c, n in sorted(f.codes.items())) or "-"
    note = "; ".join(x for x in (f.note, extra) if x)
    return (f"| {f.case} | {len(f.faults) or 1} | {len(hurt)} | {len(f.failed(f.faulty_api))} | {f.failed_share:.2%} | "
            f"{codes} | {f.others_failed} of {len(f.outcomes) - len(hurt) if f.faulty_api != '*' else 0} | "
            f"{recovery} | {note} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kills", type=int, default=10, help="SIGKILLs of the model worker in the first case")
    ap.add_argument("--every", type=float, default=3.0, help="seconds between those SIGKILLs (at least)")
    ap.add_argument("--only", nargs="*", help="run only these cases (function names in faults.py)")
    args = ap.parse_args()
    cases: dict[str, Callable[[Any], Any]] = {
        "kill_model_worker": lambda make: faults.kill_model_worker(make, args.kills, args.every),
        "kill_http_worker": faults.kill_http_worker,
        "stop_model_worker": faults.stop_model_worker,
        "leak_memory": faults.leak_memory,
        "hang_forever": faults.hang_forever,
        "sigterm_mid_reload": faults.sigterm_mid_reload,
        "crash_loop": faults.crash_loop,
        "crash_loop_unlimited": lambda make: faults.crash_loop(make, limit=0),
    }
    print("| case | faults | requests to the hurt API | failed | failed share | how they failed | other API failed | "
          "recovery s (median / max) | notes |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, case in cases.items():
        if args.only and name not in args.only:
            continue
        make = Daemons()
        try:
            result = case(make)
            if isinstance(result, tuple):  # a stop: count what was sent before it; later ones are refused
                figures, _, _ = result
                after = [o for o in figures.outcomes if o.sent >= figures.faults[0]]
                answered = sum(o.status == 200 for o in after)
                figures.outcomes = [o for o in figures.outcomes if o.sent < figures.faults[0]]
                figures.faults = []
                print(row(figures, f"after SIGTERM: {answered} answered while draining, "
                                   f"{len(after) - answered} refused (listener closed)"), flush=True)
            else:
                print(row(result), flush=True)
        finally:
            make.close()


if __name__ == "__main__":
    main()
