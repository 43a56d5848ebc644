"""The cost of a batch by its size, and when a job sent to a replica would finish (costs.py)."""

from __future__ import annotations

import pytest

from predictord.costs import REFIT_EVERY, STALE_AFTER, BatchCosts, expected_finish, fit


def test_one_size_seen_is_taken_as_proportional() -> None:
    assert fit({4: [0.008, 1.0]}) == (0.0, 0.002)
    assert fit({}) == (0.0, 0.0)


def test_a_cpu_like_cost_fits_a_line_through_the_origin() -> None:
    fixed, per_job = fit({1: [0.010, 5.0], 4: [0.040, 5.0], 8: [0.080, 5.0]})
    assert fixed == pytest.approx(0.0, abs=1e-9) and per_job == pytest.approx(0.010)


def test_a_gpu_like_cost_is_mostly_fixed() -> None:
    fixed, per_job = fit({1: [0.0101, 3.0], 8: [0.0108, 3.0], 32: [0.0132, 3.0]})
    assert fixed == pytest.approx(0.010, abs=1e-4) and per_job == pytest.approx(0.0001, abs=1e-5)


def test_noise_never_makes_a_bigger_batch_cheaper_nor_a_cost_negative() -> None:
    assert fit({1: [0.010, 3.0], 8: [0.009, 3.0]}) == pytest.approx((0.0095, 0.0))
    fixed, per_job = fit({2: [0.001, 3.0], 8: [0.010, 3.0]})  # the line would cross zero: through the origin
    assert fixed == 0.0 and per_job > 0


def test_the_line_is_refit_on_a_new_size_and_now_and_then() -> None:
    costs = BatchCosts()
    assert costs.observe(1, 0.010) and costs.line == (0.0, 0.010)
    assert costs.observe(8, 0.024)  # a new size, fit now: a batch of 8 costs less than 8 of 1
    assert costs.line == pytest.approx((0.008, 0.002))
    fixed = costs.line[0]
    changed = [costs.observe(8, 0.016) for _ in range(REFIT_EVERY)]  # batches of 8 got cheaper: seen once a refit
    assert changed.count(True) == 1 and costs.line[0] > fixed
    assert costs.cost(8) == pytest.approx(costs.line[0] + 8 * costs.line[1])


@pytest.mark.parametrize(("ahead", "lanes", "batch", "want"), [
    (0, 1, 1, 1.0),  # alone: one job's time
    (3, 1, 1, 4.0),  # three ahead, one at a time
    (1, 2, 1, 1.0),  # two lanes, one busy: starts now
    (2, 2, 1, 2.0),
    (5, 1, 8, 6.0),  # rides in the batch with the five (per job 1, fixed 0)
    (8, 1, 8, 9.0),  # a full batch first
])
def test_expected_finish_counts_lanes_and_batches(ahead: int, lanes: int, batch: int, want: float) -> None:
    assert expected_finish(ahead, lanes, batch, 0.0, 1.0) == pytest.approx(want)


def test_a_fixed_cost_is_paid_once_a_batch() -> None:
    assert expected_finish(8, 1, 8, 10.0, 0.0) == pytest.approx(20.0)  # two batches
    assert expected_finish(7, 1, 8, 10.0, 0.0) == pytest.approx(10.0)  # one


def test_a_line_no_call_fed_for_a_while_is_forgotten() -> None:
    costs = BatchCosts()
    assert not costs.forget_if_stale(1e9), "nothing measured: nothing to forget"
    costs.observe(1, 1.0)  # a cold first batch
    assert costs.line == (0.0, 1.0)
    assert not costs.forget_if_stale(costs.last + STALE_AFTER / 2), "fed recently"
    assert costs.forget_if_stale(costs.last + STALE_AFTER)
    assert costs.line == (0.0, 0.0) and not costs.sizes, "priced as the cheapest again until it runs"
    costs.observe(4, 0.004)
    assert costs.line == (0.0, 0.001), "measured afresh: the cold batch is gone"
