"""The memory-mapping pass on planned zoo models: plan.memory is its arena, valid and above the bound."""

from __future__ import annotations

import pytest

from shardwise.cluster import get_cluster
from shardwise.frontend.trace import trace
from shardwise.ir.plan import ExecutionPlan
from shardwise.passes.memory import lower_bound, verify_assignment
from shardwise.passes.memory.mapping import map_memory, plan_memory_inputs
from shardwise.passes.memory.program import ALIGN, buffer_kind, step_buffers
from shardwise.planner.auto import plan_auto
from shardwise.zoo import build_model


def _dp_plan(graph, cluster, **kwargs):
    """A data-parallel (or replicated) flat plan: the planner with tp=1 (what the simple planner made)."""
    constraints = {"tp": 1, **kwargs.pop("constraints", {})}
    return plan_auto(graph, cluster, constraints=constraints, **kwargs)


@pytest.fixture(scope="module")
def graphs():
    return {name: trace(*build_model(name))[0] for name in ("gpt2", "mlp")}


def _remap(plan: ExecutionPlan):
    cluster = get_cluster(plan.cluster_name)
    return map_memory(
        plan.graph, plan.mesh, plan.strategies, capacity_bytes=cluster.device.memory_bytes,
        optimizer_foreach=cluster.device.kind != "cpu", **plan_memory_inputs(plan),
    )  # fmt: skip


@pytest.mark.parametrize(("name", "constraints"), [("gpt2", {"dp": 2}), ("gpt2", {"tp": 2}), ("mlp", {})])
def test_plan_memory_is_a_valid_arena_above_the_lower_bound(graphs, name, constraints):
    # ZeRO off: AdamW's two moments of every parameter are on every rank (checked below)
    plan = plan_auto(graphs[name], get_cluster("cpu:2"), mode="train", constraints={**constraints, "zero": 0})
    assert len(plan.memory) == plan.world_size == 2
    mapped = _remap(plan)
    assert mapped.memory == plan.memory  # the planner recorded exactly this pass's result
    for m, bufs, assignment in zip(plan.memory, mapped.buffers, mapped.assignments):
        assert m.arena_bytes >= m.lower_bound_bytes > 0
        assert m.lower_bound_bytes == lower_bound(bufs) == assignment.lower_bound_bytes
        verify_assignment(bufs, assignment, capacity=m.capacity_bytes)
        assert m.params_bytes + m.grads_bytes + m.optimizer_bytes + m.activation_bytes == m.arena_bytes
        assert m.grads_bytes > 0 and m.optimizer_bytes == 2 * m.grads_bytes  # AdamW: two fp32 moments
        assert all(b.size % ALIGN == 0 for b in bufs)
        assert m.arena_bytes <= 1.03 * m.lower_bound_bytes


def test_predicted_memory_is_the_arena_of_the_memory_pass(graphs):
    cluster = get_cluster("cpu:2")
    for plan in (
        plan_auto(graphs["gpt2"], cluster, mode="train", constraints={"tp": 2}),
        plan_auto(graphs["gpt2"], cluster, mode="inference"),
        _dp_plan(graphs["gpt2"], cluster, mode="train", constraints={"dp": 2}),
    ):
        assert plan.predicted.memory_bytes == tuple(m.arena_bytes for m in plan.memory)
        assert plan.predicted.memory_bytes == _remap(plan).arena_bytes
        assert "memory.map" in plan.passes
        assert all(m.total_bytes == m.arena_bytes for m in plan.memory)


def test_memory_survives_the_json_round_trip(graphs):
    plan = plan_auto(graphs["gpt2"], get_cluster("cpu:2"), mode="train", constraints={"dp": 2})
    back = ExecutionPlan.from_json(plan.to_json())
    assert back.memory == plan.memory and back.predicted.memory_bytes == plan.predicted.memory_bytes


def test_training_holds_gradients_state_and_saved_activations(graphs):
    cluster = get_cluster("cpu:2")
    train = plan_auto(graphs["mlp"], cluster, mode="train", constraints={"dp": 2, "zero": 0})
    infer = plan_auto(graphs["mlp"], cluster, mode="inference", constraints={"dp": 2})
    bufs = step_buffers(train.graph, train.mesh, train.strategies, **plan_memory_inputs(train))
    kinds = {buffer_kind(b.id) for b in bufs}
    assert {"param", "grad", "opt", "act", "agrad", "input", "bucket", "scratch"} <= kinds
    end = max(b.end for b in bufs)
    n = len(train.graph.nodes)
    for b in bufs:
        if buffer_kind(b.id) in ("param", "opt", "input"):
            assert (b.start, b.end) == (0, end)  # held over the whole step
    # the first layer's output is read by the second matmul's backward, after the whole forward
    first = next(b for b in bufs if b.id == f"act:{train.graph.nodes[0].name}")
    assert first.end > n
    # the gradients of the dp-replicated parameters are all-reduced in one bucket of their total size
    grads = sum(b.size for b in bufs if buffer_kind(b.id) == "grad")
    assert sum(b.size for b in bufs if buffer_kind(b.id) == "bucket") == grads
    params = infer.memory[0].params_bytes
    assert infer.memory[0].grads_bytes == infer.memory[0].optimizer_bytes == 0
    assert train.memory[0].params_bytes == params
    assert infer.memory[0].arena_bytes < train.memory[0].arena_bytes  # no state, no backward
    assert train.memory[0].lower_bound_bytes >= 4 * params  # parameters, gradients, two moments at the step


