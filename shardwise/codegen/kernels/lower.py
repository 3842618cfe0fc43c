"""One ATen op → the Triton statements that compute it inside a fused kernel.

Values inside a kernel are float32 (``compute`` precision); after each op the value is rounded to the op's
own dtype when that is narrower (float16, bfloat16), so a kernel matches running the ops one by one, as
eager PyTorch does, up to the last bit of the narrow type. Bool operands (masks) stay ``int1``.
Row-wise ops use the kernel's ``mask`` (which columns of the row exist) and ``n_cols`` (the row length):
masked-out lanes never reach a reduction or a store.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from shardwise.ir.graph import Arg, Node, Value
from shardwise.ir.tensor import TensorSpec

__all__ = ["LOWERED_OPS", "lower_node", "literal"]

_EPS = {"float32": 1.1920928955078125e-07, "float16": 0.0009765625, "bfloat16": 0.0078125}
_NARROW = {"float16": "tl.float16", "bfloat16": "tl.bfloat16"}


def _arg(node: Node, index: int, name: str, default: object = None) -> object:
    if len(node.args) > index:
        return node.args[index]
    return node.kwarg_dict.get(name, default)


def literal(value: object) -> str:
    """A Python number as Triton source (infinities and NaN spelled the way Triton's frontend reads)."""
    if isinstance(value, bool):
        return "1.0" if value else "0.0"
    if isinstance(value, float):
        if math.isnan(value):
            return 'float("nan")'
        if math.isinf(value):
            return 'float("inf")' if value > 0 else 'float("-inf")'
        return repr(value)
    if isinstance(value, int):
        return f"{value}.0" if abs(value) < 2**24 else repr(float(value))
    raise TypeError(f"not a number: {value!r}")


class _Ctx:
    """Names of operands: ``operand(a)`` gives a float expression, ``cond(a)`` an int1 expression."""

    def __init__(self, names: dict[str, str], bools: set[str]) -> None:
        self.names = names
        self.bools = bools

    def operand(self, a: Arg) -> str:
        if isinstance(a, Value):
            var = self.names[a.name]
            return f"{var}.to(tl.float32)" if var in self.bools else var
        return literal(a)

    def cond(self, a: Arg) -> str:
        if isinstance(a, Value):
            var = self.names[a.name]
            return var if var in self.bools else f"({var} != 0)"
        return "True" if a else "False"


def _pow(x: str, e: object) -> str:
    if isinstance(e, float) and e.is_integer():
        e = int(e)
    if isinstance(e, int) and not isinstance(e, bool) and abs(e) <= 8:
        if e == 0:
            return f"({x} * 0.0 + 1.0)"
        prod = " * ".join([x] * abs(e))
        return f"({prod})" if e > 0 else f"(1.0 / ({prod}))"
    if e == 0.5:
        return f"tl.sqrt({x})"
    if e == -0.5:
        return f"tl.rsqrt({x})"
    return f"tl.exp2({literal(e)} * tl.log2({x}))"  # like eager: NaN for a negative base


def _clamp(x: str, lo: object, hi: object) -> str:
    # where(), not minimum/maximum: a NaN stays NaN, as in eager PyTorch
    out = x
    if lo is not None:
        out = f"tl.where({out} < {literal(lo)}, {literal(lo)}, {out})"
    if hi is not None:
        out = f"tl.where({out} > {literal(hi)}, {literal(hi)}, {out})"
    return out


def _softplus(x: str, beta: object, threshold: object) -> str:
    b, t = literal(beta), literal(threshold)
    return f"tl.where({x} * {b} > {t}, {x}, _log1p(tl.exp({x} * {b})) / {b})"


def _pointwise(node: Node, c: _Ctx) -> str:  # noqa: C901 - one table
    op = node.op
    name, overload = op.split(".")[1], op.split(".")[2]
    a = c.operand(node.args[0]) if name not in ("where",) else ""
    if name in ("add", "sub", "rsub"):
        b = c.operand(node.args[1])
        alpha = _arg(node, 2, "alpha", 1)
        if alpha != 1:
            b = f"({b} * {literal(alpha)})" if name != "rsub" else b
        if name == "rsub":
            scaled = a if alpha == 1 else f"({a} * {literal(alpha)})"
            return f"{b} - {scaled}"
        return f"{a} {'+' if name == 'add' else '-'} {b}"
    if name in ("mul", "div"):
        return f"{a} {'*' if name == 'mul' else '/'} {c.operand(node.args[1])}"
    simple: dict[str, Callable[[str], str]] = {
        "neg": lambda x: f"-{x}",
        "exp": lambda x: f"tl.exp({x})",
        "log": lambda x: f"tl.log({x})",
        "log1p": lambda x: f"_log1p({x})",
        "sqrt": lambda x: f"tl.sqrt({x})",
        "rsqrt": lambda x: f"tl.rsqrt({x})",
        "sin": lambda x: f"tl.sin({x})",
        "cos": lambda x: f"tl.cos({x})",
        "tanh": lambda x: f"_tanh({x})",
        "sigmoid": lambda x: f"tl.sigmoid({x})",
        "relu": lambda x: f"tl.where({x} < 0.0, 0.0, {x})",
        "silu": lambda x: f"{x} * tl.sigmoid({x})",
        "erf": lambda x: f"tl.erf({x})",
        "reciprocal": lambda x: f"1.0 / {x}",
        "abs": lambda x: f"tl.abs({x})",
        "square": lambda x: f"{x} * {x}",
        "hardsigmoid": lambda x: f"{_clamp(f'({x} + 3.0)', 0.0, 6.0)} / 6.0",
        "hardswish": lambda x: f"{x} * {_clamp(f'({x} + 3.0)', 0.0, 6.0)} / 6.0",
        "mish": lambda x: f"{x} * _tanh({_softplus(x, 1.0, 20.0)})",
        "clone": lambda x: x,
        "_to_copy": lambda x: x,
        "to": lambda x: x,
        "dropout": lambda x: x,  # the pass fuses dropout only where it is the identity (eval, or p=0)
        "alpha_dropout": lambda x: x,
        "feature_dropout": lambda x: x,
    }
    if name in simple:
        return simple[name](a)
    if name == "gelu":
        if _arg(node, 1, "approximate", "none") == "tanh":
            inner = f"0.7978845608028654 * ({a} + 0.044715 * {a} * {a} * {a})"
            return f"0.5 * {a} * (1.0 + _tanh({inner}))"
        return f"0.5 * {a} * (1.0 + tl.erf({a} * 0.7071067811865476))"
    if name == "pow":
        return _pow(a, _arg(node, 1, "exponent"))
    if name == "maximum":
        b = c.operand(node.args[1])
        return f"tl.where(({a} > {b}) | ({a} != {a}), {a}, {b})"
    if name == "minimum":
        b = c.operand(node.args[1])
        return f"tl.where(({a} < {b}) | ({a} != {a}), {a}, {b})"
    if name == "where":
        return f"tl.where({c.cond(node.args[0])}, {c.operand(node.args[1])}, {c.operand(node.args[2])})"
    if name == "masked_fill":
        return f"tl.where({c.cond(node.args[1])}, {c.operand(_arg(node, 2, 'value'))}, {a})"
    if name == "clamp":
        return _clamp(a, _arg(node, 1, "min"), _arg(node, 2, "max"))
    if name == "clamp_min":
        return _clamp(a, _arg(node, 1, "min"), None)
    if name == "clamp_max":
        return _clamp(a, None, _arg(node, 1, "max"))
    if name == "hardtanh":
        return _clamp(a, _arg(node, 1, "min_val", -1.0), _arg(node, 2, "max_val", 1.0))
    if name == "leaky_relu":
        return f"tl.where({a} > 0.0, {a}, {a} * {literal(_arg(node, 1, 'negative_slope', 0.01))})"
    if name == "elu":
        alpha, scale = _arg(node, 1, "alpha", 1.0), _arg(node, 2, "scale", 1.0)
        in_scale = _arg(node, 3, "input_scale", 1.0)
        neg = f"(tl.exp({a} * {literal(in_scale)}) - 1.0) * {literal(alpha)} * {literal(scale)}"
        return f"tl.where({a} > 0.0, {a} * {literal(scale)}, {neg})"
    if name == "softplus":
        return _softplus(a, _arg(node, 1, "beta", 1.0), _arg(node, 2, "threshold", 20.0))
    raise NotImplementedError(f"no Triton lowering for {op} (overload {overload})")


def _row(node: Node, c: _Ctx, out: str, x_dtype: str) -> list[str]:
    name = node.op.split(".")[1]
    x = c.operand(node.args[0])
    if name in ("sum", "mean"):
        total = f"tl.sum(tl.where(mask, {x}, 0.0), axis=0)"
        return [f"{out} = {total}" + (" / n_cols" if name == "mean" else "")]
    if name == "amax":
        return [f'{out} = tl.max(tl.where(mask, {x}, float("-inf")), axis=0)']
    if name in ("softmax", "_softmax", "log_softmax", "_log_softmax"):
        lines = [
            f'{out}_max = tl.max(tl.where(mask, {x}, float("-inf")), axis=0)',
            f"{out}_exp = tl.where(mask, tl.exp({x} - {out}_max), 0.0)",
            f"{out}_sum = tl.sum({out}_exp, axis=0)",
        ]
        if "log" in name:
            return lines + [f"{out} = {x} - {out}_max - tl.log({out}_sum)"]
        return lines + [f"{out} = {out}_exp / {out}_sum"]
    if name == "layer_norm":
        weight, bias, eps = _arg(node, 2, "weight"), _arg(node, 3, "bias"), _arg(node, 4, "eps", 1e-5)
        lines = [
            f"{out}_mean = tl.sum(tl.where(mask, {x}, 0.0), axis=0) / n_cols",
            f"{out}_centred = tl.where(mask, {x} - {out}_mean, 0.0)",
            f"{out}_var = tl.sum({out}_centred * {out}_centred, axis=0) / n_cols",
            f"{out} = {out}_centred * tl.rsqrt({out}_var + {literal(eps)})",
        ]
        if weight is not None:
            lines.append(f"{out} = {out} * {c.operand(weight)}")
        if bias is not None:
            lines.append(f"{out} = {out} + {c.operand(bias)}")
        return lines
    if name == "rms_norm":
        weight, eps = _arg(node, 2, "weight"), _arg(node, 3, "eps")
        eps = _EPS.get(x_dtype, _EPS["float32"]) if eps is None else eps
        lines = [
            f"{out}_ms = tl.sum(tl.where(mask, {x} * {x}, 0.0), axis=0) / n_cols",
            f"{out} = {x} * tl.rsqrt({out}_ms + {literal(eps)})",
        ]
        if weight is not None:
            lines.append(f"{out} = {out} * {c.operand(weight)}")
        return lines
    raise NotImplementedError(f"no Triton lowering for {node.op}")


_ROW_NAMES = {
    "sum",
    "mean",
    "amax",
    "softmax",
    "_softmax",
    "log_softmax",
    "_log_softmax",
    "layer_norm",
    "rms_norm",
}

LOWERED_OPS: frozenset[str] = frozenset(
    [f"aten.{n}.{o}" for n in ("add", "sub", "mul", "div", "rsub") for o in ("Tensor", "Scalar")]
    + [
        f"aten.{n}.default"
        for n in (
            "neg",
            "exp",
            "log",
            "log1p",
            "sqrt",
            "rsqrt",
            "sin",
            "cos",
            "tanh",
            "sigmoid",
            "relu",
            "gelu",
            "silu",
            "erf",
            "reciprocal",
            "abs",
            "square",
            "leaky_relu",
            "hardtanh",
            "elu",
            "softplus",
            "hardsigmoid",
            "hardswish",
            "mish",
            "clamp",
            "clamp_min",
            "clamp_max",
            "clone",
            "_to_copy",
            "dropout",
            "alpha_dropout",
            "feature_dropout",
        )
    ]  # fmt: skip
    + ["aten.pow.Tensor_Scalar", "aten.maximum.default", "aten.minimum.default", "aten.where.self"]
    + ["aten.where.ScalarOther", "aten.where.ScalarSelf", "aten.masked_fill.Scalar", "aten.to.dtype"]
    + ["aten.softmax.int", "aten._softmax.default", "aten.log_softmax.int", "aten._log_softmax.default"]
    + ["aten.layer_norm.default", "aten.rms_norm.default", "aten.sum.dim_IntList", "aten.mean.dim"]
    + ["aten.amax.default"]
)


def lower_node(node: Node, names: dict[str, str], bools: set[str], out: str, x_dtype: str) -> list[str]:
    """Statements that set ``out`` to ``node``'s value (float32, rounded to the node's dtype).

    ``names`` maps every value the node reads to its kernel variable; variables in ``bools`` hold int1.
    ``x_dtype`` is the dtype of the node's first operand (rms_norm's default eps depends on it).
    """
    if node.op not in LOWERED_OPS:
        raise NotImplementedError(f"no Triton lowering for {node.op}")
    c = _Ctx(names, bools)
    name = node.op.split(".")[1]
    lines = _row(node, c, out, x_dtype) if name in _ROW_NAMES else [f"{out} = {_pointwise(node, c)}"]
    spec = node.outputs[0]
    if isinstance(spec, TensorSpec) and spec.dtype in _NARROW:
        lines.append(f"{out} = {out}.to({_NARROW[spec.dtype]}).to(tl.float32)")
    return lines
