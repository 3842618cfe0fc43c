"""Can the batch be cut into parts that run separately? (Pipeline micro-batches and data-parallel pipeline
replicas each run some rows of the batch through the chunks, then concatenate the outputs and average the
losses.)

That is exact only if the rows are independent: :func:`batch_rows` follows the rows of the batch inputs
through the graph with the op annotations (dimops labels) and names the first op that mixes them (a
reduction over the batch, an op that needs the whole batch, a tensor of the batch's size that does not come
from the inputs, a random op: its parts would draw other numbers), an output that is not a batch-sized tensor,
or a loss that is not a mean over the batch.
Only ops that reach an output count. Given the model traced again at the micro-batch size, it also tells
tensors made at the batch size (``mask.expand(x.shape[0], -1)``, ``x.new_zeros(x.shape[0], 4)``: every row
the same, so any part of the batch sees the same rows) from ones whose size is written into the model
(``torch.zeros(8, 4)``, ``x.view(8, -1)``), which trace at another size into other shapes and would run
silently wrong.

Invariants: the answer is conservative (an op without a rule, or one whose labels do not show that it keeps
rows apart, is a problem); "" means cutting the batch gives the results of the whole batch.
"""

from __future__ import annotations

from collections.abc import Sequence

from shardwise.ir.graph import Graph, Node, Value, iter_values
from shardwise.ir.registry import draws_random
from shardwise.ir.tensor import TensorSpec
from shardwise.passes.sharding.candidates import node_info, tensor_specs

__all__ = ["batch_rows", "rows_problem", "micro_shapes_problem"]

# ops whose output rows are all the same when no operand carries rows (made at the batch size from constants)
_ROW_COPIES = (
    "aten.expand.default", "aten.full.default", "aten.zeros.default", "aten.ones.default",
    "aten.empty.memory_format", "aten.new_ones.default", "aten.new_zeros.default", "aten.new_full.default",
    "aten.new_empty.default", "aten.scalar_tensor.default",
)  # fmt: skip
# ops whose tensor operand gives only the dtype and device of what they make
_NEW_FROM = ("aten.new_ones.default", "aten.new_zeros.default", "aten.new_full.default", "aten.new_empty.default")
# ops that map a batch mean (a scalar that is the average over the rows) to another one
_MEAN_UNARY = (
    "aten.neg.default", "aten.to.dtype", "aten._to_copy.default", "aten.clone.default", "aten.alias.default",
    "aten.detach.default", "aten.view.default", "aten.reshape.default", "aten._unsafe_view.default",
    "aten.mul.Scalar", "aten.div.Scalar", "aten.add.Scalar", "aten.sub.Scalar", "aten.type_as.default",
    "aten.contiguous.default", "aten.to.dtype_layout", "aten.to.device",
)  # fmt: skip
_MEAN_SUM = ("aten.add.Tensor", "aten.sub.Tensor", "aten.rsub.Tensor")
_MEAN_SCALE = ("aten.mul.Tensor", "aten.div.Tensor")


def _where(node: Node) -> str:
    return f"{node.op.removeprefix('aten.')} ({node.source})" if node.source else node.op.removeprefix("aten.")


def _live(graph: Graph) -> set[str]:
    """Values an output or a buffer update depends on."""
    need = {v.name for a in graph.outputs for v in iter_values(a)} | {v.name for _, v in graph.buffer_updates}
    for node in reversed(graph.nodes):
        if node.name in need:
            need.update(node.inputs)
    return need


