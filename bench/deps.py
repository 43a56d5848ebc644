"""Time to serve a predictor that declares requirements: from the file's save to its first answer, with 3 small
requirements from a local wheelhouse, cold (its environment is built) and warm (an environment with the same
requirements exists), with pip and with uv. Real daemon on loopback; no index, no network.

    .venv/bin/python bench/deps.py [--reps 3]

Prints one Markdown table for BENCHMARKS.md ("Dependencies").
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))
from harness import Daemon, wait_until  # noqa: E402
from wheels import make_wheel  # noqa: E402

PREDICTOR = '''
import alpha
import beta
import gamma


class PythonPredictor:
    def predict(self, payload):
        return {"versions": [alpha.VERSION, beta.VERSION, gamma.VERSION]}
'''
REQUIREMENTS = "alpha==1.0\nbeta==1.0\ngamma==1.0\n"


def serve_time(d: Daemon, name: str, requirements: str) -> float:
    """Seconds from writing the predictor's files to its first 200."""
    (d.predictors / f".{name}").mkdir()
    (d.predictors / f".{name}" / "predictor.py").write_text(PREDICTOR)
    (d.predictors / f".{name}" / "requirements.txt").write_text(requirements)
    start = time.monotonic()
    (d.predictors / f".{name}").rename(d.predictors / name)  # mv in: the documented atomic deploy
    wait_until(lambda: d.post(f"/{name}", json={}).status_code == 200, 300, f"{name} to serve")
    return time.monotonic() - start


def install_seconds(envs: Path) -> list[float]:
    return [json.loads(p.read_text())["seconds"] for p in envs.glob("*/env.json")]


def run(installer: str, reps: int, root: Path, house: Path) -> tuple[list[float], list[float], list[float]]:
    envs = root / f"envs-{installer}"
    d = Daemon(root / f"d-{installer}", f'[predictors]\ndebounce = 0.2\nfind_links = ["{house}"]\nno_index = true\n'
                                        f'installer = "{installer}"\nenvs_dir = "{envs}"\n')
    d.start()
    try:
        d.wait_settled()
        cold, warm = [], []
        for rep in range(reps):
            requirements = f"# rep {rep}: a new environment\n" + REQUIREMENTS
            cold.append(serve_time(d, f"cold{rep}", requirements))
            warm.append(serve_time(d, f"warm{rep}", requirements))  # identical requirements: the same one
        return cold, warm, install_seconds(envs)
    finally:
        d.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="predictord-deps-"))
    house = root / "wheelhouse"
    for name in ("alpha", "beta", "gamma"):
        make_wheel(house, name, "1.0")
    print(f"predictord deps bench, {time.strftime('%Y-%m-%d %H:%M')}; `{' '.join(sys.argv)}`; 3 requirements from a "
          "local wheelhouse; time from `mv` of the folder into the predictors directory to its first 200")
    print()
    print("| installer | cold: to first answer | warm: to first answer | the install alone (env.json) |")
    print("|---|---|---|---|")
    try:
        for installer in ("pip", "uv"):
            cold, warm, installs = run(installer, args.reps, root, house)
            print(f"| {installer} | {statistics.median(cold):.2f} s (runs {', '.join(f'{c:.2f}' for c in cold)}) | "
                  f"{statistics.median(warm):.2f} s (runs {', '.join(f'{w:.2f}' for w in warm)}) | "
                  f"{statistics.median(installs):.2f} s |", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
