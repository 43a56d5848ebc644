"""Importing a predictor's code and checking its class against the contract.

The contract (Cortex's, kept exactly, then extended)::

    class PythonPredictor:
        def __init__(self, config):            # config: the [config] table of NAME.toml, as a dict
            ...                                # may also ask for `device` ("cpu", "cuda"), `predictor_dir` and
                                               # `metrics` (usermetrics.py: counters, gauges, histograms)
        def predict(self, payload):            # may also ask for `query_params` and `headers`, by name
            return {"label": "cat"}            # JSON-able, str, bytes, a starlette Response, or a generator
        def post_predict(self, response, payload):   # optional, runs after the response is sent
            ...
        def close(self):                       # optional, runs when this version unloads (reload, delete, stop)
            ...
        def health(self):                      # optional, every [serving] health_interval: raise or return False
            return True                        # when this replica cannot serve (it is taken out, then reloaded)

``predict`` may be ``async def``. Any argument name outside these lists is a load error that names it.
"""

from __future__ import annotations

import asyncio
import inspect
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from . import payload as pl
from .namespace import Namespace
from .protocol import Problem
from .sources import ApiSource, name_problem
from .usermetrics import UserMetrics

CLASS_NAME = "PythonPredictor"
PREDICT_ARGS = ("payload", "query_params", "headers")
INIT_ARGS = ("config", "device", "predictor_dir", "metrics")
POST_PREDICT_ARGS = ("response", *PREDICT_ARGS)