def batch_rows(
    graph: Graph, batch_inputs: Sequence[int], micro: Graph | None = None, rows_per_part: int = 0
) -> tuple[dict[str, frozenset[int]], set[str], str]:
    """(value -> the dims that carry rows of the batch, the batch means, the first problem or "").

    A batch mean is a scalar that averages a row-wise quantity over every row (``x.mean()``), or an affine
    function of such means: the mean of the micro-batches' values is the whole batch's. ``micro``: the
    model traced at ``rows_per_part`` rows (None: tensors made at the batch size count as written into the
    model, conservatively).
    """
    specs = tensor_specs(graph)
    live = _live(graph)
    traced = next((i.spec.shape[0] for i in graph.inputs if isinstance(i.spec, TensorSpec) and i.spec.rank), 1)
    if micro is not None and (
        len(graph.nodes) != len(micro.nodes) or any(a.op != b.op for a, b in zip(graph.nodes, micro.nodes, strict=True))
    ):
        return {}, set(), (
            f"traced at {rows_per_part} rows it has other ops than at {traced} rows (its structure depends on "
            "the batch size)"
        )  # fmt: skip
    micro_nodes = dict(zip((n.name for n in graph.nodes), micro.nodes, strict=True)) if micro is not None else {}
    rows: dict[str, frozenset[int]] = {}
    for k in batch_inputs:
        i = graph.inputs[k]
        if isinstance(i.spec, TensorSpec) and i.spec.rank:
            rows[i.name] = frozenset({0})
    means: set[str] = set()
    # values that depend on no input and no parameter; with ``micro``, their rows are trusted to be the same
    # in any part of the batch (a limitation: ``torch.arange(batch)`` used as data is not caught)
    constant: set[str] = set()
    tuple_rows: dict[str, tuple[frozenset[int], ...]] = {}
    problem = ""

    def flag(text: str) -> None:
        nonlocal problem
        problem = problem or text

    for node in graph.nodes:
        if node.name in live and draws_random(node):
            flag(f"{_where(node)} draws random numbers (each part of the batch would draw other numbers)")
        if all(v in constant for v in node.inputs):
            # made from constants alone (masks, position ids): the dims whose size follows the batch carry it
            constant.add(node.name)
            made = _made_at_batch_size(node, micro_nodes.get(node.name))
            if made and not node.tuple_output:
                rows[node.name] = made
            continue
        if node.op == "getitem":
            src, idx = node.args[0], node.args[1]
            if isinstance(src, Value) and isinstance(idx, int):
                per = tuple_rows.get(src.name, ())
                if idx < len(per) and per[idx]:
                    rows[node.name] = per[idx]
            continue
        outs = [o for o in node.outputs if isinstance(o, TensorSpec)]
        if not outs:
            continue
        info = node_info(node, specs)
        batched = [k for k, name in enumerate(info.operands) if rows.get(name)]
        if node.op in _NEW_FROM:  # x.new_zeros(...) reads only the dtype and device of x, not its rows
            batched = []
        is_live = node.name in live
        if not batched:
            made = _made_at_batch_size(node, micro_nodes.get(node.name))
            if made:  # a tensor made at the batch size (its size follows the batch)
                if node.op in _ROW_COPIES and not node.tuple_output:
                    rows[node.name] = made
                elif is_live:
                    flag(f"{_where(node)} makes a tensor of the batch's size whose rows differ")
                continue
            mean_ops = [k for k, name in enumerate(info.operands) if name in means]
            if not mean_ops:
                continue
            if _keeps_mean(node, info.operands, mean_ops, means):
                means.add(node.name)
            elif is_live:
                flag(f"{_where(node)} uses the mean over the batch in a way that is not an average over rows")
            continue
        if is_live and any(name in means for name in info.operands):
            flag(f"{_where(node)} combines rows of the batch with a mean over the whole batch")
        known = _along(node, info.operands, outs, rows, specs)
        if known is not None:  # an op the labels run whole but that acts along other dims than the batch
            if isinstance(known, str):
                if known == "mean":
                    means.add(node.name)
                elif is_live:
                    flag(f"{_where(node)} {known}")
            elif node.tuple_output:
                tuple_rows[node.name] = known
            elif known and known[0]:
                rows[node.name] = known[0]
            continue
        labels: set[str] = set()
        for k in batched:
            operand = info.dims.inputs[k] if k < len(info.dims.inputs) else ()
            for d in rows[info.operands[k]]:
                if d >= len(operand):
                    labels.add("?")
                    continue
                dim = operand[d]
                if dim.label == "1":
                    continue
                labels.add(dim.label)
                if dim.frozen and is_live:
                    flag(f"{_where(node)} needs whole rows of the batch together (it mixes the rows)")
        if "?" in labels:
            if is_live:
                flag(f"{_where(node)}: the rows of the batch cannot be followed through it")
            continue
        out_dims = [frozenset(d for d, x in enumerate(o) if x.label in labels) for o in info.dims.outputs]
        if is_live:
            for label in sorted(labels):
                if info.dims.is_reduction(label):
                    if _is_batch_mean(node, info, labels, outs):
                        means.add(node.name)
                        out_dims = [frozenset() for _ in out_dims]
                        break
                    flag(f"{_where(node)} reduces over the batch (each part of the batch would see only its rows)")
                elif any(not d for d in out_dims):
                    flag(f"{_where(node)} drops the batch dimension from an output (it mixes the rows)")
            for k, name in enumerate(info.operands):
                operand = info.dims.inputs[k] if k < len(info.dims.inputs) else ()
                holds = frozenset(d for d, x in enumerate(operand) if x.label in labels)
                if holds != rows.get(name, frozenset()) and node.name not in means:
                    flag(
                        f"{_where(node)} combines the rows of the batch with a tensor of the batch's size that "
                        "does not come from the inputs (a batch size written into the model?)"
                    )
        if node.tuple_output:
            tuple_rows[node.name] = tuple(out_dims)
        elif out_dims and out_dims[0]:
            rows[node.name] = out_dims[0]
    if micro is not None and not problem:
        problem = _micro_shapes(graph, micro_nodes, rows, live, traced, rows_per_part)
    # outputs: batch-sized tensors are concatenated over the parts, scalars averaged
    for a in graph.outputs:
        for v in iter_values(a):
            spec = graph.spec_of(v.name) if v.name in specs else None
            if not isinstance(spec, TensorSpec):
                continue
            if spec.rank == 0:
                if rows.get(v.name) or (v.name not in means and _depends_on_rows(graph, v.name, rows)):
                    flag(f"output {v.name} is a scalar that is not a mean over the batch (e.g. a sum)")
            elif rows.get(v.name) != frozenset({0}):
                flag(f"output {v.name} {tuple(spec.shape)} does not have the batch as its first dimension")
    if graph.buffer_updates:
        keys = ", ".join(key for key, _ in graph.buffer_updates)
        flag(f"the model updates buffers from the batch ({keys}): each part of the batch would update them")
    return rows, means, problem


