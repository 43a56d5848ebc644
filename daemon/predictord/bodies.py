"""Large request bodies between processes without copying them through the socket.

An HTTP worker puts a body of SHARED_FROM bytes or more into a file of its own in /dev/shm (a tmpfs: memory, not
disk) and sends the model worker its name instead of the bytes: raw bytes as they arrive, a JSON body parsed (once,
there, beside the other HTTP worker, so a malformed one is a 400 at once) and pickled straight into the file. The
model worker makes the payload from its own mapping of the file (``Reader``), kept for the file's next bodies. So an
8 MB body crosses once, through memory both processes see, instead of through the socket and the frame buffers of
each side (about five copies). The HTTP worker that made a file removes it once its request is answered; the master
removes what a dead HTTP worker left, and everything of the daemon's when it stops. A daemon that could not clean
up (its master killed: SIGKILL, the OOM killer) leaves its files to the next one: each master holds a lock
(``hold``) that its workers inherit, and a master removes the files of every daemon whose lock nobody holds
(``sweep_dead``), at its start and every few seconds.

Large answers take the same road back: a model worker writes one of SHARED_FROM bytes or more into a file of its own
pool (named ``m`` and its pid: ``JobRunner.lend``), the HTTP worker copies it out of its kept mapping and sends
RELEASE, and the file takes the worker's next answer. An answer crossed the socket in steps of its buffer (about
200 KB), waking both processes at each one. The master removes a dead model worker's files.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import pickle
import time
from dataclasses import dataclass
from pathlib import Path

SHARED_FROM = 64 * 1024  # bytes: smaller bodies go in the job frame (a file costs more than copying them)
ROOT = Path("/dev/shm")
PREFIX = "predictord-"


def available() -> bool:
    """Whether this machine has the tmpfs to share bodies through."""
    return ROOT.is_dir() and os.access(ROOT, os.W_OK)


MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # fault the mapping in at once, not page by page
KEEP_BYTES = 512 * 2**20  # idle files an HTTP worker keeps for its next bodies (a new tmpfs page costs a zeroing)
KEEP_IDLE = 30.0  # seconds an idle file (or a model worker's mapping of one) is kept
KEEP_MAPPINGS = 256  # mappings a model worker keeps (Reader): more than the bodies in flight at 256 clients


class SharedBody:
    """A body being written by the HTTP worker that received it, into one of its files (reused: ``Pool``).

    The file is written through a mapping that lives as long as the file: a copy into mapped pages costs a third of
    a ``pwrite`` into tmpfs, which looks up and locks each page on every call (``bench/shm_copy.py``, 1 MB in 256 KB
    chunks: 30 against 98 us of CPU; 8 MB: 436 against 2,284). Its blocks are allocated (``posix_fallocate``)
    before they are mapped, so a full /dev/shm is an OSError when a body asks for room, never a SIGBUS while one is
    copied in.
    """

    def __init__(self, master: int, owner: int | str, seq: int) -> None:
        self.name = f"{PREFIX}{master}-{owner}-{seq}"
        self.path = ROOT / self.name
        self.size = 0  # of this body; the file may be larger (left from an earlier one)
        self.capacity = 0  # the file's size, all of it allocated and mapped
        self.idle_since = 0.0
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self.inode = os.fstat(self._fd).st_ino  # a file of this name made later (by a replacement) has another
        self._map: mmap.mmap | None = None

    @property
    def ref(self) -> str:
        """What the job header carries: the file's name, the body's length and the file's inode."""
        return f"{self.name}:{self.size}:{self.inode}"

    def reserve(self, size: int) -> None:
        """Room for a body of ``size`` bytes (OSError if /dev/shm has none): the file grows to at least twice what
        it was, in whole pages, so a body of unknown length that arrives in chunks remaps a few times, not per chunk."""
        if size <= self.capacity:
            return
        grown = max(size, 2 * self.capacity, SHARED_FROM)
        grown = -(-grown // mmap.PAGESIZE) * mmap.PAGESIZE
        os.posix_fallocate(self._fd, 0, grown)
        if self._map is not None:
            self._map.close()
        self._map = mmap.mmap(self._fd, grown, flags=mmap.MAP_SHARED | MAP_POPULATE)
        self.capacity = grown

    def write(self, chunk: bytes) -> None:
        end = self.size + len(chunk)
        self.reserve(end)
        assert self._map is not None
        self._map[self.size:end] = chunk
        self.size = end

    def dump(self, payload: object) -> None:
        """A parsed payload, pickled into the file (the model worker unpickles it from the mapping)."""
        data = pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)  # faster than pickle.dump through a buffer
        self.size = 0
        self.write(data)

    def contents(self) -> bytes:
        """What has been written of this body (to send it another way after all)."""
        return self._map[:self.size] if self._map is not None else b""

    def start(self) -> None:
        """Ready for a new body (the last one's reader is done with it)."""
        self.size = 0

    def remove(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class Pool:
    """One process's shared files: an HTTP worker's (owner: its slot) take a large body each and are given back once
    its request is answered; a model worker's (owner: ``answers_of(pid)``) take a large answer each and are given
    back once an HTTP worker has read it."""

    def __init__(self, master: int, owner: int | str) -> None:
        self.master, self.owner = master, owner
        self.idle: list[SharedBody] = []
        self.seq = 0

    def take(self) -> SharedBody:
        if self.idle:
            body = self.idle.pop()
        else:
            self.seq += 1
            body = SharedBody(self.master, self.owner, self.seq)
        body.start()
        return body

    def give(self, body: SharedBody) -> None:
        if sum(b.capacity for b in self.idle) + body.capacity > KEEP_BYTES:
            body.remove()
        else:
            body.idle_since = time.monotonic()
            self.idle.append(body)

    def trim(self, now: float) -> None:
        """Remove the files idle for KEEP_IDLE (a burst of large bodies leaves no memory held for long)."""
        keep = []
        for body in self.idle:
            if now - body.idle_since > KEEP_IDLE:
                body.remove()
            else:
                keep.append(body)
        self.idle = keep


def _parse(ref: str) -> tuple[str, int, int]:
    """A reference's file name, body length and inode (``SharedBody.ref``)."""
    parts = ref.split(":")
    if len(parts) != 3 or "/" in parts[0] or not parts[0].startswith(PREFIX) or not parts[1].isdigit() \
            or not parts[2].isdigit():
        raise ValueError(f"not a shared body: {ref!r}")
    return parts[0], int(parts[1]), int(parts[2])


class Reader:
    """The model worker's side: a read-only mapping of each file it has taken a body from, kept for the next body in
    that file (the HTTP worker reuses its files: ``Pool``). Taking a body out of a kept mapping is one copy from pages
    already in this process's page tables: 30 us for 1 MB against 77 for ``os.pread`` (which looks up each tmpfs page
    on every call) and 130 for a fresh mapping; 8 MB: 290 against 1,900 and 1,350 (``bench/shm_copy.py``).

    A kept mapping is used only for the file it maps: the reference names the file's inode, and a replacement HTTP
    worker's file of the same name has another (the old inode lives on while this process maps it, so its number
    is not given again), so no ``stat`` is needed per body. Files only grow, so a mapping never reaches past the end
    of its file (no SIGBUS); a body longer than the mapping maps the file again. ``sweep`` lets go of the mappings
    whose file was removed or replaced (a mapping keeps a removed file's memory) and those idle for KEEP_IDLE; at
    most KEEP_MAPPINGS are kept. One thread uses a Reader (the worker's loop).
    """

    def __init__(self) -> None:
        self.kept: dict[str, Kept] = {}  # by file name, least recently used first

    def read(self, ref: str) -> bytes:
        """Raw bytes, as the payload (a copy: bytes of its own, as the payload must be)."""
        mapping, length = self._mapping(ref)
        return mapping[:length]

    def unpickle(self, ref: str) -> object:
        """A payload the HTTP worker parsed and pickled into its file, unpickled straight from the mapping."""
        mapping, length = self._mapping(ref)
        with memoryview(mapping) as whole, whole[:length] as view:
            return pickle.loads(view)

    def sweep(self, now: float) -> None:
        """Let go of the mappings of files removed or replaced since, or idle for KEEP_IDLE (with each heartbeat)."""
        for name, kept in list(self.kept.items()):
            if now - kept.used > KEEP_IDLE or _inode(name) != kept.inode:
                self.kept.pop(name).mapping.close()

    def _mapping(self, ref: str) -> tuple[mmap.mmap, int]:
        name, length, inode = _parse(ref)
        kept = self.kept.pop(name, None)  # put back last: most recently used
        if kept is not None and (len(kept.mapping) < length or kept.inode != inode):
            kept.mapping.close()  # grown past the mapping, or another file of that name: map it afresh
            kept = None
        if kept is None:
            kept = self._map(name, length, inode)
        kept.used = time.monotonic()
        self.kept[name] = kept
        return kept.mapping, length

    def _map(self, name: str, length: int, inode: int) -> Kept:
        fd = os.open(f"{ROOT}/{name}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            info = os.fstat(fd)
            if info.st_ino != inode:
                raise ValueError("its file was replaced")
            if info.st_size < length:
                raise ValueError(f"a shared body came short: {info.st_size} of {length} bytes")
            mapping = mmap.mmap(fd, info.st_size, prot=mmap.PROT_READ, flags=mmap.MAP_SHARED | MAP_POPULATE)
        finally:
            os.close(fd)
        while len(self.kept) >= KEEP_MAPPINGS:
            self.kept.pop(next(iter(self.kept))).mapping.close()
        return Kept(info.st_ino, mapping)


@dataclass(slots=True)
class Kept:
    """A Reader's mapping of one file, with the file's inode (to tell a new file of the same name) and last use."""

    inode: int
    mapping: mmap.mmap
    used: float = 0.0


def _inode(name: str) -> int:
    try:
        return os.stat(f"{ROOT}/{name}").st_ino  # a str path: pathlib's join costs more than the stat on this path
    except FileNotFoundError:
        return -1


def answers_of(pid: int) -> str:
    """The owner part of a model worker's answer files' names (``JobRunner.lend``)."""
    return f"m{pid}"


def files_of(master: int, owner: int | str | None = None) -> list[Path]:
    """The files of one process of this daemon (an HTTP worker's slot, a model worker's ``answers_of``), or with
    None of all of them."""
    pattern = f"{PREFIX}{master}-{'' if owner is None else f'{owner}-'}*"
    return list(ROOT.glob(pattern)) if ROOT.is_dir() else []


def answers_held(master: int, worker_pid: int) -> int:
    """Bytes in a model worker's answer files: its RSS counts their pages, which are no leak of its own (the
    master's memory limits leave them out)."""
    total = 0
    for path in files_of(master, answers_of(worker_pid)):
        try:
            total += path.stat().st_size
        except FileNotFoundError:
            pass
    return total


def _lock_of(master: int | str) -> Path:
    return ROOT / f"{PREFIX}{master}.lock"


def hold(master: int) -> int | None:
    """The master's claim on its files, held as long as a process of its daemon lives (a lock on a file of its
    own, inherited by the workers it forks): the descriptor, or None without /dev/shm."""
    try:
        fd = os.open(_lock_of(master), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # a live daemon of the same pid in another pid namespace: no claim
        os.close(fd)
        return None
    remove_left(master)  # what a killed daemon of the same pid (an earlier one) left
    return fd


def let_go(master: int, fd: int | None) -> None:
    """At the master's stop, once its files are removed."""
    if fd is not None:
        _lock_of(master).unlink(missing_ok=True)
        os.close(fd)


def sweep_dead() -> dict[int, int]:
    """Remove what killed daemons left: the files of each daemon (of this user) whose lock no process holds any
    more. Files with no lock file are never touched (a daemon of another pid namespace may own them). Returns
    master pid -> files removed."""
    swept: dict[int, int] = {}
    for lock in ROOT.glob(f"{PREFIX}*.lock") if ROOT.is_dir() else ():
        master = lock.name[len(PREFIX):-len(".lock")]
        if not master.isdigit():
            continue
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)  # another user's (0600) fails here: left alone
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: a process of that daemon lives
            os.close(fd)
            continue
        try:
            swept[int(master)] = remove_left(int(master))
            lock.unlink(missing_ok=True)
        finally:
            os.close(fd)
    return swept


def remove_left(master: int, owner: int | str | None = None) -> int:
    """The master's cleanup: the files a process of this daemon (or, with None, any) left."""
    removed = 0
    for path in files_of(master, owner):
        path.unlink(missing_ok=True)
        removed += 1
    return removed
