"""Recomputation as a dimension of the one search: on a real planning problem — GPT-2 (2 layers, sequence 16,
batch 4, ZeRO off) on cpu:2 shrunk to 2.1 MiB per device, where dp=2 is the fastest layout but needs more than
the device as it is, and tp=2 fits as it is, slower — the planner compares every layout with and without
recomputation at its price, and keeps the fastest that fits."""

from __future__ import annotations

import dataclasses

import pytest

from shardwise.cluster import get_cluster
from shardwise.frontend.trace import trace
from shardwise.ir.plan import ExecutionPlan
from shardwise.planner.auto import plan_auto
from shardwise.zoo import build_model

CAPACITY = int(2.1 * 2**20)


def _loss(o):
    return o.logits.float().sin().mean()


@pytest.fixture(scope="module")
def problem():
    model, inputs = build_model("gpt2", device="meta", layers=2, seq=16, batch=4)
    graph, _ = trace(model, inputs, loss_fn=_loss)
    spec = get_cluster("cpu:2")
    small = dataclasses.replace(spec, device=dataclasses.replace(spec.device, memory_bytes=CAPACITY))
    return graph, small


def _plan(problem, **pins) -> ExecutionPlan:
    graph, cluster = problem
    return plan_auto(graph, cluster, mode="train", constraints={"zero": 0, **pins})


def test_premise_fastest_layout_does_not_fit_as_it_is(problem):
    plan = _plan(problem, recompute="none")
    assert plan.degrees["tp"] == 2 and max(plan.predicted.memory_bytes) <= CAPACITY
    dp = [a for a in plan.alternatives if dict(a.degrees)["dp"] == 2]
    assert dp and not any(a.fits for a in dp) and min(a.step_time_s for a in dp) < plan.predicted.step_time_s


def test_the_choice_is_by_price_with_recomputation_in_the_search(problem):
    as_is = _plan(problem, recompute="none")
    plan = _plan(problem)  # recompute searched: none, selective, full
    assert max(plan.predicted.memory_bytes) <= CAPACITY
    assert plan.predicted.step_time_s <= as_is.predicted.step_time_s
    recomputing = [a for a in plan.alternatives if "recompute=selective" in a.note or "recompute=full" in a.note]
    assert recomputing  # the layouts made to fit by recomputation were in the search
    if plan.degrees["dp"] == 2:  # recomputation made dp=2 fit, and it is still faster than tp=2 as it is
        assert plan.recompute
    else:
        assert plan.degrees == as_is.degrees and plan.predicted.step_time_s == as_is.predicted.step_time_s
    chosen = [a for a in plan.alternatives if a.chosen]
    assert len(chosen) == 1 and chosen[0].step_time_s == plan.predicted.step_time_s
    faster_fitting = [a for a in plan.alternatives if a.fits and a.step_time_s < plan.predicted.step_time_s * 0.99]
    assert not [a for a in faster_fitting if "realized" in a.note]  # no realized plan that fits is faster


def test_pinned_recomputation_is_honoured_and_priced():
    # longer sequences than the premise's: activations, not the optimizer step, make the peak
    model, inputs = build_model("gpt2", device="meta", layers=2, seq=128, batch=8)
    graph, _ = trace(model, inputs, loss_fn=_loss)
    roomy = get_cluster("cpu:2")

    def plan(**pins):
        return plan_auto(graph, roomy, mode="train", constraints={"zero": 0, "dp": 2, "tp": 1, **pins})

    none, full = plan(recompute="none"), plan(recompute="full")
    assert not none.recompute and full.recompute
    assert full.predicted.step_time_s > none.predicted.step_time_s  # recomputation costs its forward again
    assert full.memory[0].lower_bound_bytes < none.memory[0].lower_bound_bytes
    # a byte budget between the two: selective recomputes some layers, never more than every one, within it
    budget = (full.memory[0].lower_bound_bytes + none.memory[0].lower_bound_bytes) // 2
    selective = plan(recompute=budget)
    assert selective.recompute and max(m.lower_bound_bytes for m in selective.memory) <= budget
    assert none.predicted.step_time_s < selective.predicted.step_time_s <= full.predicted.step_time_s


def test_fastest_placement_kept_when_the_memory_map_says_it_fits(problem):
    """The ILP's memory estimate (saved activations summed, no lifetimes) is above what tp=2 needs by the
    memory map; a budget from it must not push tp=2 into a slower placement on the small device."""
    graph, small = problem
    pin = {"zero": 0, "tp": 2, "recompute": "none"}
    roomy = plan_auto(graph, get_cluster("cpu:2"), mode="train", constraints=pin)
    tight = plan_auto(graph, small, mode="train", constraints=pin)
    assert max(roomy.predicted.memory_bytes) <= CAPACITY  # the premise: the fastest placement fits
    assert tight.predicted.step_time_s == roomy.predicted.step_time_s
    assert max(tight.predicted.memory_bytes) <= CAPACITY
