"""Expert parallelism in the one search (issue 17.3): ep is offered where the expert count allows, priced (the
expert weights a rank holds, the all-to-alls), pinned with the same names as the other degrees, refused with
what to do where it cannot be made; the realized plan splits the experts and the explain output says why."""

from __future__ import annotations

import pytest

from shardwise.cli.explain import explain_plan
from shardwise.cluster import get_cluster
from shardwise.errors import ConstraintError, PlanError
from shardwise.frontend.trace import trace
from shardwise.ir.experts import expert_axis, moe_nodes
from shardwise.planner.plan import PlanOptions, plan
from shardwise.planner.search import SearchOptions, search
from shardwise.zoo import build_model

pytest.importorskip("transformers")

from shardwise.zoo.hf import tiny_causal_lm  # noqa: E402


@pytest.fixture(scope="module")
def mixtral():
    model, inputs = tiny_causal_lm("mixtral")
    graph, _ = trace(model, inputs, loss_fn=lambda out: out.logits.float().mean())
    return graph


def test_the_search_offers_ep_and_prices_it(mixtral):
    cluster = get_cluster("dgx-h100x2")
    result = search(mixtral, cluster, {"dp": 2, "tp": 1, "pp": 1, "zero": 0, "recompute": "none"},
                    SearchOptions(mode="train"))  # fmt: skip
    by_ep = {c.ep: c for c in result.ranked}
    assert set(by_ep) == {1, 2}
    one, two = by_ep[1], by_ep[2]
    # half the experts per rank: less memory; the all-to-alls: more communication than the same layout without
    assert two.peak_bytes < one.peak_bytes
    assert two.comm_s > one.comm_s
    assert ("ep", 2) in two.degrees and "ep=2" in two.describe()


