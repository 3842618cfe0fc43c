"""``verify(graph)``: the structural invariants every pass must keep (see shardwise.ir.graph)."""

from __future__ import annotations

from shardwise.ir.graph import Graph, iter_values
from shardwise.ir.tensor import TensorSpec

__all__ = ["verify", "GraphInvariantError"]


class GraphInvariantError(AssertionError):
    """A pass broke a structural invariant of the IR (a shardwise bug, not a user error)."""


def verify(graph: Graph) -> Graph:
    """Raise GraphInvariantError on the first broken invariant; return the graph unchanged otherwise."""
    defined: dict[str, str] = {}

    def define(name: str, what: str) -> None:
        if name in defined:
            raise GraphInvariantError(f"value {name!r} defined twice ({defined[name]} and {what})")
        defined[name] = what

    for i in graph.inputs:
        define(i.name, "input")
    keys: set[str] = set()
    for p in graph.params:
        define(p.name, "parameter")
        if p.key in keys:
            raise GraphInvariantError(f"state_dict key {p.key!r} bound to two parameters")
        keys.add(p.key)
        if not isinstance(p.spec, TensorSpec):
            raise GraphInvariantError(f"parameter {p.key!r} has a non-tensor spec")
    for n in graph.nodes:
        for v in n.inputs:
            if v not in defined:
                raise GraphInvariantError(f"node {n.name} ({n.op}) reads {v!r} before it is defined")
        if not n.outputs:
            raise GraphInvariantError(f"node {n.name} ({n.op}) has no outputs")
        if n.op == "getitem":
            src, idx = n.args[0], n.args[1]
            if not (hasattr(src, "name") and isinstance(idx, int)):
                raise GraphInvariantError(f"getitem {n.name} must read (value, index)")
            producer = graph.node(src.name)  # type: ignore[union-attr]
            if not producer.tuple_output or not 0 <= idx < len(producer.outputs):
                raise GraphInvariantError(f"getitem {n.name} reads output {idx} of {producer.name}")
        if n.flops < 0 or n.bytes_moved < 0:
            raise GraphInvariantError(f"node {n.name} has negative cost")
        define(n.name, f"node {n.op}")
    for a in graph.outputs:
        for v in iter_values(a):
            if v.name not in defined:
                raise GraphInvariantError(f"graph output reads undefined value {v.name!r}")
    for key, v in graph.buffer_updates:
        if v.name not in defined:
            raise GraphInvariantError(f"buffer update of {key!r} reads undefined value {v.name!r}")
    return graph
