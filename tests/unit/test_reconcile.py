"""The pure reconcile: wanted APIs and observed workers in, actions out. Every rule the master relies on for reload,
rebalancing and deadlines, checked without a process."""

from __future__ import annotations

from predictord.master.reconcile import KillForDeadline, LoadApi, Retire, UnloadApi, Wanted, WorkerView, reconcile

NOW = 1000.0
LATER = NOW + 60  # a load deadline that has not passed


def test_a_new_api_is_loaded_where_it_is_placed() -> None:
    actions = reconcile({"a": Wanted("v1", (0,))}, [WorkerView(0), WorkerView(1)], NOW)
    assert actions == [LoadApi(0, "a", "v1")]


def test_one_load_per_worker_at_a_time() -> None:
    apis = {"a": Wanted("v1", (0,)), "b": Wanted("v1", (0,))}
    assert reconcile(apis, [WorkerView(0)], NOW) == [LoadApi(0, "a", "v1")]
    busy = WorkerView(0, loading={"a": ("v1", LATER)})
    assert reconcile(apis, [busy], NOW) == []  # b waits, so a hanging __init__ is blamed on a
    done = WorkerView(0, loaded={"a": "v1"})
    assert reconcile(apis, [done], NOW) == [LoadApi(0, "b", "v1")]


def test_nothing_loadable_loads_nothing_and_a_worker_not_up_gets_nothing() -> None:
    assert reconcile({"a": Wanted(None, (0,))}, [WorkerView(0)], NOW) == []
    assert reconcile({"a": Wanted("v1", (0,))}, [WorkerView(0, up=False)], NOW) == []
    assert reconcile({"a": Wanted("v1", (0,))}, [WorkerView(0, stopping=True)], NOW) == []


def test_a_load_past_its_deadline_is_killed_whatever_happened_to_its_api() -> None:
    hung = WorkerView(0, loading={"a": ("v1", NOW - 1)})
    for apis in ({"a": Wanted("v1", (0,))},  # still wanted
                 {},  # deleted while its __init__ hangs (the case that wedged the worker's load slot)
                 {"a": Wanted("v2", (0,))},  # replaced by a newer version
                 {"a": Wanted("v1", (1,))}):  # rebalanced away
        assert reconcile(apis, [hung, WorkerView(1)], NOW)[0] == KillForDeadline(0, "a", "v1")


def test_a_killed_worker_gets_no_other_action_and_others_go_on() -> None:
    hung = WorkerView(0, loading={"a": ("v1", NOW - 1)})
    apis = {"b": Wanted("v1", (0, 1))}
    assert reconcile(apis, [hung, WorkerView(1)], NOW) == [KillForDeadline(0, "a", "v1"), LoadApi(1, "b", "v1")]
    assert reconcile(apis, [WorkerView(0, stopping=True, loading={"a": ("v1", NOW - 1)})], NOW) == [
        KillForDeadline(0, "a", "v1")]  # a deadline holds for a stopping worker too


def test_a_replica_is_unloaded_only_when_served_elsewhere_or_unwanted() -> None:
    moved = {"a": Wanted("v1", (1,))}
    old, new = WorkerView(0, loaded={"a": "v1"}), WorkerView(1, loading={"a": ("v1", LATER)})
    assert reconcile(moved, [old, new], NOW) == []  # make before break: the new one is not ready yet
    ready = WorkerView(1, loaded={"a": "v1"})
    assert reconcile(moved, [old, ready], NOW) == [UnloadApi(0, "a")]
    assert reconcile({}, [old], NOW) == [UnloadApi(0, "a")]  # deleted: no one else needs to serve it
    unloading = WorkerView(0, loaded={"a": "v1"}, unloading=frozenset({"a"}))
    assert reconcile(moved, [unloading, ready], NOW) == []  # asked once


def test_a_stopping_worker_does_not_count_as_serving_elsewhere() -> None:
    moved = {"a": Wanted("v1", (1,))}
    old, leaving = WorkerView(0, loaded={"a": "v1"}), WorkerView(1, loaded={"a": "v1"}, stopping=True)
    assert reconcile(moved, [old, leaving], NOW) == []


def test_a_worker_whose_slot_is_gone_retires_after_its_apis_are_served_elsewhere() -> None:
    apis = {"a": Wanted("v1", (1,))}
    going = WorkerView(0, configured=False, loaded={"a": "v1"})
    assert reconcile(apis, [going, WorkerView(1, loading={"a": ("v1", LATER)})], NOW) == []
    assert reconcile(apis, [going, WorkerView(1, loaded={"a": "v1"})], NOW) == [Retire(0)]
    assert reconcile({}, [WorkerView(0, configured=False)], NOW) == [Retire(0)]


def test_a_new_version_rolls_one_replica_at_a_time() -> None:
    apis = {"a": Wanted("v2", (0, 1))}
    both_old = [WorkerView(0, loaded={"a": "v1"}), WorkerView(1, loaded={"a": "v1"})]
    assert reconcile(apis, both_old, NOW) == [LoadApi(0, "a", "v2")]  # not both in the same tick
    rolling = [WorkerView(0, loading={"a": ("v2", LATER)}, loaded={"a": "v1"}), WorkerView(1, loaded={"a": "v1"})]
    assert reconcile(apis, rolling, NOW) == []
    first_done = [WorkerView(0, loaded={"a": "v2"}), WorkerView(1, loaded={"a": "v1"})]
    assert reconcile(apis, first_done, NOW) == [LoadApi(1, "a", "v2")]


def test_a_first_load_goes_to_every_replica_at_once() -> None:
    """Nothing serves yet, so there is nothing to keep serving: both replicas load."""
    apis = {"a": Wanted("v1", (0, 1))}
    assert reconcile(apis, [WorkerView(0), WorkerView(1)], NOW) == [LoadApi(0, "a", "v1"), LoadApi(1, "a", "v1")]