def test_a_pinned_ep_is_realized_with_the_experts_split(mixtral):
    cluster = get_cluster("cpu:2")
    made = plan(mixtral, cluster, {"ep": 2, "zero": 0, "recompute": "none"}, PlanOptions(mode="train"))
    assert made.degrees["ep"] == 2 and made.degrees["dp"] == 2
    placements = dict(made.param_placements)
    keys = {p.name: p.key for p in made.graph.params}
    for node in moe_nodes(made.graph):
        strategy = made.strategy(node)
        assert expert_axis(strategy, made.mesh) == "dp"
        for k in (3, 4):  # the weights are stored as the op reads them: nothing moves them before it
            weight = made.graph.node(node).args[k].name
            assert placements[keys[weight]] == strategy.inputs[k]
            assert not any(r.value == weight for r in strategy.redistributes)
    grads = dict(made.param_grad_reduce)
    experts = [k for k, _ in made.param_placements if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert experts and all("dp" not in grads.get(k, ()) for k in experts)  # complete on their rank
    assert all("dp" in grads[k] for k in grads if "experts" not in k)  # the other weights: all-reduced over dp
    why = explain_plan(made, cluster)["experts"]
    assert why["ep"] == 2 and why["alltoall_s"] > 0 and "2 of the 4 experts" in why["why"]
    assert why["expert_weight_bytes_per_rank"] * 2 == why["expert_weight_bytes"]  # half of them on each rank


def test_ep_below_dp_replicates_the_experts_over_dp_over_ep_groups():
    model, inputs = tiny_causal_lm("mixtral", batch=4)
    graph, _ = trace(model, inputs, loss_fn=lambda out: out.logits.float().mean())
    cluster = get_cluster("cpu:4")
    made = plan(graph, cluster, {"dp": 4, "ep": 2, "zero": 0, "recompute": "none"}, PlanOptions(mode="train"))
    assert made.degrees["dp"] == 4 and made.degrees["ep"] == 2
    assert made.mesh.axis_names == ("dp", "ep", "tp") and made.mesh.shape == (2, 2, 1)
    for node in moe_nodes(made.graph):
        assert expert_axis(made.strategy(node), made.mesh) == "ep"
    grads = dict(made.param_grad_reduce)
    for key, axes in grads.items():
        # the experts: summed over their dp/ep replicas only; everything else over all four data-parallel ranks
        assert set(axes) == ({"dp"} if "experts" in key else {"dp", "ep"}), (key, axes)


def test_unpinned_plans_say_why_their_ep(mixtral):
    cluster = get_cluster("cpu:2")
    made = plan(mixtral, cluster, {"dp": 2, "zero": 0, "recompute": "none"}, PlanOptions(mode="train"))
    why = explain_plan(made, cluster)["experts"]
    ep = made.degrees.get("ep", 1)
    assert why["ep"] == ep and f"ep={ep}:" in why["why"]
    assert f"with ep={2 if ep == 1 else 1}" in why["why"]  # the best layout with the other ep, compared


def test_impossible_ep_is_a_clear_error(mixtral):
    with pytest.raises(ConstraintError, match="so ep divides dp"):
        plan(mixtral, get_cluster("cpu:4"), {"ep": 3, "dp": 4}, PlanOptions(mode="train"))
    with pytest.raises(PlanError, match="ep must divide the 4 experts"):
        plan(mixtral, get_cluster("cpu:4"), {"ep": 3}, PlanOptions(mode="train"))
    model, inputs = build_model("mlp")
    graph, _ = trace(model, inputs)
    with pytest.raises(PlanError, match="no mixture-of-experts layers"):
        plan(graph, get_cluster("cpu:2"), {"ep": 2})


def _pipeline_plan(model, inputs, cluster, constraints):  # noqa: ANN001, ANN202
    """The plan ``shardwise.compile`` makes (its tracer cuts the batch into replicas' micro-batches); no process
    is started."""
    import shardwise

    loss = lambda out: out.logits.float().mean()  # noqa: E731
    with shardwise.compile(model, cluster, example_inputs=inputs, mode="train", loss_fn=loss,
                           constraints=constraints) as cm:  # fmt: skip
        return cm.plan


def test_ep_with_pipelines_is_offered_priced_and_realized_per_stage():
    """pp > 1: the search offers ep beside ep=1 on a pipeline mesh and prices it (half the experts per rank: less
    memory; the all-to-alls: a longer forward of every chunk, each holding an MoE layer; the experts' gradients,
    complete on their rank, are not all-reduced: a shorter tail of every stage); the realized pipeline's chunks are placed on their stage's
    ``ep x tp`` mesh with the experts split over ``ep``, and explain says why this ep, per pipeline stage."""
    model, inputs = tiny_causal_lm("mixtral", batch=4)
    graph, _ = trace(model, inputs, loss_fn=lambda out: out.logits.float().mean())
    cluster = get_cluster("cpu:4")
    pinned = {"pp": 2, "dp": 2, "tp": 1, "zero": 0, "recompute": "none", "microbatches": 1, "schedule": "1f1b"}
    by_ep = {c.ep: c for c in search(graph, cluster, pinned, SearchOptions(mode="train")).ranked}
    assert set(by_ep) == {1, 2}
    two, one = by_ep[2], by_ep[1]
    assert two.peak_bytes < one.peak_bytes
    assert all(a > b for a, b in zip(two.chunk_forward_s, one.chunk_forward_s, strict=True))
    assert all(a < b for a, b in zip(two.tail_s, one.tail_s, strict=True))
    made = _pipeline_plan(model, inputs, cluster, {**pinned, "ep": 2})
    spec = made.pipeline
    assert spec is not None and spec.ep == 2 and made.degrees["ep"] == 2
    assert made.mesh.axis_names == ("pp", "dp", "tp")  # ep = dp: the experts split over the dp axis itself
    for stage in spec.stages:
        mesh = stage.plan.mesh
        assert mesh.axis_names == ("ep", "tp") and mesh.shape == (2, 1)
        assert mesh.ranks == tuple(stage.device_stage * 2 + e for e in range(2))  # the stage's two replicas
        for node in moe_nodes(stage.plan.graph):
            assert expert_axis(stage.plan.strategy(node), mesh) == "ep"
    top = dict(made.param_placements)
    experts = [k for k in top if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert experts and all(str(top[k].placements[1]) == "S(0)" for k in experts)
    why = explain_plan(made, cluster)["experts"]
    assert why["ep"] == 2 and why["alltoall_s"] > 0 and "pipeline stage" in why["why"]
    # a rank holds half the experts of its own stage's MoE layers only (one of the two layers on each stage)
    assert len(moe_nodes(made.graph)) == 2
    assert why["expert_weight_bytes_per_rank"] * 4 == why["expert_weight_bytes"]
    assert any(n.startswith("expert parallelism: ep=2") for n in made.notes)


def test_ep_below_dp_with_pipelines_lays_the_mesh_as_flat_plans_do():
    model, inputs = tiny_causal_lm("mixtral", batch=4)
    made = _pipeline_plan(model, inputs, get_cluster("cpu:8"), {"pp": 2, "dp": 4, "ep": 2, "zero": 1, "recompute": "none"})
    spec = made.pipeline
    assert spec is not None and (spec.pp, spec.dp, spec.ep) == (2, 4, 2)
    assert made.mesh.axis_names == ("pp", "dp", "ep", "tp") and made.mesh.shape == (2, 2, 2, 1)
    for stage in spec.stages:  # each stage's chunk spans its first group of two neighbouring replicas
        assert stage.plan.mesh.ranks == tuple(stage.device_stage * 4 + e for e in range(2))
