"""The price list's rules for GPU programs: widths of 16-bit traces, causal fused attention, fused groups'
backward and recomputation (costs.compute, costs.backward, costs.step)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import shardwise
from shardwise.cluster import get_cluster
from shardwise.costs.backward import backward_s, group_backward_s
from shardwise.costs.compute import CAUSAL_FRACTION, op_work, traced_scale
from shardwise.costs.prices import price_list
from shardwise.costs.step import fused_backward, grad_values, price_flat
from shardwise.frontend.trace import trace
from shardwise.zoo import build_model


class _Block(nn.Module):
    """An RMSNorm computed in float32 (as Llama's), a linear layer and causal attention."""

    def __init__(self, hidden: int = 64, heads: int = 4, causal: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.heads = heads
        self.causal = causal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)
        h = self.weight * h.to(x.dtype)
        b, s, d = h.shape
        q, k, v = self.qkv(h).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if self.causal:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            mask = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return o.transpose(1, 2).reshape(b, s, d)


def _graph(dtype: torch.dtype, causal: bool = True):
    with torch.device("meta"):
        model = _Block(causal=causal).to(dtype)
    x = torch.empty(2, 32, 64, dtype=dtype, device="meta")
    return trace(model, (x,))[0]


def test_widths_follow_the_trace() -> None:
    fp32, bf16 = _graph(torch.float32), _graph(torch.bfloat16)
    assert traced_scale(fp32, "bf16") == 0.5  # autocast: float32 values travel in 2 bytes
    assert traced_scale(fp32, "fp32") == 1.0
    assert traced_scale(bf16, "bf16") == 1.0  # the trace states every width
    # the linear layer moves the same bytes either way; the float32 upcast of the bf16 trace keeps its 4 bytes
    lin32 = next(n for n in fp32.nodes if n.op == "aten.linear.default")
    lin16 = next(n for n in bf16.nodes if n.op == "aten.linear.default")
    w32 = op_work(lin32, precision="bf16", scale=traced_scale(fp32, "bf16"))
    w16 = op_work(lin16, precision="bf16", scale=traced_scale(bf16, "bf16"))
    assert w16.bytes == pytest.approx(w32.bytes)
    pow16 = next(n for n in bf16.nodes if n.op == "aten.pow.Tensor_Scalar")
    assert op_work(pow16, precision="bf16", scale=1.0).bytes == 2 * 32 * 64 * 4 * 2  # read and write float32


def test_causal_attention_does_half_its_flops() -> None:
    causal = next(n for n in _graph(torch.float32).nodes if n.op.startswith("aten.scaled_dot_product"))
    masked = next(n for n in _graph(torch.float32, causal=False).nodes if n.op.startswith("aten.scaled_dot"))
    assert causal.flops == masked.flops  # the registry counts the model's FLOPs alike
    assert op_work(causal).flops == pytest.approx(CAUSAL_FRACTION * causal.flops)
    assert op_work(masked).flops == masked.flops  # a mask tensor may keep anything: the kernel does it all


def _gpu_plan():
    model, (ids,) = build_model("llama", device="meta")
    return shardwise.compile(
        model, "dgx-h100x1", example_inputs=(ids,), example_kwargs={"labels": ids}, mode="train",
        precision="bf16", loss_fn=lambda o: o.loss, constraints={"dp": 1, "tp": 1},
    ).plan  # fmt: skip


@pytest.fixture(scope="module")
def gpu_plan():
    plan = _gpu_plan()
    assert plan.fused_groups, "the zoo's llama fuses on a CUDA cluster"
    return plan


def test_fused_backward_is_one_kernel_per_group(gpu_plan) -> None:
    prices = price_list(get_cluster("dgx-h100x1"), "bf16")
    plan = gpu_plan
    per_op = price_flat(plan, prices)
    fused = price_flat(plan, prices, fused_backward=True)
    groups = fused_backward(plan.graph, plan.mesh, plan.strategies, plan.fused_groups, prices,
                            grad=grad_values(plan.graph))  # fmt: skip
    grad = grad_values(plan.graph)
    eager = 0.0
    for g in plan.fused_groups:
        if any(n in grad for n in g.nodes):
            eager += sum(
                backward_s(prices.compute, prices.work(plan.graph.node(n), scale=0.5)) for n in g.nodes if n in grad
            )
    assert groups and sum(groups.values()) < eager
    assert per_op.step_s - fused.step_s == pytest.approx(eager - sum(groups.values()), rel=1e-6)


def test_group_backward_rule() -> None:
    gpu = price_list(get_cluster("dgx-h100x1"), "bf16").compute
    cpu = price_list(get_cluster("cpu:2"), "fp32").compute
    node = next(n for n in _graph(torch.float32).nodes if n.op == "aten.pow.Tensor_Scalar")
    works = [op_work(node), op_work(node)]
    # one kernel moving twice its boundary bytes on a GPU; the ops one by one where groups are not kernels
    assert group_backward_s(gpu, works, 1e6) == pytest.approx(gpu.with_overhead(gpu.byte_s(2e6)))
    assert group_backward_s(cpu, works, 1e6) == pytest.approx(sum(backward_s(cpu, w) for w in works))


def test_recomputed_group_runs_its_kernel_once_more(gpu_plan) -> None:
    prices = price_list(get_cluster("dgx-h100x1"), "bf16")
    plan = gpu_plan
    group = max(plan.fused_groups, key=lambda g: len(g.nodes))
    again = plan.replace(recompute=((group.nodes[0], group.nodes[-1]),))
    names = [n.name for n in plan.graph.nodes]
    inside = names[names.index(group.nodes[0]) : names.index(group.nodes[-1]) + 1]
    assert set(inside) == set(group.nodes), "the group's members are contiguous in graph order"
    events = [e for e in price_flat(again, prices).events if e.phase == "recompute"]
    forward = {e.node: e.seconds for e in price_flat(plan, prices).events if e.phase == "forward"}
    kernel = sum(forward.get(n, 0.0) for n in group.nodes)  # the group's kernel, shared among its ops
    assert sum(e.seconds for e in events) == pytest.approx(kernel)
