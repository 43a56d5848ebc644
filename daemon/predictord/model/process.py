"""Setting up a model worker process after the fork: its device and threads, its signals, word of how it ends (for
the master to blame the right API), its predictors' output into the log, and the processes they start.

A fatal signal (segfault, abort) writes every thread's traceback (the crashing one first) to a file; ``os._exit``
called from predictor code notes its API in the scoreboard (where HTTP workers read it at once) and its file and
line in another file. The process is a child subreaper, and an audit hook notes who starts a process (children.py).
"""

from __future__ import annotations

import faulthandler
import gc
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import NoReturn

from .. import envs, logs
from ..devices import Device
from ..reaping import become_subreaper
from ..scoreboard import Scoreboard
from . import output
from .children import Children
from .loaded import owner

log = logging.getLogger("predictord.model")


def crash_files(runtime: Path, row: int) -> tuple[Path, Path]:
    """Where a model worker process leaves word of how it ended: the fatal signal's traceback (faulthandler), and
    which API's code called os._exit, from which file and line."""
    return runtime / f"fault-{row}.log", runtime / f"exit-{row}.json"


def prepare_process(slot: int, device: Device, threads: int, board: Scoreboard, row: int, runtime: Path) -> Children:
    """Everything a forked model worker sets up before it serves; returns its children's tracker."""
    if device.env and not device.fresh:  # a fork of the master: put its environment's packages first
        envs.activate(Path(device.env))
    os.environ["CUDA_VISIBLE_DEVICES"] = "" if device.kind == "cpu" else str(device.index)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ["PREDICTORD_WORKER"] = f"{slot}:{device.label}"
    logs.set_role(f"model{slot}:{device.label}")
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the master orchestrates shutdown
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    gc.freeze()  # what the master preloaded (torch) never costs a collection here: unloads stay short
    watch_for_crashes(board, row, runtime)
    output.capture(owner)
    if not become_subreaper():
        log.warning("model worker %s: not a child subreaper; processes whose parent exits escape it", device.label)
    children = Children(owner)
    sys.addaudithook(children.audit)
    return children


def watch_for_crashes(board: Scoreboard, row: int, runtime: Path) -> None:
    """The fault file and the os._exit hook (see the module's docstring)."""
    from .loaded import CURRENT

    fault, exit_file = crash_files(runtime, row)
    faulthandler.enable(fault.open("w"), all_threads=True)
    real_exit = os._exit

    def _exit(code: int) -> NoReturn:
        api = CURRENT.get()
        if api is not None:
            board.set_exit(row, api.slot, code)
            file, line = None, None
            frame = sys._getframe(1)
            mine = api.namespace.source.own_files() if api.namespace is not None else None
            while frame is not None and mine is not None:
                if mine(frame.f_code.co_filename):
                    file, line = frame.f_code.co_filename, frame.f_lineno
                    break
                frame = frame.f_back  # type: ignore[assignment]
            try:
                exit_file.write_text(json.dumps({"api": api.name, "code": code, "file": file, "line": line}))
            except OSError:
                pass
        real_exit(code)

    os._exit = _exit  # type: ignore[assignment]  # the hook keeps os._exit's signature
