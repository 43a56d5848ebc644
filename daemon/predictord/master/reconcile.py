"""What the model workers should do next: wanted APIs and observed workers in, actions out. Pure: no I/O, no clock,
no processes; the master's loop executes the actions.

The rules (each has a unit test in tests/unit/test_reconcile.py):
- a worker loads one API at a time, so a hanging ``__init__`` is blamed on the right API;
- a load past its deadline is killed, whatever happened to its API meanwhile (deleted, changed, moved away);
- make before break: a replica is unloaded only when its API is no longer wanted or is served elsewhere, and a
  worker whose slot is gone is retired only once every API it serves is served elsewhere;
- a new version rolls one replica at a time while an old one serves.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Wanted:
    """An API as reconcile sees it: the version to serve (None: nothing loadable yet) and the workers it goes on."""

    version: str | None
    placement: tuple[int, ...]


@dataclass(frozen=True)
class WorkerView:
    """A model worker as reconcile sees it."""

    slot: int
    configured: bool = True  # its slot is still wanted (not dropped by a config reload or the rebalancer)
    up: bool = True  # it said it started
    stopping: bool = False
    loaded: Mapping[str, str] = field(default_factory=dict)  # API -> version it serves
    loading: Mapping[str, tuple[str, float]] = field(default_factory=dict)  # API -> (version, deadline)
    unloading: frozenset[str] = frozenset()


@dataclass(frozen=True)
class LoadApi:
    worker: int
    api: str
    version: str


@dataclass(frozen=True)
class UnloadApi:
    worker: int
    api: str


@dataclass(frozen=True)
class Retire:
    worker: int


@dataclass(frozen=True)
class KillForDeadline:
    """A load ran past its deadline: the worker is killed (its one load slot would stay taken forever)."""

    worker: int
    api: str
    version: str


Action = LoadApi | UnloadApi | Retire | KillForDeadline


def served_elsewhere(api: str, worker: int, apis: Mapping[str, Wanted], workers: Sequence[WorkerView]) -> bool:
    """The API is no longer wanted, or another live worker that placement wants for it has it loaded."""
    wanted = apis.get(api)
    return wanted is None or any(
        api in w.loaded and w.slot in wanted.placement and not w.stopping for w in workers if w.slot != worker)


def reconcile(apis: Mapping[str, Wanted], workers: Sequence[WorkerView], now: float) -> list[Action]:
    """The actions that move the workers toward what is wanted, in the order to run them."""
    actions: list[Action] = []
    loading_anywhere = {api for w in workers for api in w.loading}
    for w in workers:
        overdue = [(api, version) for api, (version, deadline) in w.loading.items() if now > deadline]
        if overdue:
            api, version = overdue[0]
            actions.append(KillForDeadline(w.slot, api, version))
            continue
        if w.stopping:
            continue
        if not w.configured:
            if all(served_elsewhere(api, w.slot, apis, workers) for api in w.loaded):
                actions.append(Retire(w.slot))
            continue
        if not w.up:
            continue
        load = _load(w, apis, workers, loading_anywhere)
        if load is not None:
            actions.append(load)
            loading_anywhere.add(load.api)  # the next worker sees this roll as started
        actions += [UnloadApi(w.slot, api) for api in w.loaded
                    if api not in w.unloading and (api not in apis or w.slot not in apis[api].placement)
                    and served_elsewhere(api, w.slot, apis, workers)]
    return actions


def _load(w: WorkerView, apis: Mapping[str, Wanted], workers: Sequence[WorkerView],
          loading_anywhere: set[str]) -> LoadApi | None:
    """At most one load for this worker: the first API placed here whose wanted version it does not serve."""
    if w.loading:
        return None
    for api, wanted in apis.items():
        if wanted.version is None or w.slot not in wanted.placement or w.loaded.get(api) == wanted.version:
            continue
        rolling = api in loading_anywhere and any(api in o.loaded for o in workers)
        if rolling:
            continue  # one replica at a time while an old one serves
        return LoadApi(w.slot, api, wanted.version)
    return None
