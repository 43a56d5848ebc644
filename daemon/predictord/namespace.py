"""A module namespace per API version, so APIs that share a process never see each other's modules.

Every version of an API gets a package of its own in ``sys.modules``, named ``NAME@VERSION`` (a name no real module
can have). A folder predictor's ``predictor.py`` is ``NAME@VERSION.predictor`` and its sibling ``model.py`` is
``NAME@VERSION.model``; a single-file predictor is the module ``NAME@VERSION`` itself. Inside that code, a plain
``import model`` (Cortex's layout) resolves to the same version's ``model``: each module of the namespace gets
builtins whose ``__import__`` maps the top-level names the folder provides into the namespace, at import time and
later inside ``predict()``. ``importlib.import_module("model")`` does too, and relative imports work. Everything else
(numpy, torch, the standard library) is the one shared copy.

The code run is the version's snapshot (what the probe checked), compiled with the user's path as its file name, so
tracebacks and error messages name ``predictors/NAME/model.py:LINE``, and ``__file__``, ``__path__`` and
``predictor_dir`` all name the user's folder, where its assets are. Unloading a version drops every module of its
namespace, and undoes the ``sys.path`` entries and environment variables its import and ``__init__`` added. Its
code's ``atexit`` hooks run at that unload (a worker ends with os._exit), and ``signal.signal`` refuses: the
worker owns its signals.
"""

from __future__ import annotations

import atexit
import builtins
import importlib
import importlib.abc
import importlib.machinery
import logging
import os
import signal
import sys
import threading
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .sources import ApiSource

log = logging.getLogger("predictord.model")
_real_import = builtins.__import__
_lock = threading.Lock()


def namespace_name(api: str, version: str) -> str:
    """The package name of one API version: ``NAME@VERSION`` (never a valid identifier, so it cannot clash)."""
    return f"{api}@{version}"


def provided(root: Path) -> frozenset[str]:
    """The top-level module names a predictor folder holds: its ``*.py`` files and its folders of Python code."""
    names = set()
    for entry in root.iterdir() if root.is_dir() else ():
        if entry.suffix == ".py" and entry.stem.isidentifier():
            names.add(entry.stem)
        elif entry.is_dir() and entry.name.isidentifier() and any(entry.rglob("*.py")):
            names.add(entry.name)
    return frozenset(names)


class Namespace:
    """One API version's modules: where their code is (the snapshot), what they are called, and their import."""

    def __init__(self, source: ApiSource, version: str) -> None:
        self.source = source
        self.name = namespace_name(source.name, version)
        self.folder = source.folder is not None
        self.root = source.root  # the snapshot: the code that runs
        self.home = source.assets  # the user's folder: what __file__ and tracebacks name
        self.provides = provided(self.root) if self.folder else frozenset()
        self.builtins: dict[str, Any] = {**builtins.__dict__, "__import__": self.import_}
        # The modules its code sees as its own version of a shared one (see each class).
        self.shims: dict[str, types.ModuleType] = {"importlib": _Importlib(self), "atexit": _Atexit(),
                                                   "signal": _Signal()}
        self.path_before: list[str] = []
        self.env_before: dict[str, str] = {}
        self.path_added: list[str] = []  # sys.path entries its import and __init__ added
        self.env_set: dict[str, str | None] = {}  # variables they set (None: removed), with...
        self.env_was: dict[str, str | None] = {}  # ...the values before

    @property
    def entry(self) -> str:
        """The module name of the predictor's own file."""
        return f"{self.name}.predictor" if self.folder else self.name

    def shown(self, path: Path) -> str:
        """A snapshot path as the user's file it was copied from."""
        return str(self.home / path.relative_to(self.root))

    def import_(self, name: str, globals: Any = None, locals: Any = None, fromlist: Sequence[str] | None = (),
                level: int = 0) -> types.ModuleType:
        """``__import__`` for this namespace's code: names the folder provides resolve inside the namespace."""
        if level == 0:
            top = name.partition(".")[0]
            if top in self.provides:
                try:
                    module = _real_import(f"{self.name}.{name}", globals, locals, fromlist, 0)
                except ModuleNotFoundError as e:
                    raise self.not_found(e) from None
                return module if fromlist else sys.modules[f"{self.name}.{top}"]
            if top in self.shims and (name == top or not fromlist):
                _real_import(name, globals, locals, fromlist, 0)
                return self.shims[top]
        return _real_import(name, globals, locals, fromlist, level)

    def not_found(self, e: ModuleNotFoundError) -> ModuleNotFoundError:
        """The error for a missing submodule, in the user's names rather than the namespace's."""
        missing = (e.name or "").removeprefix(self.name + ".")
        error = ModuleNotFoundError(f"No module named {missing!r} in {self.home}", name=missing)
        return error

    # -- finding and loading its modules --------------------------------------------------------------------------
    def spec(self, fullname: str) -> importlib.machinery.ModuleSpec | None:
        """The spec of one of its modules, from the snapshot (None: the namespace has no such module)."""
        if fullname == self.name:
            if not self.folder:
                return self._spec(fullname, self.source.code, None)
            return self._spec(fullname, None, self.root)
        rel = Path(*fullname[len(self.name) + 1:].split("."))
        if not self.folder:
            return None
        file, package = self.root / rel.with_suffix(".py"), self.root / rel
        if (package / "__init__.py").is_file():
            return self._spec(fullname, package / "__init__.py", package)
        if file.is_file():
            return self._spec(fullname, file, None)
        if package.is_dir():
            return self._spec(fullname, None, package)
        return None

    def _spec(self, fullname: str, code: Path | None, package: Path | None) -> importlib.machinery.ModuleSpec:
        shown = self.shown(code) if code is not None else None
        spec = importlib.machinery.ModuleSpec(fullname, _Loader(self, code, shown), origin=shown,
                                              is_package=package is not None)
        if package is not None:
            spec.submodule_search_locations = [self.shown(package)]
        spec.has_location = shown is not None
        return spec

    # -- the version's life in a process --------------------------------------------------------------------------
    def load(self) -> types.ModuleType:
        """Import the predictor's file (and so whatever it imports from its folder). Call ``settle`` after its
        ``__init__``: what the two changed in ``sys.path`` and ``os.environ`` is undone at ``unload``."""
        install()
        self.path_before, self.env_before = list(sys.path), dict(os.environ)
        with _lock:
            _finder.spaces[self.name] = self
        if self.folder:
            importlib.import_module(self.name)
        return importlib.import_module(self.entry)

    def settle(self) -> None:
        """Note what the import and ``__init__`` added to ``sys.path`` and changed in ``os.environ``."""
        self.path_added = [p for p in sys.path if p not in self.path_before]
        keys = set(os.environ) | set(self.env_before)
        self.env_set = {k: os.environ.get(k) for k in keys if os.environ.get(k) != self.env_before.get(k)}
        self.env_was = {k: self.env_before.get(k) for k in self.env_set}
        self.path_before, self.env_before = [], {}

    def unload(self) -> None:
        """Run the atexit hooks its code registered (newest first), drop every module of this namespace and the
        sys.path entries it added, and undo its environment changes (a variable changed again since is left)."""
        atexit_shim = self.shims["atexit"]
        assert isinstance(atexit_shim, _Atexit)
        atexit_shim.run(self.name)
        with _lock:
            _finder.spaces.pop(self.name, None)
        prefix = self.name + "."
        for name in [n for n in list(sys.modules) if n == self.name or n.startswith(prefix)]:
            sys.modules.pop(name, None)
        for entry in self.path_added:
            if entry in sys.path:
                sys.path.remove(entry)
        for key, value in self.env_set.items():
            if os.environ.get(key) != value:
                continue
            was = self.env_was.get(key)
            if was is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = was


