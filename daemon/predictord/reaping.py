"""Processes that predictor code starts end with it.

The master and every model worker are child subreapers (Linux ``PR_SET_CHILD_SUBREAPER``): a process whose parent
exits is re-parented to the nearest of them instead of to init, so nothing a predictor starts (directly, through a
library, or through a probe) can slip out of the daemon's tree. A model worker ends what each version started when
that version unloads (model/children.py); the master ends the strays that reach it (orphans of a dead worker or
probe) on its next look.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
from collections.abc import Collection

import psutil

log = logging.getLogger("predictord")
PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Make this process the reaper of its orphaned descendants; whether the kernel agreed."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def end_processes(pids: Collection[int], why: str) -> int:
    """SIGKILL these processes and everything under them (they are ours: descendants of this process); how many."""
    victims: dict[int, psutil.Process] = {}
    for pid in pids:
        try:
            p = psutil.Process(pid)
            victims[pid] = p
            for child in p.children(recursive=True):
                victims[child.pid] = child
        except psutil.Error:
            continue
    for p in victims.values():
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.Error:
            continue
    if victims:
        log.info("ended %d process(es) %s: pids %s", len(victims), why, ", ".join(map(str, sorted(victims))))
    return len(victims)


def reap_strays(known: Collection[int]) -> int:
    """The master's look: end and reap its children that it did not start itself (orphans re-parented to it)."""
    try:
        children = psutil.Process(os.getpid()).children()
    except psutil.Error:
        return 0
    strays = [c.pid for c in children if c.pid not in known]
    if not strays:
        return 0
    ended = end_processes(strays, "that a predictor started and left behind")
    for pid in strays:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
    return ended
