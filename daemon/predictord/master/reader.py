"""The predictors directory, read off the master's loop.

Everything the daemon does to the predictors directory (listing it, following links, the permission guard, hashing
versions, copying snapshots, and the watcher's looks at files settling) happens in this reader's thread, never in
the master's loop. A FIFO, a huge file, a tree behind a link or a hung network mount can slow the reader; the
master goes on replacing workers, answering signals and serving what it has. The master asks for a reading
(``request``) and takes the readings that are done (``take``); ``busy_for`` says how long the current one has run.

The directory is the configured path as it resolves now, looked at again every second while watching: a release
deployed by swapping a link (``ln -sfn releases/42 current``), a folder replaced by another (the old one moved away
and a new one moved in) or one made after the daemon started is watched from then on and read whole once its files
settle, as an edited API's do. While the path is no directory (between the two halves of a swap), the APIs keep
serving what they have.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..protocol import Problem
from ..sources import ApiSource, Unreadable, name_problem, scan, snapshot
from . import permissions
from .watcher import PredictorWatcher, fingerprint_all

log = logging.getLogger("predictord.master")


@dataclass(frozen=True)
class Seen:
    """One API as the reader found it: its version and the copy to check and load, or why it was refused."""

    name: str
    origin: ApiSource  # the user's files
    version: str = ""  # its code (sources.ApiSource.identity)
    snapshot: ApiSource | None = None
    stamp: str = ""  # its files' mtimes and its folder: a touch changes this alone
    problem: Problem | None = None  # kind: name, permissions, unreadable


@dataclass(frozen=True)
class Reading:
    """What one look at the directory found (``only``: the APIs it covers; None: all of them)."""

    only: frozenset[str] | None
    directory: Path  # the directory read (the configured path, as it resolved then)
    apis: dict[str, Seen] = field(default_factory=dict)
    clashes: dict[str, tuple[Path, Path]] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)  # entries that are no API, and why


SNAPSHOT_GRACE = 10.0  # seconds a fresh copy is kept though no record names it yet
FOLLOW_EVERY = 1.0  # seconds between looks at what the configured path resolves to, while watching
Identity = tuple[int, int]  # a directory's (st_dev, st_ino)


def locate(path: Path) -> tuple[Path, Identity | None]:
    """The directory ``path`` resolves to now, and its identity (None: no directory is there, or a link loop)."""
    try:
        where = path.resolve()
    except (OSError, RuntimeError):  # RuntimeError: a link loop
        return path, None
    try:
        st = os.stat(where)
    except OSError:
        return where, None
    return where, ((st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None)


def prune_snapshots(root: Path, keep: set[str], now: float) -> None:
    """Delete the version copies in ``root`` but those in ``keep`` and those just made (the reader may have copied
    a version the master has not heard of yet)."""
    for entry in root.iterdir() if root.is_dir() else ():
        try:
            young = now - entry.stat().st_mtime < SNAPSHOT_GRACE
        except OSError:
            continue
        if entry.name not in keep and not young:
            shutil.rmtree(entry, ignore_errors=True)


class DirectoryReader:
    """The thread that reads the predictors directory for the master, and runs the watcher's debounce."""

    def __init__(self, path: Path, runtime: Path, check_permissions: bool, wake: Callable[[], None],
                 gate: Path | None = None) -> None:
        self.path = path  # as configured: a link, or under one, is followed to what it points to now
        self.directory, self._identity = locate(path)  # what it is now
        self.gate = gate  # tests: while this file exists, a reading hangs (as on a hung network mount), <= 120 s
        self.snapshots = runtime / "snapshots"
        self.check_permissions = check_permissions
        self.wake = wake  # the master's: a reading is done
        self.watcher: PredictorWatcher | None = None
        self._cond = threading.Condition()
        self._full = False
        self._names: set[str] = set()
        self._done: list[Reading] = []
        self._busy_since: float | None = None
        self._watch_debounce: float | None = None  # watching, with this debounce; None: readings on request only
        self._next_look = 0.0  # when to look at what the path resolves to again (monotonic)
        self._settling: tuple[tuple[object, ...], float] | None = None  # a new directory: (a look at it, when)
        self._gone_said = False
        self._stopped = False
        self._thread: threading.Thread | None = None

    # -- the master's side ----------------------------------------------------------------------------------------
    def request(self, only: set[str] | None = None) -> None:
        """Read these APIs again (None: the whole directory)."""
        with self._cond:
            if only is None:
                self._full = True
            else:
                self._names |= only
            self._cond.notify()

    def take(self) -> list[Reading]:
        """The readings done since the last take, oldest first."""
        with self._cond:
            done, self._done = self._done, []
        return done

    def busy_for(self, now: float) -> float:
        """Seconds the reading in progress has taken (0 when none is)."""
        since = self._busy_since
        return now - since if since is not None else 0.0

    def wait_first(self, timeout: float) -> bool:
        """Wait (at start) until a reading is done, at most ``timeout`` seconds; whether one is."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._done and time.monotonic() < deadline:
                self._cond.wait(max(0.0, deadline - time.monotonic()))
            return bool(self._done)

    def start(self, watch: bool, debounce: float) -> None:
        if watch:
            self.watch(debounce)
        self._thread = threading.Thread(target=self._run, name="predictors-reader", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._unwatch()

    def watch(self, debounce: float) -> None:
        """Watch the directory for changes, and the path for a new directory (``follow``)."""
        self._watch_debounce = debounce
        self._next_look = 0.0
        self._watch()

    def _watch(self) -> None:
        """Watch the directory the path is now (and nothing while there is none)."""
        self._unwatch()
        if self._watch_debounce is not None and self._identity is not None and not self._stopped:
            self.watcher = PredictorWatcher(self.directory, self._watch_debounce, self.poke)
            self.watcher.start()
            log.info("watching %s for changes (debounce %.2gs)", self.directory, self._watch_debounce)

    def _unwatch(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
            self.watcher = None

    def poke(self) -> None:
        """The watcher saw an event: look again when it is due."""
        with self._cond:
            self._cond.notify()

    # -- the reader's thread --------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._stopped or self._full or self._names or self._due() == 0.0):
                    self._cond.wait(self._due())
                if self._stopped:
                    return
                full, names = self._full, self._names
                self._full, self._names = False, set()
            try:
                self._busy_since = now = time.monotonic()
                if full:
                    self.follow(now, asked=True)
                elif self._watch_debounce is not None:
                    full = self.follow(now, asked=False)
                if self.watcher is not None:
                    names |= self.watcher.step()
                if full or names:  # asked while the path is no directory: only the names (none: a reading of none)
                    reading = self.read(None if full and not self._gone_said else names)
                    with self._cond:
                        self._done.append(reading)
                        self._cond.notify_all()
                    self.wake()
            except Exception:  # noqa: BLE001 - the reader must outlive anything the filesystem does
                log.exception("reading the predictors directory %s failed; trying again on the next change",
                              self.directory)
            finally:
                self._busy_since = None

    def _due(self) -> float | None:
        """Seconds until the loop has something to do (None: only when asked)."""
        due = [self.watcher.next_due()] if self.watcher is not None else []
        if self._watch_debounce is not None:
            now = time.monotonic()
            due.append(self._next_look - now)
            if self._settling is not None:
                due.append(self._settling[1] + self._watch_debounce / 2 - now)
        known = [d for d in due if d is not None]
        return max(0.0, min(known)) if known else None

    def follow(self, now: float, asked: bool) -> bool:
        """Look at what the path resolves to (every FOLLOW_EVERY seconds, and before a reading asked for): a new
        directory there is watched from now on. A reading that was asked for reads it at once; otherwise it is read
        whole once two looks at its files, ``debounce`` / 2 apart, agree (a release still being copied in is not
        loaded half-written). True: read it whole now."""
        if asked or now >= self._next_look:
            self._next_look = now + FOLLOW_EVERY
            where, identity = locate(self.path)
            if identity is None:
                if not self._gone_said:
                    leads = f" (it leads to {where})" if where != self.path else ""
                    log.warning("the predictors directory %s is not there%s; the APIs keep serving what they have "
                                "until it is", self.path, leads)
                    self._gone_said = True
                return False
            if (where, identity) != (self.directory, self._identity) or self._gone_said:
                if self._gone_said:
                    log.info("the predictors directory %s is there again (%s); reading it", self.path, where)
                else:
                    log.info("the predictors directory %s is now %s (was %s); reading it", self.path, where,
                                self.directory)
                self.directory, self._identity, self._gone_said = where, identity, False
                self._watch()
                self._settling = None if asked else (fingerprint_all(where), now)
        if self._settling is not None and self._watch_debounce is not None:
            if now < self._settling[1] + self._watch_debounce / 2:
                return False
            seen = fingerprint_all(self.directory)
            if seen != self._settling[0]:
                self._settling = (seen, now)
                return False
            self._settling = None
            return True
        return False

    def read(self, only: set[str] | None) -> Reading:
        """One look at the directory (or at the APIs in ``only``): every API's version and copy, or its refusal."""
        deadline = time.monotonic() + 120
        while self.gate is not None and self.gate.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        found = scan(self.directory)
        apis = {n: s for n, s in found.apis.items() if only is None or n in only}
        clashes = {n: c for n, c in found.clashes.items() if only is None or n in only}
        if self.watcher is not None:
            self.watcher.watch_links(found.links)
        reading = Reading(frozenset(only) if only is not None else None, self.directory, clashes=clashes,
                          notes=found.notes)
        for name, source in apis.items():
            reading.apis[name] = self.see(name, source)
        return reading

    def see(self, name: str, source: ApiSource) -> Seen:
        problem = name_problem(name)
        if problem:
            return Seen(name, source, problem=Problem(problem, str(source.code), kind="name"))
        try:
            version, stamp = source.identity()  # first: a FIFO or a device is refused as what it is
            if self.check_permissions:
                problem = permissions.check_source(source, self.directory)
                if problem:
                    return Seen(name, source, problem=Problem(problem, kind="permissions"))
            copy = snapshot(source, self.snapshots / f"{name}-{version}")
        except Unreadable as e:
            return Seen(name, source, problem=Problem(str(e), kind="unreadable"))
        except OSError as e:
            return Seen(name, source, problem=Problem(f"cannot copy its code to check it: {e}", str(source.code)))
        return Seen(name, source, version, copy, stamp=stamp)