def _arg(node: Node, index: int, name: str, default: object = None) -> object:
    if len(node.args) > index:
        return node.args[index]
    return node.kwarg_dict.get(name, default)


def _dims(value: object, rank: int) -> frozenset[int] | None:
    """Normalized dims of a dim / dims argument (None: every dim)."""
    if value is None or value == () or value == []:
        return None
    items = value if isinstance(value, tuple | list) else (value,)
    if not all(isinstance(d, int) for d in items):
        return None
    return frozenset(d % rank if rank else 0 for d in items)  # type: ignore[operator]


# ops the annotations run whole (all dims frozen) that act along the dims of an argument: (index, name,
# default) of that argument, and whether those dims are reduced away (the keepdim argument's place)
_ALONG: dict[str, tuple[int, str, object, tuple[int, str] | None]] = {
    "aten.flip.default": (1, "dims", None, None),
    "aten.roll.default": (2, "dims", (), None),
    "aten.sort.default": (1, "dim", -1, None),
    "aten.topk.default": (2, "dim", -1, None),
    "aten.diff.default": (2, "dim", -1, None),
    "aten.index_select.default": (1, "dim", None, None),
    "aten.cumsum.default": (1, "dim", None, None),
    "aten.var.correction": (1, "dim", None, (3, "keepdim")),
    "aten.var.dim": (1, "dim", None, (3, "keepdim")),
    "aten.std.dim": (1, "dim", None, (3, "keepdim")),
    "aten.std.correction": (1, "dim", None, (3, "keepdim")),
    "aten.var_mean.correction": (1, "dim", None, (3, "keepdim")),
    "aten.max.dim": (1, "dim", None, (2, "keepdim")),
    "aten.min.dim": (1, "dim", None, (2, "keepdim")),
    "aten.argmax.default": (1, "dim", None, (2, "keepdim")),
    "aten.any.dim": (1, "dim", None, (2, "keepdim")),
    "aten.all.dim": (1, "dim", None, (2, "keepdim")),
    "aten.prod.dim_int": (1, "dim", None, (2, "keepdim")),
    "aten.linalg_vector_norm.default": (2, "dim", None, (3, "keepdim")),
    "aten.logsumexp.default": (1, "dim", None, (2, "keepdim")),
    "aten.amin.default": (1, "dim", None, (2, "keepdim")),
}
_MEAN_LOSSES = {  # op: (index of the reduction argument, of the class weight or -1)
    "aten.cross_entropy_loss.default": (3, 2),
    "aten.mse_loss.default": (2, -1),
    "aten.l1_loss.default": (2, -1),
    "aten.smooth_l1_loss.default": (2, -1),
    "aten.binary_cross_entropy_with_logits.default": (4, 2),
}


