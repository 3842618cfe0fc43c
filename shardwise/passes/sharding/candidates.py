"""The candidate strategies of one op on a mesh: which dimops label each mesh axis splits.

A :class:`Choice` is a strategy reduced to what the ILP and codegen need: the placement each tensor operand
must have, the placement of each output, and the mesh axes over which each operand's gradient is a partial
sum (Megatron's "f": it is all-reduced in the backward). Besides splitting a label, an axis may *pass a
partial sum through* a linear op of one operand (a view, a copy, a scaling, dropout with p=0): the input
and output stay ``Partial`` on that axis and nothing is communicated.

Two whole-graph analyses feed the candidates:

- :func:`batch_dims`: which dimension of every value carries the data-parallel split (the inputs' batch
  dimension, followed through the graph as the greedy chooser would); the ``dp`` axis is fixed to it;
- :func:`token_dims`: which dimensions of every value come from a graph input's dimensions (batch,
  sequence, pixels). With sequence parallelism disabled the tensor-parallel axis may not split them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from shardwise.ir.dimops import OpDims
from shardwise.ir.graph import Graph, Node, Value
from shardwise.ir.placement import DeviceMesh, Partial, Replicate, Shard, ShardingSpec
from shardwise.ir.registry import op_dims, runs_whole, tensor_operands
from shardwise.ir.tensor import TensorSpec
from shardwise.passes.sharding.strategy import make_strategy, split_is_valid

__all__ = [
    "Choice",
    "PARTIAL_LABEL",
    "NodeInfo",
    "node_info",
    "batch_dims",
    "token_dims",
    "make_choice",
    "node_choices",
    "follow_choice",
    "passes_partial",
]

PARTIAL_LABEL = "*partial"  # the "label" of an axis that passes a partial sum through

_PASS_VIEWS = (
    "aten.view.default", "aten.reshape.default", "aten._unsafe_view.default", "aten.transpose.int",
    "aten.permute.default", "aten.t.default", "aten.unsqueeze.default", "aten.squeeze.dim",
    "aten.squeeze.dims", "aten.squeeze.default", "aten.alias.default", "aten.detach.default",
    "aten.clone.default", "aten.contiguous.default", "aten.flatten.using_ints", "aten.unflatten.int",
)  # fmt: skip
_SCALE = ("aten.mul.Tensor", "aten.div.Tensor", "aten.mul.Scalar", "aten.div.Scalar")


@dataclass(frozen=True)
class Choice:
    """One candidate strategy of one node (see the module docstring)."""

    split: tuple[tuple[str, str], ...]  # (mesh axis, label) for every axis that splits or passes partial
    inputs: tuple[ShardingSpec, ...]  # one per tensor operand, argument order, repeats kept
    outputs: tuple[ShardingSpec, ...]  # one per tensor output
    grad_axes: tuple[tuple[str, ...], ...]  # one per tensor operand: axes its gradient is partial over
    ways: int  # how many ways the op's work is divided


@dataclass(frozen=True)
class NodeInfo:
    """What the candidates of one node are computed from."""

    node: Node
    operands: tuple[str, ...]  # tensor operand value names (argument order, repeats kept)
    ins: tuple[TensorSpec, ...]
    outs: tuple[TensorSpec, ...]
    dims: OpDims


def node_info(node: Node, specs: Mapping[str, TensorSpec]) -> NodeInfo:
    operands = tuple(n for n in tensor_operands(node) if n in specs)
    ins = tuple(specs[n] for n in operands)
    outs = tuple(o for o in node.outputs if isinstance(o, TensorSpec))
    return NodeInfo(node, operands, ins, outs, op_dims(node, ins))


def passes_partial(node: Node, info: NodeInfo) -> bool:
    """Is the op linear in its single tensor operand, so that a partial sum may flow through it?"""
    if len(info.operands) != 1 or len(info.outs) != 1 or node.tuple_output:
        return False
    if node.op in _PASS_VIEWS:
        return True
    if node.op in ("aten.dropout.default",):
        p = node.args[1] if len(node.args) > 1 else node.kwarg_dict.get("p", 0.0)
        return p == 0.0
    if node.op in _SCALE or node.op == "aten.neg.default":
        return all(not isinstance(a, Value) for a in node.args[1:])
    return False


def make_choice(info: NodeInfo, split: Mapping[str, str | None], mesh: DeviceMesh) -> Choice:
    """The Choice for ``split`` (axis -> label, PARTIAL_LABEL, or None to run whole on that axis)."""
    labels = {a: lab for a, lab in split.items() if lab is not None and lab != PARTIAL_LABEL}
    strategy = make_strategy(
        info.node, info.dims, info.operands, [None] * len(info.operands), info.ins, info.outs, labels, mesh,
        None, True,
    )  # fmt: skip
    inputs = [list(s.placements) for s in strategy.inputs]
    outputs = [list(s.placements) for s in strategy.outputs]
    for a, axis in enumerate(mesh.axis_names):
        if split.get(axis) == PARTIAL_LABEL:
            for pl in inputs + outputs:
                pl[a] = Partial("sum")
    grad = dict(strategy.grad_reduce)
    ways = 1
    for a, axis in enumerate(mesh.axis_names):
        if labels.get(axis) is not None:
            ways *= mesh.shape[a]
    return Choice(
        split=tuple((a, lab) for a, lab in split.items() if lab is not None),
        inputs=tuple(ShardingSpec(tuple(p)) for p in inputs),
        outputs=tuple(ShardingSpec(tuple(p)) for p in outputs),
        grad_axes=tuple(tuple(grad.get(i, ())) for i in range(len(info.operands))),
        ways=ways,
    )


def _shard_label(info: NodeInfo, operand: int, placement: ShardingSpec, axis_index: int) -> str | None:
    p = placement.placements[axis_index]
    if not isinstance(p, Shard) or operand >= len(info.dims.inputs):
        return None
    dims = info.dims.inputs[operand]
    return dims[p.dim].label if p.dim < len(dims) else None


def follow_choice(
    info: NodeInfo,
    current: Sequence[ShardingSpec | None],
    mesh: DeviceMesh,
    axes: Sequence[str] | None = None,
) -> dict[str, str | None]:
    """The split that keeps the operands' placement where the op allows it (the greedy rule), per axis in
    ``axes`` (all by default): biggest operand first; a partial operand passes through linear ops."""
    split: dict[str, str | None] = {}
    used: set[str] = set()
    order = sorted(range(len(info.operands)), key=lambda i: -info.ins[i].nbytes)
    for a, axis in enumerate(mesh.axis_names):
        split[axis] = None
        if axes is not None and axis not in axes or mesh.shape[a] == 1:
            continue
        for i in order:
            pl = current[i]
            if pl is None:
                continue
            if isinstance(pl.placements[a], Partial) and pl.placements[a].op == "sum":
                if passes_partial(info.node, info):
                    split[axis] = PARTIAL_LABEL
                    break
                continue
            label = _shard_label(info, i, pl, a)
            if label is None or label in used:
                continue
            if not split_is_valid(info.node, info.dims, label, mesh.shape[a], info.ins, info.outs, axis):
                continue
            split[axis] = label
            used.add(label)
            break
    return split


def batch_dims(
    graph: Graph, mesh: DeviceMesh, axis: str, inputs: Mapping[str, ShardingSpec]
) -> dict[str, str | None]:
    """node name -> the label the ``axis`` splits (the greedy data-parallel rule), for every tensor node."""
    a = mesh.axis_names.index(axis)
    dim_of: dict[str, int | None] = {}
    for i in graph.inputs:
        spec = inputs.get(i.name)
        p = spec.placements[a] if spec is not None else None
        dim_of[i.name] = p.dim if isinstance(p, Shard) else None
    specs = tensor_specs(graph)
    out: dict[str, str | None] = {}
    tuple_dims: dict[str, tuple[int | None, ...]] = {}
    for node in graph.nodes:
        if node.op == "getitem":
            src, idx = node.args[0], node.args[1]
            assert isinstance(src, Value) and isinstance(idx, int)
            dims = tuple_dims.get(src.name, ())
            dim_of[node.name] = dims[idx] if idx < len(dims) else None
            continue
        outs = [o for o in node.outputs if isinstance(o, TensorSpec)]
        if not outs:
            continue
        info = node_info(node, specs)
        current = []
        for name in info.operands:
            d = dim_of.get(name)
            pl = [Replicate() for _ in mesh.shape]
            if d is not None:
                pl[a] = Shard(d)
            current.append(ShardingSpec(tuple(pl)))
        label = follow_choice(info, current, mesh, axes=(axis,)).get(axis)
        if label == PARTIAL_LABEL:
            label = None
        out[node.name] = label
        choice = make_choice(info, {axis: label}, mesh)
        dims_out = tuple(
            p.placements[a].dim if isinstance(p.placements[a], Shard) else None for p in choice.outputs
        )
        if node.tuple_output:
            tuple_dims[node.name] = dims_out
        else:
            dim_of[node.name] = dims_out[0] if dims_out else None
    return out


def token_dims(graph: Graph, *, batch_only: bool = False) -> dict[str, frozenset[str]]:
    """node name -> the labels of its annotation that carry a graph input's dimensions (``batch_only``:
    only the inputs' first dimension)."""
    specs = tensor_specs(graph)
    from_input: dict[str, frozenset[int]] = {}
    for i in graph.inputs:
        if isinstance(i.spec, TensorSpec) and i.spec.rank:
            from_input[i.name] = frozenset({0}) if batch_only else frozenset(range(i.spec.rank))
    tuple_dims: dict[str, tuple[frozenset[int], ...]] = {}
    out: dict[str, frozenset[str]] = {}
    for node in graph.nodes:
        if node.op == "getitem":
            src, idx = node.args[0], node.args[1]
            assert isinstance(src, Value) and isinstance(idx, int)
            dims = tuple_dims.get(src.name, ())
            from_input[node.name] = dims[idx] if idx < len(dims) else frozenset()
            continue
        outs = [o for o in node.outputs if isinstance(o, TensorSpec)]
        if not outs:
            continue
        info = node_info(node, specs)
        labels: set[str] = set()
        for operand, name in zip(info.dims.inputs, info.operands, strict=False):
            for d in from_input.get(name, frozenset()):
                if d < len(operand) and operand[d].label != "1":
                    labels.add(operand[d].label)
        out[node.name] = frozenset(labels)
        per_out = tuple(
            frozenset(i for i, d in enumerate(operand) if d.label in labels) for operand in info.dims.outputs
        )
        if node.tuple_output:
            tuple_dims[node.name] = per_out
        else:
            from_input[node.name] = per_out[0] if per_out else frozenset()
    return out


