"""Ops written the way a person writes them (``torch.*``, ``F.*``, tensor methods, operators, subscripts)
compute what the aten op computes: each case spells one op with its arguments, evaluates the expression and
compares it with calling ``torch.ops.aten`` on the same arguments. The generated programs' results are checked
against eager PyTorch by the e2e tests and the op corpus (tests/frontend/test_op_corpus.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shardwise.codegen.spelling import spell, uses_aten
from shardwise.ir.graph import Node
from shardwise.ir.registry import REGISTRY, SPELLINGS
from shardwise.ir.tensor import TensorSpec

g = torch.Generator().manual_seed(0)
X = torch.randn(2, 3, 4, generator=g)
Y = torch.randn(2, 3, 4, generator=g)
M = torch.randn(3, 4, generator=g)
W = torch.randn(5, 4, generator=g)
IDS = torch.tensor([[0, 2, 4], [1, 1, 3]])
MASK = X > 0
INT = torch.arange(6).reshape(2, 3)

CASES = [  # (aten op, args, kwargs)
    ("aten.add.Tensor", (X, Y), {}), ("aten.add.Tensor", (X, Y), {"alpha": 2}), ("aten.add.Tensor", (X, 0), {}),
    ("aten.add.Scalar", (X, 1.5), {}), ("aten.sub.Tensor", (X, Y), {}), ("aten.mul.Tensor", (X, -1.0), {}),
    ("aten.div.Tensor", (X, Y), {}), ("aten.div.Tensor_mode", (X, Y), {"rounding_mode": "floor"}),
    ("aten.rsub.Scalar", (X, 2), {}), ("aten.pow.Tensor_Scalar", (X, 2), {}), ("aten.pow.Scalar", (-2.0, X), {}),
    ("aten.eq.Tensor", (X, Y), {}), ("aten.ne.Scalar", (INT, 1), {}), ("aten.le.Tensor", (X, Y), {}),
    ("aten.__and__.Tensor", (MASK, Y > 0), {}), ("aten.__or__.Tensor", (MASK, Y > 0), {}),
    ("aten.neg.default", (X,), {}), ("aten.exp.default", (X,), {}), ("aten.rsqrt.default", (X.abs(),), {}),
    ("aten.relu.default", (X,), {}), ("aten.gelu.default", (X,), {"approximate": "tanh"}),
    ("aten.silu.default", (X,), {}), ("aten.leaky_relu.default", (X, 0.2), {}),
    ("aten.elu.default", (X, 0.5), {}), ("aten.hardtanh.default", (X, -0.5, 0.5), {}),
    ("aten.where.self", (MASK, X, Y), {}), ("aten.masked_fill.Scalar", (X, MASK, -1.0), {}),
    ("aten.clamp.default", (X, -0.5, 0.5), {}), ("aten.clamp_min.default", (X, 0.0), {}),
    ("aten.dropout.default", (X, 0.0, True), {}), ("aten.maximum.default", (X, Y), {}),
    ("aten.to.dtype", (X, torch.float64), {}),
    ("aten.to.dtype", (X, torch.float64, False, True, torch.contiguous_format), {}),
    ("aten.to.device", (X, torch.device("cpu"), torch.float64, False, False, torch.preserve_format), {}),
    ("aten.rsub.Scalar", (X, 2, 3), {}), ("aten._to_copy.default", (X,), {"dtype": torch.float64}),
    ("aten.to.dtype_layout", (X,), {"dtype": torch.float64, "layout": torch.strided, "device": torch.device("cpu")}),
    ("aten.view.default", (X, [6, 4]), {}), ("aten.view.default", (X[0, 0, :1], []), {}),
    ("aten.reshape.default", (X, [2, -1]), {}), ("aten.expand.default", (X[:, :1], [2, 3, 4]), {}),
    ("aten.permute.default", (X, [2, 0, 1]), {}), ("aten.transpose.int", (X, 0, 2), {}),
    ("aten.unsqueeze.default", (X, 1), {}), ("aten.t.default", (M,), {}),
    ("aten.slice.Tensor", (X, 2, 1, 3), {}), ("aten.slice.Tensor", (X, -1, 0, 9223372036854775807, 2), {}),
    ("aten.slice.Tensor", (X, 1, 1), {}), ("aten.select.int", (X, 1, 0), {}),
    ("aten.index.Tensor", (X, [IDS[:, :2] % 2, None, IDS[:, :2]]), {}), ("aten.index.Tensor", (X, [MASK]), {}),
    ("aten.cat.default", ([X, Y], 1), {}), ("aten.split.Tensor", (X, 2, 2), {}),
    ("aten.sum.dim_IntList", (X, [1], True), {}), ("aten.sum.dim_IntList", (X, [1]), {"dtype": torch.float64}),
    ("aten.mean.dim", (X, [-1]), {}), ("aten.amax.default", (X, [0]), {}), ("aten.max.dim", (X, 1), {}),
    ("aten.softmax.int", (X, -1), {}), ("aten._softmax.default", (X, -1, False), {}),
    ("aten.log_softmax.int", (X, 1), {}), ("aten.cumsum.default", (INT, -1), {}),
    ("aten.layer_norm.default", (X, [4], W[0], W[1], 1e-5), {}),
    ("aten.layer_norm.default", (X, [4], W[0], W[1], 1e-5, True), {}),
    ("aten.embedding.default", (W, IDS), {}), ("aten.embedding.default", (W, IDS, -1), {}),
    ("aten.scaled_dot_product_attention.default", (X, Y, X, None, 0.0, True), {"scale": 0.5}),
    ("aten.linear.default", (X, W), {}), ("aten.linear.default", (X, W, W[:, 0]), {}),
    ("aten.addmm.default", (W[0], M.t(), M), {}), ("aten.matmul.default", (X, M.t()), {}),
    ("aten.mm.default", (M, M.t()), {}), ("aten.bmm.default", (X, X.transpose(1, 2)), {}),
    ("aten.arange.default", (5,), {"device": torch.device("cpu"), "pin_memory": False}),
    ("aten.arange.start_step", (1, 9, 2), {"dtype": torch.int64}),
    ("aten.full.default", ([2, 3], 1.5), {"dtype": torch.float32, "layout": torch.strided}),
    ("aten.new_ones.default", (X, [2]), {"dtype": torch.bool, "pin_memory": False}),
    ("aten.zeros_like.default", (X,), {"dtype": torch.float64}), ("aten.tril.default", (M, -1), {}),
    ("aten.gather.default", (X, 2, IDS[:, :1].unsqueeze(1).expand(2, 3, 1) % 4), {}),
    ("aten.diff.default", (INT, 1, -1, INT[:, :1] - 1), {}), ("aten.repeat.default", (M, [2, 1]), {}),
    ("aten.flip.default", (X, [0, 2]), {}), ("aten.var.correction", (X, [1]), {"correction": 1, "keepdim": True}),
    ("aten.pad.default", (X, [1, 2], "constant", 0.5), {}), ("aten.constant_pad_nd.default", (X, [1, 1]), {}),
    ("aten.copy.default", (X, Y[:, :1]), {}), ("aten.copy.default", (X, INT[:, :, None]), {}),
    ("aten.cross_entropy_loss.default", (M, torch.tensor([1, 0, 3])), {}),
    ("aten.cross_entropy_loss.default", (M, torch.tensor([1, 0, 3]), None, 2, 1), {}),
    ("aten.cross_entropy_loss.default", (M, torch.tensor([1, 0, 3]), None, 0, -100, 0.1), {}),
]  # fmt: skip


def _source(value: object, tensors: dict[str, torch.Tensor]) -> str:
    if isinstance(value, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = value
        return name
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_source(v, tensors) for v in value) + "]"
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, torch.layout):
        return f"torch.{str(value).removeprefix('torch.')}"
    if isinstance(value, torch.device):
        return "device"
    return repr(value)


def _aten(op: str):
    _, name, overload = op.split(".")
    return getattr(getattr(torch.ops.aten, name), overload)


@pytest.mark.parametrize(("op", "args", "kwargs"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_spelling_computes_what_aten_computes(op: str, args: tuple, kwargs: dict) -> None:
    want = _aten(op)(*args, **kwargs)
    first = want[0] if isinstance(want, tuple | list) else want
    node = Node(name="n", op=op, args=(), kwargs=(), outputs=(TensorSpec(tuple(first.shape), "float32"),))
    tensors: dict[str, torch.Tensor] = {}
    expr = spell(node, [_source(a, tensors) for a in args], [(k, _source(v, tensors)) for k, v in kwargs.items()])
    assert not uses_aten(expr), expr  # every case here has a PyTorch spelling
    got = eval(expr, {"torch": torch, "F": F, "device": torch.device("cpu"), **tensors})  # noqa: S307
    for a, b in zip(got if isinstance(got, tuple | list) else [got], want if isinstance(want, tuple | list) else [want],
                    strict=True):  # fmt: skip
        assert a.dtype == b.dtype and a.shape == b.shape, expr
        torch.testing.assert_close(a, b, equal_nan=True, msg=expr)


def test_ops_without_a_spelling_are_written_the_aten_way() -> None:
    node = Node(name="n", op="aten.gelu_backward.default", args=(), kwargs=(), outputs=())
    assert spell(node, ["g", "x"], [("approximate", '"tanh"')]) == 'aten.gelu_backward.default(g, x, approximate="tanh")'
    # a template applies only to the arguments it names: other argument lists take the next spelling
    add = Node(name="n", op="aten.add.Tensor", args=(), kwargs=(), outputs=())
    assert spell(add, ["x", "y"], []) == "x + y"
    assert spell(add, ["x", "y"], [("alpha", "2")]) == "torch.add(x, y, alpha=2)"
    assert spell(add, ["-x", "y"], []) == "(-x) + y"
    assert all(op in REGISTRY and REGISTRY[op].spelling == s for op, s in SPELLINGS.items())
