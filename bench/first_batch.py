"""What a predictor's first call at each batch size costs against its later ones: why a batching warm-up runs every
size it may see (loader.warm_up). In this process, torch with one thread, as a model worker of `make bench` runs it.

    .venv/bin/python bench/first_batch.py [--sizes 1,2,3,4,8,16,32] [--rounds 3]

Loads predictors/mlp (256 -> 1024 -> 10) and calls predict() with a batch of each size in turn, ``--rounds`` times;
prints microseconds per call, the first round being the cold one.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from run import MLP_BODY  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1,2,3,4,8,16,32")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    spec = importlib.util.spec_from_file_location("mlp", REPO / "predictors" / "mlp" / "predictor.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    predictor = module.PythonPredictor({"seed": 0}, "cpu")
    payload = json.loads(MLP_BODY)
    sizes = [int(n) for n in args.sizes.split(",")]
    print("| round | " + " | ".join(f"batch of {n}" for n in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    for r in range(1, args.rounds + 1):
        took = []
        for n in sizes:
            started = time.perf_counter()
            predictor.predict([payload] * n)
            took.append(f"{(time.perf_counter() - started) * 1e6:,.0f} us")
        print(f"| {r} | " + " | ".join(took) + " |")


if __name__ == "__main__":
    main()
