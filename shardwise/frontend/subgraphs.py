"""The subgraphs of higher-order ops (``torch.cond``'s branches, ``while_loop``'s condition and body, ...) as
IR functions (:class:`shardwise.ir.graph.Function`), so that a generated program can call the op whole, as
eager PyTorch does: ``torch.ops.higher_order.cond(pred, true_fn, false_fn, operands)``.

A function holds the subgraph's ops as nodes (nested subgraphs become functions of their own, named after their
parent, listed first); it is pure: torch.export lifts the parameters a branch reads into its operands.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx

from shardwise.errors import UnsupportedOpError
from shardwise.ir.graph import Arg, Const, Function, Node, Value

__all__ = ["subgraph_functions"]

_DROPPED = ("aten._assert_tensor_metadata.default", "aten._assert_scalar.default", "aten._assert_async.msg")

OpName = Callable[[torch.fx.Node], str]
Convert = Callable[[Any, str], Arg]
Specs = Callable[[Any], tuple[Any, ...]]


def subgraph_functions(
    owner: torch.fx.GraphModule, attr: str, name: str, op_name: OpName, convert: Convert, specs: Specs
) -> list[Function]:
    """The subgraph ``owner.<attr>`` as the function ``name``, after the functions of the subgraphs it uses.
    ``op_name``, ``convert`` and ``specs`` are the frontend's own: an fx node's op name, an argument in IR
    form, a value's output specs."""
    gm = getattr(owner, attr, None)
    if not isinstance(gm, torch.fx.GraphModule):
        raise UnsupportedOpError(f"{attr} is not a subgraph (a {type(gm).__name__}); shardwise cannot run it")
    out: list[Function] = []
    nested: dict[str, str] = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            if not isinstance(getattr(gm, str(n.target), None), torch.fx.GraphModule):
                raise UnsupportedOpError(f"subgraph {attr} reads {n.target!r}, which is not a subgraph")
            nested[n.name] = f"{name}_{n.target}"
            out.extend(subgraph_functions(gm, str(n.target), nested[n.name], op_name, convert, specs))
    params = tuple(n.name for n in gm.graph.nodes if n.op == "placeholder")
    nodes: list[Node] = []
    output: Arg = None
    for n in gm.graph.nodes:
        if n.op == "output":
            output = _named(convert(n.args[0], attr), nested)
        elif n.op == "call_function":
            op = op_name(n)
            if op in _DROPPED:
                continue
            if not (op.startswith(("aten.", "higher_order.")) or op in ("getitem", "scalar_op")):
                raise UnsupportedOpError(f"subgraph {attr} calls {op!r}, which shardwise cannot run in a subgraph")
            args = tuple(_named(convert(a, attr), nested) for a in n.args)
            if op == "scalar_op":
                args = (n.target.__name__,) + args  # type: ignore[union-attr]
            kwargs = tuple((k, _named(convert(v, attr), nested)) for k, v in n.kwargs.items())
            val = n.meta.get("val")
            tuple_output = isinstance(val, list | tuple)
            nodes.append(Node(n.name, op, args, kwargs, specs(val), tuple_output=tuple_output))
        elif n.op not in ("placeholder", "get_attr"):
            raise UnsupportedOpError(f"subgraph {attr} has a {n.op} node ({n.target}); shardwise cannot run it")
    out.append(Function(name, params, tuple(nodes), output))
    return out


def _named(a: Arg, nested: dict[str, str]) -> Arg:
    """``a`` with each value that names a nested subgraph replaced by that function."""
    if isinstance(a, Value) and a.name in nested:
        return Const("function", nested[a.name])
    if isinstance(a, tuple):
        return tuple(_named(x, nested) for x in a)
    return a
