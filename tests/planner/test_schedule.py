"""Pipeline schedules: every forward and backward exactly once, in-flight counts in closed form, and the
simulator against the textbook step times (GPipe/1F1B: (m + pp - 1) t; interleaved: (m + (pp - 1)/v) t)."""

from __future__ import annotations

import pytest

from shardwise.planner.schedule import (
    ScheduleDeadlock,
    analytic_step,
    peak_live,
    peak_live_count,
    schedule_actions,
    simulate,
)

CASES = [("gpipe", 4, 8, 1), ("1f1b", 4, 8, 1), ("1f1b", 4, 2, 1), ("interleaved", 4, 8, 2),
         ("interleaved", 2, 4, 3), ("interleaved", 8, 64, 2), ("1f1b", 1, 5, 1)]  # fmt: skip


@pytest.mark.parametrize(("schedule", "pp", "m", "v"), CASES)
def test_each_device_runs_each_of_its_forwards_and_backwards_once(schedule, pp, m, v):
    acts = schedule_actions(schedule, pp, m, v)
    chunks = pp * v
    for p, a in enumerate(acts):
        want = sorted((k, c, i) for k in "FB" for c in range(p, chunks, pp) for i in range(m))
        assert sorted(a) == want
        seen = set()
        for kind, c, i in a:  # a backward never precedes its own forward on the device
            if kind == "B":
                assert ("F", c, i) in seen
            seen.add((kind, c, i))
    assert peak_live(acts) == peak_live_count(schedule, pp, m, v)


@pytest.mark.parametrize(("schedule", "pp", "m", "v"), CASES)
def test_simulated_step_matches_the_textbook_formula(schedule, pp, m, v):
    chunks = pp * v
    f, b = 1.0 / v, 2.0 / v
    result = simulate(schedule_actions(schedule, pp, m, v), [f] * chunks, [b] * chunks, [0.0] * chunks)
    assert result.step_s == pytest.approx((m + (pp - 1) / v) * 3.0)
    assert result.step_s == pytest.approx(
        analytic_step(pp, v, m, [3.0] * pp, [3.0 / v] * chunks, 0.0, [0.0] * pp)
    )
    assert result.bubble_s == pytest.approx((pp - 1) / v * 3.0)


def test_transfers_and_tails_lengthen_the_step():
    acts = schedule_actions("1f1b", 2, 4)
    base = simulate(acts, [1.0, 1.0], [2.0, 2.0], [0.0, 0.0]).step_s
    slow = simulate(acts, [1.0, 1.0], [2.0, 2.0], [0.5, 0.0]).step_s
    tail = simulate(acts, [1.0, 1.0], [2.0, 2.0], [0.0, 0.0], tail_s=[0.0, 5.0])
    assert slow > base
    # the last stage finishes its backwards first, so part of its tail hides behind stage 0's work
    assert base < tail.step_s < base + 5.0


def test_a_schedule_that_waits_on_itself_is_a_deadlock():
    bad = [[("B", 0, 0), ("F", 0, 0)], [("F", 1, 0), ("B", 1, 0)]]
    with pytest.raises(ScheduleDeadlock):
        simulate(bad, [1.0, 1.0], [1.0, 1.0], [0.0, 0.0])


def test_interleaved_needs_whole_groups_of_micro_batches():
    with pytest.raises(ValueError, match="multiple of pp"):
        schedule_actions("interleaved", 4, 6, 2)
    with pytest.raises(ValueError, match="virtual=1"):
        schedule_actions("1f1b", 4, 8, 2)


def test_forward_only_schedules_for_inference():
    acts = schedule_actions("gpipe", 2, 3, 2, train=False)
    assert all(k == "F" for a in acts for k, _, _ in a)
    result = simulate(acts, [1.0] * 4, [0.0] * 4, [0.0] * 4)
    assert result.step_s == pytest.approx(6.0 + 1.0)