# scatters whose index (and source) carry the same rows as the tensor they write into
_SCATTERS = frozenset(("aten.scatter.value", "aten.scatter.src"))


def _along(
    node: Node, operands: Sequence[str], outs: list[TensorSpec], rows: dict[str, frozenset[int]],
    specs: dict[str, TensorSpec],
) -> tuple[frozenset[int], ...] | str | None:  # fmt: skip
    """For ops whose annotation is all frozen: the batch dims of each output, "mean" (a loss that is a mean
    over the batch), a problem (text), or None (not one of these ops: the labels decide)."""
    first = operands[0] if operands else ""
    have = rows.get(first, frozenset())
    others = [n for n in operands[1:] if rows.get(n)]
    rank = specs[first].rank if first in specs else 0
    if node.op in _ALONG:
        index, name, default, keep = _ALONG[node.op]
        if others:  # e.g. diff with a batch-sized prepend, index_select by batch values
            return "acts on several batch-sized tensors"
        acted = _dims(_arg(node, index, name, default), rank)
        if node.op == "aten.roll.default" and acted is None:
            return "rolls the flattened tensor (it mixes the rows)"
        if acted is None or acted & have:
            return "acts along the batch dimension (it mixes the rows)"
        kept = keep is not None and bool(_arg(node, keep[0], keep[1], False))
        if keep is not None and not kept:
            out = frozenset(d - sum(1 for a in acted if a < d) for d in have)
        else:
            out = have
        return tuple(out for _ in outs)
    if node.op in _SCATTERS:  # out[i][index[i][j]] = v along ``dim``: row i reads index row i (and src row i)
        d = _arg(node, 1, "dim")
        d = d % rank if isinstance(d, int) and rank else None
        if d is None or d in have or any(rows.get(n, frozenset()) != have for n in operands[1:]):
            return "scatters along the batch dimension or by indices of other rows (it mixes the rows)"
        return (have,)
    if node.op == "aten.gather.default":
        return _gather_rows(node, operands, rows, rank)
    if node.op == "aten.copy.default":
        return _copy_rows(operands, outs, rows, specs)
    if node.op in ("aten.pad.default", "aten.constant_pad_nd.default"):
        pad = _arg(node, 1, "pad", ())
        width = len(pad) // 2 if isinstance(pad, tuple | list) else rank
        if others or any(d >= rank - width for d in have):
            return "pads along the batch dimension (it mixes the rows)"
        return (have,)
    if node.op == "aten.repeat.default":
        reps = _arg(node, 1, "repeats", ())
        if not isinstance(reps, tuple | list) or others or not outs:
            return "repeats along the batch dimension (it mixes the rows)"
        shift = outs[0].rank - rank
        if any(reps[d + shift] != 1 for d in have):
            return "repeats along the batch dimension (it mixes the rows)"
        return (frozenset(d + shift for d in have),)
    if node.op == "aten.stack.default":
        tensors = [n for n in operands]
        if any(rows.get(n, frozenset()) != have for n in tensors) or not outs:
            return "stacks rows of the batch with other tensors (it mixes the rows)"
        d = _arg(node, 1, "dim", 0)
        d = d % outs[0].rank if isinstance(d, int) else 0
        return (frozenset(x + (x >= d) for x in have),)
    if node.op in _MEAN_LOSSES:
        red, weight = _MEAN_LOSSES[node.op]
        target = operands[1] if len(operands) > 1 else ""
        mean = _arg(node, red, "reduction", 1) == 1 and (weight < 0 or _arg(node, weight, "weight") is None)
        if mean and have == frozenset({0}) and rows.get(target) == frozenset({0}) and len(operands) == 2:
            return "mean"  # (cross-entropy with ignored targets: exact when the parts ignore alike)
        return "is a loss that is not a mean over the batch"
    return None


