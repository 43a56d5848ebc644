"""Predictor sources on disk: the names the directory may hold, finding each API's files, and the snapshot of a
version's code that probes and workers load (so what was checked is what runs)."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .requirements import requirement_files

FOLDER_ENTRY = "predictor.py"
FOLDER_SETTINGS = "predictor.toml"
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
CODE_SUFFIXES = (".py", ".toml")
MAX_CODE_BYTES = 16 * 2**20  # one code or settings file
MAX_ENTRIES = 100_000  # files and folders walked in one predictor folder, or in the predictors directory
RESERVED = frozenset({"healthz", "readyz", "metrics", "admin", "status", "openapi.json", "docs", "favicon.ico"})


def is_ignored(name: str) -> bool:
    """Editor droppings and caches that never make or change an API."""
    return (
        name.startswith(".")
        or name.endswith(("~", ".swp", ".swx", ".tmp", ".pyc"))
        or name == "__pycache__"
    )


def name_problem(name: str) -> str | None:
    """Why NAME cannot be an API's name and route, or None when it can."""
    if name in RESERVED:
        return f"{name!r} is reserved for the daemon's own route /{name}; rename the predictor"
    if not NAME_RE.match(name):
        return (
            f"{name!r} is not a valid API name: use lowercase letters, digits, '-' and '_' "
            "(starting with a letter or digit, at most 63 characters)"
        )
    return None


@dataclass(frozen=True)
class ApiSource:
    """Where an API's files are: NAME.py (+ NAME.toml) or NAME/ (predictor.py + predictor.toml + assets)."""

    name: str
    code: Path
    settings: Path | None
    folder: Path | None = None
    home: Path | None = None  # for a snapshot: the user's folder, where its assets (weights...) stay

    @property
    def root(self) -> Path:
        """Where its code is (and its helper modules are imported from)."""
        return self.folder if self.folder is not None else self.code.parent

    @property
    def assets(self) -> Path:
        """The predictor's own folder as the predictor sees it (``predictor_dir``): its assets are relative to it."""
        return self.home if self.home is not None else self.root

    @property
    def shown_code(self) -> str:
        """The predictor's file as the user knows it (for a snapshot: the file it was copied from)."""
        return self.original(str(self.code)) or str(self.code)

    def own_files(self) -> Callable[[str], bool]:
        """Whether a path (a traceback frame's) is the predictor's own code: in its folder, or its one file; the
        snapshot's paths and the user's both count."""
        if self.folder is None:
            mine = {str(self.code), self.shown_code}
            return mine.__contains__
        roots = tuple({str(self.root) + os.sep, str(self.assets) + os.sep})
        return lambda path: path.startswith(roots)

    def original(self, path: str | None) -> str | None:
        """A path inside a snapshot, as the user's file it was copied from (for error messages)."""
        if path is None or self.home is None or not path.startswith(str(self.root)):
            return path
        return str(self.home) + path[len(str(self.root)):]

    def code_files(self) -> list[Path]:
        """Its code and settings files, what a version is made of; a folder is walked without entering linked
        folders, and at most MAX_ENTRIES deep (Unreadable past that)."""
        if self.folder is None:
            return [p for p in (self.code, self.settings) if p is not None and os.path.lexists(p)]
        found: list[Path] = []
        seen = 0
        for root, dirs, files in os.walk(self.folder):
            dirs[:] = sorted(d for d in dirs if not is_ignored(d))
            seen += len(dirs) + len(files)
            if seen > MAX_ENTRIES:
                raise Unreadable(f"{self.folder}: more than {MAX_ENTRIES} files and folders; keep large data sets "
                                 "outside the predictors directory and point to them in [config]")
            found += [Path(root) / f for f in sorted(files) if f.endswith(CODE_SUFFIXES) and not is_ignored(f)]
        return found + [p for p in requirement_files(self.folder) if p not in found]  # they are code too

    def identity(self) -> tuple[str, str]:
        """(version, stamp). The version is a hash of its code, settings and requirements files (names and
        contents): the same files are the same version on every host. The stamp is a hash of their mtimes and of
        its folder itself: a ``touch`` of a code file, or the same code in a new folder moved in with ``mv``, changes
        it alone, and the daemon loads the same code again (new weights). Other files (weights, what the predictor
        writes into its folder) are part of neither, so a predictor that writes into its own folder never reloads
        itself. Reads are bounded (see ``read_code``): Unreadable when a file cannot be read safely."""
        code, stamp = hashlib.sha256(), hashlib.sha256()
        if self.folder is not None:
            st = os.stat(self.folder)
            stamp.update(f"folder {st.st_dev}:{st.st_ino}\0".encode())
        for p in self.code_files():
            data, mtime = read_code(p)
            name = str(p.relative_to(self.root)).encode()
            code.update(name + f"\0{len(data)}\0".encode() + data)
            stamp.update(name + f"\0{mtime}\0".encode())
        return code.hexdigest()[:12], stamp.hexdigest()[:12]

    def version(self) -> str:
        return self.identity()[0]


