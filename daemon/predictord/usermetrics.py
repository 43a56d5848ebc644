"""Metrics a predictor publishes itself: ``__init__`` asks for ``metrics`` by name and declares counters, gauges and
histograms on it. Each is named ``predictord_user_NAME`` and labelled with the API, written by whichever process
runs the predictor (prometheus-client's multiprocess mode, like the daemon's own), and merged into ``/metrics``.

    def __init__(self, config, metrics):
        self.tokens = metrics.counter("tokens_total", "Tokens generated.")
        self.by_lang = metrics.counter("requests_by_language_total", "Requests by language.", labels=["language"])
        self.depth = metrics.histogram("beam_depth", "Beam depth per request.", buckets=[1, 2, 4, 8])

    def predict(self, payload):
        self.tokens.inc(12)
        self.by_lang.labels(language="fr").inc()
        self.depth.observe(4)

A name or label that Prometheus would refuse, the label ``api`` (the daemon's), or a name declared again with
another kind or other labels is a ``MetricsError``: a load error with the predictor's file and line.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from typing import Any

PREFIX = "predictord_user_"
_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_GAUGE_MODES = ("livesum", "liveall", "max", "min", "sum", "mostrecent", "livemostrecent", "all")
_declared: dict[str, tuple[str, tuple[str, ...], Any]] = {}  # this process's: name -> (kind, labels, metric)
_lock = threading.Lock()


class MetricsError(ValueError):
    """A metric a predictor cannot declare as asked (the message says why and what would do)."""


class Labelled:
    """A metric with labels of the predictor's own: ``.labels(...)`` gives the child for one set of values."""

    def __init__(self, metric: Any, api: str, labels: tuple[str, ...]) -> None:
        self.metric, self.api, self.names = metric, api, labels

    def labels(self, *values: str, **named: str) -> Any:
        if values and named:
            raise MetricsError("give label values by position or by name, not both")
        if named:
            if set(named) != set(self.names):
                raise MetricsError(f"labels {sorted(named)} given; this metric has {list(self.names)}")
            values = tuple(named[n] for n in self.names)
        if len(values) != len(self.names):
            raise MetricsError(f"{len(values)} label values given; this metric has {list(self.names)}")
        return self.metric.labels(self.api, *(str(v) for v in values))


class UserMetrics:
    """What ``__init__`` gets when it asks for ``metrics``: it declares metrics labelled with its API."""

    def __init__(self, api: str) -> None:
        self.api = api

    def counter(self, name: str, documentation: str, labels: Sequence[str] = ()) -> Any:
        """A counter (``.inc(n)``); its samples end in ``_total``."""
        return self._declare("counter", name, documentation, labels)

    def gauge(self, name: str, documentation: str, labels: Sequence[str] = (), mode: str = "livesum") -> Any:
        """A gauge (``.set(v)``, ``.inc()``, ``.dec()``); ``mode``: how the values of several processes combine
        (prometheus-client's multiprocess modes: the sum over live processes by default)."""
        if mode not in _GAUGE_MODES:
            raise MetricsError(f"gauge {name!r}: mode {mode!r}; allowed: {', '.join(_GAUGE_MODES)}")
        return self._declare("gauge", name, documentation, labels, multiprocess_mode=mode)

    def histogram(self, name: str, documentation: str, labels: Sequence[str] = (),
                  buckets: Sequence[float] | None = None) -> Any:
        """A histogram (``.observe(v)``), with Prometheus' default buckets unless given."""
        extra = {"buckets": tuple(buckets)} if buckets is not None else {}
        return self._declare("histogram", name, documentation, labels, **extra)

    def _declare(self, kind: str, name: str, documentation: str, labels: Sequence[str], **extra: Any) -> Any:
        full = name if name.startswith(PREFIX) else PREFIX + name
        if not isinstance(name, str) or not _NAME.match(full):
            raise MetricsError(f"{kind} name {name!r}: use letters, digits and '_' (not starting with a digit)")
        names = tuple(labels)
        for label in names:
            if not isinstance(label, str) or not _NAME.match(label) or label.startswith("__"):
                raise MetricsError(f"{kind} {full}: label {label!r}: use letters, digits and '_'")
            if label in ("api", "le", "quantile"):
                raise MetricsError(f"{kind} {full}: label {label!r} is the daemon's (every metric of yours is "
                                   "labelled with its API already); choose another name")
        if len(set(names)) != len(names):
            raise MetricsError(f"{kind} {full}: a label is named twice in {list(names)}")
        if not isinstance(documentation, str) or not documentation.strip():
            raise MetricsError(f"{kind} {full}: say what it counts in its documentation (a non-empty string)")
        with _lock:
            known = _declared.get(full.removesuffix("_total") if kind == "counter" else full)
            if known is None:
                metric = _make(kind, full, documentation, ("api", *names), extra)
                known = _declared[full.removesuffix("_total") if kind == "counter" else full] = (kind, names, metric)
            elif known[:2] != (kind, names):
                raise MetricsError(f"{full} is declared already as a {known[0]} with labels {list(known[1])} (by this "
                                   f"or another API in this process); it cannot also be a {kind} with labels "
                                   f"{list(names)}: use another name")
        metric = known[2]
        return Labelled(metric, self.api, names) if names else metric.labels(self.api)


def _make(kind: str, name: str, documentation: str, labels: tuple[str, ...], extra: dict[str, Any]) -> Any:
    from prometheus_client import Counter, Gauge, Histogram

    cls = {"counter": Counter, "gauge": Gauge, "histogram": Histogram}[kind]
    try:
        return cls(name, documentation, labels, **extra)
    except ValueError as e:  # a name the daemon's own metrics use, or one prometheus-client refuses
        raise MetricsError(f"{kind} {name}: {e}") from None
