"""The master's parts (catalog, fleet, balancer, publisher), each driven in-process: no daemon, no worker process."""

from __future__ import annotations

import json
import pickle
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from predictord.config import ApiSettings, Config, ServingConfig
from predictord.devices import Device
from predictord.master.balancer import Balancer
from predictord.master.catalog import Catalog
from predictord.master.fleet import Fleet, ModelWorkerHandle
from predictord.master.notify import Notifier
from predictord.master.publisher import DaemonInfo, Publisher
from predictord.master.rebalance import Decision
from predictord.master.reconcile import LoadApi, UnloadApi
from predictord.master.records import ApiRecord, Events
from predictord.protocol import (
    CONTROL,
    FrameReader,
    Hung,
    Load,
    Loaded,
    Problem,
    RoutingTable,
    Started,
    Unload,
    Unloaded,
)
from predictord.scoreboard import Scoreboard
from predictord.sources import source_for

THEIRS: dict[int, socket.socket] = {}  # the worker's end of each stand-in control channel


@pytest.fixture
def parts(tmp_path: Path) -> Iterator[tuple[Catalog, Fleet, Balancer, Publisher, Events]]:
    (tmp_path / "predictors").mkdir()
    config = Config()
    events = Events()
    scoreboard = Scoreboard()
    catalog = Catalog(config, tmp_path, events)
    fleet = Fleet(scoreboard, tmp_path, 1, lambda: None)
    balancer = Balancer(config, {0: Device("cpu"), 1: Device("cpu")}, catalog, fleet, scoreboard, events)
    publisher = Publisher(tmp_path, scoreboard, Notifier(None))
    yield catalog, fleet, balancer, publisher, events
    for handle in fleet:
        handle.ctl.close()


def api(catalog: Catalog, tmp_path: Path, name: str, version: str = "v1", replicas: int = 1) -> ApiRecord:
    """A record that passed its probe (no probe process: its outcome is written in)."""
    path = tmp_path / "predictors" / f"{name}.py"
    path.write_text("class PythonPredictor: ...\n")
    record = ApiRecord(name, len(catalog.apis), source_for(path), version)
    record.settings = ApiSettings(serving=ServingConfig(replicas=replicas))
    record.signature = {"predict": ["payload"], "init": ["config"], "post_predict": None}
    catalog.apis[name] = record
    catalog.needs_plan = True
    return record


def worker(fleet: Fleet, slot: int) -> ModelWorkerHandle:
    """A worker as the fleet tracks one, with a real control channel and no process behind it."""
    ours, theirs = socket.socketpair()
    THEIRS[slot] = theirs
    handle = ModelWorkerHandle(slot, Device("cpu"), 40000 + slot, ours, f"/tmp/model-{slot}.sock", time.monotonic())
    fleet.workers[slot] = handle
    return handle