def code_of(version: str) -> str:
    """The code a version id names: ``abc123`` and its reloads ``abc123-1``, ``abc123-2`` (a touch) are one code."""
    return version.partition("-")[0]


def next_load(version: str) -> str:
    """The id of the same code loaded again after a touch: ``abc123`` -> ``abc123-1`` -> ``abc123-2``."""
    code, _, n = version.partition("-")
    return f"{code}-{int(n or 0) + 1}"


class Unreadable(Exception):
    """An API's files cannot be read safely: not a regular file, too large, too many, or unreadable."""


def read_code(path: Path) -> tuple[bytes, int]:
    """A code or settings file's bytes and mtime, never blocking and never unbounded: a FIFO, device or socket
    (or a link to one) is refused, and so is a file over MAX_CODE_BYTES (checked on the open file, so a swap
    between the check and the read cannot get past it)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        try:
            mode = os.stat(path).st_mode  # a socket cannot even be opened: say what it is
        except OSError:
            mode = stat.S_IFREG
        if not stat.S_ISREG(mode):
            raise Unreadable(f"{path}: is {_kind(mode)}, not a regular file; the daemon reads only regular files"
                             ) from None
        raise Unreadable(f"{path}: cannot be read ({e.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Unreadable(f"{path}: is {_kind(st.st_mode)}, not a regular file; the daemon reads only regular "
                             "files")
        if st.st_size > MAX_CODE_BYTES:
            raise Unreadable(f"{path}: {st.st_size} bytes; a code or settings file may have at most "
                             f"{MAX_CODE_BYTES >> 20} MiB")
        chunks, size = [], 0
        while size <= MAX_CODE_BYTES:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > MAX_CODE_BYTES:
            raise Unreadable(f"{path}: grew past {MAX_CODE_BYTES >> 20} MiB while it was read")
        return b"".join(chunks), st.st_mtime_ns
    finally:
        os.close(fd)


def _kind(mode: int) -> str:
    for test, word in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK,
                       "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return word
    return "not a plain file"


def snapshot(source: ApiSource, dest: Path) -> ApiSource:
    """Copy an API's code and settings (not its assets) to ``dest``, and describe the copy (Unreadable when a file
    cannot be read safely). An existing copy of the same version is reused: versions are content hashes.

    The probe checks the copy and the workers load the copy, so what was validated is exactly what runs, and a
    replacement worker can load the last good version after the files on disk have changed (or broken).
    """
    copy = snapshot_of(source, dest)
    if dest.is_dir():
        return copy
    partial = dest.with_name(dest.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    for path in source.code_files():
        data, mtime = read_code(path)
        target = partial / (path.name if source.folder is None else Path(source.name) / path.relative_to(source.folder))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        os.utime(target, ns=(mtime, mtime))
    (partial / source.name if source.folder is not None else partial).mkdir(parents=True, exist_ok=True)
    os.replace(partial, dest)  # whole or not at all: a reader never finds half a copy
    return copy


def snapshot_of(source: ApiSource, dest: Path) -> ApiSource:
    """The description of an API's copy in ``dest`` (see ``snapshot``)."""
    if source.folder is None:
        settings = dest / source.settings.name if source.settings is not None else None
        return ApiSource(source.name, dest / source.code.name, settings, None, source.root)
    folder = dest / source.name  # the copy keeps the folder's name: a probe takes the API's name from it
    return ApiSource(source.name, folder / FOLDER_ENTRY, folder / FOLDER_SETTINGS, folder, source.folder)


