"""The one planner through the front door: data-parallel plans, predictions, alternatives and clear errors."""

from __future__ import annotations

import pytest

import shardwise
from shardwise.cluster import get_cluster
from shardwise.errors import DeviceUnavailableError, DoesNotFitError, PlanError, UserInputError
from shardwise.frontend.trace import trace
from shardwise.planner.auto import plan_auto
from shardwise.zoo import build_model


@pytest.fixture(scope="module")
def gpt2_graph():
    return trace(*build_model("gpt2"))[0]


def test_data_parallel_plan_splits_the_batch_and_gathers_the_outputs(gpt2_graph):
    plan = plan_auto(gpt2_graph, get_cluster("cpu:2"), constraints={"dp": 2, "tp": 1})
    assert plan.degrees == {"dp": 2, "tp": 1, "pp": 1}
    assert [str(p) for p in plan.input_placements] == ["[S(0), R]"]
    final = plan.strategy("<output>")
    assert [r.collective for r in final.redistributes] == ["allgather"]
    assert plan.predicted.step_time_s > 0 and len(plan.predicted.memory_bytes) == 2
    assert len(plan.memory) == 2 and all(m.lower_bound_bytes > 0 for m in plan.memory)
    chosen = [a for a in plan.alternatives if a.chosen]
    assert len(chosen) == 1 and dict(chosen[0].degrees)["dp"] == 2


def test_planner_prefers_the_faster_candidate(gpt2_graph):
    plan = plan_auto(gpt2_graph, get_cluster("dgx-a100x1"))
    realized = [a for a in plan.alternatives if a.fits and ("realized" in a.note or a.chosen)]
    assert plan.predicted.step_time_s == pytest.approx(min(a.step_time_s for a in realized))
    estimated = [a for a in plan.alternatives if "estimated" in a.note]
    assert all("estimated" in a.note or "realized" in a.note or a.chosen or "could not" in a.note
               for a in plan.alternatives) and estimated  # fmt: skip


def test_constraints_are_checked(gpt2_graph):
    with pytest.raises(PlanError, match="unknown constraint 'xp'"):
        plan_auto(gpt2_graph, get_cluster("cpu:2"), constraints={"xp": 2})
    with pytest.raises(PlanError, match="dp=3 needs more devices"):
        plan_auto(gpt2_graph, get_cluster("cpu:2"), constraints={"dp": 3})
    with pytest.raises(PlanError, match="recompute='sometimes': choose one of none, selective, full, auto"):
        plan_auto(gpt2_graph, get_cluster("cpu:2"), constraints={"recompute": "sometimes"})
    with pytest.raises(PlanError, match="ZeRO stages are 0, 1"):
        plan_auto(gpt2_graph, get_cluster("cpu:2"), constraints={"zero": 4})
    with pytest.raises(PlanError, match="cp=3 needs more devices"):
        plan_auto(gpt2_graph, get_cluster("cpu:2"), constraints={"cp": 3})
    with pytest.raises(PlanError, match="cp_attention='sideways': choose one of allgather, ulysses, ring, auto"):
        plan_auto(gpt2_graph, get_cluster("cpu:2"), constraints={"cp": 2, "cp_attention": "sideways"})


def test_model_that_fits_nowhere_says_how_much_it_needs():
    model, inputs = build_model("gpt2", device="meta", layers=4, hidden=4096, heads=32, vocab=50257, seq=64)
    graph, _ = trace(model, inputs)
    tiny = get_cluster("cpu:2")
    tiny = tiny.__class__.from_dict({**tiny.to_dict(), "device": {**tiny.to_dict()["device"], "memory_bytes": 2**20}})
    with pytest.raises(DoesNotFitError) as info:
        plan_auto(graph, tiny)
    message = str(info.value)
    # what the best layout needs (above the device's capacity), what that is made of, and what would help
    need = float(message.split(" needs at least ")[1].split(" GiB")[0])
    assert need * 2**30 > 2**20 and "weights" in message and "Try:" in message and "more devices" in message


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


def test_require_fit_false_returns_the_fastest_when_nothing_fits():
    """require_fit=False (sizing: a published layout on a device too small for it) gives the fastest realized
    plan, marked chosen and not fitting, with a note (it crashed in _finish when no plan fit)."""
    import dataclasses

    from shardwise.cluster import get_cluster
    from shardwise.frontend.trace import trace
    from shardwise.planner.auto import plan_auto
    from shardwise.zoo import build_model

    model, inputs = build_model("gpt2")
    graph = trace(model, inputs, loss_fn=lambda o: o.logits.float().mean())[0]
    cpu = get_cluster("cpu:2")
    tiny = dataclasses.replace(cpu, device=dataclasses.replace(cpu.device, memory_bytes=2**20))
    plan = plan_auto(graph, tiny, mode="train", constraints={"dp": 2}, require_fit=False)
    assert max(plan.predicted.memory_bytes) > 2**20
    chosen = [a for a in plan.alternatives if a.chosen]
    assert len(chosen) == 1 and not chosen[0].fits and "none fits" in chosen[0].note
    assert any(n.startswith("does not fit") for n in plan.notes)


def test_a_pipeline_that_fits_nowhere_lists_the_parts_of_its_largest_stage():
    """The does-not-fit message of a pipeline names what its busiest rank holds: the parts it lists add up to
    the memory it says every layout needs (not the parts of the first stage)."""
    import re

    from shardwise.planner.plan import plan

    model, inputs = build_model("gpt2", device="meta", layers=3, hidden=2048, heads=16, vocab=50257, seq=64)
    graph, _ = trace(model, inputs)
    tiny = get_cluster("cpu:2")
    tiny = tiny.__class__.from_dict({**tiny.to_dict(), "device": {**tiny.to_dict()["device"], "memory_bytes": 2**20}})
    with pytest.raises(DoesNotFitError) as info:
        plan(graph, tiny, {"pp": 2})
    message = str(info.value)
    unit = {"GiB": 2**30, "MiB": 2**20}
    need = re.search(r"needs at least ([\d.]+) (GiB|MiB)", message)
    held = re.search(r"\) holds (.*?)\. Try:", message)
    assert need and held, message
    parts = [float(v) * unit[u] for v, u in re.findall(r"([\d.]+) (GiB|MiB)", held.group(1))]
    assert len(parts) >= 2, message
    assert sum(parts) == pytest.approx(float(need.group(1)) * unit[need.group(2)], abs=0.03 * 2**30), message
