"""plan_auto(make_fit=...): the joint choice between the fastest layout made to fit (recomputation, offload)
and the fastest layout that fits as it is, on a real planning problem: GPT-2 (2 layers, sequence 16, batch 4,
ZeRO off) on cpu:2 shrunk to 2.1 MiB per device, where dp=2 is the fastest layout but needs 2.13 MiB and
tp=2 fits as it is, slower. The cost of making a plan fit is what decides: ``priced`` stands for a
recomputation that brings the plan within the device at a given step-time factor."""

from __future__ import annotations

import dataclasses

import pytest

from shardwise.cluster import get_cluster
from shardwise.errors import DoesNotFitError
from shardwise.frontend.trace import trace
from shardwise.ir.plan import ExecutionPlan
from shardwise.planner.auto import plan_auto
from shardwise.planner.recompute import fit_by_recomputation
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


def _plan(problem, make_fit=None) -> ExecutionPlan:
    graph, cluster = problem
    return plan_auto(graph, cluster, mode="train", constraints={"zero": 0}, make_fit=make_fit)


def priced(factor: float):
    """A stand-in for recomputation: the plan within the device, its step ``factor`` times longer."""

    def fit(plan: ExecutionPlan) -> ExecutionPlan:
        memory = tuple(dataclasses.replace(m, arena_bytes=min(m.arena_bytes, CAPACITY)) for m in plan.memory)
        predicted = dataclasses.replace(
            plan.predicted, step_time_s=plan.predicted.step_time_s * factor,
            memory_bytes=tuple(m.arena_bytes for m in memory),
        )  # fmt: skip
        return dataclasses.replace(plan, memory=memory, predicted=predicted)

    return fit


def test_premise_fastest_layout_does_not_fit_a_slower_one_does(problem):
    plan = _plan(problem)
    assert plan.degrees["tp"] == 2 and max(plan.predicted.memory_bytes) <= CAPACITY
    dp = next(a for a in plan.alternatives if dict(a.degrees)["dp"] == 2)
    assert not dp.fits and dp.step_time_s < plan.predicted.step_time_s


def test_cheap_fit_of_the_fastest_layout_wins(problem):
    as_is = _plan(problem)
    plan = _plan(problem, priced(1.05))
    assert plan.degrees["dp"] == 2 and max(plan.predicted.memory_bytes) <= CAPACITY
    assert plan.predicted.step_time_s < as_is.predicted.step_time_s
    assert "made to fit" in plan.notes[-1] and f"{as_is.predicted.step_time_s * 1e3:.4g} ms" in plan.notes[-1]
    chosen = [a for a in plan.alternatives if a.chosen]
    assert len(chosen) == 1 and chosen[0].fits and chosen[0].step_time_s == plan.predicted.step_time_s
    assert len(plan.alternatives) == len(as_is.alternatives)


def test_costly_fit_loses_to_the_layout_that_fits_as_it_is(problem):
    as_is = _plan(problem)
    plan = _plan(problem, priced(2.0))
    assert plan.degrees == as_is.degrees and plan.predicted.step_time_s == as_is.predicted.step_time_s
    assert not any("made to fit" in n for n in plan.notes)


def test_fit_that_fails_leaves_the_layout_that_fits(problem):
    def impossible(plan):
        raise DoesNotFitError("no recomputation fits")

    assert _plan(problem, impossible).degrees == _plan(problem).degrees


def test_real_recomputation_never_chosen_slower_than_fitting_as_is(problem):
    as_is = _plan(problem)
    plan = _plan(problem, fit_by_recomputation)
    assert max(plan.predicted.memory_bytes) <= CAPACITY
    assert plan.predicted.step_time_s <= as_is.predicted.step_time_s
    if plan.degrees != as_is.degrees:  # recomputation made dp=2 fit, and it is still faster
        assert plan.recompute and "made to fit" in plan.notes[-1]


def test_fastest_placement_kept_when_the_memory_map_says_it_fits(problem):
    """The ILP's memory estimate (saved activations summed, no lifetimes) is above what tp=2 needs by the
    memory map; a budget from it must not push tp=2 into a slower placement on the small device."""
    graph, small = problem
    pin = {"zero": 0, "tp": 2}
    roomy = plan_auto(graph, get_cluster("cpu:2"), mode="train", constraints=pin)
    tight = plan_auto(graph, small, mode="train", constraints=pin)
    assert max(roomy.predicted.memory_bytes) <= CAPACITY  # the premise: the fastest placement fits
    assert tight.predicted.step_time_s == roomy.predicted.step_time_s
    assert max(tight.predicted.memory_bytes) <= CAPACITY