@dataclass(frozen=True)
class Found:
    """What a scan of the predictors directory found: the APIs by name, the names with two sources, the targets of
    the links that make APIs (the watcher watches them too), and entries that are no API, with why."""

    apis: dict[str, ApiSource] = field(default_factory=dict)
    clashes: dict[str, tuple[Path, Path]] = field(default_factory=dict)  # NAME -> (NAME.py, NAME/)
    links: dict[Path, str] = field(default_factory=dict)  # a link's target -> the API it makes
    notes: dict[str, str] = field(default_factory=dict)  # entry name -> why it is not an API


def scan(directory: Path) -> Found:
    """Every API in the predictors directory, by name (names may be invalid: loading reports that). A name with
    both a ``NAME.py`` and a ``NAME/`` folder is a clash: neither is taken, both are named. A link is followed
    only to a predictor file or folder; any other link is noted and left alone (never walked)."""
    found = Found()
    if not directory.is_dir():
        return found
    files: dict[str, ApiSource] = {}
    folders: dict[str, ApiSource] = {}
    names: list[str] = []
    with os.scandir(directory) as listing:
        for item in listing:
            names.append(item.name)
            if len(names) > MAX_ENTRIES:
                found.notes["*"] = f"{directory}: more than {MAX_ENTRIES} entries; only the first were read"
                break
    for name in sorted(names):
        path = directory / name
        if is_ignored(name):
            continue
        try:
            st = path.stat()  # follows a link to its target
        except OSError as e:
            if path.is_symlink():
                found.notes[name] = f"{path}: a link to {os.readlink(path)}, which is not there ({e.strerror})"
            continue
        if stat.S_ISDIR(st.st_mode):
            if os.path.lexists(path / FOLDER_ENTRY):
                folders[name] = ApiSource(name, path / FOLDER_ENTRY, path / FOLDER_SETTINGS, path)
            elif path.is_symlink():
                found.notes[name] = f"{path}: a link to {path.resolve()}, which holds no {FOLDER_ENTRY}; not an API"
        elif path.suffix == ".py":
            files[path.stem] = ApiSource(path.stem, path, path.with_suffix(".toml"))  # not a plain file: refused
    for name in sorted(set(files) | set(folders)):
        if name in files and name in folders:
            found.clashes[name] = (files[name].code, folders[name].root)
            continue
        source = files.get(name) or folders[name]
        found.apis[name] = source
        linked = [source.folder] if source.folder is not None else [source.code, source.settings]
        for entry in linked:
            if entry is not None and entry.is_symlink():
                found.links[entry.resolve()] = name
    return found


def source_for(path: Path, home: Path | None = None) -> ApiSource:
    """The ApiSource of a path given on the command line (a .py file or a folder); ``home``: for a snapshot, the
    user's folder it was copied from (what its errors and tracebacks name)."""
    path = path.resolve()
    if path.is_dir():
        return ApiSource(path.name, path / FOLDER_ENTRY, path / FOLDER_SETTINGS, path, home)
    return ApiSource(path.stem, path, path.with_suffix(".toml"), None, home)
