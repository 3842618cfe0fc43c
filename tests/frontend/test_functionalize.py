"""What the frontend makes of code a user writes (issue 16): in-place ops become functional, tensor constants
go with the weights, size arithmetic becomes scalar nodes, sizes read from tensor values take the example's values,
and what cannot run is refused with the op, the model's line and what to do. (The runs equal to eager are in
tests/e2e/test_user_models.py.)"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shardwise.errors import UnsupportedOpError
from shardwise.frontend.custom_ops import KNOWN_DECOMPOSITIONS
from shardwise.frontend.trace import trace
from shardwise.ir.registry import SCALAR_OPERATORS
from shardwise.ir.tensor import TensorSpec
from shardwise.ir.verify import verify


def _mutable(graph) -> list[str]:
    return [n.op for n in graph.nodes if n.op.startswith("aten.") and n.op.split(".")[1].endswith("_")]


class InPlaceOnIntermediates(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        h.mul_(2.0)
        h[:, :2].add_(1.0)
        torch.relu_(h)
        h.detach_()
        return h


def test_in_place_ops_on_intermediates_and_views_become_functional():
    graph, _ = trace(InPlaceOnIntermediates(), (torch.randn(4, 8),))
    verify(graph)
    assert _mutable(graph) == []
    ops = {n.op for n in graph.nodes}
    assert {"aten.mul.Tensor", "aten.add.Tensor", "aten.relu.default"} <= ops
    assert "aten.slice_scatter.default" in ops  # the write into the view, as a new value


class WritesIntoInputView(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x[0].add_(1.0)
        return x * 2


class WritesIntoParameter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.lin.weight.mul_(0.5)
        return self.lin(x)


def test_writes_into_inputs_or_parameters_are_refused_with_op_line_and_remedy():
    with pytest.raises(UnsupportedOpError, match=r"test_functionalize\.py:\d+: op 'aten\.add_\.Tensor' mutates its input 'x'.*x = x \+ y"):
        trace(WritesIntoInputView(), (torch.randn(4, 4),))
    with pytest.raises(UnsupportedOpError, match=r"test_functionalize\.py:\d+: op 'aten\.mul_\.Tensor' writes into the parameter 'lin\.weight'.*register_buffer"):
        trace(WritesIntoParameter(), (torch.randn(4, 4),))


class Constants(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.tensor(3.0) + torch.tensor([1.0, 2.0, 3.0, 4.0])


def test_tensor_constants_made_in_forward_are_carried_with_the_weights():
    from shardwise.frontend.trace import model_tensors

    model = Constants()
    graph, _ = trace(model, (torch.randn(2, 4),))
    verify(graph)
    constants = [p for p in graph.params if p.kind == "constant"]
    assert [p.spec.shape for p in constants] == [(), (4,)]
    weights = model_tensors(model)
    torch.testing.assert_close(weights[constants[1].key], torch.tensor([1.0, 2.0, 3.0, 4.0]))


class SizeArithmetic(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.size(0)
        torch._check(b >= 2)  # a comparison that only feeds a run-time assertion
        return x.reshape(b * 2, -1) * torch.sym_ite(b > 3, b // 2, b + 1)


def test_size_arithmetic_becomes_scalar_nodes_and_unused_comparisons_go():
    from torch.export import Dim

    graph, _ = trace(SizeArithmetic(), (torch.randn(6, 4),), dynamic_shapes=({0: Dim("b", min=2, max=64)},))
    verify(graph)
    functions = [n.args[0] for n in graph.nodes if n.op == "scalar_op"]
    assert {"mul", "gt", "floordiv", "add", "sym_ite"} <= set(functions)
    assert "ge" not in functions  # b >= 2 fed only the dropped assertion
    assert set(functions) <= set(SCALAR_OPERATORS) | {"sym_ite"}


class ValueDependent(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = (x[:, 0] > 0).sum().item()
        torch._check_is_size(k)
        torch._check(k <= x.size(0))
        low, high = x.split([x.size(0) - k, k])
        return torch.cat([low * 2, high * 3])


def test_sizes_read_from_tensor_values_take_the_example_values_and_run_whole():
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [-4.0, 0.0]])  # k = 3
    graph, _ = trace(ValueDependent(), (x,))
    verify(graph)
    split = next(n for n in graph.nodes if n.op == "aten.split_with_sizes.default")
    assert [o.shape for o in split.outputs] == [(2, 2), (3, 2)]
    assert split.whole
    pieces = [n for n in graph.nodes if n.op == "aten.mul.Tensor"]
    assert [n.outputs[0] for n in pieces] == [TensorSpec((2, 2), "float32"), TensorSpec((3, 2), "float32")]
    assert all(n.whole for n in pieces)
    assert next(n for n in graph.nodes if n.op == "aten.cat.default").whole  # it reads them


def test_transformers_grouped_mm_decomposition_equals_its_implementation():
    """The ATen form of transformers' grouped matmul (used by every MoE model of transformers 5 while
    torch.export traces) computes what transformers' own implementation does: empty groups, rows after the
    last group."""
    pytest.importorskip("transformers.integrations.moe")
    decomposed = KNOWN_DECOMPOSITIONS["transformers::grouped_mm_fallback"]
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(11, 6, generator=g), torch.randn(4, 6, 5, generator=g)
    for offs in ([3, 3, 7, 11], [0, 5, 5, 9], [11, 11, 11, 11]):
        offs_t = torch.tensor(offs, dtype=torch.int32)
        expected = torch.ops.transformers.grouped_mm_fallback(x, w, offs_t)
        torch.testing.assert_close(decomposed(x, w, offs_t), expected, rtol=0, atol=0)


class _TimesTwoGradThree(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        return x * 2

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        return grad * 3


class OwnBackward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _TimesTwoGradThree.apply(self.lin(x))


def test_an_autograd_function_with_its_own_backward_is_refused_for_training_only():
    """torch.export keeps the forward of an autograd.Function and drops its backward: fine for inference, a
    silently different gradient in training, so training refuses it with the line and the remedy."""
    graph, _ = trace(OwnBackward(), (torch.randn(2, 4),))
    assert "aten.mul.Tensor" in {n.op for n in graph.nodes}
    with pytest.raises(UnsupportedOpError, match=r"test_functionalize\.py:\d+: .*'_TimesTwoGradThree'.*register_autograd"):
        trace(OwnBackward(), (torch.randn(2, 4),), loss_fn=lambda out: out.sum())


class Branches(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cond(x.sum() > 0, lambda a: (a.cos() * 2,), lambda a: (torch.zeros_like(a) + a.sin(),), (x,))[0]


def test_higher_order_ops_keep_their_subgraphs_as_functions_that_round_trip_as_data():
    from shardwise.ir.safety import plan_text_problems
    from shardwise.ir.serialize import graph_from_json, graph_to_json

    graph, _ = trace(Branches(), (torch.randn(3, 4),))
    verify(graph)
    cond = next(n for n in graph.nodes if n.op == "higher_order.cond")
    branches = [a.value for a in cond.args if getattr(a, "kind", "") == "function"]
    assert branches == [f.name for f in graph.functions] == ["subgraph_true_graph_0", "subgraph_false_graph_0"]
    assert {n.op for n in graph.functions[1].nodes} >= {"aten.zeros_like.default", "aten.sin.default"}
    assert graph_from_json(graph_to_json(graph)) == graph
    assert plan_text_problems(graph) == []