def _gather_rows(
    node: Node, operands: Sequence[str], rows: dict[str, frozenset[int]], rank: int
) -> tuple[frozenset[int], ...] | str:
    """``out[i][j] = input[i][index[i][j]]`` (dim 1; likewise for any dim): the output has the index's shape
    and, along every dim but ``dim``, reads the input at the index's own position. Rows stay apart when the
    gathered dim carries no rows of the input and, along the other dims, the input carries rows exactly where
    the index does (row r of the index reads row r of the input). The index may carry rows along ``dim``
    itself (``table.gather(0, ids)``: each row picks its own entries of a table without rows)."""
    source, index = (list(operands) + ["", ""])[:2]
    d = _arg(node, 1, "dim")
    d = d % rank if isinstance(d, int) and rank else None
    have, picks = rows.get(source, frozenset()), rows.get(index, frozenset())
    if d is None or d in have:
        return "gathers along the batch dimension (it mixes the rows)"
    if have != picks - {d}:
        return "gathers by indices of other rows than its input's (it mixes the rows)"
    return (picks,)


def _copy_rows(
    operands: Sequence[str], outs: list[TensorSpec], rows: dict[str, frozenset[int]],
    specs: dict[str, TensorSpec],
) -> tuple[frozenset[int], ...] | str:  # fmt: skip
    """``copy(dst, src)`` is ``src`` broadcast to ``dst``'s shape (``dst``'s values are overwritten, only its
    shape is read). The output carries the source's rows (at their broadcast place) and, where the source is
    broadcast (a dim it lacks or of size 1), the destination's: every row there gets the same values, as
    ``expand`` gives. A destination carrying rows where the source has a whole dim without rows would be
    filled with values of other rows."""
    dst, src = (list(operands) + ["", ""])[:2]
    if src not in specs or not outs:
        return "copies a tensor whose rows cannot be followed"
    shape, source = outs[0].shape, specs[src].shape
    shift = len(shape) - len(source)
    moved = frozenset(d + shift for d in rows.get(src, frozenset()))
    spread = frozenset(d for d in range(len(shape)) if d < shift or (source[d - shift] == 1 and shape[d] != 1))
    if rows.get(dst, frozenset()) - moved - spread:
        return (
            "copies into rows of the batch a tensor of the batch's size that does not come from the inputs "
            "(it mixes the rows)"
        )
    return (moved | (rows.get(dst, frozenset()) & spread),)


