"""Predictor sources on disk: the names the directory may hold, finding each API's files, and the snapshot of a
version's code that probes and workers load (so what was checked is what runs)."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

FOLDER_ENTRY = "predictor.py"
FOLDER_SETTINGS = "predictor.toml"
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
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

    def files(self) -> list[Path]:
        """Every file whose change makes a new version."""
        if self.folder is None:
            return [p for p in (self.code, self.settings) if p is not None and p.exists()]
        found = []
        for p in sorted(self.folder.rglob("*")):
            rel = p.relative_to(self.folder).parts
            if p.is_file() and not any(is_ignored(part) for part in rel):
                found.append(p)
        return found

    def version(self) -> str:
        """Content hash of code and settings, plus size and mtime of other files (weights are not re-read)."""
        h = hashlib.sha256()
        for p in self.files():
            h.update(str(p.relative_to(self.root)).encode() + b"\0")
            try:
                if p.suffix in (".py", ".toml"):
                    h.update(p.read_bytes())
                else:
                    st = p.stat()
                    h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
            except OSError:
                h.update(b"<unreadable>")
        return h.hexdigest()[:12]


def snapshot(source: ApiSource, dest: Path) -> ApiSource:
    """Copy an API's code and settings (not its assets) to ``dest``, and describe the copy.

    The probe checks the copy and the workers load the copy, so what was validated is exactly what runs, and a
    replacement worker can load the last good version after the files on disk have changed (or broken).
    """
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    if source.folder is None:
        for path in (source.code, source.settings):
            if path is not None and path.exists():
                shutil.copy2(path, dest / path.name)
        settings = dest / source.settings.name if source.settings is not None else None
        return ApiSource(source.name, dest / source.code.name, settings, None, source.root)
    folder = dest / source.name  # the copy keeps the folder's name: a probe takes the API's name from it
    folder.mkdir()
    for path in source.files():
        if path.suffix in (".py", ".toml"):
            target = folder / path.relative_to(source.folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
    return ApiSource(source.name, folder / FOLDER_ENTRY, folder / FOLDER_SETTINGS, folder, source.folder)


@dataclass(frozen=True)
class Found:
    """What a scan of the predictors directory found: the APIs by name, and the names with two sources."""

    apis: dict[str, ApiSource] = field(default_factory=dict)
    clashes: dict[str, tuple[Path, Path]] = field(default_factory=dict)  # NAME -> (NAME.py, NAME/)


def scan(directory: Path) -> Found:
    """Every API in the predictors directory, by name (names may be invalid: loading reports that). A name with
    both a ``NAME.py`` and a ``NAME/`` folder is a clash: neither is taken, both are named."""
    found = Found()
    if not directory.is_dir():
        return found
    files: dict[str, ApiSource] = {}
    folders: dict[str, ApiSource] = {}
    for entry in sorted(directory.iterdir()):
        if is_ignored(entry.name):
            continue
        if entry.is_dir():
            code = entry / FOLDER_ENTRY
            if code.is_file():
                folders[entry.name] = ApiSource(entry.name, code, entry / FOLDER_SETTINGS, entry)
        elif entry.suffix == ".py" and entry.is_file():
            files[entry.stem] = ApiSource(entry.stem, entry, entry.with_suffix(".toml"))
    for name in sorted(set(files) | set(folders)):
        if name in files and name in folders:
            found.clashes[name] = (files[name].code, folders[name].root)
        else:
            found.apis[name] = files.get(name) or folders[name]
    return found


def source_for(path: Path, home: Path | None = None) -> ApiSource:
    """The ApiSource of a path given on the command line (a .py file or a folder); ``home``: for a snapshot, the
    user's folder it was copied from (what its errors and tracebacks name)."""
    path = path.resolve()
    if path.is_dir():
        return ApiSource(path.name, path / FOLDER_ENTRY, path / FOLDER_SETTINGS, path, home)
    return ApiSource(path.stem, path, path.with_suffix(".toml"), None, home)
