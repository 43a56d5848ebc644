from __future__ import annotations

from predictord.placement import Want, WorkerSlot, place, plan_slots

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
