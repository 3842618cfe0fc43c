"""made_to_fit on real plans (GPT-2, 4 layers, planned for cpu:2 on the meta device): a plan that fits only
with recomputation loses to a layout that fits as it is when that layout is predicted faster, and keeps its
recomputation otherwise; when recomputation cannot make it fit, the layout that fits as it is is taken, and
when nothing fits the recomputation's own error is raised."""

from __future__ import annotations

import pytest

import shardwise
from shardwise.errors import DoesNotFitError
from shardwise.planner.fit import made_to_fit
from shardwise.planner.recompute import with_recomputation
from shardwise.zoo import build_model


def _loss(o):
    return o.logits.float().sin().mean()


@pytest.fixture(scope="module")
def plans():
    model, inputs = build_model("gpt2", device="meta", layers=4, seq=64, batch=8)
    common = dict(example_inputs=inputs, mode="train", loss_fn=_loss, fusion=False)
    dp = shardwise.compile(model, "cpu:2", constraints={"dp": 2}, **common).plan
    tp = shardwise.compile(model, "cpu:2", constraints={"tp": 2}, **common).plan
    return dp, tp


def _impossible(plan):
    raise DoesNotFitError("no recomputation fits: the lowest peak is 1 byte too many")


def test_slower_layout_that_fits_wins_when_recomputation_costs_more(plans):
    dp, tp = plans
    every = with_recomputation(dp, "all")
    assert dp.predicted.step_time_s < tp.predicted.step_time_s < every.predicted.step_time_s  # the premise
    chosen = made_to_fit(dp, lambda p: with_recomputation(p, "all"), lambda: tp)
    assert chosen.degrees == tp.degrees and not chosen.recompute
    assert "dp=2" in chosen.notes[-1] and "fits as it is" in chosen.notes[-1]


def test_recomputation_kept_when_it_is_faster(plans):
    dp, tp = plans
    budget = max(dp.predicted.memory_bytes) - 2**19  # half a MiB short: a little recomputation
    fitted = with_recomputation(dp, budget)
    assert 0 < len(fitted.recompute) and fitted.predicted.step_time_s < tp.predicted.step_time_s
    chosen = made_to_fit(dp, lambda p: with_recomputation(p, budget), lambda: tp)
    assert chosen.recompute == fitted.recompute and chosen.degrees == dp.degrees


def test_plan_that_fits_is_not_replanned(plans):
    dp, _ = plans

    def never():
        raise AssertionError("planned again although the plan fits")

    assert made_to_fit(dp, lambda p: p, never) is dp


def test_layout_that_fits_taken_when_recomputation_cannot(plans):
    dp, tp = plans
    assert made_to_fit(dp, _impossible, lambda: tp) is tp
    with pytest.raises(DoesNotFitError, match="lowest peak is 1 byte"):
        made_to_fit(dp, _impossible, lambda: _impossible(None))
    with pytest.raises(DoesNotFitError, match="lowest peak is 1 byte"):
        made_to_fit(dp, _impossible, None)
