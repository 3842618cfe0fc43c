"""precision="fp8": bf16 mixed precision whose linear layers run on float8 tensor cores (costs.compute)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import shardwise
from shardwise.cluster import get_cluster
from shardwise.costs.backward import backward_s
from shardwise.costs.prices import price_list
from shardwise.errors import PlanError, UserInputError
from shardwise.frontend.trace import trace


class _Net(nn.Module):
    """A linear layer, causal attention, and an output head."""

    def __init__(self, hidden: int = 4096, heads: int = 32) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden, 3 * hidden, bias=False)
        self.lm_head = nn.Linear(hidden, hidden, bias=False)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.proj(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, d)
        return self.lm_head(o)


@pytest.fixture(scope="module")
def graph():
    with torch.device("meta"):
        model = _Net()
    return trace(model, (torch.empty(8, 2048, 4096, device="meta"),))[0]


def _op(graph, kind: str, module: str):
    return next(n for n in graph.nodes if n.op == kind and n.module_path == module)


def test_linear_layers_run_at_the_float8_peak(graph):
    cluster = get_cluster("dgx-h100")
    bf16, fp8 = price_list(cluster, "bf16"), price_list(cluster, "fp8")
    params = {p.name: p.spec.nbytes for p in graph.params}
    proj = _op(graph, "aten.linear.default", "proj")
    a, b = bf16.work(proj, 1, params), fp8.work(proj, 1, params)
    assert b.float8 and not a.float8 and (a.flops, a.bytes) == (b.flops, b.bytes)
    # a large matmul is bound by its FLOPs: the float8 peak over the bf16 one (H100 datasheet: 1979 / 989), beside
    # torchao's scaling and casting kernels (its roofline model, tensorwise): the input (M x K, 6 bytes an element)
    # and the weight (K x N, 5) in the forward, the output's gradient (M x N, 6) and the weight again (3) in the
    # backward, at the memory's bandwidth
    ratio = dict(cluster.device.peak_flops)["float8_e4m3fn"] / dict(cluster.device.peak_flops)["bfloat16"]
    m, k, n = 8 * 2048, 4096, 3 * 4096
    assert b.cast_bytes() == m * k * 6 + k * n * 5 and b.cast_bytes(backward=True) == m * n * 6 + k * n * 3
    assert a.cast_bytes() == a.cast_bytes(backward=True) == 0
    casts = fp8.compute.byte_s(b.cast_bytes()), fp8.compute.byte_s(b.cast_bytes(backward=True))
    assert fp8.compute.device_s(b) == pytest.approx(bf16.compute.device_s(a) / ratio + casts[0])
    assert backward_s(fp8.compute, b) == pytest.approx(backward_s(bf16.compute, a) / ratio + casts[1], rel=1e-3)
    # the output head stays in bf16, attention is not a linear layer: both priced as under bf16
    head = _op(graph, "aten.linear.default", "lm_head")
    attention = next(n for n in graph.nodes if n.op == "aten.scaled_dot_product_attention.default")
    for node in (head, attention):
        assert not fp8.work(node, 1, params).float8
        assert fp8.compute.device_s(fp8.work(node, 1, params)) == bf16.compute.device_s(bf16.work(node, 1, params))


def test_a_device_without_float8_is_refused():
    with pytest.raises(PlanError, match="float8"):
        price_list(get_cluster("dgx-a100"), "fp8")


def test_fp8_plans_are_faster_and_are_not_turned_into_programs():
    with torch.device("meta"):
        model = _Net(hidden=1024, heads=8)
    x = torch.empty(8, 512, 1024, device="meta")
    loss = lambda out: out.float().mean()  # noqa: E731
    plans = {
        p: shardwise.compile(model, "dgx-h100", example_inputs=(x,), mode="train", precision=p, loss_fn=loss,
                             constraints={"dp": 8, "tp": 1, "zero": 0})  # fmt: skip
        for p in ("bf16", "fp8")
    }
    assert plans["fp8"].plan.predicted.step_time_s < plans["bf16"].plan.predicted.step_time_s
    assert plans["fp8"].plan.predicted.memory_bytes == plans["bf16"].plan.predicted.memory_bytes
    assert any("float8" in n for n in plans["fp8"].plan.notes)
    with pytest.raises(UserInputError, match="no float8 kernels"):
        plans["fp8"].save("unused-directory")
