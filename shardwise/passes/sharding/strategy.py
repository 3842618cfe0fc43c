"""One op's strategy from a choice of split labels: required input placements, output placements,
the redistributions before it, and which operand gradients are partial sums.

Rules (dimops semantics, see shardwise.ir.dimops), per mesh axis that splits label L:
- an operand holding L is sharded on L's position; an operand lacking L is used whole (Replicate), except
  that for a contraction label (``+``) the operands lacking it in a linear op (a bias) enter as partial
  sums, so that the bias is added once;
- an output holding L is sharded on it; if L is a contraction the outputs are Partial; an output lacking a
  label the op combines itself (``OpDims.combined``, e.g. the classes of a vocabulary-parallel cross
  entropy) is whole; an output lacking a label summed inside the op (``OpDims.inner``) is Partial, and the
  operands lacking it are read whole with partial gradients (as for a non-contraction label);
- in training, an operand lacking a non-contraction label L gets a partial gradient on that axis (each
  device saw only its part of the work): it must be summed over the axis in the backward (Megatron's "f"
  operator). A partial-sum operand (the bias of a contraction split) gets its whole gradient on every
  device: ``to_partial``'s backward is the identity.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from shardwise.costs.prices import MeshPrices
from shardwise.ir.dimops import OpDims
from shardwise.ir.graph import Node
from shardwise.ir.placement import (
    CONTEXT_AXIS,
    DeviceMesh,
    Partial,
    Placement,
    Replicate,
    Shard,
    ShardingSpec,
    chunks_cleanly,
)
from shardwise.ir.plan import NodeStrategy, Redistribute
from shardwise.ir.registry import rule_for
from shardwise.ir.tensor import TensorSpec
from shardwise.passes.sharding.redistribute import redistribute_steps

__all__ = ["label_sizes", "split_is_valid", "make_strategy", "scalar_strategy", "LINEAR_KINDS",
           "context_attention_inputs", "context_attention_strategy"]

LINEAR_KINDS = ("matmul", "conv", "reduction", "embedding")


def label_sizes(dims: OpDims, ins: Sequence[TensorSpec], outs: Sequence[TensorSpec]) -> dict[str, set[int]]:
    sizes: dict[str, set[int]] = {}
    for operand, spec in list(zip(dims.inputs, ins, strict=False)) + list(zip(dims.outputs, outs, strict=False)):
        for d, size in zip(operand, spec.shape, strict=False):
            sizes.setdefault(d.label, set()).add(size)
    return sizes


# Ops that may split a label whose size is not a multiple of the ways (torch.chunk pieces: ceil(n / ways)
# rows on the first devices, the remainder on the last). Exact only where each device's piece of the output
# is computed from the same rows of every operand holding the label and from nothing else: elementwise ops,
# views that keep the dimension whole (a dimension merged or split by a reshape would be cut elsewhere),
# the free dimensions of a matmul (never its contraction: a mean of uneven partial results is wrong), and
# the classes of the vocabulary-parallel cross entropy (C.sharded_cross_entropy, told the number of classes).
# Views with a size argument get each device's size at run time (codegen: C.piece_size).
UNEVEN_OPS = frozenset({
    "aten.view.default", "aten.reshape.default", "aten._unsafe_view.default", "aten.flatten.using_ints",
    "aten.transpose.int", "aten.permute.default", "aten.t.default", "aten.unsqueeze.default",
    "aten.alias.default", "aten.detach.default", "aten.clone.default", "aten.contiguous.default",
    "aten.linear.default", "aten.mm.default", "aten.bmm.default", "aten.matmul.default", "aten.addmm.default",
    "aten.cross_entropy_loss.default",
})  # fmt: skip


def _uneven_ok(node: Node, dims: OpDims, label: str, ways: int, sizes: set[int]) -> bool:
    """May ``label`` (of sizes ``sizes``, not all multiples of ``ways``) be split in uneven pieces here?"""
    if len(sizes) != 1:  # a reshape that merges the dimension, or a broadcast: pieces would not line up
        return False
    (n,) = sizes
    if not chunks_cleanly(n, ways):  # torch.chunk would leave a device without a piece
        return False
    rule = rule_for(node.op)
    if rule is None or dims.is_reduction(label):
        return False
    if label in dims.combined:
        return node.op == "aten.cross_entropy_loss.default"
    return rule.kind == "elementwise" or node.op in UNEVEN_OPS


def split_is_valid(
    node: Node, dims: OpDims, label: str, ways: int, ins: Sequence[TensorSpec], outs: Sequence[TensorSpec],
    axis: str | None = None,
) -> bool:
    """Can ``label`` be split ``ways`` ways in this op (over mesh ``axis``)? Evenly anywhere the dimops allow it;
    in uneven (torch.chunk) pieces only where that is exact (``UNEVEN_OPS``, elementwise ops); a context label
    (``OpDims.context``) only over the context-parallel axis."""
    if label not in dims.splittable_labels():
        return False
    if label in dims.context and axis != CONTEXT_AXIS:
        return False
    sizes = label_sizes(dims, ins, outs)
    label_sizes_ = sizes.get(label, {0})
    if any(s < ways for s in label_sizes_):
        return False
    if any(s % ways for s in label_sizes_) and not _uneven_ok(node, dims, label, ways, label_sizes_):
        return False
    if dims.is_reduction(label):
        rule = rule_for(node.op)
        lacking = [op for op in dims.inputs if dims.position(op, label) is None]
        if lacking and (rule is None or rule.kind not in LINEAR_KINDS):
            return False
    elif label not in dims.combined | dims.inner and any(dims.position(o, label) is None for o in dims.outputs):
        # a split label must reach every output (or the op would produce a whole output from a piece)
        return False
    return True


def make_strategy(
    node: Node,
    dims: OpDims,
    operands: Sequence[str],
    current: Sequence[ShardingSpec | None],
    ins: Sequence[TensorSpec],
    outs: Sequence[TensorSpec],
    split: Mapping[str, str | None],
    mesh: DeviceMesh,
    cost: MeshPrices | None,
    train: bool,
    reason: str = "",
) -> NodeStrategy:
    """Build the NodeStrategy for splitting ``split[axis]`` on each mesh axis (None: run whole on it)."""
    n_axes = len(mesh.shape)
    req: list[list[Placement]] = [[Replicate() for _ in range(n_axes)] for _ in operands]
    out_pl: list[list[Placement]] = [[Replicate() for _ in range(n_axes)] for _ in outs]
    grad_axes: dict[int, list[str]] = {}
    ways = 1
    for a, axis in enumerate(mesh.axis_names):
        label = split.get(axis)
        if label is None:
            continue
        ways *= mesh.shape[a]
        reduction = dims.is_reduction(label)
        for i, operand in enumerate(dims.inputs[: len(operands)]):
            pos = dims.position(operand, label)
            if pos is not None:
                req[i][a] = Shard(pos)
            elif reduction:
                # a bias-like operand enters as a partial sum (rank 0 holds it, the others zeros); the
                # gradient of that sum reaches every rank whole, so it is complete, not partial
                req[i][a] = Partial(dims.partial)
            elif train and ins[i].dtype.startswith(("float", "bfloat")):
                grad_axes.setdefault(i, []).append(axis)
        for j, operand in enumerate(dims.outputs[: len(outs)]):
            pos = dims.position(operand, label)
            if pos is not None:
                out_pl[j][a] = Shard(pos)
            elif label not in dims.combined:  # (a combined label's pieces are joined inside the op)
                out_pl[j][a] = Partial(dims.partial)
    required = tuple(ShardingSpec(tuple(r)) for r in req)
    redistributes: list[Redistribute] = []
    for name, spec, have, want in zip(operands, ins, current, required, strict=False):
        if have is None or have == want:
            continue
        redistributes.extend(redistribute_steps(name, spec, have, want, mesh, cost))
    compute = cost.compute_s(node, ways) if cost is not None else 0.0
    return NodeStrategy(
        node=node.name,
        split=tuple((axis, label) for axis, label in split.items() if label is not None),
        inputs=required,
        outputs=tuple(ShardingSpec(tuple(o)) for o in out_pl),
        redistributes=tuple(redistributes),
        grad_reduce=tuple((i, tuple(ax)) for i, ax in sorted(grad_axes.items())),
        compute_s=compute,
        comm_s=sum(r.time_s for r in redistributes),
        reason=reason,
    )


def context_attention_inputs(
    ins: Sequence[TensorSpec], inputs: Sequence[ShardingSpec], mesh: DeviceMesh, axis: str
) -> tuple[ShardingSpec, ...]:
    """An attention's operand placements when it runs over the sequence split on ``axis`` by Ulysses or ring
    (``costs.attention``): queries, keys and values on their sequence (dimension -2), the mask on its rows (its
    columns whole); the other axes as ``inputs`` has them."""
    a = mesh.axis_names.index(axis)
    out = []
    for i, (spec, pl) in enumerate(zip(ins, inputs, strict=True)):
        placements = list(pl.placements)
        if i < 3 or (spec.rank >= 2 and spec.shape[-2] > 1):
            placements[a] = Shard(spec.rank - 2)
        out.append(ShardingSpec(tuple(placements)))
    return tuple(out)


def context_attention_strategy(
    base: NodeStrategy, operands: Sequence[str], current: Sequence[ShardingSpec | None], ins: Sequence[TensorSpec],
    mesh: DeviceMesh, axis: str, label: str, cost: MeshPrices | None,
) -> NodeStrategy:  # fmt: skip
    """``base`` (an attention whose queries ``axis`` splits on their sequence) run the way ``label`` records
    ("s@ring", ``costs.attention.way_label``): the operands stay split on the sequence (no gathered keys and
    values, no partial gradients over ``axis``)."""
    inputs = context_attention_inputs(ins, base.inputs, mesh, axis)
    redistributes: list[Redistribute] = []
    for name, spec, have, want in zip(operands, ins, current, inputs, strict=False):
        if have is not None and have != want:
            redistributes.extend(redistribute_steps(name, spec, have, want, mesh, cost))
    return NodeStrategy(
        node=base.node, split=tuple((a, label if a == axis else lab) for a, lab in base.split), inputs=inputs,
        outputs=base.outputs, redistributes=tuple(redistributes),
        grad_reduce=tuple((i, tuple(x for x in ax if x != axis)) for i, ax in base.grad_reduce
                          if any(x != axis for x in ax)),
        compute_s=base.compute_s, comm_s=sum(r.time_s for r in redistributes), reason=base.reason,
    )  # fmt: skip


# ops without tensor outputs that read only their operands' shapes (codegen scales a split dimension's size)
_SHAPE_READERS = ("sym_size", "sym_numel")


def scalar_strategy(
    node: Node,
    operands: Sequence[str],
    specs: Mapping[str, TensorSpec],
    placement: Mapping[str, ShardingSpec | None],
    mesh: DeviceMesh,
    cost: MeshPrices | None,
) -> NodeStrategy:
    """The strategy of a node without tensor outputs. One that reads tensor values into Python (``x.item()``,
    the sizes of ``x.tolist()``) reads every tensor operand whole: pieces or partial sums are gathered first.
    Shape readers (``sym_size``) and size arithmetic read no tensor data and need nothing."""
    if node.op in _SHAPE_READERS or not operands:
        return NodeStrategy(node=node.name, split=(), inputs=(), outputs=())
    whole = ShardingSpec(tuple(Replicate() for _ in mesh.shape))
    steps: list[Redistribute] = []
    for name in dict.fromkeys(operands):
        have = placement.get(name)
        if have is not None and have != whole:
            steps.extend(redistribute_steps(name, specs[name], have, whole, mesh, cost))
    return NodeStrategy(
        node=node.name, split=(), inputs=tuple(whole for _ in operands), outputs=(), redistributes=tuple(steps),
        comm_s=sum(r.time_s for r in steps),
    )  # fmt: skip
