"""Why a model worker died, and whose code ended it: read what the process left behind (its row of job marks in
the scoreboard, the traceback faulthandler wrote on a fatal signal, the note its os._exit hook wrote) and decide
which API to blame, and how sure that is.

Blame, most certain first: the daemon ended it itself (a hung predict() names its API); an API's code called
``os._exit``; a fatal signal's traceback runs through one API's files; the process exited on its own while exactly
one API was running ``predict()``. A SIGKILL from outside (the OOM killer, an operator) names what was running but
blames nobody: that evidence is too weak to quarantine an API on.
"""

from __future__ import annotations

import json
import os
import re
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..scoreboard import Scoreboard

_FRAME = re.compile(r'^\s*File "(?P<file>.+)", line (?P<line>\d+) in (?P<func>.+)$')


@dataclass(frozen=True)
class Autopsy:
    """How one model worker process ended."""

    culprit: str | None = None  # the API whose code ended it (None: nobody, or not known)
    why: str = ""  # what the culprit did, e.g. "called os._exit(3)"
    file: str | None = None  # where in the culprit's files, when known
    line: int | None = None
    running: dict[str, int] = field(default_factory=dict)  # APIs with predict() running at the end, and how many

    def text(self) -> str:
        """The blame in words, to append to the exit's description (empty when there is nothing to say)."""
        at = f" at {self.file}:{self.line}" if self.file and self.line else f" in {self.file}" if self.file else ""
        if self.culprit is not None:
            return f"API {self.culprit} {self.why}{at}"
        if self.running:
            listed = ", ".join(f"{name} ({n})" for name, n in sorted(self.running.items()))
            return f"it was running predict() of {listed}"
        return ""


def fault_frames(text: str) -> list[tuple[str, int, str]]:
    """The frames of the thread that took the fatal signal, innermost first, from faulthandler's output."""
    frames: list[tuple[str, int, str]] = []
    current = False
    for line in text.splitlines():
        if line.startswith("Current thread") or line.startswith("Stack (most recent call first)"):
            current, frames = True, []
            continue
        if current:
            m = _FRAME.match(line)
            if m:
                frames.append((m["file"], int(m["line"]), m["func"].strip()))
            elif frames:
                break
    return frames


def examine(board: Scoreboard, row: int, status: int | None, files: tuple[Path, Path], names: Mapping[int, str],
            api_of: Callable[[str], str | None], hung: str | None) -> Autopsy:
    """Read what a dead worker left behind (and remove its files). ``names``: API column -> name; ``api_of``: the
    API a source file belongs to; ``hung``: the API whose predict() hung, when the daemon killed it for that."""
    fault_path, exit_path = files
    slots, _, _ = board.running(row)
    running = {names.get(s, f"#{s}"): n for s, n in slots.items()}
    fault = _read(fault_path)
    note = _read(exit_path)
    if hung is not None:
        return Autopsy(hung, "hung in predict() (the daemon ended the worker)", running=running)
    exited = board.exit_of(row)
    if exited is not None:
        api_slot, code = exited
        try:
            detail = json.loads(note) if note else {}
        except ValueError:
            detail = {}
        name = detail.get("api") or names.get(api_slot)
        if name is not None:
            return Autopsy(name, f"called os._exit({code})", detail.get("file"), detail.get("line"), running)
    if status is not None and os.WIFSIGNALED(status) and fault:
        for file, line, func in fault_frames(fault):
            name = api_of(file)
            if name is not None:
                sig = signal.Signals(os.WTERMSIG(status)).name
                return Autopsy(name, f"crashed the process ({sig}) in {func}()", file, line, running)
    killed_from_outside = status is not None and os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    if len(running) == 1 and not killed_from_outside:
        (name,) = running
        return Autopsy(name, "was the only API in predict() when the process ended", running=running)
    return Autopsy(running=running)


def _read(path: Path) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    path.unlink(missing_ok=True)
    return text