class LoadError(Exception):
    """A predictor could not be loaded; carries the file and line to show the user."""

    def __init__(self, message: str, file: str | None = None, line: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.file = file
        self.line = line

    def as_dict(self) -> dict[str, Any]:
        return {"message": self.message, "file": self.file, "line": self.line}

    def problem(self) -> Problem:
        return Problem(self.message, self.file, self.line)

    def __str__(self) -> str:
        return str(self.problem())


def error_from_exception(exc: BaseException, source: ApiSource, doing: str) -> LoadError:
    """A LoadError pointing at the deepest line of the predictor's own code in the traceback (its code is compiled
    with the user's paths, so frames name the user's files)."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return LoadError(f"syntax error: {exc.msg}", source.original(exc.filename), exc.lineno)
    file, line = user_frame(exc, source)
    return LoadError(f"{doing} raised {type(exc).__name__}: {exc}", file or source.shown_code, line)


def user_frame(exc: BaseException, source: ApiSource) -> tuple[str | None, int | None]:
    """The deepest frame of an exception's traceback that is in the predictor's own files (its folder, or its file
    for a single-file predictor): (file, line), or (None, None)."""
    file, line = None, None
    mine = source.own_files()
    for frame in traceback.extract_tb(exc.__traceback__):
        if mine(frame.filename):
            file, line = source.original(frame.filename), frame.lineno
    return file, line


@dataclass(frozen=True)
class Signature:
    """What a predictor class asks for, found by inspecting it once."""

    predict_args: tuple[str, ...]
    init_args: tuple[str, ...]
    is_async: bool = False
    post_predict_args: tuple[str, ...] | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    has_close: bool = False  # it defines close(self), called when a version unloads
    has_health: bool = False  # it defines health(self), called every [serving] health_interval

    def as_dict(self) -> dict[str, Any]:
        return {
            "predict": list(self.predict_args),
            "init": list(self.init_args),
            "async": self.is_async,
            "post_predict": list(self.post_predict_args) if self.post_predict_args is not None else None,
            "close": self.has_close,
            "health": self.has_health,
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
    where = source.shown_code
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
        close = getattr(cls, "close", None)
        if callable(close) and _asked(close, (), where, "close()"):
            raise LoadError("close() takes no arguments but self", where)
        health = getattr(cls, "health", None)
        if callable(health) and _asked(health, (), where, "health()"):
            raise LoadError("health() takes no arguments but self", where)
    except LoadError as e:
        e.line = e.line or line
        raise
    return Signature(predict_args, init_args, inspect.iscoroutinefunction(predict), post_args,
                     has_close=callable(close), has_health=callable(health))


@dataclass
class Imported:
    """A predictor's class, what it asks for, and the namespace its modules live in (unload it to drop them)."""

    cls: Any
    signature: Signature
    namespace: Namespace


def load_class(source: ApiSource, version: str) -> Imported:
    """Import a predictor in a namespace of its own (see namespace.py) and check its class; raise LoadError with
    file and line (and leave nothing of it in ``sys.modules``)."""
    problem = name_problem(source.name)
    if problem:
        raise LoadError(problem, source.shown_code)
    if not source.code.is_file():
        raise LoadError("file not found", source.shown_code)
    namespace = Namespace(source, version)
    try:
        module = namespace.load()
    except BaseException as e:  # noqa: BLE001 - any failure of user code is a load error, even SystemExit
        namespace.unload()
        raise error_from_exception(e, source, "importing it") from None
    cls = getattr(module, CLASS_NAME, None)
    try:
        if cls is None:
            raise LoadError(f"no class named {CLASS_NAME}; define `class {CLASS_NAME}:` with predict()",
                            source.shown_code)
        return Imported(cls, inspect_class(cls, source), namespace)
    except LoadError:
        namespace.unload()
        raise


def instantiate(imported: Imported, config: dict[str, Any], device: str) -> Any:
    """Call the predictor's __init__ with what it asked for; raise LoadError on failure (and unload its namespace).
    What the import and __init__ changed in sys.path and os.environ is noted, to be undone at unload."""
    source = imported.namespace.source
    offered = {"config": config, "device": device, "predictor_dir": str(source.assets)}
    kwargs = {name: offered[name] if name != "metrics" else UserMetrics(source.name)
              for name in imported.signature.init_args}
    try:
        instance = imported.cls(**kwargs)
    except BaseException as e:  # noqa: BLE001 - user code: every failure becomes a load error
        imported.namespace.settle()
        imported.namespace.unload()
        raise error_from_exception(e, source, "__init__") from None
    imported.namespace.settle()
    return instance


MAX_SAMPLE = 64 * 2**20  # bytes of one warm-up sample


def warm_up(imported: Imported, instance: Any, samples: tuple[str, ...], max_batch_size: int = 1) -> None:
    """Run each warm-up sample (a file in the predictor's folder: .json parsed, .txt text, anything else bytes)
    through predict() as a request would; raise LoadError naming the sample that fails. A batching predictor
    (``max_batch_size`` > 1) gets each sample as a batch of one, then batches of 2, 4, 8, ... and of
    ``max_batch_size``, filled with the samples in turn: a first batch of a new size is dear (torch picks kernels
    per shape; bench/first_batch.py), and a replica whose first batches are dear looks dear to dispatch (costs.py);
    a batch as large as it will run also finds out now, not under load, whether the device has the memory for it."""
    source = imported.namespace.source
    batching = max_batch_size > 1
    payloads: list[Any] = []
    for name in samples:
        payload = _sample(source, name)
        payloads.append(payload)
        _warm_call(imported, instance, [payload] if batching else payload, batching, f"warm-up sample {name}")
    if batching and payloads:
        for n in batch_sizes(max_batch_size):
            batch = [payloads[i % len(payloads)] for i in range(n)]
            _warm_call(imported, instance, batch, batching, f"warm-up batch of {n} (the samples in turn)")


def batch_sizes(max_batch_size: int) -> list[int]:
    """The batch sizes a warm-up runs past 1: the powers of two below ``max_batch_size``, and it."""
    sizes: list[int] = []
    n = 2
    while n < max_batch_size:
        sizes.append(n)
        n *= 2
    return [*sizes, max_batch_size] if max_batch_size > 1 else []


def _sample(source: ApiSource, name: str) -> Any:
    """A warm-up sample's payload, as a request with it as its body would carry."""
    path = source.assets / name
    doing = f"warm-up sample {name}"
    try:
        if path.stat().st_size > MAX_SAMPLE:
            raise LoadError(f"{doing}: larger than {MAX_SAMPLE >> 20} MiB", str(path))
        data = path.read_bytes()
    except OSError as e:
        raise LoadError(f"{doing}: cannot read {path} ({e.strerror})", str(path)) from None
    try:
        return pl.parse_body("application/json" if name.endswith(".json") else
                             "text/plain" if name.endswith(".txt") else "", data)
    except pl.BadPayload as e:
        raise LoadError(f"{doing}: {e}", str(path)) from None


def _warm_call(imported: Imported, instance: Any, payload: Any, batching: bool, doing: str) -> None:
    """One warm-up predict() (of a list of payloads when batching), checked as a request's would be."""
    kwargs = pl.offer(imported.signature.predict_args, payload, b"", [])
    n = len(payload) if batching else 1
    if batching:
        kwargs = {k: (v if k == "payload" else [v] * n) for k, v in kwargs.items()}
    try:
        result = instance.predict(**kwargs)
        if inspect.isawaitable(result):
            result = asyncio.run(_awaited(result))
        if batching and (not isinstance(result, (list, tuple)) or len(result) != n):
            got = f"{len(result)} results" if isinstance(result, (list, tuple)) else type(result).__name__
            raise TypeError(f"predict() returned {got} for a batch of {n}; a batching predictor returns a list with "
                            "one result per payload")
        for one in result if batching else [result]:
            reply = pl.to_reply(one)
            if isinstance(reply.stream, Iterator):
                for _ in reply.stream:
                    pass  # a sync stream runs to its end (an async one is left)
    except BaseException as e:  # noqa: BLE001 - user code: every failure is this sample's
        raise error_from_exception(e, imported.namespace.source, f"{doing}: predict()") from None


async def _awaited(result: Any) -> Any:
    return await result
