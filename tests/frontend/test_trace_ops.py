"""What the frontend accepts and refuses, op by op: random ops (by ATen's tag, not by name: they run whole, or
are refused where a rule would split them), outputs of a data-dependent size, and tensors held by the model
(lifted constants)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shardwise.errors import UnsupportedOpError
from shardwise.frontend.trace import model_tensors, trace
from shardwise.ir.registry import RANDOM_OPS, draws_random, op_dims


class Fn(nn.Module):
    def __init__(self, fn) -> None:  # noqa: ANN001
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def test_the_random_ops_of_the_registry_are_those_torch_tags() -> None:
    tagged = set()
    for full in torch._C._dispatch_get_all_op_names():
        if not full.startswith("aten::"):
            continue
        base, _, overload = full[len("aten::") :].partition(".")
        try:
            op = getattr(getattr(torch.ops.aten, base), overload or "default")
        except (AttributeError, RuntimeError):
            continue
        if torch.Tag.nondeterministic_seeded in op.tags:
            tagged.add(base)
    kernels = {n for n in tagged if "attention" in n or "rnn" in n or n in ("gru", "lstm", "_lstm_mps")}
    internal = {"_cudnn_init_dropout_state", "_fill_mem_eff_dropout_mask_", "_fused_sdp_choice",
                "_nested_tensor_softmax_with_shape"}  # fmt: skip
    assert tagged - kernels - internal == set(RANDOM_OPS)


@pytest.mark.parametrize(
    ("fn", "random"),
    [
        (lambda x: F.rrelu(x, training=True), True),
        (lambda x: x + torch.randn_like(x), True),
        (lambda x: F.feature_alpha_dropout(x, 0.5, training=True), True),
        (lambda x: F.dropout(x, 0.5, training=True), True),
        (lambda x: F.rrelu(x, training=False), False),
        (lambda x: F.dropout(x, 0.0, training=True) + F.alpha_dropout(x, 0.5, training=False), False),
    ],
    ids=["rrelu", "randn_like", "feature-alpha-dropout", "dropout", "rrelu-eval", "dropout-p0-or-eval"],
)
def test_random_ops_trace_and_run_whole(fn, random: bool) -> None:  # noqa: ANN001
    graph = trace(Fn(fn), (torch.randn(4, 3),))[0]
    drawing = [n for n in graph.nodes if draws_random(n)]
    assert bool(drawing) == random
    for node in drawing:  # every rank draws the whole tensor, as eager PyTorch does
        dims = op_dims(node, [graph.spec_of(v) for v in node.inputs])
        assert not dims.splittable_labels(), (node.op, str(dims))


def test_attention_dropout_is_refused_since_its_rule_would_split_it() -> None:
    def attention(x: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(x, x, x, dropout_p=0.5)

    with pytest.raises(UnsupportedOpError, match="draws random numbers on pieces"):
        trace(Fn(attention), (torch.randn(2, 2, 4, 8),))


def test_an_output_of_data_dependent_size_takes_the_example_size_and_runs_whole() -> None:
    x = torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 3.0]])
    graph = trace(Fn(lambda x: x.nonzero().float().sum(0)), (x,))[0]
    nonzero = next(n for n in graph.nodes if n.op == "aten.nonzero.default")
    assert nonzero.outputs[0].shape == (3, 2) and nonzero.whole


def test_tensors_held_by_the_model_are_weights_of_the_program() -> None:
    class Scaled(nn.Module):  # plain tensor attributes (neither parameters nor buffers): lifted constants
        def __init__(self) -> None:
            super().__init__()
            self.scale = torch.tensor([0.5, 2.0, -1.0])
            self.rows = torch.tensor([2, 0])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[self.rows] * self.scale

    model = Scaled()
    graph = trace(model, (torch.randn(4, 3),))[0]
    constants = {p.key for p in graph.params if p.kind == "constant"}
    assert len(constants) == 2
    tensors = model_tensors(model)
    assert constants <= set(tensors)
    assert any(torch.equal(tensors[k], model.scale) for k in constants)
