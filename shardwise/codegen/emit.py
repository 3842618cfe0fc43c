"""ExecutionPlan → the Python source of one rank's program. Every decision is made here and in the modules
it calls; the template (templates/program.py.j2) only lays the code out.

The program's forward pass is made in steps:

1. one :class:`Statement` per op or fused group in execution order (``_body``): the op spelled as a person
   writes it (``codegen.spelling``), its operands' collectives before it, ``del`` after each value's last
   use. Values that depend on no input and no weight (attention masks, position ids: shape-only
   subgraphs) are computed once when the program is built and kept as buffers; ops that return their
   operand unchanged (``x + 0``, ``x * 1``, dropout that drops nothing, a ``to`` that changes nothing) are
   not written at all;
2. activation checkpointing and host offload wrap the statements of their ranges (``codegen.recompute``,
   ``codegen.offload``);
3. repeated layers become one function per distinct layer, called per layer with that layer's weights,
   in a loop where the layers are consecutive (``codegen.blocks``); the weight tables are written once per
   repeated layer (``codegen.tables``).

Guarantees: the program computes, op for op, what the plan says (the same ops on the same local pieces, the
same collectives), so its results equal the unfolded, unrolled program's.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import jinja2

from shardwise.codegen.blocks import outline
from shardwise.codegen.offload import offloads_optimizer, save_activations_on_host
from shardwise.codegen.pysource import WIDTH, identifier, rename, uses, wrap_lines
from shardwise.codegen.recompute import checkpoint_ranges, recompute_ranges
from shardwise.codegen.spelling import spell, uses_aten
from shardwise.codegen.statement import Statement, render_statements
from shardwise.codegen.tables import program_tables
from shardwise.ir.experts import MOE_EXPERTS, expert_axis
from shardwise.ir.fusion import FusedGroup, check_groups, schedule
from shardwise.ir.graph import Arg, Const, Function, Graph, Node, Value, iter_values
from shardwise.ir.placement import (
    PAIRED_AXIS,
    DeviceMesh,
    Partial,
    Shard,
    ShardingSpec,
    pairs_chunks,
    zero_group,
)
from shardwise.ir.plan import ExecutionPlan, NodeStrategy, Redistribute
from shardwise.ir.registry import SYM_FUNCTIONS, draws_random, tensor_operands
from shardwise.ir.tensor import TensorSpec

__all__ = ["render_program", "Statement", "template_env"]

# names of collective algorithms (checked again here: they are written into string literals)
_ALGORITHM_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_:.+-]*\Z")

OUTPUT_NODE = "<output>"
# Python module names (the graph's custom-op libraries are imported by name)
_MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*\Z")

# ops whose size argument (at this index) is the output shape: it must be made local
_SIZE_ARG = {
    "aten.view.default": 1,
    "aten.reshape.default": 1,
    "aten._unsafe_view.default": 1,
    "aten.expand.default": 1,
    "aten.new_ones.default": 1,
    "aten.new_zeros.default": 1,
    "aten.new_full.default": 1,
    "aten.new_empty.default": 1,
    "aten.full.default": 0,
    "aten.zeros.default": 0,
    "aten.ones.default": 0,
    "aten.empty.memory_format": 0,
}
_SCALAR_INFIX = {
    "add": "+", "sub": "-", "mul": "*", "floordiv": "//", "truediv": "/", "mod": "%", "pow": "**", "ge": ">=",
    "gt": ">", "le": "<=", "lt": "<", "eq": "==", "ne": "!=", "and_": "&", "or_": "|", "lshift": "<<", "rshift": ">>",
}  # fmt: skip
# one-operand functions on sizes, written without imports ({} is the operand)
_SCALAR_UNARY = {
    "neg": "-{}", "not_": "not {}", "abs": "abs({})", "round": "round({})", "trunc": "int({})", "floor": "int({} // 1)",
    "ceil": "-int(-{} // 1)",
}  # fmt: skip
_DROPOUTS = ("aten.dropout.default", "aten.alpha_dropout.default", "aten.feature_dropout.default")
_CONVERSIONS = (
    "aten.to.dtype", "aten.to.dtype_layout", "aten._to_copy.default", "aten.to.device", "aten.type_as.default",
)  # fmt: skip


def template_env() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("shardwise.codegen", "templates"),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )


class _Code(str):
    """A Python expression to emit as is."""


def _identifier(text: str) -> str:
    return identifier(text)


# names the program's own code uses: never a variable
_RESERVED = {
    "self", "mesh", "torch", "nn", "F", "C", "K", "aten", "loss", "w", "i", "layer", "re", "SimpleNamespace",
    "per_layer", "fill", "build", "Program", "TENSORS", "ALIASES", "PARTS", "GRAD_REDUCE", "PRECISION", "TRAINING",
    "ZERO_STAGE", "OFFLOAD_OPTIMIZER", "MESH_SHAPE", "MESH_AXES", "MESH_RANKS",
}  # fmt: skip


class _Names:
    """Readable, unique variable names: the module path, then the op when a module makes several values."""

    def __init__(self, graph: Graph) -> None:
        self.var: dict[str, str] = {}
        self.taken: set[str] = set(_RESERVED)
        self.attr: dict[str, str] = {}
        self.read: dict[str, str] = {}  # parameter value -> a local copy the program reads instead
        for p in graph.params:
            self.attr[p.name] = _identifier(p.key)
        self.taken |= set(self.attr.values())
        for i in graph.inputs:
            self._take(i.name, _identifier(i.name))
        counts: dict[str, int] = {}
        for n in graph.nodes:
            counts[n.module_path] = counts.get(n.module_path, 0) + 1
        for n in graph.nodes:
            op_short = n.op.split(".")[1] if n.op.startswith("aten.") else n.op
            base = _identifier(n.module_path) if n.module_path else ""
            if not base:
                base = op_short
            elif counts[n.module_path] > 1:
                base = f"{base}_{op_short}"
            self._take(n.name, _identifier(base))

    @classmethod
    def empty(cls) -> _Names:
        """Names of an empty graph (a subgraph function names its values itself)."""
        return cls(Graph(inputs=(), params=(), nodes=(), outputs=()))

    def _take(self, value: str, base: str) -> None:
        name = base
        k = 1
        while name in self.taken:
            k += 1
            name = f"{base}_{k}"
        self.taken.add(name)
        self.var[value] = name

    def fresh(self, base: str) -> str:
        name = _identifier(base)
        k = 1
        while name in self.taken:
            k += 1
            name = f"{_identifier(base)}_{k}"
        self.taken.add(name)
        return name

    def ref(self, value: str) -> str:
        if value in self.read:
            return self.read[value]
        if value in self.attr:
            return f"self.{self.attr[value]}"
        return self.var[value]


def _format(a: Arg | _Code, ref: Mapping[str, str], names: _Names) -> str:
    if isinstance(a, _Code):
        return str(a)
    if isinstance(a, Value):
        return ref.get(a.name) or names.ref(a.name)
    if isinstance(a, Const):
        if a.kind == "device":
            return "self.device"
        if a.kind == "function":  # a subgraph of a higher-order op, written at the top of the program
            if not a.value.isidentifier():
                raise ValueError(f"not a function name: {a.value!r}")
            return a.value
        return f"torch.{a.value}"
    if isinstance(a, tuple):
        return "[" + ", ".join(_format(x, ref, names) for x in a) + "]"
    if isinstance(a, float):
        if a != a:
            return 'float("nan")'
        if a in (float("inf"), float("-inf")):
            return 'float("inf")' if a > 0 else '-float("inf")'
    return repr(a)


def _shard_factors(spec: ShardingSpec | None, mesh: DeviceMesh, rank: int) -> dict[int, int]:
    """tensor dim -> how many ways it is split."""
    out: dict[int, int] = {}
    if spec is None:
        return out
    for size, p in zip(mesh.shape, spec.placements, strict=True):
        if isinstance(p, Shard):
            out[p.dim] = out.get(p.dim, 1) * size
    return out


def _shard_axes(spec: ShardingSpec | None, mesh: DeviceMesh) -> dict[int, list[str]]:
    """tensor dim -> the mesh axes that split it, in axis order."""
    out: dict[int, list[str]] = {}
    if spec is None:
        return out
    for size, axis, p in zip(mesh.shape, mesh.axis_names, spec.placements, strict=True):
        if isinstance(p, Shard) and size > 1:
            out.setdefault(p.dim, []).append(axis)
    return out


def _localize_sizes(node: Node, strategy: NodeStrategy, mesh: DeviceMesh, names: _Names) -> tuple[Arg | _Code, ...]:
    args: list[Arg | _Code] = list(node.args)
    index = _SIZE_ARG.get(node.op)
    if index is None or index >= len(args) or not strategy.outputs:
        return tuple(args)
    factors = _shard_factors(strategy.outputs[0], mesh, 0)
    axes = _shard_axes(strategy.outputs[0], mesh)
    sizes = args[index]
    if not isinstance(sizes, tuple) or not factors:
        return tuple(args)
    local: list[Arg | _Code] = []
    for d, s in enumerate(sizes):
        f = factors.get(d, 1)
        if f == 1 or s == -1:
            local.append(s)
        elif isinstance(s, int) and s % f:
            # uneven torch.chunk pieces (planned only where exact): this rank's size, known at run time
            expr = str(s)
            for axis in axes[d]:
                expr = f"C.piece_size({expr}, mesh, {axis!r})"
            local.append(_Code(expr))
        elif isinstance(s, int):
            local.append(s // f)
        else:
            local.append(_Code(f"{_format(s, {}, names)} // {f}"))
    args[index] = tuple(local)  # type: ignore[arg-type]
    return tuple(args)


def _call(
    node: Node, args: tuple[Arg | _Code, ...], ref: Mapping[str, str], names: _Names,
    kwargs: tuple[tuple[str, Arg | _Code], ...] | None = None,
) -> str:  # fmt: skip
    """The expression for ``node`` with ``args`` (and ``kwargs``, the node's by default); values are named
    by ``ref`` or their own variable (operands bound to another variable by :func:`_bind` are code)."""
    fmt = [_format(a, ref, names) for a in args]
    kw = [(k, _format(v, ref, names)) for k, v in (node.kwargs if kwargs is None else kwargs)]
    if node.op == "getitem":
        return f"{fmt[0]}[{fmt[1]}]"
    if node.op == "scalar_op":  # arithmetic on sizes: a Python expression over ints, floats and bools
        op = str(node.args[0])
        if op in _SCALAR_UNARY:
            return _SCALAR_UNARY[op].format(fmt[1])
        if op in _SCALAR_INFIX:
            return f"{fmt[1]} {_SCALAR_INFIX[op]} {fmt[2]}"
        if op not in SYM_FUNCTIONS:
            raise ValueError(f"unknown scalar function {op!r} in node {node.name}")
        return f"torch.{op}({', '.join(fmt[1:])})"  # torch.sym_max(a, b) and the like
    if node.op.startswith("higher_order."):  # torch.cond and the like, called whole as eager PyTorch does
        return f"torch.ops.higher_order.{node.op.split('.', 1)[1]}({', '.join(fmt + [f'{k}={v}' for k, v in kw])})"
    return spell(node, fmt, kw)


def _sharded_cross_entropy(
    node: Node, strategy: NodeStrategy, args: tuple[Arg | _Code, ...], names: _Names, mesh: DeviceMesh,
    shapes: dict[str, tuple[int, ...]],
) -> str | None:
    """A cross entropy whose classes are split over a mesh axis (vocabulary parallel) runs as
    ``C.sharded_cross_entropy``, which joins the pieces itself; None for any other op or split."""
    if node.op != "aten.cross_entropy_loss.default":
        return None
    axis = next((a for a, label in strategy.split if label == "c"), None)
    if axis is None:
        return None
    kw = node.kwarg_dict
    reduction = node.args[3] if len(node.args) > 3 else kw.get("reduction", 1)
    ignore = node.args[4] if len(node.args) > 4 else kw.get("ignore_index", -100)
    x, target = (_format(a, {}, names) for a in args[:2])
    logits = node.args[0]
    shape = shapes.get(logits.name) if isinstance(logits, Value) else None
    size = ""
    if shape is not None and len(shape) > 1 and shape[1] % mesh.axis_size(axis):
        size = f", size={shape[1]}"  # uneven pieces: the op finds its first class from the number of classes
    return (
        f"C.sharded_cross_entropy({x}, {target}, mesh, {axis!r}, reduction={reduction}, ignore_index={ignore}{size})"
    )


def _expert_parallel(
    node: Node, strategy: NodeStrategy | None, args: tuple[Arg | _Code, ...], names: _Names, mesh: DeviceMesh
) -> str | None:
    """An experts op runs as ``C.moe_experts(...)``; with its experts split over a mesh axis as
    ``C.moe_experts(..., mesh, axis)``, which dispatches the rows to their experts' ranks and combines them back
    by all-to-all; with its up projections apart (``up=``). None for any other op."""
    if node.op != MOE_EXPERTS:
        return None
    axis = expert_axis(strategy, mesh)
    parts = [_format(a, {}, names) for a in args]
    up = ""
    if len(parts) == 7:  # (hidden, index, weights, gate, up, down, activation): the up projections apart
        up = f", up={parts.pop(4)}"
    ep = f", mesh, {axis!r}" if axis is not None else ""
    return f"C.moe_experts({', '.join(parts)}{ep}{up})"
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")


def _context_attention(
    node: Node, strategy: NodeStrategy, args: tuple[Arg | _Code, ...],
    kwargs: tuple[tuple[str, Arg | _Code], ...], names: _Names,
) -> str | None:  # fmt: skip
    """An attention whose sequence a mesh axis splits and that runs by Ulysses or ring attention (its split
    label names the way: "s@ring", ``costs.attention.way_label``) is ``C.context_attention``; None otherwise."""
    if node.op != "aten.scaled_dot_product_attention.default":
        return None
    found = next(((a, label.split("@", 1)[1]) for a, label in strategy.split if "@" in label), None)
    if found is None:
        return None
    axis, way = found
    given = dict(zip(_SDPA_ARGS, args, strict=False)) | dict(kwargs)
    q, k, v = (_format(given[n], {}, names) for n in _SDPA_ARGS[:3])
    mask = given.get("attn_mask")
    extra = "".join(
        f", {name}={_format(given[name], {}, names)}"
        for name in ("dropout_p", "is_causal", "scale", "enable_gqa") if given.get(name) is not None
    )  # fmt: skip
    mask_code = _format(mask, {}, names) if mask is not None else "None"
    return f"C.context_attention({q}, {k}, {v}, {mask_code}, mesh, {axis!r}, {way!r}{extra})"


def _collective_call(
    r: Redistribute,
    var: str,
    mesh: DeviceMesh,
    partial_grad: bool = False,
    shape: tuple[int, ...] | None = None,
    schedules: frozenset[str] = frozenset(),
) -> str:
    """The expression for one redistribution step; ``partial_grad``: the gathered value's gradient is a
    partial sum over the axis, so the backward reduce-scatters it (instead of an all-reduce, then a slice).
    ``shape``: the value's whole shape, to tell gathers the size of a dimension split in uneven pieces.
    ``schedules``: the plan's point-to-point programs; a one-step collective whose algorithm is one of them
    runs it (``schedule="<name>"``)."""
    a = mesh.axis_names.index(r.axis)
    src, dst = r.src.placements[a], r.dst.placements[a]
    axis = repr(r.axis)
    kinds = r.collective.split("+")
    expr = var
    extra = ""  # trailing keyword arguments: the whole size of uneven pieces, or the schedule
    if isinstance(src, Shard) and shape is not None and shape[src.dim] % mesh.shape[a]:
        # uneven torch.chunk pieces (one axis splits the dimension: the strategies use a label on one axis)
        extra = f", size={shape[src.dim]}"
    if not extra and len(kinds) == 1 and r.algorithm in schedules and _ALGORITHM_NAME.match(r.algorithm):
        extra = f', schedule="{r.algorithm}"'  # even pieces only: the programs move equal chunks
    for kind in kinds:
        if kind == "slice":
            expr = f"C.shard({expr}, {dst.dim}, mesh, {axis})"  # type: ignore[union-attr]
        elif kind == "allgather" and partial_grad and len(kinds) == 1:
            expr = f"C.all_gather({expr}, {src.dim}, mesh, {axis}, partial_grad=True{extra})"  # type: ignore[union-attr]
        elif kind == "allgather":
            expr = f"C.all_gather({expr}, {src.dim}, mesh, {axis}{extra})"  # type: ignore[union-attr]
        elif kind == "allreduce":
            op = src.op if isinstance(src, Partial) else "sum"
            expr = f"C.all_reduce({expr}, mesh, {axis}, {op!r}{extra})"
        elif kind == "reduce_scatter":
            op = src.op if isinstance(src, Partial) else "sum"
            expr = f"C.reduce_scatter({expr}, {dst.dim}, mesh, {axis}, {op!r}{extra})"  # type: ignore[union-attr]
        elif kind == "alltoall":
            expr = f"C.all_to_all({expr}, {src.dim}, {dst.dim}, mesh, {axis}{extra})"  # type: ignore[union-attr]
        elif kind == "to_partial":
            op = dst.op if isinstance(dst, Partial) else "sum"
            expr = f"C.to_partial({expr}, mesh, {axis}, {op!r})"
        else:
            raise ValueError(f"unknown collective {kind!r}")
    return expr


def zero_axes(plan: ExecutionPlan) -> str | tuple[str, ...]:
    """The axes ZeRO shards over (the runtime's ``Trainer(zero_axis=...)``): the mesh's data-parallel axes
    (``ir.placement.zero_group``), ``"dp"`` alone as before where that is all there is."""
    axes = zero_group(plan.mesh, None)
    return axes[0] if len(axes) == 1 else (axes or "dp")


def combined_axes(plan: ExecutionPlan) -> tuple[tuple[str, ...], ...]:
    """The combinations of data-parallel axes some parameter's gradient is summed over (``zero_group``: two or
    more), each one process group of the runtime's mesh (``Mesh(combined=...)``), in a fixed order."""
    groups = {zero_group(plan.mesh, axes) for _, axes in plan.param_grad_reduce}
    return tuple(sorted(g for g in groups if len(g) > 1))


def paired_axes(plan: ExecutionPlan) -> tuple[str, ...]:
    """The mesh axes whose pieces are chunk pairs (``ir.placement.PAIRED_AXIS``, the runtime's ``Mesh.paired``):
    the context-parallel axis, where every dimension the plan splits over it cuts into ``2 cp`` chunks."""
    mesh = plan.mesh
    if PAIRED_AXIS not in mesh.axis_names:
        return ()
    a = mesh.axis_names.index(PAIRED_AXIS)
    ways = mesh.shape[a]
    shapes = _whole_shapes(plan.graph)
    by_node = {n.name: n for n in plan.graph.nodes}
    split: list[int] = []
    for i, spec in zip(plan.graph.inputs, plan.input_placements, strict=True):
        p = spec.placements[a]
        if isinstance(p, Shard) and isinstance(i.spec, TensorSpec):
            split.append(i.spec.shape[p.dim])
    for s in plan.strategies:
        node = by_node.get(s.node)
        specs = [o for o in node.outputs if isinstance(o, TensorSpec)] if node is not None else []
        for spec, pl in zip(specs, s.outputs, strict=False):
            p = pl.placements[a]
            if isinstance(p, Shard):
                split.append(spec.shape[p.dim])
        for r in s.redistributes:
            for pl in (r.src, r.dst):
                p = pl.placements[a]
                if isinstance(p, Shard) and r.value in shapes:
                    split.append(shapes[r.value][p.dim])
    return (PAIRED_AXIS,) if split and all(pairs_chunks(n, ways) for n in split) else ()


def _whole_shapes(graph: Graph) -> dict[str, tuple[int, ...]]:
    """value name -> whole shape, for every tensor value (inputs, parameters, single-output nodes)."""
    out = {i.name: tuple(i.spec.shape) for i in graph.inputs if isinstance(i.spec, TensorSpec)}
    out.update((p.name, tuple(p.spec.shape)) for p in graph.params)
    for n in graph.nodes:
        if n.outputs and isinstance(n.outputs[0], TensorSpec) and not n.tuple_output:
            out[n.name] = tuple(n.outputs[0].shape)
    return out


def _placement_note(spec: ShardingSpec | None, mesh: DeviceMesh) -> str:
    if spec is None or spec.is_replicated:
        return ""
    parts = [f"{axis}:{p}" for axis, p in zip(mesh.axis_names, spec.placements, strict=True) if str(p) != "R"]
    return " [" + " ".join(parts) + "]"


def _source_detail(node: Node) -> str:
    """``file.py:LINE: the line's code`` (or as much of it as the node knows)."""
    if node.source and node.source_text:
        return f"{node.source}: {node.source_text}"
    return node.source


@dataclass(frozen=True)
class _Operand:
    """How one operand value reaches an op: redistribution steps, then a gradient all-reduce.

    ``indices`` are the operand positions (among the node's tensor operands, argument order) read this way:
    one value read twice may reach the op in two placements (``matmul(a, a)`` with the first ``a`` split on
    its rows and the second gathered), each with its own steps. ``key`` names the redistributed value and
    ``grad_key`` the value after the gradient all-reduce: ops reading the same value the same way share them
    (one collective, summed gradients)."""

    value: str
    indices: tuple[int, ...]
    steps: tuple[Redistribute, ...]
    fused: tuple[str, ...]  # axes whose all-gather reduce-scatters the (partial) gradient in the backward
    grad_axes: tuple[str, ...]  # axes whose partial gradient is all-reduced (identity forward)
    key: tuple | None
    grad_key: tuple | None


def _tensor_values(graph: Graph) -> set[str]:
    """Names of the tensor values (inputs, parameters, node outputs): a strategy's operands, as the planner
    counts them (symbolic sizes are not operands)."""
    out = {i.name for i in graph.inputs if isinstance(i.spec, TensorSpec)} | {p.name for p in graph.params}
    out |= {n.name for n in graph.nodes if n.outputs and isinstance(n.outputs[0], TensorSpec) and not n.tuple_output}
    return out


def _operand_plans(
    node: Node, strategy: NodeStrategy, train: bool, deferred: set[str], param_keys: dict[str, str],
    tensors: set[str],
) -> list[_Operand]:  # fmt: skip
    operands = [v for v in tensor_operands(node) if v in tensors] if node.op != "getitem" else []
    grad = dict(strategy.grad_reduce) if train else {}
    ways: dict[tuple, list[int]] = {}
    for index, value in enumerate(operands):
        target = strategy.inputs[index] if index < len(strategy.inputs) else None
        ways.setdefault((value, target, tuple(grad.get(index, ()))), []).append(index)
    out: list[_Operand] = []
    for (value, target, axes), indices in ways.items():
        # the steps that bring this value to this operand's placement (each step records its target spec;
        # operands that read one value the same way each listed the same steps)
        steps = tuple(dict.fromkeys(r for r in strategy.redistributes if r.value == value and r.dst == target))
        if param_keys.get(value) in deferred and not steps:
            axes = ()
        fused = tuple(r.axis for r in steps if r.collective == "allgather" and r.axis in axes)
        remaining = tuple(a for a in axes if a not in fused)
        key = (value, target, fused) if steps else None
        grad_key = (value, target, fused, remaining) if remaining else None
        out.append(_Operand(value, tuple(indices), steps, fused, remaining, key, grad_key))
    return out


def _bind(args: tuple[Arg | _Code, ...], kwargs: tuple[tuple[str, Arg], ...], tensors: set[str],
          operand_vars: dict[int, str]) -> tuple[tuple[Arg | _Code, ...], tuple[tuple[str, Arg | _Code], ...]]:  # fmt: skip
    """``args``/``kwargs`` with the tensor operand at each position in ``operand_vars`` replaced by that
    variable (positions count tensor operands in argument order, as :func:`tensor_operands` lists them)."""
    counter = [0]

    def sub(a: Arg | _Code) -> Arg | _Code:
        if isinstance(a, Value) and a.name in tensors:
            index = counter[0]
            counter[0] += 1
            return _Code(operand_vars[index]) if index in operand_vars else a
        if isinstance(a, tuple):
            return tuple(sub(x) for x in a)  # type: ignore[misc]
        return a

    new_args = tuple(sub(a) for a in args)
    new_kwargs = tuple((k, sub(v)) for k, v in kwargs)
    return new_args, new_kwargs  # type: ignore[return-value]


# -- ops computed once, ops not written -------------------------------------------------------------------


def _arg(node: Node, index: int, name: str, default: object = None) -> object:
    if len(node.args) > index:
        return node.args[index]
    return node.kwarg_dict.get(name, default)


def _is_number(a: object, value: float) -> bool:
    return isinstance(a, int | float) and not isinstance(a, bool) and a == value


def _folds_to(node: Node, strategy: NodeStrategy | None, plan: ExecutionPlan, train: bool) -> str | None:
    """The operand value ``node`` returns unchanged (``x + 0``, ``x * 1``, dropout dropping nothing, a
    conversion to the dtype ``x`` has), or None. Only ops that run where their operand is (no collective,
    no gradient reduction) and return a value of its shape and dtype fold (``strategy`` None: whole)."""
    if node.tuple_output or not node.args or not isinstance(node.args[0], Value):
        return None
    if strategy is not None and (strategy.redistributes or (train and strategy.grad_reduce)):
        return None
    x = node.args[0].name
    graph = plan.graph
    try:
        spec = graph.spec_of(x)
    except (KeyError, ValueError):  # a tuple
        return None
    out = node.outputs[0] if node.outputs else None
    if not isinstance(spec, TensorSpec) or not isinstance(out, TensorSpec) or spec != out:
        return None
    if any(p.name == x for p in graph.params) or any(i.name == x for i in graph.inputs):
        return None  # the program never hands out a weight or an input as another value
    op = node.op
    if op in ("aten.add.Tensor", "aten.add.Scalar", "aten.sub.Tensor", "aten.sub.Scalar"):
        alpha = _arg(node, 2, "alpha", 1)
        ok = len(node.args) >= 2 and _is_number(node.args[1], 0) and _is_number(alpha, 1)
        return x if ok and len(node.kwargs) <= (1 if "alpha" in node.kwarg_dict else 0) else None
    if op in ("aten.mul.Tensor", "aten.mul.Scalar", "aten.div.Tensor", "aten.div.Scalar"):
        floating = spec.dtype in ("float32", "float64", "float16", "bfloat16")
        ok = len(node.args) == 2 and not node.kwargs and _is_number(node.args[1], 1)
        return x if ok and (floating or op.startswith("aten.mul")) else None
    if op in _DROPOUTS:
        p, on = _arg(node, 1, "p", 0.5), _arg(node, 2, "train", True)
        return x if _is_number(p, 0) or on is False else None
    if op in ("aten.alias.default", "aten.lift_fresh_copy.default") and len(node.args) == 1:
        return x
    if op in _CONVERSIONS:
        floating = spec.dtype in ("float32", "float64", "float16", "bfloat16")
        return x if plan.precision == "fp32" or not floating else None
    return None


@dataclass
class _Steps:
    """What ``_body`` decided about each step: computed once at build time, or not written (folded)."""

    constant: set[str] = field(default_factory=set)  # steps (nodes or groups) computed at build time
    alias: dict[str, str] = field(default_factory=dict)  # folded node -> the value it returns
    dead: set[str] = field(default_factory=set)  # steps whose values nothing reads


def _plan_steps(
    plan: ExecutionPlan, order: list[str], groups: Mapping[str, FusedGroup], strategies: Mapping[str, NodeStrategy],
    final: set[str],
) -> tuple[list[str], _Steps]:  # fmt: skip
    """(the order without the steps nothing reads, what is decided about the steps): which values are
    shape-only (they depend on no input, no weight and nothing random: computed whole, once, when the
    program is built; a fused group of them runs op by op there) and which ops fold away."""
    graph = plan.graph
    train = plan.mode == "train"
    out = _Steps()
    # values nothing reads (torch.export keeps some): not written
    needed = set(final)
    for item in reversed(order):
        made = groups[item].outputs if item in groups else (item,)
        if any(v in needed for v in made):
            needed.update(groups[item].inputs if item in groups else graph.node(item).inputs)
        else:
            out.dead.add(item)
    inputs = {i.name for i in graph.inputs} | {p.name for p in graph.params}
    constant: set[str] = set()  # constant values

    def is_constant(node: Node) -> bool:
        reads = [v.name for a in (*node.args, *(v for _, v in node.kwargs)) for v in iter_values(a)]
        if node.name in final or any(v in inputs or v not in constant for v in reads):
            return False
        if draws_random(node) or node.op.startswith("aten.empty"):  # (values drawn, or left uninitialized)
            return False
        return bool(node.tuple_output or (node.outputs and isinstance(node.outputs[0], TensorSpec)))

    kept: list[str] = []
    for item in order:
        if item in out.dead:
            continue
        if item in groups:
            members = [graph.node(n) for n in groups[item].nodes]
            made: set[str] = set()
            for m in members:  # in order: members read each other
                if all(v in constant for v in groups[item].inputs) and is_constant(m):
                    constant.add(m.name)
                    made.add(m.name)
            if len(made) == len(members):
                kept += [m.name for m in members]  # op by op at build time
                out.constant.update(made)
            else:
                constant.difference_update(made)
                kept.append(item)
            continue
        kept.append(item)
        node = graph.node(item)
        folded = _folds_to(node, strategies.get(node.name), plan, train) if node.name not in final else None
        if folded is not None:
            out.alias[node.name] = out.alias.get(folded, folded)
            if folded in constant:
                constant.add(node.name)
        elif is_constant(node):
            out.constant.add(item)
            constant.add(node.name)
    return kept, out


# -- the body ---------------------------------------------------------------------------------------------


def _constant_piece(
    value: str, target: ShardingSpec | None, names: _Names, mesh: DeviceMesh, shared: dict[tuple, str],
    build: list[Statement],
) -> str:  # fmt: skip
    """The variable holding this rank's piece of the whole shape-only ``value`` in placement ``target``
    (split by ``C.shard``, made a partial sum by ``C.to_partial``: no communication), cut once at build
    time; pieces asked for twice are shared."""
    whole = names.var[value]
    steps = []
    expr = whole
    if target is not None:
        for size, axis, p in zip(mesh.shape, mesh.axis_names, target.placements, strict=True):
            if size > 1 and isinstance(p, Shard):
                expr = f"C.shard({expr}, {p.dim}, mesh, {axis!r})"
                steps.append(axis)
            elif size > 1 and isinstance(p, Partial):
                expr = f"C.to_partial({expr}, mesh, {axis!r}, {p.op!r})"
                steps.append(axis)
    if not steps:
        return whole
    key = ("piece", whole, target)
    if key not in shared:
        shared[key] = names.fresh(f"{whole}_{'_'.join(steps)}")
        build.append(Statement("", (f"{shared[key]} = {expr}",)))
    return shared[key]


def _group_pieces(
    group: FusedGroup, graph: Graph, constant_values: set[str], canon: Callable[[str], str],
    strategies: Mapping[str, NodeStrategy], tensors: set[str], names: _Names, mesh: DeviceMesh,
    shared: dict[tuple, str], build: list[Statement],
) -> dict[str, str]:  # fmt: skip
    """Group input -> this rank's piece of it, for the shape-only inputs (computed whole at build time): cut
    in the placement the group's first member reading it reads it in (a group's members read their operands
    without redistribution), as a single op's operand is (``_constant_piece``)."""
    pieces: dict[str, str] = {}
    for v in group.inputs:
        if canon(v) not in constant_values:
            continue
        for member in group.nodes:
            strategy = strategies.get(member)
            operands = [o for o in tensor_operands(graph.node(member)) if o in tensors]
            if strategy is None or v not in operands:
                continue
            index = operands.index(v)
            target = strategy.inputs[index] if index < len(strategy.inputs) else None
            pieces[v] = _constant_piece(canon(v), target, names, mesh, shared, build)
            break
    return pieces


@dataclass
class _Body:
    build: list[Statement]  # shape-only values, computed when the program is built
    compute: list[Statement]  # the forward pass
    returns: str


def _group_statement(
    group: FusedGroup, step: int, last_use: dict[str, int], final: set[str], names: _Names, plan: ExecutionPlan,
    placement: dict[str, ShardingSpec | None], kernel: str, alias: Mapping[str, str], pieces: Mapping[str, str],
) -> Statement:  # fmt: skip
    """``outputs = K.<kernel>(inputs)``: a fused group's call (its ops are in kernels.py). ``pieces``: input ->
    the variable holding this rank's piece of it (shape-only values, cut at build time)."""
    args = ", ".join(pieces.get(v) or names.ref(alias.get(v, v)) for v in group.inputs)
    targets = ", ".join(names.var[o] for o in group.outputs)
    lines = [f"{targets} = K.{kernel}({args})"]
    for o in group.outputs:
        s = plan.strategy(o)
        placement[o] = s.outputs[0] if s.outputs else None
    inputs = [alias.get(v, v) for v in group.inputs]
    dead = [
        names.var[v]
        for v in inputs
        if last_use.get(v) == step and v not in final and v in names.var and v not in names.attr
    ]
    if dead:
        lines.append(f"del {', '.join(dict.fromkeys(dead))}")
    nodes = [plan.graph.node(n) for n in group.nodes]
    paths = tuple(dict.fromkeys(n.module_path for n in nodes if n.module_path))
    ops = ", ".join(n.op.split(".")[1] for n in nodes)
    note = _placement_note(placement.get(group.outputs[0]), plan.mesh) if group.outputs else ""
    detail = f"fused {group.kind}: {ops}"
    comment = f"{', '.join(paths) + ' — ' if paths else ''}{detail}{note}"
    return Statement(comment, tuple(lines), nodes=tuple(group.nodes), paths=paths, detail=detail, note=note)


def _in_place_writes(plan: ExecutionPlan, strategies: Mapping[str, NodeStrategy]) -> set[str]:
    """The ops written as an in-place write into their buffer (``Node.in_place``, inference): those that read
    the buffer as it is stored and make its update in that placement (else they run as their functional op
    and the update is written back at the end, as the memory map assumes too)."""
    if plan.mode == "train":
        return set()
    stored = dict(plan.param_placements)
    keys = {p.name: p.key for p in plan.graph.params}
    out = set()
    for node in plan.graph.nodes:
        s = strategies.get(node.name)
        target = node.args[0] if node.args else None
        if not (node.in_place and s is not None and s.inputs and s.outputs and isinstance(target, Value)):
            continue
        placement = stored.get(keys.get(target.name, ""))
        if placement is not None and s.inputs[0] == placement == s.outputs[0]:
            out.add(node.name)
    return out


def _write_in_place(
    node: Node, args: tuple[Arg | _Code, ...], kwargs: tuple[tuple[str, Arg | _Code], ...],
    ref: Mapping[str, str], names: _Names, in_place: set[str],
) -> str | None:  # fmt: skip
    """``buffer.index_copy_(dim, index, source)`` for an op of ``in_place``; None for any other op."""
    if node.name not in in_place or node.op != "aten.index_copy.default" or kwargs:
        return None
    fmt = [_format(a, ref, names) for a in args]
    return f"{fmt[0]}.index_copy_({', '.join(fmt[1:])})"


def _body(plan: ExecutionPlan, names: _Names, kernels: Mapping[str, str]) -> _Body:
    graph, mesh = plan.graph, plan.mesh
    train = plan.mode == "train"
    strategies = {s.node: s for s in plan.strategies}
    deferred = {key for key, _ in plan.param_grad_reduce}
    param_keys = {p.name: p.key for p in graph.params}
    tensors = _tensor_values(graph)
    shapes = _whole_shapes(graph)
    schedules = frozenset(name for name, _ in plan.collective_programs)
    placement: dict[str, ShardingSpec | None] = {}
    # fused groups run as one step each (kernels.py); the order is graph order with each group contracted
    groups = {g.name: g for g in plan.fused_groups}
    check_groups(graph, plan.fused_groups)
    order = schedule(graph, plan.fused_groups) if groups else [n.name for n in graph.nodes]
    in_place = _in_place_writes(plan, strategies)
    final = set(graph.output_names) | {v.name for _, v in graph.buffer_updates if v.name not in in_place}
    order, steps = _plan_steps(plan, order, groups, strategies, final)
    alias = steps.alias

    def canon(v: str) -> str:
        return alias.get(v, v)

    for folded, value in alias.items():  # a folded op's value is its operand's variable
        names.var[folded] = names.var[value]
    # last use of every local variable (folded values count for the value they return)
    last_use: dict[str, int] = {}
    for step, item in enumerate(order):
        if item in alias:
            continue
        for v in groups[item].inputs if item in groups else graph.node(item).inputs:
            last_use[canon(v)] = step
    final = {canon(v) for v in final}
    shared: dict[tuple, str] = {}  # redistributed (or gradient-reduced) operand -> its variable
    last_key: dict[tuple, int] = {}
    for step, item in enumerate(order):
        if item in groups or item in alias:
            continue
        node = graph.node(item)
        for op in _operand_plans(node, strategies[node.name], train, deferred, param_keys, tensors):
            for k in (op.key, op.grad_key):
                if k is not None:
                    last_key[(canon(k[0]), *k[1:])] = step
    shared_last: dict[int, list[tuple]] = {}
    for k, step in last_key.items():
        shared_last.setdefault(step, []).append(k)
    build: list[Statement] = []
    body: list[Statement] = []
    if train and graph.buffer_updates:
        # buffers updated in the forward (BatchNorm statistics) are read from copies: autograd saved what
        # the forward read, and the update must not change it before the backward
        lines = []
        for key, _ in dict.fromkeys(graph.buffer_updates):
            p = graph.param_by_key(key)
            if p.name not in names.read:
                names.read[p.name] = names.fresh(f"{names.attr[p.name]}_read")
                lines.append(f"{names.read[p.name]} = self.{names.attr[p.name]}.clone()")
        body.append(Statement("buffers updated by this step, read before the update", tuple(lines)))
    for i, spec in zip(graph.inputs, plan.input_placements, strict=True):
        placement[i.name] = spec
        lines = []
        for a, (axis, p) in enumerate(zip(mesh.axis_names, spec.placements, strict=True)):
            if isinstance(p, Shard) and mesh.shape[a] > 1:
                v = names.ref(i.name)
                lines.append(f"{v} = C.shard({v}, {p.dim}, mesh, {axis!r})")
        if lines:
            body.append(Statement(f"input {i.name}: this rank's part of the batch", tuple(lines)))
    constant_values = set(steps.constant) | {v for v, src in alias.items() if src in steps.constant}
    built: dict[str, str] = {}  # expression of a shape-only value -> its variable
    for step, item in enumerate(order):
        if item in alias:
            placement[item] = placement.get(alias[item])
            continue
        if item in groups:
            kernel = kernels.get(item, item)
            pieces = _group_pieces(
                groups[item], graph, constant_values, canon, strategies, tensors, names, mesh, shared, build
            )
            body.append(_group_statement(
                groups[item], step, last_use, final, names, plan, placement, kernel, alias, pieces
            ))  # fmt: skip
            continue
        node = graph.node(item)
        strategy = strategies[node.name]
        placement[node.name] = strategy.outputs[0] if strategy.outputs and not node.tuple_output else None
        lines: list[str] = []
        operand_vars: dict[int, str] = {}
        # folded values are their operand's variable; ``ref`` also names operands after their collectives
        folded = {v: names.var[canon(v)] for v in node.inputs if v in alias}
        ref: dict[str, str] = dict(folded)
        if item in steps.constant:  # the whole value, once, when the program is built
            detail = _source_detail(node)
            paths = (node.module_path,) if node.module_path else ()
            expr = _call(node, node.args, ref, names)
            if expr in built:  # the same value made twice (torch.export repeats them): made once
                names.var[node.name] = built[expr]
                continue
            built[expr] = names.var[node.name]
            build.append(Statement(detail, (f"{names.var[node.name]} = {expr}",), nodes=(item,), paths=paths,
                                   detail=detail))  # fmt: skip
            continue
        # redistributions, then gradient reductions of operands each rank only sees part of; ops reading
        # a value the same way share one collective (freed after its last reader)
        operands = [v for v in tensor_operands(node) if v in tensors] if node.op != "getitem" else []
        for index, value in enumerate(operands):
            if canon(value) in constant_values:
                # this rank's piece of a shape-only value, in the placement the op reads it: cut at build time
                target = strategy.inputs[index] if index < len(strategy.inputs) else None
                piece = _constant_piece(canon(value), target, names, mesh, shared, build)
                operand_vars[index] = piece
        for op in _operand_plans(node, strategy, train, deferred, param_keys, tensors):
            value = canon(op.value)
            if value in constant_values:
                continue
            current = ref.get(op.value) or names.ref(value)
            key = (value, *op.key[1:]) if op.key is not None else None
            grad_key = (value, *op.grad_key[1:]) if op.grad_key is not None else None
            if key is not None:
                if key not in shared:
                    new = names.fresh(f"{current.removeprefix('self.')}_{op.steps[-1].collective.split('+')[0]}")
                    expr = current
                    for r in op.steps:
                        expr = _collective_call(
                            r, expr, mesh, partial_grad=r.axis in op.fused, shape=shapes.get(r.value),
                            schedules=schedules,
                        )  # fmt: skip
                    lines.append(f"{new} = {expr}")
                    shared[key] = new
                current = shared[key]
            if grad_key is not None:
                if grad_key not in shared:
                    new = names.fresh(f"{current.removeprefix('self.')}_g")
                    lines.append(f"{new} = C.grad_all_reduce({current}, mesh, {op.grad_axes!r})")
                    shared[grad_key] = new
                current = shared[grad_key]
            if current != names.ref(op.value):
                ref[op.value] = current
                operand_vars.update((i, current) for i in op.indices)
        if node.op == "sym_size":
            src = node.args[0]
            assert isinstance(src, Value)
            dim = int(node.args[1])  # type: ignore[arg-type]
            factor = _shard_factors(placement.get(src.name), mesh, 0).get(dim, 1)
            whole = shapes.get(src.name)
            if factor > 1 and whole is not None and whole[dim] % factor:
                expr = str(whole[dim])  # uneven pieces: the whole size is not this piece's size times the ways
            else:
                expr = f"{_format(src, ref, names)}.size({dim})" + (f" * {factor}" if factor > 1 else "")
        else:
            args = _localize_sizes(node, strategy, mesh, names)
            args, kwargs = _bind(args, node.kwargs, tensors, operand_vars)
            expr = (
                _write_in_place(node, args, kwargs, folded, names, in_place)
                or _sharded_cross_entropy(node, strategy, args, names, mesh, shapes)
                or _expert_parallel(node, strategy, args, names, mesh)
                or _context_attention(node, strategy, args, kwargs, names)
                or _call(node, args, folded, names, kwargs)
            )
        target = names.var[node.name]
        lines.append(f"{target} = {expr}")
        dead = [
            names.var[canon(v)]
            for v in node.inputs
            if last_use.get(canon(v)) == step and canon(v) not in final and canon(v) in names.var
            and canon(v) not in names.attr
        ]  # fmt: skip
        dead += [shared.pop(k) for k in shared_last.get(step, ()) if k in shared]
        if dead:
            lines.append(f"del {', '.join(dict.fromkeys(dead))}")
        note = _placement_note(placement.get(node.name), mesh)
        detail = _source_detail(node)
        paths = (node.module_path,) if node.module_path else ()
        comment = f"{node.module_path}{note}".strip()
        comment = f"{comment} — {detail}" if comment and detail else comment or detail
        body.append(Statement(comment, tuple(lines), nodes=(node.name,), paths=paths, detail=detail, note=note))
    # outputs: gathered so that every rank returns whole tensors
    out_strategy = strategies.get(OUTPUT_NODE)
    ref = {}
    lines = []
    if out_strategy is not None:
        for r in out_strategy.redistributes:
            source = canon(r.value)
            current = ref.get(r.value, names.ref(source))
            new = names.fresh(f"{names.ref(source).removeprefix('self.')}_{r.collective.split('+')[0]}")
            call = _collective_call(r, current, mesh, shape=shapes.get(r.value), schedules=schedules)
            lines.append(f"{new} = {call}")
            ref[r.value] = new
    written = [(key, v) for key, v in graph.buffer_updates if v.name not in in_place]
    if written:  # written as stored (BatchNorm statistics; a KV cache not written in place)
        lines.append("with torch.no_grad():")
        for key, v in written:
            attr = names.attr[graph.param_by_key(key).name]
            lines.append(f"    self.{attr}.copy_({ref.get(v.name, names.ref(canon(v.name)))})")
    if lines:
        what = "; the buffers this step updates, written as stored" if written else ""
        body.append(Statement(f"outputs: whole on every rank{what}", tuple(lines)))
    for a in graph.outputs:
        for v in iter_values(a):
            if v.name in alias and v.name not in ref:
                ref[v.name] = names.ref(canon(v.name))
    outs = [_format(a, ref, names) for a in graph.outputs]
    returns = outs[0] if len(outs) == 1 else "(" + ", ".join(outs) + ("," if len(outs) == 1 else "") + ")"
    return _Body(build, body, returns)


_MODULE_ATTRIBUTES = {
    "rank", "world_size", "device", "mesh", "optimizer", "sharded_optimizer", "gradient_reducer", "loss_scale",
    "training", "compute", "infer", "forward", "train_step", "weights", "build_constants",
}  # fmt: skip


def _hoist_constants(body: _Body, taken: set[str]) -> tuple[list[Statement], list[Statement], dict[str, str]]:
    """(build statements, compute statements, buffer attribute per variable): the shape-only values the
    forward reads become buffers (``self.<name>``) made by the build statements; ``del`` of them goes."""
    made = {v for s in body.build for v in uses(s.code()).sets}
    read: dict[str, None] = {}
    for s in body.compute:
        for v in uses(s.code()).reads:
            if v in made:
                read.setdefault(v, None)
    for v in uses([f"_ = {body.returns}"]).reads:
        if v in made:
            read.setdefault(v, None)
    buffers = {}
    for v in read:
        attr = v if v not in _MODULE_ATTRIBUTES and not v.startswith("_") else f"{v}_const"
        while attr in taken - {v}:
            attr += "_"
        buffers[v] = attr
    compute = [_drop_deleted(s, made) for s in body.compute]
    compute = [replace(s, lines=tuple(rename("\n".join(s.lines), attributes={}, names={
        v: f"self.{a}" for v, a in buffers.items()}).split("\n")) if s.lines else ()) for s in compute]  # fmt: skip
    build = _free_after_last_use(body.build, set(buffers))
    if buffers:
        lines = [f'self.register_buffer("{a}", {v}, persistent=False)' for v, a in buffers.items()]
        build.append(Statement("kept for every forward pass (not part of the weights)", tuple(lines)))
    return build, [s for s in compute if s.lines or s.body], buffers


def _free_after_last_use(statements: list[Statement], kept: set[str]) -> list[Statement]:
    """``statements`` with ``del`` after the last use of every name they make but ``kept``."""
    made: dict[str, int] = {}
    last: dict[str, int] = {}
    for k, s in enumerate(statements):
        u = uses(s.code())
        for v in u.reads:
            last[v] = k
        for v in u.sets:
            made.setdefault(v, k)
    dead: dict[int, list[str]] = {}
    for v, k in made.items():
        if v not in kept:
            dead.setdefault(last.get(v, k), []).append(v)
    return [replace(s, lines=(*s.lines, f"del {', '.join(dead[k])}")) if k in dead else s
            for k, s in enumerate(statements)]  # fmt: skip


def _drop_deleted(s: Statement, gone: set[str]) -> Statement:
    lines = []
    for line in s.lines:
        if line.startswith("del "):
            kept = [v.strip() for v in line[4:].split(",") if v.strip() not in gone]
            if not kept:
                continue
            line = f"del {', '.join(kept)}"
        lines.append(line)
    return replace(s, lines=tuple(lines))


def _indented(lines: list[str], indent: str) -> str:
    return "\n".join(wrap_lines([f"{indent}{line}" if line else "" for line in lines], WIDTH))




def _function_source(fn: Function) -> str:
    """A subgraph of a higher-order op as a module-level function: one statement per op, values named
    ``v_<name>``; a device argument is the device type itself (the function has no ``self``)."""
    local = {v: f"v_{_identifier(v)}" for v in list(fn.params) + [n.name for n in fn.nodes]}

    def own(a: Arg) -> Arg | _Code:
        if isinstance(a, Const) and a.kind == "device":
            return _Code(f'torch.device("{a.value}")')
        if isinstance(a, tuple):
            return tuple(own(x) for x in a)  # type: ignore[misc]
        return a

    lines = [f"def {fn.name}({', '.join(local[p] for p in fn.params)}):"]
    for node in fn.nodes:
        args = tuple(own(a) for a in node.args)
        kwargs = tuple((k, own(v)) for k, v in node.kwargs)
        lines.append(f"    {local[node.name]} = {_call(node, args, local, _Names.empty(), kwargs)}")  # type: ignore[arg-type]
    out = fn.output
    names = _Names.empty()
    if isinstance(out, tuple):
        ret = "(" + "".join(_format(o, local, names) + ", " for o in out) + ")"
    else:
        ret = _format(out, local, names)
    lines.append(f"    return {ret}")
    return "\n".join(wrap_lines(lines, WIDTH))


def _libraries(graph: Graph) -> list[str]:
    """The modules to import for the custom ops the program calls (checked: they are written as code)."""
    bad = [m for m in graph.libraries if not _MODULE_NAME.match(m)]
    if bad:
        raise ValueError(f"not a Python module name: {bad[0]!r}")
    return list(graph.libraries)


def render_program(plan: ExecutionPlan, *, version: str, plan_id: str, shared: bool = False) -> str:
    """The generated module ``program.py`` for ``plan``; ``shared``: its ``Program`` may take its tensors and
    mesh from another program of the same model (``share=``: generation's prefill and decode programs)."""
    from shardwise.codegen.kernels.render import kernel_names

    graph, mesh = plan.graph, plan.mesh
    names = _Names(graph)
    names.taken |= {fn.name for fn in graph.functions}  # module-level functions of higher-order ops
    kernels = kernel_names(plan) if plan.fused_groups else {}
    emitted = _body(plan, names, kernels)
    build, compute, buffers = _hoist_constants(emitted, set(names.taken))
    inputs = [names.ref(i.name) for i in graph.inputs]
    # ranges (checkpointing, offload) find their statements by the variables of their ops
    real_var = {n: v for n, v in names.var.items() if n in {x.name for x in graph.nodes}}
    if plan.recompute:  # ranges recomputed in the backward (passes.remat): run under torch.utils.checkpoint
        ranges = recompute_ranges(plan, real_var, names.fresh)
        compute = checkpoint_ranges(compute, emitted.returns, ranges, inputs)
    compute = save_activations_on_host(plan, compute, real_var)  # plan.tiers (passes.offload)
    layered = outline(plan, compute, emitted.returns, inputs, names.attr, set(names.taken) | set(buffers.values()))
    tables = program_tables(plan, names.attr)
    code = "\n".join([*layered.compute, f"return {layered.returns}"])
    uses_mesh = re.search(r"(?<![\w.])mesh\b", code) is not None
    compute_lines = (["mesh = self.mesh"] if uses_mesh else []) + layered.compute + [f"return {layered.returns}"]
    build_lines = render_statements(build)
    build_uses_mesh = re.search(r"(?<![\w.])mesh\b", "\n".join(build_lines)) is not None
    if build_uses_mesh:
        build_lines = ["mesh = self.mesh", *build_lines]
    subgraphs = [_function_source(fn) for fn in graph.functions]
    everything = "\n".join([code, "\n".join(build_lines), *layered.functions, *subgraphs])
    degrees = ", ".join(f"{k}={v}" for k, v in plan.degrees.items())
    return template_env().get_template("program.py.j2").render(
        title=f"{plan.model_name} on {plan.cluster_name}: one rank's program.",
        version=version,
        plan_id=plan_id,
        degrees=degrees,
        mode=plan.mode,
        precision=plan.precision,
        passes=", ".join(plan.passes),
        mesh_shape=repr(tuple(mesh.shape)),
        mesh_axes=repr(tuple(mesh.axis_names)),
        mesh_ranks=repr(tuple(mesh.ranks)),
        mesh_paired=repr(paired_axes(plan)) if paired_axes(plan) else "",
        mesh_combined=repr(combined_axes(plan)) if combined_axes(plan) else "",
        zero_axes=repr(zero_axes(plan)),
        tables="\n".join(wrap_lines(tables, WIDTH)),
        training=repr(plan.mode == "train"),
        zero_stage=plan.zero_stage,
        offload_optimizer=repr(offloads_optimizer(plan)),
        model_name=plan.model_name,
        shared=shared,
        fused=bool(plan.fused_groups),
        aten=uses_aten(everything),
        functional=re.search(r"(?<![\w.])F\.", everything) is not None,
        namespace=bool(layered.functions),
        libraries=_libraries(graph),
        subgraphs=subgraphs,
        inputs=inputs,
        functions="\n\n\n".join(layered.functions),
        weight_tables="\n".join(wrap_lines(layered.tables, WIDTH)),
        build=_indented(build_lines, " " * 8) if build_lines else "",
        body=_indented(compute_lines, " " * 8),
    )
