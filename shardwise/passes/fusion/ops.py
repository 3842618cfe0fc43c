"""Which ops may join a fused group, and in what role.

Roles: ``pointwise`` (one output element from the same-index elements of broadcast operands), ``row`` (a
shape-preserving op that normalizes over the last dimension: softmax, log_softmax, layer_norm, rms_norm)
and ``reduce`` (sum/mean/amax over the last dimension with ``keepdim=True``). Codegen must lower every op
listed here to Triton (tests check that it does); everything else runs as its own statement.

Only floating-point results (float32, float16, bfloat16) are fused; operands may also be integer or bool
tensors (masks) and Python numbers. A tensor operand of unknown or symbolic shape stops fusion.
"""

from __future__ import annotations

from shardwise.ir.graph import Const, Graph, Node, Value
from shardwise.ir.registry import tensor_operands
from shardwise.ir.tensor import TensorSpec

__all__ = ["POINTWISE_OPS", "ROW_OPS", "REDUCE_OPS", "FUSED_DTYPES", "role_of", "arg", "reduce_dim"]

FUSED_DTYPES = ("float32", "float16", "bfloat16")
_OPERAND_DTYPES = FUSED_DTYPES + ("bool", "int64", "int32", "int16", "int8", "uint8")

_UNARY = (
    "neg", "exp", "log", "log1p", "sqrt", "rsqrt", "sin", "cos", "tanh", "sigmoid", "relu", "gelu", "silu", "erf",
    "reciprocal", "abs", "square", "leaky_relu", "hardtanh", "elu", "softplus", "hardsigmoid", "hardswish", "mish",
    "clamp", "clamp_min", "clamp_max", "clone", "_to_copy", "dropout", "alpha_dropout", "feature_dropout",
)  # fmt: skip
POINTWISE_OPS: frozenset[str] = frozenset(
    [f"aten.{name}.{o}" for name in ("add", "sub", "mul", "div", "rsub") for o in ("Tensor", "Scalar")]
    + [f"aten.{name}.default" for name in _UNARY]
    + [
        "aten.pow.Tensor_Scalar",
        "aten.maximum.default",
        "aten.minimum.default",
        "aten.where.self",
        "aten.where.ScalarOther",
        "aten.where.ScalarSelf",
        "aten.masked_fill.Scalar",
        "aten.to.dtype",
    ]
)
ROW_OPS: frozenset[str] = frozenset(
    {
        "aten.softmax.int",
        "aten._softmax.default",
        "aten.log_softmax.int",
        "aten._log_softmax.default",
        "aten.layer_norm.default",
        "aten.rms_norm.default",
    }
)
REDUCE_OPS: frozenset[str] = frozenset({"aten.sum.dim_IntList", "aten.mean.dim", "aten.amax.default"})

# keyword arguments the lowering understands (any other stops fusion)
_KNOWN_KWARGS = frozenset(
    {"memory_format", "layout", "pin_memory", "non_blocking", "copy", "device", "dtype", "alpha", "approximate",
     "negative_slope", "min_val", "max_val", "scale", "input_scale", "beta", "threshold", "value",
     "half_to_float", "eps", "keepdim", "min", "max"}
)  # fmt: skip
_DTYPE_KWARG_OPS = ("aten._to_copy.default", "aten.to.dtype", "aten.softmax.int", "aten.log_softmax.int")


def arg(node: Node, index: int, name: str, default: object = None) -> object:
    """Argument ``index`` (positional) or ``name`` (keyword) of ``node``, else ``default``."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwarg_dict.get(name, default)


def reduce_dim(node: Node, rank: int) -> int | None:
    """The single dimension a row/reduce op works on, normalized; None when it is not one dimension."""
    if node.op in ("aten.layer_norm.default", "aten.rms_norm.default"):
        shape = arg(node, 1, "normalized_shape")
        return rank - 1 if isinstance(shape, tuple) and len(shape) == 1 else None
    value = arg(node, 1, "dim")
    if isinstance(value, tuple):
        if len(value) != 1:
            return None
        value = value[0]
    if not isinstance(value, int) or isinstance(value, bool):
        return None
    return value + rank if value < 0 else value


def _scalar_ok(a: object) -> bool:
    if a is None or isinstance(a, bool | int | float | str | Value):
        return True
    if isinstance(a, Const):
        return a.kind in ("dtype", "layout", "memory_format")
    if isinstance(a, tuple):
        return all(isinstance(x, int) and not isinstance(x, bool) for x in a)
    return False


def role_of(graph: Graph, node: Node) -> str | None:
    """``"pointwise"``, ``"row"`` or ``"reduce"`` when ``node`` may be fused, else None."""
    op = node.op
    if op in POINTWISE_OPS:
        role = "pointwise"
    elif op in ROW_OPS:
        role = "row"
    elif op in REDUCE_OPS:
        role = "reduce"
    else:
        return None
    if node.tuple_output or len(node.outputs) != 1:
        return None
    out = node.outputs[0]
    if not isinstance(out, TensorSpec) or out.dtype not in FUSED_DTYPES:
        return None
    for a in list(node.args) + [v for _, v in node.kwargs]:
        if not _scalar_ok(a):
            return None
    for k, v in node.kwargs:
        if k not in _KNOWN_KWARGS or (k == "device" and v is not None):
            return None
        if k == "dtype" and v is not None and op not in _DTYPE_KWARG_OPS:
            return None
    operands = tensor_operands(node)
    for name in operands:
        spec = graph.spec_of(name)
        if not isinstance(spec, TensorSpec) or spec.dtype not in _OPERAND_DTYPES:
            return None
    if "dropout" in op:
        p, train = arg(node, 1, "p", 0.5), arg(node, 2, "train", True)
        if train and p not in (0, 0.0):
            return None  # random: only the identity (eval, or p=0) is fused
    if role != "pointwise":
        x = graph.spec_of(operands[0])
        assert isinstance(x, TensorSpec)
        if x.rank == 0 or reduce_dim(node, x.rank) != x.rank - 1 or x.shape[-1] <= 1:
            return None
        if role == "reduce" and (arg(node, 2, "keepdim", False) is not True or node.kwarg_dict.get("dtype")):
            return None
    return role