def test_low_precision_inference_stores_half_size_weights(graphs):
    cluster = get_cluster("cpu:2")
    fp32 = plan_auto(graphs["mlp"], cluster, mode="inference", constraints={"dp": 2})
    bf16 = plan_auto(graphs["mlp"], cluster, mode="inference", precision="bf16", constraints={"dp": 2})
    assert bf16.memory[0].params_bytes < fp32.memory[0].params_bytes
    assert bf16.memory[0].arena_bytes < fp32.memory[0].arena_bytes


def test_pipeline_plans_map_each_stage_with_the_micro_batches_in_flight():
    from shardwise.passes.memory.pipeline import map_pipeline_memory
    from shardwise.planner.pipeline import plan_pipeline

    model, inputs = build_model("gpt2")

    def loss(o):
        return o.logits.float().sin().mean()

    graph = trace(model, inputs, loss_fn=loss)[0]

    def micro(n):
        return trace(model, tuple(x[:n] for x in inputs), loss_fn=loss)[0]

    base = {"pp": 2, "dp": 1, "tp": 1, "microbatches": 4, "recompute": "none"}
    plans = {
        s: plan_pipeline(graph, get_cluster("cpu:2"), micro_graph=micro, constraints={**base, "schedule": s})
        for s in ("gpipe", "1f1b")
    }
    for plan in plans.values():
        assert plan.predicted.memory_bytes == tuple(m.arena_bytes for m in plan.memory)
        assert "memory.map" in plan.passes
        mapped = map_pipeline_memory(plan.pipeline, train=True, capacity_bytes=plan.memory[0].capacity_bytes)
        assert mapped.memory == plan.memory
        for bufs, a in zip(mapped.buffers, mapped.assignments):
            verify_assignment(bufs, a)
            assert a.arena_bytes >= a.lower_bound_bytes == lower_bound(bufs) > 0
            assert {b.id.rsplit("#", 1)[1] for b in bufs if "#" in b.id} == {"0", "1", "2", "3"}
    interleaved = {"pp": 2, "dp": 1, "tp": 1, "schedule": "interleaved", "virtual": 2, "microbatches": 2}
    for recompute in ("none", "full"):
        plan = plan_pipeline(
            graph,
            get_cluster("cpu:2"),
            micro_graph=micro,
            constraints={**interleaved, "recompute": recompute},
        )
        mapped = map_pipeline_memory(plan.pipeline, train=True, capacity_bytes=plan.memory[0].capacity_bytes)
        assert mapped.memory == plan.memory
        for bufs, a in zip(mapped.buffers, mapped.assignments):
            verify_assignment(bufs, a)
            assert any(b.id.endswith(".re") for b in bufs) == (recompute == "full")  # recomputed in backward
    # GPipe keeps all four micro-batches' activations on the first stage, 1F1B at most two
    assert plans["gpipe"].memory[0].arena_bytes > plans["1f1b"].memory[0].arena_bytes
    back = ExecutionPlan.from_json(plans["1f1b"].to_json())
    assert back.memory == plans["1f1b"].memory


def test_online_assignment_of_large_stages_is_valid():
    import random

    from shardwise.passes.memory import Buffer
    from shardwise.passes.memory.pipeline import online_assignment

    rng = random.Random(3)
    for _ in range(200):
        bufs = []
        for i in range(rng.randint(1, 30)):
            start = rng.randint(0, 15)
            bufs.append(Buffer(f"b{i}", start, rng.randint(start + 1, 20), rng.randint(1, 64)))
        a = online_assignment(bufs)
        verify_assignment(bufs, a)
        assert a.lower_bound_bytes == lower_bound(bufs) and a.method == "online-best-fit"


def test_zero_over_dp_and_cp_keeps_a_quarter_of_the_state():
    # dp2 x cp2: every rank holds the same weights, so ZeRO shards the fp32 master and AdamW's moments over the
    # four of them (one group, as the runtime's buckets do: runtime.lib.gradients), not over dp's two
    pytest.importorskip("transformers")
    from shardwise.zoo.hf import tiny_causal_lm

    model, inputs = tiny_causal_lm("llama", seq=256)
    graph = trace(model, inputs, loss_fn=lambda out: out.logits.float().sin().mean())[0]
    plan = plan_auto(
        graph, get_cluster("cpu:4"), mode="train",
        constraints={"dp": 2, "cp": 2, "tp": 1, "zero": 1, "cp_attention": "allgather", "recompute": "none"},
    )  # fmt: skip
    assert all(set(axes) == {"dp", "cp"} for _, axes in plan.param_grad_reduce)
    trainable = sum(p.spec.numel for p in graph.params if p.requires_grad and p.kind == "parameter")
    buffers = {b.id: b.size for b in step_buffers(plan.graph, plan.mesh, plan.strategies, **plan_memory_inputs(plan))}
    master = buffers["opt:zero-master"]
    assert 4 * trainable / 4 <= master <= 4 * (trainable / 4 + 64) + ALIGN
    assert buffers["opt:zero-state"] == 2 * master
    assert not any(name.startswith("opt:") and "zero" not in name for name in buffers)
