"""File events in the predictors directory, turned into "API NAME changed" once its files have settled.

watchdog's thread only records which API an event touched and wakes the reader; the reader's thread (reader.py)
calls ``step()``, so the looks at the files never run in the master's loop. An API is handed back when it has had
no event for ``debounce`` seconds *and* two looks at its files' sizes and mtimes (after half the quiet period, and
at its end) agree. So an editor's atomic save (a move onto the file), vim's delete-then-write, or a ``cp -r`` of
large weights still being written never load a half-written API, and a delete takes effect only after the quiet
period (vim deletes briefly). The targets of linked predictors are watched too.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from ..sources import FOLDER_ENTRY, MAX_ENTRIES, is_ignored

log = logging.getLogger("predictord.master")

IGNORED_EVENTS = ("opened", "closed_no_write")  # reads (ours included) change nothing
Fingerprint = tuple[tuple[str, int, int], ...]


def api_of(directory: Path, path: str) -> str | None:
    """The API a path belongs to (NAME.py, NAME.toml, anything under NAME/), or None."""
    try:
        parts = Path(path).relative_to(directory).parts
    except ValueError:
        return None
    if not parts or any(is_ignored(p) for p in parts):
        return None
    if len(parts) == 1:
        stem, dot, suffix = parts[0].rpartition(".")
        if dot and suffix in ("py", "toml"):
            return stem
        if dot:
            return None  # some other file beside the predictors (notes.txt): not an API
    return parts[0]


def fingerprint(directory: Path, name: str) -> Fingerprint:
    """Size and mtime of every file an API is made of (empty when it is gone)."""
    seen: list[tuple[str, int, int]] = []
    for candidate in (directory / f"{name}.py", directory / f"{name}.toml"):
        try:
            st = candidate.stat()
            seen.append((candidate.name, st.st_size, st.st_mtime_ns))
        except OSError:
            pass
    folder = directory / name
    if folder.is_dir() and os.path.lexists(folder / FOLDER_ENTRY):  # a predictor: never a folder that is none
        for root, dirs, files in os.walk(folder):  # never into linked folders; at most MAX_ENTRIES
            dirs[:] = [d for d in dirs if not is_ignored(d)]
            if len(seen) > MAX_ENTRIES:
                break
            for f in files:
                if is_ignored(f):
                    continue
                p = os.path.join(root, f)
                try:
                    st = os.stat(p)
                except OSError:
                    continue
                seen.append((os.path.relpath(p, directory), st.st_size, st.st_mtime_ns))
    return tuple(sorted(seen))


def fingerprint_all(directory: Path) -> tuple[tuple[str, Fingerprint], ...]:
    """``fingerprint`` of every API in the directory (a new directory's files settle as one API's do)."""
    try:
        entries = sorted(os.listdir(directory))[:MAX_ENTRIES]
    except OSError:
        return ()
    names = {name for e in entries if (name := api_of(directory, str(directory / e))) is not None}
    return tuple((name, fingerprint(directory, name)) for name in sorted(names))


class PredictorWatcher(FileSystemEventHandler):
    """Per-API debounce of the watched directory's events."""

    def __init__(self, directory: Path, debounce: float, wake: Callable[[], None]) -> None:
        self.directory = directory
        self.debounce = debounce
        self.wake = wake
        self._lock = threading.Lock()
        self._pending: dict[str, float] = {}  # API -> time of its last event or look
        self._looks: dict[str, tuple[Fingerprint, float]] = {}  # API -> (what a look saw, when)
        self._observer: Observer | None = None  # type: ignore[valid-type]
        self._links: dict[Path, str] = {}  # a linked predictor's target -> its API
        self._watches: dict[Path, object] = {}  # a target -> its watchdog watch

    # -- watchdog's thread ----------------------------------------------------------------------------------------
    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in IGNORED_EVENTS:
            return
        for path in (event.src_path, getattr(event, "dest_path", "")):
            if path:
                self.touch(os.fsdecode(path))

    def touch(self, path: str) -> None:
        name = api_of(self.directory, path) or self._linked(path)
        if name is None:
            return
        with self._lock:
            first = name not in self._pending
            self._pending[name] = time.monotonic()
            self._looks.pop(name, None)  # a new event: the files must settle again
        if first:
            self.wake()

    def _linked(self, path: str) -> str | None:
        """The API whose link target holds ``path`` (the target folder, or the target file itself)."""
        p = Path(path)
        for target, name in list(self._links.items()):
            if p == target or (target in p.parents and not any(is_ignored(x) for x in p.relative_to(target).parts)):
                return name
        return None

    def watch_links(self, links: dict[Path, str]) -> None:
        """Watch the targets of linked predictors too (inotify sees a link, not what it points to), so that a
        linked predictor reloads when its target changes; stop watching targets no longer linked."""
        if links == self._links:
            return
        self._links = dict(links)
        observer = self._observer
        if observer is None:
            return
        for target in set(self._watches) - set(links):
            observer.unschedule(self._watches.pop(target))
        for target in set(links) - set(self._watches):
            if not (target.is_dir() or target.is_file()):
                continue  # a link to a device, a FIFO...: refused, and nothing to watch
            try:
                where = target if target.is_dir() else target.parent
                self._watches[target] = observer.schedule(self, str(where), recursive=target.is_dir())
            except OSError as e:
                log.warning("cannot watch %s, the target of a linked predictor (%s); it reloads on SIGHUP only",
                            target, e)

    # -- the reader's thread --------------------------------------------------------------------------------------
    def _due(self, name: str) -> float:
        """When this API's next look is due (monotonic time)."""
        last = self._pending[name]
        look = self._looks.get(name)
        if look is None:
            return last + self.debounce / 2
        return max(last + self.debounce, look[1] + self.debounce / 2)

    def step(self, now: float | None = None) -> set[str]:
        """APIs whose files have settled since their last event; each is handed back once."""
        now = time.monotonic() if now is None else now
        settled: set[str] = set()
        with self._lock:
            due = [n for n in self._pending if self._due(n) <= now]
        for name in due:
            seen = fingerprint(self.directory, name)
            with self._lock:
                if name not in self._pending or self._due(name) > now:
                    continue  # an event came in meanwhile
                look = self._looks.get(name)
                if look is not None and look[0] == seen:
                    del self._pending[name], self._looks[name]
                    settled.add(name)
                else:  # the first look, or the files changed between looks: look again
                    self._looks[name] = (seen, now)
        return settled

    def next_due(self) -> float | None:
        """Seconds until the next step has something to do (None: nothing pending)."""
        with self._lock:
            if not self._pending:
                return None
            return max(0.0, min(self._due(n) for n in self._pending) - time.monotonic())

    def start(self) -> None:
        observer = Observer()
        observer.schedule(self, str(self.directory), recursive=True)
        observer.daemon = True
        observer.start()
        self._observer = observer

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer = None
