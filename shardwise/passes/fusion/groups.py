"""The shape of a candidate group: its iteration domain, its kind, and whether one kernel can compute it.

A group is one kernel over a *domain* (a shape). Pointwise-only groups iterate over the elements of the
domain; groups with a row or reduce member iterate over its rows (all dimensions but the last), each
program holding a whole row. Rules (a group breaking any of them is not made):
- every member's output broadcasts to the domain; row/reduce members read a tensor of exactly the domain;
- in a row group a value is either a *row vector* or a *row scalar* (a reduction's result, or a pointwise
  result of row scalars only); a group output is domain-shaped, or a row scalar of shape ``[..., 1]``;
- every member has the same placement (so collectives stay between groups).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from shardwise.ir.graph import Graph, Node
from shardwise.ir.placement import ShardingSpec
from shardwise.ir.registry import tensor_operands
from shardwise.ir.tensor import TensorSpec

__all__ = ["GroupShape", "analyze", "broadcast_shapes", "kind_of"]


@dataclass(frozen=True)
class GroupShape:
    domain: tuple[int, ...]
    rowwise: bool
    kind: str
    row_scalars: frozenset[str]  # member values that are one number per row (row groups only)


def broadcast_shapes(*shapes: tuple[int, ...]) -> tuple[int, ...] | None:
    """NumPy broadcasting of ``shapes``; None when they do not broadcast."""
    rank = max((len(s) for s in shapes), default=0)
    out = [1] * rank
    for s in shapes:
        off = rank - len(s)
        for i, d in enumerate(s):
            o = out[off + i]
            if d == o or d == 1:
                continue
            if o == 1:
                out[off + i] = d
            else:
                return None
    return tuple(out)


def _reduce_name(op: str) -> str:
    return op.split(".")[1]


def kind_of(nodes: Sequence[Node]) -> str:
    """The kernel kind a reader would name: layernorm, rmsnorm, softmax, reduction or elementwise."""
    ops = [n.op for n in nodes]
    names = {_reduce_name(o) for o in ops}
    if "layer_norm" in names:
        return "layernorm"
    if "rms_norm" in names:
        return "rmsnorm"
    if names & {"softmax", "_softmax", "log_softmax", "_log_softmax"}:
        return "softmax"
    means = sum(1 for o in ops if o == "aten.mean.dim")
    if "amax" in names and "exp" in names and "sum" in names:
        return "softmax"
    if means >= 2 and "rsqrt" in names:
        return "layernorm"  # written out: mean, centre, mean of squares, rsqrt
    if means == 1 and "rsqrt" in names:
        return "rmsnorm"
    if names & {"sum", "mean", "amax"}:
        return "reduction"
    return "elementwise"


def analyze(
    graph: Graph,
    members: Sequence[Node],
    roles: Mapping[str, str],
    outputs: Sequence[str],
    placements: Mapping[str, ShardingSpec | None],
) -> GroupShape | None:
    """The group's shape, or None when one kernel cannot compute ``members`` (graph order) with ``outputs``."""
    first = placements.get(members[0].name)
    if any(placements.get(m.name) != first for m in members[1:]):
        return None
    shapes: dict[str, tuple[int, ...]] = {}
    for m in members:
        out = m.outputs[0]
        assert isinstance(out, TensorSpec)
        shapes[m.name] = out.shape
    row_inputs = [m for m in members if roles[m.name] != "pointwise"]
    if row_inputs:
        domain = _input_shape(graph, row_inputs[0])
        if any(_input_shape(graph, m) != domain for m in row_inputs[1:]):
            return None
    else:
        bcast = broadcast_shapes(*shapes.values())
        if bcast is None:
            return None
        domain = bcast
    for s in shapes.values():
        if broadcast_shapes(s, domain) != domain:
            return None
    scalars: set[str] = set()
    if row_inputs:
        for m in members:
            if roles[m.name] == "reduce":
                scalars.add(m.name)
            elif roles[m.name] == "pointwise":
                operands = tensor_operands(m)
                if operands and all(v in scalars for v in operands):
                    scalars.add(m.name)
        reduced = domain[:-1] + (1,)
        for o in outputs:
            if shapes[o] != domain and not (o in scalars and shapes[o] == reduced):
                return None
    else:
        if any(shapes[o] != domain for o in outputs):
            return None
    return GroupShape(domain, bool(row_inputs), kind_of(members), frozenset(scalars))


def _input_shape(graph: Graph, node: Node) -> tuple[int, ...]:
    spec = graph.spec_of(tensor_operands(node)[0])
    assert isinstance(spec, TensorSpec)
    return spec.shape
