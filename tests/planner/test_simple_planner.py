"""The simplest planner: replicate or data parallel, with predictions, alternatives and clear errors."""

from __future__ import annotations

import pytest

import shardwise
from shardwise.cluster import get_cluster
from shardwise.errors import DeviceUnavailableError, DoesNotFitError, PlanError, UserInputError
from shardwise.frontend.trace import trace
from shardwise.planner.simple import plan_simple
from shardwise.zoo import build_model


@pytest.fixture(scope="module")
def gpt2_graph():
    return trace(*build_model("gpt2"))[0]


def test_data_parallel_plan_splits_the_batch_and_gathers_the_outputs(gpt2_graph):
    plan = plan_simple(gpt2_graph, get_cluster("cpu:2"), constraints={"dp": 2})
    assert plan.degrees == {"dp": 2, "tp": 1, "pp": 1}
    assert [str(p) for p in plan.input_placements] == ["[S(0), R]"]
    final = plan.strategy("<output>")
    assert [r.collective for r in final.redistributes] == ["allgather"]
    assert plan.predicted.step_time_s > 0 and len(plan.predicted.memory_bytes) == 2
    assert len(plan.memory) == 2 and all(m.lower_bound_bytes > 0 for m in plan.memory)
    chosen = [a for a in plan.alternatives if a.chosen]
    assert len(chosen) == 1 and dict(chosen[0].degrees)["dp"] == 2


def test_planner_prefers_the_faster_candidate(gpt2_graph):
    plan = plan_simple(gpt2_graph, get_cluster("dgx-a100x1"))
    best = min(a.step_time_s for a in plan.alternatives if a.fits)
    assert plan.predicted.step_time_s == pytest.approx(best)


def test_constraints_are_checked(gpt2_graph):
    with pytest.raises(PlanError, match="unknown constraint 'xp'"):
        plan_simple(gpt2_graph, get_cluster("cpu:2"), constraints={"xp": 2})
    with pytest.raises(PlanError, match="dp=3 needs more devices"):
        plan_simple(gpt2_graph, get_cluster("cpu:2"), constraints={"dp": 3})


def test_model_that_fits_nowhere_says_how_much_it_needs():
    model, inputs = build_model("gpt2", device="meta", layers=4, hidden=4096, heads=32, vocab=50257, seq=64)
    graph, _ = trace(model, inputs)
    tiny = get_cluster("cpu:2")
    tiny = tiny.__class__.from_dict({**tiny.to_dict(), "device": {**tiny.to_dict()["device"], "memory_bytes": 2**20}})
    with pytest.raises(DoesNotFitError, match=r"needs at least .* GiB per device"):
        plan_simple(graph, tiny)


def test_meta_model_plans_but_does_not_run():
    model, inputs = build_model("gpt2", device="meta")
    cm = shardwise.compile(model, "cpu:2", example_inputs=inputs)
    assert cm.plan.graph.meta_device and cm.plan.predicted.step_time_s > 0
    with pytest.raises(UserInputError, match="meta device"):
        cm.run(*inputs)


def test_plan_for_devices_this_machine_lacks_is_a_clear_error():
    model, inputs = build_model("mlp")
    cm = shardwise.compile(model, "dgx-a100x1", example_inputs=inputs)
    with pytest.raises(DeviceUnavailableError, match="A100"):
        cm.run(*inputs)


def test_bad_mode_and_missing_loss_are_user_errors():
    model, inputs = build_model("mlp")
    with pytest.raises(UserInputError, match="mode='serve' is not allowed"):
        shardwise.compile(model, "cpu:2", example_inputs=inputs, mode="serve")
    with pytest.raises(UserInputError, match="needs loss_fn"):
        shardwise.compile(model, "cpu:2", example_inputs=inputs, mode="train")
