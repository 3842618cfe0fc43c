"""Uneven (torch.chunk) splits are offered only where they are exact: free dimensions of a matmul, views
that keep the dimension whole, elementwise ops and the classes of cross entropy; never a contraction, a
reshape that merges the dimension, a normalization over other dims, or a size torch.chunk cannot cut into
one piece per device."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shardwise.frontend.trace import trace
from shardwise.ir.placement import DeviceMesh, Replicate, Shard, ShardingSpec, chunks_cleanly
from shardwise.passes.sharding.candidates import node_info, tensor_specs
from shardwise.passes.sharding.strategy import split_is_valid


class _Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(1001, 32)  # contraction of 1001
        self.ln = nn.LayerNorm(32)
        self.head = nn.Linear(32, 1001, bias=False)  # output dimension of 1001

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.ln(self.proj(x))) * 2.0
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")


@pytest.fixture(scope="module")
def infos():
    x = torch.randn(3, 5, 1001)
    labels = torch.randint(0, 1001, (3, 5))
    graph, _ = trace(_Head(), (x, labels))
    specs = tensor_specs(graph)
    return {n.name: node_info(n, specs) for n in graph.nodes if n.name in specs}


def _valid(info, label: str, ways: int = 2) -> bool:
    return split_is_valid(info.node, info.dims, label, ways, info.ins, info.outs)


def _by_op(infos, op: str, module: str = ""):
    found = [i for i in infos.values() if i.node.op == op and i.node.module_path.startswith(module)]
    assert found, op
    return found[0]


def test_torch_chunk_must_give_every_device_a_piece():
    assert chunks_cleanly(1001, 2) and chunks_cleanly(50257, 4) and chunks_cleanly(8, 4)
    assert not chunks_cleanly(5, 4)  # torch.chunk: 2, 2, 1 (three pieces)
    assert not chunks_cleanly(1, 2)
    assert [len(c) for c in torch.arange(50257).chunk(4)] == [12565, 12565, 12565, 12562]


def test_local_shape_is_the_biggest_piece_and_uneven_dims_are_named():
    mesh = DeviceMesh((1, 2), ("dp", "tp"), (0, 1))
    spec = ShardingSpec((Replicate(), Shard(1)))
    assert spec.local_shape((4, 1001), mesh) == (4, 501)
    assert spec.uneven_dims((4, 1001), mesh) == (1,)
    assert spec.uneven_dims((4, 1000), mesh) == ()


def test_lm_head_output_dimension_may_split_unevenly_but_not_a_contraction(infos):
    head = _by_op(infos, "aten.linear.default", "head")
    assert _valid(head, "n")  # 1001 rows of the LM head
    proj = _by_op(infos, "aten.linear.default", "proj")
    assert not _valid(proj, "k")  # a contraction of 1001: partial sums over uneven pieces are not planned
    assert not _valid(head, "n", ways=1002)


def test_elementwise_views_and_cross_entropy_classes_split_unevenly(infos):
    mul = _by_op(infos, "aten.mul.Tensor")
    assert _valid(mul, mul.dims.outputs[0][-1].label)
    flatten = next(i for i in infos.values() if i.node.op in ("aten.flatten.using_ints", "aten.view.default",
                                                              "aten.reshape.default") and i.ins[0].rank == 3)  # fmt: skip
    last = flatten.dims.inputs[0][-1].label
    assert _valid(flatten, last)  # the vocabulary dimension is kept whole by the flatten
    ce = next(i for i in infos.values() if i.node.op == "aten.cross_entropy_loss.default")
    assert _valid(ce, "c")


def test_normalization_and_merging_reshapes_do_not_split_unevenly():
    class _M(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.layer_norm(x.softmax(-1), (9,)).reshape(7 * 3, 9)

    graph, _ = trace(_M(), (torch.randn(7, 3, 9),))
    specs = tensor_specs(graph)
    infos = {n.name: node_info(n, specs) for n in graph.nodes if n.name in specs}
    reshape = next(i for i in infos.values() if i.node.op in ("aten.view.default", "aten.reshape.default",
                                                              "aten._unsafe_view.default"))  # fmt: skip
    # 7 rows merged with 3 into 21: pieces of 4 + 3 rows are not the pieces 11 + 10 of the 21
    assert not _valid(reshape, reshape.dims.inputs[0][0].label)
    softmax = next(i for i in infos.values() if "softmax" in i.node.op)
    assert not _valid(softmax, softmax.dims.inputs[0][0].label)  # 7 rows: not an op on the uneven list
    assert _valid(softmax, softmax.dims.inputs[0][0].label, ways=7)  # even splits are unchanged
