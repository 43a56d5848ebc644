"""The limit on open files, which bounds how many connections an HTTP worker can hold.

Each client connection is a file descriptor. systemd starts a service with a soft limit of 1024 (and a hard limit of
524288), and systemd.exec(5) asks programs that can use more to raise the soft limit themselves: the master does at
its start, and every worker inherits it. Where even the hard limit is low (a container, a shell's ``ulimit -Hn``), an
HTTP worker at the limit would meet libuv's answer to running out, which accepts each new connection and closes it
unanswered (its "EMFILE trick"): the client sees an empty reply and the log says nothing. So an HTTP worker stops
short of the limit: past ``connections_for(limit)`` connections, a new one gets a 503 with Retry-After and is closed,
and the log says why (http/guard.py).
"""

from __future__ import annotations

import resource

ROOMY = 8192  # an open-file limit below this is logged at start: a burst of clients may reach it


def raise_to_hard() -> tuple[int, int]:
    """Raise this process's soft limit on open files to its hard limit; (the soft limit before, the one now)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == resource.RLIM_INFINITY:  # Linux caps it at fs.nr_open anyway
        return soft, soft
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):  # refused (a sandbox): keep the soft limit
            return soft, soft
        return soft, hard
    return soft, soft


def connections_for(limit: int) -> int:
    """Connections an HTTP worker may hold under an open-file limit: what is left after the worker's own files (its
    listener, its links to the model workers, shared body files, logs), a fixed part and an eighth of the limit."""
    return max(8, limit - 64 - limit // 8)


def current() -> int:
    """This process's soft limit on open files (no limit: as many as Linux's default fs.nr_open)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return soft if soft != resource.RLIM_INFINITY else 2**20