def _depends_on_rows(graph: Graph, name: str, rows: dict[str, frozenset[int]]) -> bool:
    """Does ``name`` depend on a value that carries rows of the batch?"""
    if rows.get(name):
        return True
    if not graph.has_node(name):
        return False
    seen: set[str] = set()
    stack = [name]
    while stack:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        if rows.get(v):
            return True
        if graph.has_node(v):
            stack.extend(graph.node(v).inputs)
    return False


def _is_batch_mean(node: Node, info, labels: set[str], outs: list[TensorSpec]) -> bool:  # noqa: ANN001
    """A mean over every dimension (a scalar) of row-wise values: the average over the micro-batches' means
    (equal sizes) is the whole batch's."""
    return (
        info.dims.partial == "avg"
        and len(outs) == 1
        and outs[0].rank == 0
        and all(info.dims.is_reduction(label) for label in labels)
        and not node.tuple_output
    )


def _keeps_mean(node: Node, operands: Sequence[str], mean_ops: list[int], means: set[str]) -> bool:
    """An affine map of batch means (no operand carries rows)."""
    if node.op in _MEAN_UNARY and len(operands) == 1:
        return True
    if node.op in _MEAN_SUM:
        return True  # means plus constants, or minus each other: still averages over rows
    if node.op in _MEAN_SCALE and len(mean_ops) == 1:
        # one mean times (or divided by) something that does not depend on the batch
        return not (node.op == "aten.div.Tensor" and mean_ops[0] != 0)
    return False


def rows_problem(graph: Graph, batch_inputs: Sequence[int]) -> str:
    """"" if the batch of ``graph`` may be cut into parts run separately, else what prevents it."""
    return batch_rows(graph, batch_inputs)[2]


def _made_at_batch_size(node: Node, micro: Node | None) -> frozenset[int]:
    """The dims of ``node``'s output whose size changes with the batch (traced at two sizes)."""
    if micro is None or not node.outputs or not micro.outputs:
        return frozenset()
    a, b = node.outputs[0], micro.outputs[0]
    if not (isinstance(a, TensorSpec) and isinstance(b, TensorSpec)) or a.rank != b.rank:
        return frozenset()
    return frozenset(d for d, (x, y) in enumerate(zip(a.shape, b.shape, strict=True)) if x != y)


def _micro_shapes(
    graph: Graph, micro_nodes: dict[str, Node], dims: dict[str, frozenset[int]], live: set[str], traced: int,
    rows: int,
) -> str:  # fmt: skip
    """"" if every op of the model traced at ``rows`` rows has the full trace's shapes with the batch
    dimensions scaled, else the first difference."""

    def expected(shape: tuple[int, ...], carry: frozenset[int]) -> tuple[int, ...] | None:
        out = []
        for d, n in enumerate(shape):
            if d in carry:
                if n * rows % traced:
                    return None
                n = n * rows // traced
            out.append(n)
        return tuple(out)

    for full in graph.nodes:
        part = micro_nodes[full.name]
        if full.name not in live or full.tuple_output:
            continue
        for a, b in zip(full.outputs, part.outputs, strict=False):
            if not (isinstance(a, TensorSpec) and isinstance(b, TensorSpec)):
                continue
            want = expected(tuple(a.shape), dims.get(full.name, frozenset()))
            if want != tuple(b.shape):
                return (
                    f"{_where(full)} gives {tuple(b.shape)} for {rows} rows where {want or '?'} was expected from "
                    f"{tuple(a.shape)} for {traced} rows: the model hard-codes its batch size {traced}"
                )
    return ""


def micro_shapes_problem(graph: Graph, micro: Graph, batch_inputs: Sequence[int], rows: int) -> str:
    """"" if the batch of ``graph`` may be cut into parts of ``rows`` rows run separately, given ``micro``,
    the model traced at ``rows`` rows; else what prevents it (see the module docstring)."""
    return batch_rows(graph, batch_inputs, micro, rows)[2]