class _Loader(importlib.abc.Loader):
    """Runs a snapshot file in its namespace: its builtins, and the user's path as its file name."""

    def __init__(self, namespace: Namespace, code: Path | None, shown: str | None) -> None:
        self.namespace = namespace
        self.code = code
        self.shown = shown

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        module.__dict__["__builtins__"] = self.namespace.builtins
        if self.code is None:
            return  # a folder of modules with no __init__.py (or the predictor's own folder): nothing to run
        code = compile(self.code.read_bytes(), self.shown or str(self.code), "exec", dont_inherit=True)
        exec(code, module.__dict__)  # noqa: S102 - a predictor's code is what the daemon is for


class _Importlib(types.ModuleType):
    """``importlib`` as a namespace's code sees it: ``import_module`` resolves the folder's names inside it."""

    def __init__(self, namespace: Namespace) -> None:
        super().__init__("importlib")
        self._namespace = namespace

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib, attr)

    def import_module(self, name: str, package: str | None = None) -> types.ModuleType:
        ns = self._namespace
        if not name.startswith(".") and name.partition(".")[0] in ns.provides:
            try:
                return importlib.import_module(f"{ns.name}.{name}")
            except ModuleNotFoundError as e:
                raise ns.not_found(e) from None
        return importlib.import_module(name, package)


class _Atexit(types.ModuleType):
    """``atexit`` as a namespace's code sees it: a model worker ends with os._exit (after draining), so hooks are
    run when the version unloads instead: on a reload, a delete, and when the worker stops."""

    def __init__(self) -> None:
        super().__init__("atexit")
        self._hooks: list[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]] = []

    def __getattr__(self, attr: str) -> Any:
        return getattr(atexit, attr)

    def register(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Callable[..., Any]:
        self._hooks.append((func, args, kwargs))
        return func

    def unregister(self, func: Callable[..., Any]) -> None:
        self._hooks = [h for h in self._hooks if h[0] != func]

    def run(self, owner: str) -> None:
        while self._hooks:
            func, args, kwargs = self._hooks.pop()
            try:
                func(*args, **kwargs)
            except Exception:  # noqa: BLE001 - user code at unload: say so and go on, as atexit does
                log.exception("%s: an atexit hook raised", owner)


class _Signal(types.ModuleType):
    """``signal`` as a namespace's code sees it: everything but installing handlers, which a model worker owns (its
    SIGTERM drains it); ``signal.signal`` raises, wherever the code runs, rather than only off the main thread."""

    def __init__(self) -> None:
        super().__init__("signal")

    def __getattr__(self, attr: str) -> Any:
        return getattr(signal, attr)

    def signal(self, signalnum: int, handler: Any) -> Any:
        raise RuntimeError(f"a predictor may not install signal handlers (signal.signal({signalnum!r}, ...)): the "
                           "model worker owns its signals; clean up in an atexit hook, which runs at unload")


class _Finder(importlib.abc.MetaPathFinder):
    """Finds the modules of the namespaces loaded in this process (and nothing else)."""

    def __init__(self) -> None:
        self.spaces: dict[str, Namespace] = {}

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        namespace = self.spaces.get(fullname.partition(".")[0])
        return namespace.spec(fullname) if namespace is not None else None


_finder = _Finder()


def install() -> None:
    """Put the namespaces' finder first on ``sys.meta_path`` (once per process)."""
    if _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)


def loaded() -> list[str]:
    """The namespaces this process has loaded (for tests and status)."""
    return sorted(_finder.spaces)

