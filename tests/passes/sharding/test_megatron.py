"""The placement ILP rediscovers Megatron-LM's tensor-parallel split on GPT-2 and Llama blocks (planned on
the meta device for one DGX-A100 node): column-parallel QKV and first MLP projection, row-parallel
attention output and second MLP projection, one all-reduce per attention and per MLP in the forward; with
sequence parallelism allowed, the all-reduce becomes a reduce-scatter + all-gather pair."""

from __future__ import annotations

import pytest
import torch

from shardwise.cluster import get_cluster
from shardwise.frontend.trace import trace
from shardwise.ir.placement import Partial, Shard
from shardwise.ir.plan import ExecutionPlan
from shardwise.planner.auto import plan_auto
from shardwise.zoo import build_model

SIZE = dict(layers=2, hidden=4096, heads=32, vocab=32000, seq=1024, batch=2)
# (model, attention projections in, attention out, first MLP projection(s), second MLP projection)
LAYOUT = {
    "gpt2": ("transformer.h.{i}.attn.c_attn", "transformer.h.{i}.attn.c_proj", ("transformer.h.{i}.mlp.c_fc",),
             "transformer.h.{i}.mlp.c_proj"),
    "llama": (("model.layers.{i}.self_attn.q_proj", "model.layers.{i}.self_attn.k_proj",
               "model.layers.{i}.self_attn.v_proj"), "model.layers.{i}.self_attn.o_proj",
              ("model.layers.{i}.mlp.gate_proj", "model.layers.{i}.mlp.up_proj"), "model.layers.{i}.mlp.down_proj"),
}  # fmt: skip
MATMULS = ("aten.linear.default", "aten.matmul.default", "aten.addmm.default", "aten.mm.default")


def _loss(out):
    return out.logits.float().pow(2).mean()


@pytest.fixture(scope="module")
def graphs():
    out = {}
    for name in LAYOUT:
        model, inputs = build_model(name, device="meta", **SIZE)
        model.train()
        out[name] = trace(model, inputs, loss_fn=_loss)[0]
    return out


def _matmuls(plan: ExecutionPlan, paths: tuple[str, ...]):
    nodes = [n for n in plan.graph.nodes if n.op in MATMULS and n.module_path in paths]
    assert nodes, f"no matmul under {paths}"
    return [(n, plan.strategy(n.name)) for n in nodes]


def _tp(spec) -> object:
    return spec.placements[1]


def _forward_collectives(plan: ExecutionPlan, prefix: str) -> list[tuple[str, str]]:
    """Distinct (collective, value) pairs on the tp axis in the forward of one block."""
    seen: dict[tuple[str, str], None] = {}
    for n in plan.graph.nodes:
        if n.module_path != prefix and not n.module_path.startswith(prefix + "."):
            continue
        for r in plan.strategy(n.name).redistributes:
            if r.axis == "tp" and r.collective not in ("slice", "to_partial"):
                seen[(r.collective, r.value)] = None
    return list(seen)


def _as_tuple(x) -> tuple[str, ...]:
    return (x,) if isinstance(x, str) else tuple(x)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
@pytest.mark.parametrize("tp", [4, 8])
def test_megatron_split_without_sequence_parallelism(graphs, name, tp):
    plan = plan_auto(graphs[name], get_cluster("dgx-a100"), mode="train", constraints={"tp": tp, "sp": 1})
    assert plan.degrees["tp"] == tp
    params = dict(plan.param_placements)
    qkv, attn_out, fc1, fc2 = LAYOUT[name]
    for i in range(SIZE["layers"]):

        def paths(x, i=i):
            return tuple(p.format(i=i) for p in _as_tuple(x))

        column = _matmuls(plan, paths(qkv)) + _matmuls(plan, paths(fc1))
        for node, s in column:  # column-parallel: weight split on its output features, output split too
            weight = node.args[1].name
            key = next(p.key for p in plan.graph.params if p.name == weight)
            out_dim = 0 if node.op == "aten.linear.default" else 1
            assert _tp(params[key]) == Shard(out_dim), (node.module_path, str(params[key]))
            assert (
                isinstance(_tp(s.outputs[0]), Shard) and _tp(s.outputs[0]).dim == len(node.output.shape) - 1
            )
        for node, s in _matmuls(plan, paths(attn_out)) + _matmuls(plan, paths(fc2)):  # row-parallel
            weight = node.args[1].name
            key = next(p.key for p in plan.graph.params if p.name == weight)
            in_dim = 1 if node.op == "aten.linear.default" else 0
            assert _tp(params[key]) == Shard(in_dim), (node.module_path, str(params[key]))
            assert isinstance(_tp(s.outputs[0]), Partial)
        prefix = ("transformer.h." if name == "gpt2" else "model.layers.") + f"{i}"
        collectives = _forward_collectives(plan, prefix)
        assert sorted(c for c, _ in collectives) == ["allreduce", "allreduce"], collectives
        attn = [n.name for n in plan.graph.nodes if n.module_path in paths(attn_out)]
        mlp = [n.name for n in plan.graph.nodes if n.module_path in paths(fc2)]
        reduced = {v for _, v in collectives}
        assert reduced & set(attn) and reduced & set(mlp), (collectives, attn, mlp)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_sequence_parallelism_replaces_the_all_reduce_when_it_pays(graphs, name):
    cluster = get_cluster("dgx-a100")
    plain = plan_auto(graphs[name], cluster, mode="train", constraints={"tp": 8, "sp": 1})
    sp = plan_auto(graphs[name], cluster, mode="train", constraints={"tp": 8})
    assert sp.predicted.step_time_s < plain.predicted.step_time_s
    # the peak of this two-layer model is at the optimizer step (parameters, gradients, AdamW state and
    # its scratch), where sequence parallelism changes nothing: it never raises the peak
    assert max(sp.predicted.memory_bytes) <= max(plain.predicted.memory_bytes)
    hidden = SIZE["batch"] * SIZE["seq"] * SIZE["hidden"]
    for i in range(SIZE["layers"]):
        prefix = ("transformer.h." if name == "gpt2" else "model.layers.") + f"{i}"
        kinds = [c for c, v in _forward_collectives(sp, prefix) if _numel(sp, v) >= hidden]
        # per attention and per MLP: the row-parallel output is reduce-scattered, the column-parallel
        # input all-gathered (once, shared by Q, K and V)
        assert sorted(kinds) == ["allgather", "allgather", "reduce_scatter", "reduce_scatter"], kinds


def _numel(plan: ExecutionPlan, value: str) -> int:
    return plan.graph.spec_of(value).numel  # type: ignore[union-attr]


def test_meta_plan_is_cheap_and_deterministic(graphs):
    cluster = get_cluster("dgx-a100")
    a = plan_auto(graphs["gpt2"], cluster, mode="train", constraints={"tp": 8})
    b = plan_auto(graphs["gpt2"], cluster, mode="train", constraints={"tp": 8})
    assert a.strategies == b.strategies and a.param_placements == b.param_placements
    assert torch.device("meta") is not None  # planning touched no real memory: the model was on meta
