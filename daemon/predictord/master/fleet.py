"""The model worker processes as the master sees them: spawning, control messages, exit statuses."""

from __future__ import annotations

import logging
import os
import pickle
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..devices import Device
from ..model.worker import ModelWorker
from ..protocol import CONTROL, FrameReader, control
from ..scoreboard import Scoreboard

log = logging.getLogger("predictord.master")

EXIT_CODES = {0: "exited cleanly", 1: "crashed (see its traceback above)"}
MAX_BACKOFF = 10.0


def describe_exit(status: int | None) -> str:
    """An exit status in words, naming the likely cause."""
    if status is None:
        return "exited (status unknown)"
    if os.WIFSIGNALED(status):
        name = exit_cause(status)
        if os.WTERMSIG(status) == signal.SIGKILL:
            return f"was killed by {name} (out of memory, or replaced by the daemon)"
        return f"was killed by {name}"
    code = os.WEXITSTATUS(status)
    return EXIT_CODES.get(code, f"exited with status {code} (did a predictor call exit or os._exit?)")


def exit_cause(status: int | None) -> str:
    """A short label for an exit status, for metrics: SIGKILL, exit 3, unknown."""
    if status is None:
        return "unknown"
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return signal.Signals(sig).name if sig in signal.Signals.__members__.values() else f"signal {sig}"
    return f"exit {os.WEXITSTATUS(status)}"


@dataclass
class ModelWorkerHandle:
    """A running model worker: its process, its control channel, and what it has loaded."""

    slot: int
    device: Device
    pid: int
    ctl: socket.socket
    socket_path: str
    spawned_at: float
    started_at: float = field(default_factory=time.time)  # wall clock, for uptime in status
    up: bool = False  # it has said "started"
    stopping: bool = False
    kill_reason: str = ""  # why the master ended it: heartbeat, load_timeout, memory, retired
    loaded: dict[str, str] = field(default_factory=dict)  # API -> version serving
    loading: dict[str, tuple[str, float]] = field(default_factory=dict)  # API -> (version, deadline)
    unloading: set[str] = field(default_factory=set)
    threads: dict[str, int] = field(default_factory=dict)
    inbox: list[dict[str, Any]] = field(default_factory=list)  # control messages read, not yet handled

    def __post_init__(self) -> None:
        self.reader = FrameReader(self._frame)

    def _frame(self, kind: int, job_id: int, payload: memoryview) -> None:
        if kind == CONTROL:
            self.inbox.append(pickle.loads(payload))

    def send(self, message: dict[str, Any]) -> bool:
        try:
            self.ctl.sendall(control(message))
            return True
        except OSError:
            return False


class Fleet:
    """Spawns model workers in their slots and reads what they say."""

    def __init__(self, scoreboard: Scoreboard, runtime: Path, torch_threads: int,
                 close_in_child: Callable[[], None]) -> None:
        self.scoreboard = scoreboard
        self.runtime = runtime
        self.torch_threads = torch_threads
        self.close_in_child = close_in_child
        self.workers: dict[int, ModelWorkerHandle] = {}
        self.generation = 0
        self.deaths: dict[int, list[float]] = {}  # slot -> recent death times, for back-off

    def spawn(self, slot: int, device: Device) -> ModelWorkerHandle:
        """Fork a model worker into ``slot``; it reports "started" on its control channel when it listens."""
        self.generation += 1
        path = str(self.runtime / f"model-{slot}-{self.generation}.sock")
        ours, theirs = socket.socketpair()
        pid = os.fork()
        if pid == 0:  # the child: drop the master's channels and signal handling, then become a model worker
            ours.close()
            self.close_in_child()
            for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD,
                        signal.SIGTTIN, signal.SIGTTOU, signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH):
                signal.signal(sig, signal.SIG_DFL)
            ModelWorker(slot, device, theirs, self.scoreboard, path, self.torch_threads).run()
        theirs.close()
        ours.setblocking(True)
        handle = ModelWorkerHandle(slot, device, pid, ours, path, time.monotonic())
        self.workers[slot] = handle
        self.scoreboard.beat(slot)
        log.info("spawned model worker %d (%s) pid %d", slot, device.label, pid)
        return handle

    def read(self, handle: ModelWorkerHandle) -> list[dict[str, Any]]:
        """Messages waiting on a worker's control channel ([] and EOF look alike; reaping tells them apart)."""
        try:
            data = handle.ctl.recv(65536, socket.MSG_DONTWAIT)
        except OSError:  # nothing waiting (BlockingIOError) or the worker is gone
            data = b""
        if data:
            handle.reader.feed(data)
        messages, handle.inbox = handle.inbox, []
        return messages

    def backoff(self, slot: int) -> float:
        """Seconds to wait before respawning a slot that keeps dying (0 for the first death in a minute)."""
        now = time.monotonic()
        recent = [t for t in self.deaths.get(slot, []) if now - t < 60] + [now]
        self.deaths[slot] = recent
        return 0.0 if len(recent) <= 1 else min(MAX_BACKOFF, 0.25 * 2 ** (len(recent) - 2))

    def reap(self) -> list[tuple[ModelWorkerHandle, int | None]]:
        """Model workers that have exited, with their wait status (None when another waitpid got it first)."""
        gone = []
        for slot, handle in list(self.workers.items()):
            status: int | None
            try:
                pid, status = os.waitpid(handle.pid, os.WNOHANG)
            except ChildProcessError:
                pid, status = handle.pid, None
            if pid:
                del self.workers[slot]
                handle.ctl.close()
                try:
                    os.unlink(handle.socket_path)
                except OSError:
                    pass
                gone.append((handle, status))
        return gone

    def kill(self, handle: ModelWorkerHandle, sig: int) -> None:
        try:
            os.kill(handle.pid, sig)
        except ProcessLookupError:
            pass

    def stop_all(self, timeout: float) -> None:
        """SIGTERM every model worker, wait for them to drain, SIGKILL what is left."""
        for handle in self.workers.values():
            handle.stopping = True
            self.kill(handle, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.workers and time.monotonic() < deadline:
            for handle, status in self.reap():
                log.info("model worker %d (%s) pid %d stopped: %s", handle.slot, handle.device.label, handle.pid,
                         describe_exit(status))
            time.sleep(0.05)
        for handle in list(self.workers.values()):
            log.warning("model worker %d pid %d did not stop in %.0fs; killing it", handle.slot, handle.pid, timeout)
            self.kill(handle, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while self.workers and time.monotonic() < deadline:
            self.reap()
            time.sleep(0.01)
