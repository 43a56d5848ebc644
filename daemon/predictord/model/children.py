"""The processes the predictors of one model worker start, and which version started each, so that they end with
that version (on unload, on delete) and all of them with the worker.

The worker is a child subreaper (reaping.py), so what its predictors start stays under it even when a middle
process exits. Who started what: an audit hook notes every process creation (``subprocess.Popen``, ``os.fork``,
``os.posix_spawn``, ``os.system``...) with the version whose code made it (the API whose code runs in that task or
thread: ``owner``), and each look pairs the new descendants with those notes in order of creation; a child's own
children are its owner's. A process nobody can be paired with ends with the worker.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

import psutil

from ..reaping import end_processes

SPAWNS = frozenset({"subprocess.Popen", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.system",
                    "pty.spawn"})


class Children:
    """This worker's descendants, by the version that started them."""

    def __init__(self, owner: Callable[[], str | None]) -> None:
        self.owner = owner  # the version whose code runs in the calling task or thread, if any
        self.me = os.getpid()
        self.spawned: list[str] = []  # owners of the creations noted since the last look, oldest first
        self.owners: dict[int, str] = {}  # pid -> the version that started it ("" when unknown)
        self.parents: dict[int, int] = {}  # pid -> its parent when first seen (to tell adopted orphans)
        self.ended: set[int] = set()  # pids we killed and still have to reap
        self.lock = threading.Lock()

    def audit(self, event: str, args: Any) -> None:
        """sys.addaudithook's callback: it runs on every audited event, so it does nothing else first."""
        if event in SPAWNS and os.getpid() == self.me:
            owner = self.owner() or ""
            with self.lock:
                self.spawned.append(owner)

    def look(self, force: bool = False) -> None:
        """Pair new descendants with the creations noted (cheap when nothing was created since the last look)."""
        with self.lock:
            spawned, self.spawned = self.spawned, []
        if not spawned and not force and not self.owners:
            return
        try:
            found = psutil.Process(self.me).children(recursive=True)
        except psutil.Error:
            return
        new = []
        for p in found:
            if p.pid not in self.owners:
                try:
                    new.append((p.create_time(), p.pid, p.ppid()))
                except psutil.Error:
                    continue
        for _, pid, ppid in sorted(new):
            parent = self.owners.get(ppid)
            self.owners[pid] = parent if parent is not None else (spawned.pop(0) if spawned else "")
            self.parents[pid] = ppid
        alive = {p.pid for p in found}
        self.owners = {pid: o for pid, o in self.owners.items() if pid in alive}
        self.parents = {pid: pp for pid, pp in self.parents.items() if pid in alive}
        self.reap(found)

    def reap(self, found: list[psutil.Process]) -> None:
        """Reap what we killed, and orphans re-parented to us that have exited (nobody else will); a predictor's
        own children are left for its Popen to reap."""
        for p in found:
            try:
                adopted = p.ppid() == self.me and self.parents.get(p.pid, self.me) != self.me
                if adopted and p.status() == psutil.STATUS_ZOMBIE:
                    self.ended.add(p.pid)
            except psutil.Error:
                continue
        for pid in list(self.ended):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self.ended.discard(pid)

    def end(self, owner: str) -> int:
        """End every process a version started (its unload); how many."""
        self.look(force=True)
        pids = [pid for pid, o in self.owners.items() if o == owner]
        return self._end(pids, f"that {owner} started")

    def end_all(self) -> int:
        """End every descendant (the worker is stopping)."""
        self.look(force=True)
        return self._end(list(self.owners), "that this worker's predictors started")

    def _end(self, pids: list[int], why: str) -> int:
        if not pids:
            return 0
        ended = end_processes(pids, why)
        self.ended |= {pid for pid in pids if self.parents.get(pid) == self.me}
        deadline = time.monotonic() + 1.0
        while self.ended and time.monotonic() < deadline:
            self.reap([])
            time.sleep(0.01)
        return ended
