"""An API's own threads for its predictor code, handed work more cheaply than ``loop.run_in_executor``.

``run_in_executor`` costs a concurrent Future with its condition, a chained asyncio Future and one write to the
loop's self-pipe per call: about 100 us of CPU a call at one caller and 40 us at eight on the development VM
(``bench/hand_off.py``). Here a call is an asyncio Future and a ``SimpleQueue.put``; a thread that finishes puts its
result on a list and wakes the loop only when no wake is pending, so results that finish close together come back
in one loop callback (71-75 and 12 us a call). Threads are daemons, so a predict that never returns does not
hold up the worker's exit (the master replaces a worker whose job hangs).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from queue import SimpleQueue
from typing import Any

_STOP = None


class Lanes:
    """``threads`` long-lived threads that run one API's calls in the order given."""

    def __init__(self, loop: asyncio.AbstractEventLoop, threads: int, name: str) -> None:
        self.loop = loop
        self.threads = threads
        self.name = name
        self.calls: SimpleQueue[tuple[asyncio.Future[Any], Callable[..., Any], tuple[Any, ...]] | None] = SimpleQueue()
        self.lock = threading.Lock()
        self.done: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        self.wake_pending = False
        self.started = 0
        self.stopped = False

    def run(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """Call ``fn(*args)`` in one of the threads; the future (of this loop) gets its result or its exception."""
        if self.stopped:
            raise RuntimeError(f"the threads of {self.name} are shut down")
        future = self.loop.create_future()
        self.calls.put((future, fn, args))
        if self.started < self.threads:  # one more thread per call until there are `threads` (as an executor does)
            self.started += 1
            threading.Thread(target=self._work, name=f"{self.name}-{self.started}", daemon=True).start()
        return future

    def shutdown(self) -> None:
        """Each thread ends after the calls queued before this one (those still run; nothing new is taken)."""
        self.stopped = True
        for _ in range(self.started):
            self.calls.put(_STOP)

    def _work(self) -> None:
        get = self.calls.get
        while (call := get()) is not _STOP:
            self._call(*call)
            del call  # hold nothing of a finished call while waiting for the next

    def _call(self, future: asyncio.Future[Any], fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        error: BaseException | None = None
        result: Any = None
        try:
            result = fn(*args)
        except BaseException as e:  # noqa: BLE001 - predictor code: its failure goes to the caller, as in executors
            error = e
        with self.lock:
            self.done.append((future, result, error))
            if self.wake_pending:
                return
            self.wake_pending = True
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the loop is closed: the worker is ending, nobody waits for the answer
            pass

    def _deliver(self) -> None:
        """On the loop: hand every finished call's result to its future."""
        with self.lock:
            done, self.done = self.done, []
            self.wake_pending = False
        for future, result, error in done:
            if future.cancelled():
                continue
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)