def test_plan_spreads_apis_and_the_catalog_is_its_only_writer(parts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    catalog, _, balancer, _, _ = parts
    api(catalog, tmp_path, "a")
    api(catalog, tmp_path, "b")
    catalog.plan(balancer.slots(), balancer.gpu_room())
    assert sorted(r.placement for r in catalog.apis.values()) == [(0,), (1,)]
    assert not catalog.needs_plan
    wanted = catalog.wanted()
    assert wanted["a"].version == "v1" and wanted["a"].placement == catalog.apis["a"].placement


def test_a_rebalance_decision_changes_what_is_wanted_and_the_plan_follows(parts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    catalog, _, balancer, _, events = parts
    record = api(catalog, tmp_path, "a")
    catalog.plan(balancer.slots(), balancer.gpu_room())
    before = record.placement
    balancer.apply(Decision("add", api="a", device="cpu", reason="queueing"))  # into a new worker slot
    assert record.placement == before, "a decision does not write placement itself"
    assert catalog.needs_plan and len(balancer.devices) == 3 and balancer.extra_slots
    catalog.plan(balancer.slots(), balancer.gpu_room())
    new_slot = next(iter(balancer.extra_slots))
    assert record.placement == tuple(sorted((*before, new_slot))) and record.scale == 2
    moved_from = record.placement[0]
    balancer.apply(Decision("remove", api="a", device="cpu", slot=moved_from, reason="idle"))
    catalog.plan(balancer.slots(), balancer.gpu_room())
    assert moved_from not in record.placement and len(record.placement) == 1
    assert [e["kind"] for e in events.recent] == ["rebalance", "rebalance"]


def test_loaded_reports_update_the_api_and_name_the_users_file(parts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    catalog, fleet, _, _, events = parts
    record = api(catalog, tmp_path, "a")
    handle = worker(fleet, 0)
    handle.loading["a"] = ("v1", time.monotonic() + 60)
    ok = Loaded("a", "v1", None, 0.5, 1234)
    fleet.note(handle, ok)
    catalog.loaded(ok, 0, "cpu")
    assert handle.loaded == {"a": "v1"} and not handle.loading
    assert record.good is not None and record.footprint == 1234 and "v1" in record.loaded_at
    assert "ready on cpu (worker 0)" in events.recent[-1]["text"]
    record.version = "v2"
    bad = Loaded("a", "v2", Problem("__init__ raised ValueError: no", str(record.source.code), 3))
    catalog.loaded(bad, 0, "cpu")
    assert record.error is not None and record.error.line == 3 and record.error.version == "v2"
    assert "v2" in record.failed_versions and catalog.wanted()["a"].version == "v1"  # the last good one serves


def test_a_load_that_ends_without_a_report_fails_only_the_version_still_wanted(parts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    catalog, _, _, _, _ = parts
    record = api(catalog, tmp_path, "a", version="v2")
    catalog.load_failed("a", "v1", "the model worker died while loading it")  # an older version: history
    assert record.error is None
    catalog.load_failed("a", "v2", "__init__ took longer than the load deadline (1s)")
    assert record.error is not None and record.error.file == str(record.source.code)
    catalog.load_failed("gone", "v1", "deleted meanwhile")  # no record: nothing to do, no error


def test_fleet_notes_messages_and_views(parts) -> None:  # type: ignore[no-untyped-def]
    _, fleet, _, _, _ = parts
    handle = worker(fleet, 0)
    fleet.note(handle, Started(handle.pid))
    assert handle.up
    handle.loaded["a"] = "v1"
    handle.threads["a"] = 2
    assert [(r.worker, r.version, r.threads) for r in fleet.replicas("a")] == [(0, "v1", 2)]
    fleet.note(handle, Hung("a", 99.0, "r1"))  # logged; the heartbeat decides
    view = handle.view(configured=False)
    assert view.loaded == {"a": "v1"} and not view.configured
    handle.unloading.add("a")
    assert fleet.replicas("a") == []  # leaving: no new jobs
    fleet.note(handle, Unloaded("a"))
    assert handle.loaded == {} and handle.unloading == set()
    assert fleet.in_use() == set()


def test_backoff_grows_for_a_slot_that_keeps_dying(parts) -> None:  # type: ignore[no-untyped-def]
    _, fleet, _, _, _ = parts
    waits = [fleet.backoff(3) for _ in range(6)]
    assert waits[0] == 0.0 and waits == sorted(waits) and waits[-1] <= 10.0 and waits[-1] > waits[1]


def test_publisher_rewrites_routes_only_when_routing_changes(parts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    catalog, fleet, balancer, publisher, events = parts
    api(catalog, tmp_path, "a")
    catalog.plan(balancer.slots(), balancer.gpu_room())
    info = DaemonInfo(1, time.time(), str(tmp_path / "predictors"), 2)
    board = publisher.scoreboard
    publisher.publish(catalog, fleet, balancer, events, info)
    routes_v, status_v = board.routes_version, board.status_version
    table = RoutingTable.loads((tmp_path / "routes.json").read_bytes())
    assert table.apis["a"].state == "loading" and table.apis["a"].replicas == ()
    events.add("load", "something a person wants to see")
    publisher.publish(catalog, fleet, balancer, events, info)
    assert board.routes_version == routes_v, "a status change alone leaves the routes alone"
    assert board.status_version == status_v + 1
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["events"][-1]["text"] == "something a person wants to see"
    assert status["apis"]["a"]["state"] == "loading" and status["daemon"]["ready"] is False
    handle = worker(fleet, catalog.apis["a"].placement[0])
    handle.up = True
    handle.loaded["a"] = "v1"
    publisher.publish(catalog, fleet, balancer, events, info)
    assert board.routes_version == routes_v + 1
    row = RoutingTable.loads((tmp_path / "routes.json").read_bytes()).apis["a"].replicas[0]
    assert (row.worker, row.socket, row.version) == (handle.slot, handle.socket_path, "v1")


def received(slot: int) -> list[object]:
    """The control messages a stand-in worker was sent."""
    got: list[object] = []
    reader = FrameReader(lambda kind, _, body: got.append(pickle.loads(body)) if kind == CONTROL else None)
    reader.feed(THEIRS[slot].recv(65536))
    return got


def test_fleet_carries_out_reconciles_loads_and_unloads(parts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    catalog, fleet, _, _, _ = parts
    record = api(catalog, tmp_path, "a")
    handle = worker(fleet, 0)
    fleet.carry_out(LoadApi(0, "a", "v1"), catalog, 30.0)
    [load] = received(0)
    assert isinstance(load, Load) and load.version == "v1" and load.api_slot == record.slot
    assert handle.loading["a"][0] == "v1" and handle.threads["a"] == 1
    handle.loading.clear()
    handle.loaded["a"] = "v1"
    fleet.carry_out(UnloadApi(0, "a"), catalog, 30.0)
    assert received(0) == [Unload("a")] and handle.unloading == {"a"}
