"""Validate a predictor in a throwaway process, so broken code never reaches the master or a model worker.

Run as ``python -m predictord.probe PATH [--init] [--home DIR]``: it imports the predictor, checks its class and
signature (and with ``--init`` constructs it on the CPU), then prints one JSON line with the outcome. The caller
enforces the deadline by killing the process. It loads the way a model worker does (the same namespace, off the main
thread), so what was checked is what runs; ``--home`` names the user's folder of a snapshot, for its messages.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from . import envs
from .config import ConfigError, load_api_settings
from .loader import LoadError, instantiate, load_class, warm_up
from .reaping import end_processes
from .sources import source_for

CHECK_BATCH = 2  # the largest warm-up batch `predictord check` runs (on the CPU)


def probe(path: Path, init: bool, home: Path | None = None) -> dict[str, Any]:
    """The outcome of loading a predictor, as data (loaded in a thread, as a model worker loads it)."""
    result: dict[str, Any] = {}
    loader = threading.Thread(target=lambda: result.update(_probe(path, init, home)), name="load")
    loader.start()
    loader.join()
    return result


def _probe(path: Path, init: bool, home: Path | None) -> dict[str, Any]:
    source = source_for(path, home)
    started = time.monotonic()
    try:
        settings = load_api_settings(source.settings)
    except ConfigError as e:
        return {"ok": False, "name": source.name, "error": {"message": e.detail(source.settings),  # its file apart
                                                             "file": str(source.settings), "line": None}}
    try:
        imported = load_class(source, "check")
        if init:
            serving = settings.serving
            # On the CPU, not the device it will serve on: a batch of 2 checks the batching contract; the larger
            # sizes (and whether their memory fits) are the daemon's load to find out, on that device.
            warm_up(imported, instantiate(imported, dict(settings.config), "cpu"), serving.warmup,
                    min(serving.max_batch_size, CHECK_BATCH))
    except LoadError as e:
        return {"ok": False, "name": source.name, "error": e.as_dict()}
    return {"ok": True, "name": source.name, "signature": imported.signature.as_dict(),
            "seconds": round(time.monotonic() - started, 3)}


def start(path: Path, init: bool, stderr: Any = subprocess.PIPE, home: Path | None = None,
          env: Path | None = None) -> subprocess.Popen[bytes]:
    """Start a probe process (with the Python of the environment ``env``, when the predictor has one); its stdout
    carries the JSON outcome, its stderr whatever the predictor printed."""
    python = [str(envs.python_of(env)), "-s"] if env is not None else [sys.executable]
    args = [*python, "-m", "predictord.probe", str(path)] + (["--init"] if init else [])
    args += ["--home", str(home)] if home is not None else []
    environ = dict(envs.child_environ(env) if env is not None else os.environ, CUDA_VISIBLE_DEVICES="",
                   OMP_NUM_THREADS="1")
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL, env=environ)


def end(proc: subprocess.Popen[bytes]) -> None:
    """Stop a probe (if it still runs) and reap it; what it started is the master's to end (it is a subreaper)."""
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def outcome(path: Path, stdout: bytes, stderr: bytes, returncode: int | None) -> dict[str, Any]:
    """Read a finished probe's outcome; a probe that died without one is a load error too."""
    for line in reversed(stdout.decode(errors="replace").splitlines()):
        if line.startswith("{"):
            try:
                result: dict[str, Any] = json.loads(line)
                return result
            except json.JSONDecodeError:
                break
    tail = stderr.decode(errors="replace").strip().splitlines()[-3:]
    how = f"exit status {returncode}" if returncode and returncode > 0 else f"signal {-(returncode or 0)}"
    message = f"loading it killed the process ({how})" + (": " + " | ".join(tail) if tail else "")
    return {"ok": False, "name": source_for(path).name, "error": {"message": message, "file": str(path), "line": None}}


def run(path: Path, init: bool, timeout: float, env: Path | None = None) -> dict[str, Any]:
    """Probe and wait, killing the probe at the deadline."""
    proc = start(path, init, env=env)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # The probe and what it started: a child holding the probe's stdout would keep communicate() waiting.
        end_processes([proc.pid], "that a check past its deadline started")
        proc.communicate()
        doing = "__init__" if init else "importing it"
        return {"ok": False, "name": source_for(path).name,
                "error": {"message": f"{doing} took longer than the load deadline ({timeout:g}s); "
                                     "raise [predictors] load_timeout if it is just slow",
                          "file": str(source_for(path).code), "line": None}}
    return outcome(path, stdout, stderr, proc.returncode)


def main() -> None:
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever the predictor prints goes to stderr, not into our answer
    args = sys.argv[2:]
    home = Path(args[args.index("--home") + 1]) if "--home" in args else None
    result = probe(Path(sys.argv[1]), "--init" in args, home)
    out.write(json.dumps(result) + "\n")
    out.flush()
    end_processes([c.pid for c in psutil.Process().children()], "that the predictor started while it was checked")
    os._exit(0)


if __name__ == "__main__":
    main()
