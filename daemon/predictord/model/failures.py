"""Request failures of predictor code in the log: each kind's traceback once a minute, a line for the next ones, and
past LINES a minute only a count.

A version that raises on every request (a bug that its warm-up did not reach) would otherwise log a traceback per
request: about 14 lines each, 54,000 lines in 4 s at 970 failing requests/s on the development VM, written by the
model worker that its neighbours share, and past journald's rate limit, which then drops every process's lines. A
kind is the API, the exception's type and the line of the API's own code that raised. In each window of EVERY
seconds, the first failure of a kind is logged with its traceback, the next LINES on one line each (the request id
and the message: a client's failed request is still found by its id), and the rest are counted; the count goes into
one line (with the last request's id and message) when the window ends. Every failure still reaches the master
(GET /NAME, status) and the 500 counters.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

log = logging.getLogger("predictord.model")
EVERY = 60.0  # seconds: one traceback per kind of failure in this window
LINES = 100  # failures of a kind logged on a line each per window, after its traceback
TRACEBACK, LINE, COUNT = "traceback", "line", "count"  # how a failure is logged


@dataclass
class Kind:
    since: float  # when its traceback was last logged
    lines: int = 0  # failures of this kind since, logged on a line each
    more: int = 0  # failures of this kind since, not logged
    request_id: str = ""  # the last of them
    message: str = ""


class FailureLog:
    """How each failure is logged; those not logged summed up per kind (``sweep``)."""

    def __init__(self, every: float = EVERY) -> None:
        self.every = every
        self.kinds: dict[tuple[str, str, str], Kind] = {}

    def how(self, api: str, error: BaseException, where: str, request_id: str, now: float | None = None) -> str:
        """How this failure is logged: TRACEBACK, LINE, or COUNT (only counted, for the kind's summary line)."""
        now = time.monotonic() if now is None else now
        key = (api, type(error).__name__, where)
        kind = self.kinds.get(key)
        if kind is not None and now - kind.since < self.every:
            if kind.lines < LINES:
                kind.lines += 1
                return LINE
            kind.more += 1
            kind.request_id = request_id
            kind.message = str(error)
            return COUNT
        if kind is not None:
            self._summarize(key, kind, now)
        self.kinds[key] = Kind(now)
        return TRACEBACK

    def sweep(self, now: float | None = None, every: bool = False) -> None:
        """Sum up the kinds whose window has ended (``every``: all of them, as the worker stops), and forget them."""
        now = time.monotonic() if now is None else now
        for key, kind in list(self.kinds.items()):
            if every or now - kind.since >= self.every:
                self._summarize(key, kind, now)
                del self.kinds[key]

    @staticmethod
    def _summarize(key: tuple[str, str, str], kind: Kind, now: float) -> None:
        if not kind.more:
            return
        api, error, where = key
        at = f" at {where}" if where else ""
        log.error("API %s: %d more %s failed with %s%s in the last %.0fs, not logged one by one (the last: "
                  "request %s, %s: %s)", api, kind.more, "request" if kind.more == 1 else "requests", error, at,
                  now - kind.since, kind.request_id, error, kind.message[:200])
