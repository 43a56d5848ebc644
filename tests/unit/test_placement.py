from __future__ import annotations

from predictord.master.placement import Want, WorkerSlot, place, plan_slots

CPU2 = [WorkerSlot(0, "cpu", "cpu"), WorkerSlot(1, "cpu", "cpu")]
MIXED = [WorkerSlot(0, "gpu", "gpu0"), WorkerSlot(1, "gpu", "gpu1"), WorkerSlot(2, "cpu", "cpu")]


def test_spreads_apis_over_workers() -> None:
    p = place(CPU2, {"a": Want("any", 1), "b": Want("any", 1)})
    assert {p["a"].slots, p["b"].slots} == {(0,), (1,)}


def test_device_kinds_are_respected() -> None:
    p = place(MIXED, {"g": Want("gpu", 2), "c": Want("cpu", 1), "any": Want("any", 1)})
    assert p["g"].slots == (0, 1) and p["c"].slots == (2,) and p["any"].slots[0] in (0, 1)


def test_gpu_api_without_gpu_is_an_error() -> None:
    p = place(CPU2, {"g": Want("gpu", 1)})
    assert p["g"].slots == () and "needs a GPU" in (p["g"].error or "")
    p = place([WorkerSlot(0, "gpu", "gpu0")], {"c": Want("cpu", 1)})
    assert "[workers] cpu = 0" in (p["c"].error or "")


def test_more_replicas_than_workers_is_a_note() -> None:
    p = place(CPU2, {"a": Want("cpu", 3)})
    assert p["a"].slots == (0, 1) and "only 2" in (p["a"].note or "")


def test_current_placement_is_kept() -> None:
    p = place(CPU2, {"a": Want("any", 1), "b": Want("any", 1)}, {"a": [1], "b": [0]})
    assert p["a"].slots == (1,) and p["b"].slots == (0,)


def test_plan_slots_keeps_running_workers_and_adds_or_drops() -> None:
    assert plan_slots({}, ["gpu0", "cpu", "cpu"]) == {0: "gpu0", 1: "cpu", 2: "cpu"}
    assert plan_slots({0: "gpu0", 1: "cpu"}, ["gpu0", "cpu", "cpu"]) == {0: "gpu0", 1: "cpu", 2: "cpu"}
    assert plan_slots({0: "gpu0", 1: "cpu", 2: "cpu"}, ["cpu"]) == {1: "cpu"}
    assert plan_slots({1: "cpu"}, ["cpu", "cpu"]) == {1: "cpu", 0: "cpu"}


GIB = 1 << 30


def test_a_replica_whose_footprint_does_not_fit_a_gpu_goes_elsewhere_or_is_refused_with_the_figures() -> None:
    room = {"gpu0": 2 * GIB, "gpu1": 12 * GIB}
    p = place(MIXED, {"big": Want("gpu", 1, 10 * GIB)}, room=room)
    assert p["big"].slots == (1,) and p["big"].error is None
    p = place(MIXED, {"big": Want("gpu", 2, 10 * GIB)}, room=room)
    assert p["big"].slots == (1,) and "does not fit in the room left on gpu0 2.0 GiB" in (p["big"].note or "")
    p = place(MIXED, {"big": Want("gpu", 1, 20 * GIB)}, room=room)
    assert p["big"].slots == ()
    assert "not placed: 20.0 GiB (its measured footprint) does not fit" in (p["big"].error or "")


def test_room_is_used_up_by_the_replicas_placed_before() -> None:
    p = place(MIXED, {"a": Want("gpu", 1, 8 * GIB), "b": Want("gpu", 1, 8 * GIB)}, room={"gpu0": 10 * GIB, "gpu1": 1})
    assert p["a"].slots == (0,) and p["b"].slots == () and p["b"].error


def test_where_a_replica_already_runs_it_keeps_running_whatever_the_room() -> None:
    p = place(MIXED, {"a": Want("gpu", 1, 30 * GIB)}, {"a": [0]}, room={"gpu0": 0, "gpu1": 0})
    assert p["a"].slots == (0,) and p["a"].error is None
