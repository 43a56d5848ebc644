"""What a predictor declares it needs beyond the daemon's own packages.

A folder predictor declares ``requirements.txt`` (pip's format: ``-r`` and ``-c`` to other files of its folder,
markers, hashes); any predictor may instead list them in its settings file's ``[dependencies] pip``. The files
count as code: editing them makes a new version, and the snapshot holds them, so the environment is built from
exactly what was checked.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

REQUIREMENTS_FILE = "requirements.txt"
_REFERENCE = re.compile(r"^\s*(?:-r|-c|--requirement|--constraint)(?:\s*=\s*|\s+)(\S+)")


def references(text: str) -> list[str]:
    """The files a requirements file names with -r or -c (as written, relative to the file)."""
    found = []
    for line in text.splitlines():
        m = _REFERENCE.match(line.split(" #")[0])
        if m:
            found.append(m.group(1))
    return found


def requirement_files(folder: Path) -> list[Path]:
    """``requirements.txt`` at the top of a predictor's folder and the files it names with -r or -c, recursively,
    that lie inside the folder and exist (a reference outside it fails the install, which names it)."""
    top = folder / REQUIREMENTS_FILE
    if not top.is_file():
        return []
    out: list[Path] = []
    todo = [top]
    root = folder.resolve()
    while todo and len(out) < 100:
        path = todo.pop(0)
        if path in out:
            continue
        out.append(path)
        try:
            text = path.read_text(errors="replace") if path.stat().st_size <= 1 << 20 else ""
        except OSError:
            continue
        for ref in references(text):
            named = Path(os.path.normpath(path.parent / ref))
            if named.is_file() and named.resolve().is_relative_to(root):
                todo.append(named)
    return out


@dataclass(frozen=True)
class Declared:
    """A version's requirements: the requirements file in its snapshot, or the lines of [dependencies] pip; and
    what identifies them (their text, with every file they name)."""

    file: Path | None  # requirements.txt (installed with -r, so pip resolves its -r and -c itself)
    lines: tuple[str, ...]  # [dependencies] pip
    text: str  # what the environment's key hashes

    @property
    def shown(self) -> str:
        """Where they were declared, for messages."""
        return str(self.file) if self.file is not None else "[dependencies] pip"

    def installer_args(self) -> list[str]:
        """The installer's arguments that name them."""
        return ["-r", str(self.file)] if self.file is not None else list(self.lines)


def declared(folder: Path | None, lines: tuple[str, ...], settings: Path | None) -> Declared | None:
    """A version's requirements (None: it declares none). ``folder``: a folder predictor's (snapshot) folder;
    ``lines``: its settings file's [dependencies] pip. Declaring both is an error (ValueError)."""
    files = requirement_files(folder) if folder is not None else []
    if files and lines:
        raise ValueError(f"{files[0]} and [dependencies] pip in {settings} both declare "
                         "requirements; keep one of them")
    if files:
        assert folder is not None
        text = "".join(f"{f.relative_to(folder)}\0{f.read_text(errors='replace')}\0" for f in files)
        return Declared(files[0], (), text)
    if lines:
        return Declared(None, tuple(lines), "\0".join(lines))
    return None


def key(declared: Declared, *context: str) -> str:
    """The environment's key: its requirements and what else decides what gets installed (the daemon's Python and
    base packages, the installer and its index settings)."""
    h = hashlib.sha256(declared.text.encode())
    for part in context:
        h.update(b"\0" + part.encode())
    return h.hexdigest()[:16]


def pip_line(args: list[str]) -> str:
    """An installer command line, for logs."""
    return " ".join(shlex.quote(a) for a in args)
