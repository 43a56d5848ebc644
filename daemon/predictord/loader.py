"""Predictor files: finding them in the directory, importing them, and checking them against the contract.

The contract (Cortex's, kept exactly, then extended)::

    class PythonPredictor:
        def __init__(self, config):            # config: the [config] table of NAME.toml, as a dict
            ...                                # may also ask for `device` ("cpu", "cuda") and `predictor_dir`
        def predict(self, payload):            # may also ask for `query_params` and `headers`, by name
            return {"label": "cat"}            # JSON-able, str, bytes, a starlette Response, or a generator
        def post_predict(self, response, payload):   # optional, runs after the response is sent
            ...

``predict`` may be ``async def``. Any argument name outside these lists is a load error that names it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import os
import re
import shutil
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

CLASS_NAME = "PythonPredictor"
FOLDER_ENTRY = "predictor.py"
FOLDER_SETTINGS = "predictor.toml"
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
RESERVED = frozenset({"healthz", "readyz", "metrics", "admin", "status", "openapi.json", "docs", "favicon.ico"})
PREDICT_ARGS = ("payload", "query_params", "headers")
INIT_ARGS = ("config", "device", "predictor_dir")
POST_PREDICT_ARGS = ("response", *PREDICT_ARGS)


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


def scan(directory: Path) -> dict[str, ApiSource]:
    """Every API in the predictors directory, by name (names may be invalid: loading reports that)."""
    found: dict[str, ApiSource] = {}
    if not directory.is_dir():
        return found
    for entry in sorted(directory.iterdir()):
        if is_ignored(entry.name):
            continue
        if entry.is_dir():
            code = entry / FOLDER_ENTRY
            if code.is_file():
                found[entry.name] = ApiSource(entry.name, code, entry / FOLDER_SETTINGS, entry)
        elif entry.suffix == ".py" and entry.is_file():
            found[entry.stem] = ApiSource(entry.stem, entry, entry.with_suffix(".toml"))
    return found


def source_for(path: Path) -> ApiSource:
    """The ApiSource of a path given on the command line (a .py file or a folder)."""
    path = path.resolve()
    if path.is_dir():
        return ApiSource(path.name, path / FOLDER_ENTRY, path / FOLDER_SETTINGS, path)
    return ApiSource(path.stem, path, path.with_suffix(".toml"))


class LoadError(Exception):
    """A predictor could not be loaded; carries the file and line to show the user."""

    def __init__(self, message: str, file: str | None = None, line: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.file = file
        self.line = line

    def as_dict(self) -> dict[str, Any]:
        return {"message": self.message, "file": self.file, "line": self.line}

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}: " if self.file and self.line else f"{self.file}: " if self.file else ""
        return where + self.message


def error_from_exception(exc: BaseException, source: ApiSource, doing: str) -> LoadError:
    """A LoadError pointing at the deepest line of the predictor's own code in the traceback."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return LoadError(f"syntax error: {exc.msg}", source.original(exc.filename), exc.lineno)
    file, line = str(source.code), None
    root = str(source.root)
    for frame in traceback.extract_tb(exc.__traceback__):
        if frame.filename.startswith(root):
            file, line = frame.filename, frame.lineno
    return LoadError(f"{doing} raised {type(exc).__name__}: {exc}", source.original(file), line)


@dataclass(frozen=True)
class Signature:
    """What a predictor class asks for, found by inspecting it once."""

    predict_args: tuple[str, ...]
    init_args: tuple[str, ...]
    is_async: bool = False
    post_predict_args: tuple[str, ...] | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "predict": list(self.predict_args),
            "init": list(self.init_args),
            "async": self.is_async,
            "post_predict": list(self.post_predict_args) if self.post_predict_args is not None else None,
        }