def tensor_specs(graph: Graph) -> dict[str, TensorSpec]:
    """Every tensor value's spec by name (inputs, parameters, single-output nodes)."""
    specs: dict[str, TensorSpec] = {}
    for i in graph.inputs:
        if isinstance(i.spec, TensorSpec):
            specs[i.name] = i.spec
    for p in graph.params:
        specs[p.name] = p.spec
    for n in graph.nodes:
        if not n.tuple_output and n.outputs and isinstance(n.outputs[0], TensorSpec):
            specs[n.name] = n.outputs[0]
    return specs


def node_choices(
    info: NodeInfo,
    mesh: DeviceMesh,
    fixed: Mapping[str, str | None],
    free_axes: Sequence[str],
    forbidden: frozenset[str] = frozenset(),
) -> list[Choice]:
    """Every candidate: ``fixed`` labels on their axes, and on each free axis: none, passing a partial sum
    through (linear one-operand ops), or any valid label not used on another axis and not ``forbidden``."""
    if runs_whole(info.node):
        return [make_choice(info, {a: None for a in mesh.axis_names}, mesh)]
    splits: list[dict[str, str | None]] = [dict(fixed)]
    valid = info.dims.splittable_labels()
    for axis in free_axes:
        size = mesh.axis_size(axis)
        grown: list[dict[str, str | None]] = []
        for base in splits:
            grown.append({**base, axis: None})
            if size == 1:
                continue
            if passes_partial(info.node, info):
                grown.append({**base, axis: PARTIAL_LABEL})
            used = {lab for lab in base.values() if lab is not None}
            for label in valid:
                if label in used or label in forbidden:
                    continue
                if split_is_valid(info.node, info.dims, label, size, info.ins, info.outs, axis):
                    grown.append({**base, axis: label})
        splits = grown
    return [make_choice(info, s, mesh) for s in splits]
