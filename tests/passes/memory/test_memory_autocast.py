"""Weights gathered by a collective under bf16 autocast: the matmul saves a 2-byte copy, not the fp32 gather.

Under ``torch.autocast`` a linear casts an fp32 weight it reads to bf16 and saves that copy for backward
(checked here with autograd's saved-tensor hooks); a weight that ZeRO-3 all-gathers before the matmul is not a
parameter, so autocast does not cache its cast: each matmul reading it has its own copy, and the gathered
fp32 tensor is free after its last forward read. On ``cpu:2`` (GPT-2 zoo model, dp=2, ZeRO-3, the capacity
cut so that the placement shards the weights; peak at the start of the backward) repeated measurements of
each rank's train_step peak varied from 1.37 to 1.52 MB; the prediction is 1.32 MB (1.59 MB before), so a
part of that step is still missing from the map.
"""

from __future__ import annotations

import dataclasses

import torch

from shardwise.cluster import get_cluster
from shardwise.frontend.trace import trace
from shardwise.passes.memory.mapping import OPTIMIZER_STATE_FACTOR
from shardwise.passes.memory.program import buffer_kind, step_buffers
from shardwise.planner.auto import plan_auto
from shardwise.zoo import build_model


def test_autocast_linear_saves_the_cast_of_a_gathered_weight_not_the_weight():
    class Gather(torch.autograd.Function):  # stands for the generated all-gather (it saves nothing)
        @staticmethod
        def forward(ctx, w):
            return torch.cat([w, w], 0)

        @staticmethod
        def backward(ctx, g):
            return g[: len(g) // 2] + g[len(g) // 2 :]

    w = torch.nn.Parameter(torch.randn(8, 16))
    x = torch.randn(4, 16, dtype=torch.bfloat16, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved.append(t) or t, lambda t: t
    ):  # fmt: skip
        gathered = Gather.apply(w)
        torch.nn.functional.linear(x, gathered)
    assert all(t.data_ptr() != gathered.data_ptr() for t in saved)
    assert any(t.dtype == torch.bfloat16 and t.numel() == gathered.numel() for t in saved)


def test_gathered_weights_are_saved_as_bf16_copies_until_their_backward():
    model, inputs = build_model("gpt2")
    graph = trace(model, inputs, loss_fn=lambda o: o.logits.float().sin().mean())[0]
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    cpu = get_cluster("cpu:2")
    # a device too small for the replicated weights with their ZeRO-2 state and activations (~4.9x weights), big
    # enough once the ILP splits some over dp (their gradients and optimizer state split with them)
    small = dataclasses.replace(cpu, device=dataclasses.replace(cpu.device, memory_bytes=int(3.5 * weights)))
    plan = plan_auto(
        graph, small, mode="train", precision="bf16", constraints={"dp": 2, "zero": 3}, require_fit=False
    )
    names = {p.key: p.name for p in plan.graph.params}
    bufs = step_buffers(
        plan.graph, plan.mesh, plan.strategies, param_placements={names[k]: s for k, s in plan.param_placements},
        input_placements={i.name: s for i, s in zip(plan.graph.inputs, plan.input_placements)}, train=True,
        precision="bf16", optimizer_factor=OPTIMIZER_STATE_FACTOR[plan.optimizer], zero=plan.zero_stage,
        grad_reduce=dict(plan.param_grad_reduce),
    )  # fmt: skip
    n = len(plan.graph.nodes)
    by_id = {b.id: b for b in bufs}
    matmuls = ("aten.linear.default", "aten.addmm.default", "aten.mm.default")
    checked = 0
    for k, node in enumerate(plan.graph.nodes):
        strategy = next(s for s in plan.strategies if s.node == node.name)
        for r in strategy.redistributes:
            if node.op not in matmuls or r.value not in names.values() or r.collective != "allgather":
                continue
            gathered = next(b for b in bufs if b.id.startswith(f"coll:{r.value}->") and b.start <= k < b.end)
            assert gathered.end <= n  # freed in the forward: the matmul does not keep the fp32 weight
            key = next(key for key, name in names.items() if name == r.value)
            copy = next(b for i, b in by_id.items() if i.startswith(f"cast:{key}@{k}."))
            assert buffer_kind(copy.id) == "cast"
            assert copy.size == gathered.size // 2  # bf16 of the gathered fp32 weight
            assert copy.start == k and copy.end > 2 * n - k  # kept for this op's backward
            checked += 1
    assert checked >= 4  # the attention and MLP weights of both blocks are gathered in this plan