def _asked(func: Any, allowed: tuple[str, ...], where: str, what: str, skip_first: bool = True) -> tuple[str, ...]:
    params = list(inspect.signature(func).parameters.values())
    if skip_first:
        params = params[1:]  # self
    names: list[str] = []
    for p in params:
        if p.kind is p.VAR_KEYWORD:
            return (*names, *(a for a in allowed if a not in names))
        if p.kind is p.VAR_POSITIONAL:
            raise LoadError(f"{what} takes *{p.name}; ask for arguments by name: {', '.join(allowed)}", where)
        if p.name not in allowed:
            raise LoadError(f"{what} asks for {p.name!r}; allowed: {', '.join(allowed)}", where)
        names.append(p.name)
    return tuple(names)


def inspect_class(cls: Any, source: ApiSource) -> Signature:
    """Check a class against the contract; raise LoadError naming the first problem."""
    where = str(source.code)
    if not inspect.isclass(cls):
        raise LoadError(f"{CLASS_NAME} is a {type(cls).__name__}, not a class", where)
    predict = getattr(cls, "predict", None)
    if predict is None or not callable(predict):
        raise LoadError(f"class {CLASS_NAME} has no predict method; define predict(self, payload)", where)
    line = None
    try:
        line = inspect.getsourcelines(predict)[1]
    except (OSError, TypeError):
        pass
    try:
        predict_args = _asked(predict, PREDICT_ARGS, where, "predict()")
        init_args = _asked(cls.__init__, INIT_ARGS, where, "__init__()") if cls.__init__ is not object.__init__ else ()
        post = getattr(cls, "post_predict", None)
        post_args = _asked(post, POST_PREDICT_ARGS, where, "post_predict()") if callable(post) else None
    except LoadError as e:
        e.line = e.line or line
        raise
    return Signature(predict_args, init_args, inspect.iscoroutinefunction(predict), post_args)


def import_module(source: ApiSource, module_name: str) -> ModuleType:
    """Import a predictor's code under a unique module name; its folder is importable for its helpers."""
    spec = importlib.util.spec_from_file_location(module_name, source.code)
    if spec is None or spec.loader is None:
        raise LoadError("cannot be imported as a Python module", str(source.code))
    module = importlib.util.module_from_spec(spec)
    root = str(source.root)
    if source.folder is not None:
        # A new version must import its own helpers, not the ones an older version left in sys.modules.
        for name in modules_under(source.folder):
            del sys.modules[name]
        if root not in sys.path:
            sys.path.insert(0, root)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as e:  # noqa: BLE001 - any failure of user code is a load error, even SystemExit
        sys.modules.pop(module_name, None)
        raise error_from_exception(e, source, "importing it") from None
    return module


def modules_under(folder: Path) -> list[str]:
    """Names of the imported modules whose file is inside ``folder`` (a predictor's helpers)."""
    prefix = str(folder) + os.sep
    return [name for name, m in list(sys.modules.items()) if (getattr(m, "__file__", None) or "").startswith(prefix)]


def load_class(source: ApiSource, module_name: str) -> tuple[Any, Signature]:
    """Import a predictor and check its class; raise LoadError with file and line."""
    problem = name_problem(source.name)
    if problem:
        raise LoadError(problem, str(source.code))
    if not source.code.is_file():
        raise LoadError("file not found", str(source.code))
    module = import_module(source, module_name)
    cls = getattr(module, CLASS_NAME, None)
    if cls is None:
        raise LoadError(f"no class named {CLASS_NAME}; define `class {CLASS_NAME}:` with predict()", str(source.code))
    return cls, inspect_class(cls, source)


def instantiate(cls: Any, signature: Signature, source: ApiSource, config: dict[str, Any], device: str) -> Any:
    """Call the predictor's __init__ with what it asked for; raise LoadError on failure."""
    offered = {"config": config, "device": device, "predictor_dir": str(source.assets)}
    kwargs = {name: offered[name] for name in signature.init_args}
    try:
        return cls(**kwargs)
    except BaseException as e:  # noqa: BLE001 - user code: every failure becomes a load error
        raise error_from_exception(e, source, "__init__") from None
