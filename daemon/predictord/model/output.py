"""What predictors print, into the daemon's log: per API, prefixed, a line at a time, each line bounded.

``print()`` and writes to ``sys.stdout``/``sys.stderr`` go to a stream that knows which API's code is writing (the
owner of the task or thread) and logs each line as ``API NAME: line`` on the logger ``predictord.output`` (stdout
at INFO, stderr at WARNING). Writes that bypass Python (a C library, a child process) reach file descriptors 1 and
2, which lead to a pipe that a thread reads into the same log, without an API. The daemon's own log handlers keep
the original stderr. So no predictor output is ever a raw, unbounded or non-JSON line in the daemon's log.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import sys
import threading
from collections.abc import Callable

from ..logs import redirect_handlers

log = logging.getLogger("predictord.output")
MAX_LINE = 8192  # characters of one line kept; the rest of it is counted, not logged


class Lines:
    """Splits written text into lines, bounded: a line longer than MAX_LINE is cut and its length noted."""

    def __init__(self, emit: Callable[[str], None]) -> None:
        self.emit = emit
        self.parts: list[str] = []
        self.size = 0
        self.cut = 0  # characters dropped from the current line

    def write(self, text: str) -> None:
        while text:
            head, newline, text = text.partition("\n")
            room = MAX_LINE - self.size
            if len(head) > room:
                self.cut += len(head) - room
                head = head[:room]
            if head:
                self.parts.append(head)
                self.size += len(head)
            if newline:
                self.flush()

    def flush(self) -> None:
        if not self.parts and not self.cut:
            return
        line = "".join(self.parts)
        if self.cut:
            line += f"... ({self.cut} more characters)"
        self.parts, self.size, self.cut = [], 0, 0
        self.emit(line)


class ApiOutput(io.TextIOBase):
    """``sys.stdout`` or ``sys.stderr`` of a model worker: lines go to the log, with the API that wrote them."""

    def __init__(self, kind: str, owner: Callable[[], str | None]) -> None:
        super().__init__()
        self.kind = kind
        self.owner = owner
        self.level = logging.INFO if kind == "stdout" else logging.WARNING
        self.lines: dict[str, Lines] = {}
        self.lock = threading.Lock()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        owner = self.owner() or "-"
        with self.lock:
            lines = self.lines.get(owner)
            if lines is None:
                lines = self.lines[owner] = Lines(functools.partial(self._log, owner))
            lines.write(text)
        return len(text)

    def flush(self) -> None:
        with self.lock:
            for lines in self.lines.values():
                lines.flush()

    def _log(self, owner: str, line: str) -> None:
        api = owner.split("@")[0]
        log.log(self.level, "API %s (%s): %s", api, self.kind, line, extra={"api": api, "stream": self.kind})


def capture(owner: Callable[[], str | None]) -> None:
    """In a new model worker: the daemon's handlers keep the real stderr; fds 1 and 2 and sys.stdout/sys.stderr
    lead into the log."""
    keep = os.fdopen(os.dup(2), "w", buffering=1, errors="replace")
    redirect_handlers(keep)
    read, write = os.pipe()
    os.dup2(write, 1)
    os.dup2(write, 2)
    os.close(write)
    threading.Thread(target=_pump, args=(read,), name="output", daemon=True).start()
    sys.stdout = ApiOutput("stdout", owner)
    sys.stderr = ApiOutput("stderr", owner)


def _pump(fd: int) -> None:
    """Lines written straight to fds 1 and 2 (no API can be told from them)."""
    lines = Lines(lambda line: log.warning("output (fd): %s", line, extra={"stream": "fd"}))
    with os.fdopen(fd, "rb", buffering=0) as pipe:
        while chunk := pipe.read(65536):
            lines.write(chunk.decode(errors="replace"))
    lines.flush()
