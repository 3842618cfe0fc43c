"""ExecutionPlan → the Python source of one rank's program. Every decision is made here; the template
(templates/program.py.j2) only lays the statements out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import jinja2

from shardwise.codegen.offload import offloads_optimizer, save_activations_on_host
from shardwise.codegen.recompute import checkpoint_ranges, recompute_ranges
from shardwise.ir.fusion import FusedGroup, check_groups, schedule
from shardwise.ir.graph import Arg, Const, Function, Graph, Node, Value
from shardwise.ir.placement import DeviceMesh, Partial, Shard, ShardingSpec
from shardwise.ir.plan import ExecutionPlan, NodeStrategy, Redistribute
from shardwise.ir.registry import SYM_FUNCTIONS, tensor_operands
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
_BINARY_INFIX = {"aten.add.Tensor": "+", "aten.sub.Tensor": "-", "aten.mul.Tensor": "*", "aten.div.Tensor": "/"}
_METHODS = {
    # a view of a sharded value may see other strides than the whole value had (a collective's or a
    # kernel's output): reshape is the same view when the strides allow it, a copy otherwise
    "aten.view.default": "reshape",
    "aten._unsafe_view.default": "reshape",
    "aten.reshape.default": "reshape",
    "aten.transpose.int": "transpose",
    "aten.permute.default": "permute",
    "aten.unsqueeze.default": "unsqueeze",
    "aten.expand.default": "expand",
}
_FUNCTIONAL = {
    "aten.linear.default": "F.linear",
    "aten.layer_norm.default": "F.layer_norm",
    "aten.scaled_dot_product_attention.default": "F.scaled_dot_product_attention",
    "aten.silu.default": "F.silu",
    "aten.relu.default": "F.relu",
    "aten.tanh.default": "torch.tanh",
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


@dataclass(frozen=True)
class Statement:
    comment: str
    lines: tuple[str, ...]


class _Code(str):
    """A Python expression to emit as is."""


def template_env() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("shardwise.codegen", "templates"),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )


def _identifier(text: str) -> str:
    name = re.sub(r"[^0-9a-zA-Z_]", "_", text).strip("_")
    name = re.sub(r"_+", "_", name)
    if not name or name[0].isdigit():
        name = "v_" + name
    return name


_RESERVED = {"self", "mesh", "torch", "nn", "F", "C", "K", "aten", "loss"}


class _Names:
    """Readable, unique variable names: the module path, then the op when a module makes several values."""

    def __init__(self, graph: Graph) -> None:
        self.var: dict[str, str] = {}
        self.taken: set[str] = set(_RESERVED)
        self.attr: dict[str, str] = {}
        self.read: dict[str, str] = {}  # parameter value -> a local copy the program reads instead
        for p in graph.params:
            self.attr[p.name] = _identifier(p.key)
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


def _format(a: Arg | _Code, ref: dict[str, str], names: _Names) -> str:
    if isinstance(a, _Code):
        return str(a)
    if isinstance(a, Value):
        return ref.get(a.name) or names.ref(a.name)
    if isinstance(a, Const):
        if a.kind == "dtype":
            return f"torch.{a.value}"
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
    node: Node, args: tuple[Arg | _Code, ...], ref: dict[str, str], names: _Names,
    kwargs: tuple[tuple[str, Arg | _Code], ...] | None = None,
) -> str:  # fmt: skip
    """The expression for ``node`` with ``args`` (and ``kwargs``, the node's by default); values are named
    by ``ref`` or their own variable (operands bound to another variable by :func:`_bind` are code)."""
    fmt = [_format(a, ref, names) for a in args]
    kw = [f"{k}={_format(v, ref, names)}" for k, v in (node.kwargs if kwargs is None else kwargs)]
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
    if node.op in _BINARY_INFIX and not kw and len(fmt) == 2:
        return f"{fmt[0]} {_BINARY_INFIX[node.op]} {fmt[1]}"
    if node.op in _METHODS and not kw and isinstance(node.args[0], Value):
        rest = fmt[1:]
        if node.op in ("aten.view.default", "aten._unsafe_view.default", "aten.reshape.default", "aten.expand.default",
                       "aten.permute.default"):
            rest = [r[1:-1] if r.startswith("[") and r != "[]" else r for r in rest]  # (a 0-d shape stays [])
        return f"{fmt[0]}.{_METHODS[node.op]}({', '.join(rest)})"
    if node.op == "aten.copy.default" and len(fmt) == 2 and not kw:  # (aten.copy has no autograd formula)
        return f"{fmt[1]}.to({fmt[0]}.dtype).expand_as({fmt[0]}).clone()"
    if node.op == "aten.embedding.default" and len(fmt) == 2 and not kw:
        return f"F.embedding({fmt[1]}, {fmt[0]})"
    if node.op == "aten.layer_norm.default" and not kw:
        return f"F.layer_norm({', '.join(fmt[:5])})"  # aten's sixth argument (cudnn_enable) is not F's
    if node.op in _FUNCTIONAL and node.op != "aten.layer_norm.default":
        return f"{_FUNCTIONAL[node.op]}({', '.join(fmt + kw)})"
    if node.op.startswith("higher_order."):  # torch.cond and the like, called whole as eager PyTorch does
        return f"torch.ops.higher_order.{node.op.split('.', 1)[1]}({', '.join(fmt + kw)})"
    ns, name, overload = node.op.split(".", 2) if node.op.count(".") >= 2 else ("aten", node.op, "default")
    return f"torch.ops.{ns}.{name}.{overload}({', '.join(fmt + kw)})"


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


def _group_statement(
    group: FusedGroup, step: int, last_use: dict[str, int], final: set[str], names: _Names, plan: ExecutionPlan,
    placement: dict[str, ShardingSpec | None],
) -> Statement:  # fmt: skip
    """``outputs = K.<group>(inputs)``: a fused group's call (its ops are in kernels.py)."""
    args = ", ".join(names.ref(v) for v in group.inputs)
    targets = ", ".join(names.var[o] for o in group.outputs)
    lines = [f"{targets} = K.{group.name}({args})"]
    for o in group.outputs:
        s = plan.strategy(o)
        placement[o] = s.outputs[0] if s.outputs else None
    dead = [
        names.var[v]
        for v in group.inputs
        if last_use.get(v) == step and v not in final and v in names.var and v not in names.attr
    ]
    if dead:
        lines.append(f"del {', '.join(dict.fromkeys(dead))}")
    nodes = [plan.graph.node(n) for n in group.nodes]
    paths = ", ".join(dict.fromkeys(n.module_path for n in nodes if n.module_path))
    ops = ", ".join(n.op.split(".")[1] for n in nodes)
    note = _placement_note(placement.get(group.outputs[0]), plan.mesh) if group.outputs else ""
    comment = f"{paths + ' — ' if paths else ''}fused {group.kind}: {ops}{note}"
    return Statement(comment, tuple(lines))


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


def _body(plan: ExecutionPlan, names: _Names) -> tuple[list[Statement], str]:
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
    # last use of every local variable, to free activations as soon as possible
    last_use: dict[str, int] = {}
    for step, item in enumerate(order):
        for v in groups[item].inputs if item in groups else graph.node(item).inputs:
            last_use[v] = step
    final = set(graph.output_names) | {v.name for _, v in graph.buffer_updates}
    shared: dict[tuple, str] = {}  # redistributed (or gradient-reduced) operand -> its variable
    last_key: dict[tuple, int] = {}
    for step, item in enumerate(order):
        if item in groups:
            continue
        node = graph.node(item)
        for op in _operand_plans(node, strategies[node.name], train, deferred, param_keys, tensors):
            for k in (op.key, op.grad_key):
                if k is not None:
                    last_key[k] = step
    shared_last: dict[int, list[tuple]] = {}
    for k, step in last_key.items():
        shared_last.setdefault(step, []).append(k)
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
    for step, item in enumerate(order):
        if item in groups:
            body.append(_group_statement(groups[item], step, last_use, final, names, plan, placement))
            continue
        node = graph.node(item)
        strategy = strategies[node.name]
        lines: list[str] = []
        ref: dict[str, str] = {}
        operand_vars: dict[int, str] = {}
        # redistributions, then gradient reductions of operands each rank only sees part of; ops reading
        # a value the same way share one collective (freed after its last reader)
        for op in _operand_plans(node, strategy, train, deferred, param_keys, tensors):
            current = names.ref(op.value)
            if op.key is not None:
                if op.key not in shared:
                    new = names.fresh(f"{current.removeprefix('self.')}_{op.steps[-1].collective.split('+')[0]}")
                    expr = current
                    for r in op.steps:
                        expr = _collective_call(
                            r, expr, mesh, partial_grad=r.axis in op.fused, shape=shapes.get(r.value),
                            schedules=schedules,
                        )  # fmt: skip
                    lines.append(f"{new} = {expr}")
                    shared[op.key] = new
                current = shared[op.key]
            if op.grad_key is not None:
                if op.grad_key not in shared:
                    new = names.fresh(f"{current.removeprefix('self.')}_g")
                    lines.append(f"{new} = C.grad_all_reduce({current}, mesh, {op.grad_axes!r})")
                    shared[op.grad_key] = new
                current = shared[op.grad_key]
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
            expr = _sharded_cross_entropy(node, strategy, args, names, mesh, shapes) or _call(node, args, {}, names, kwargs)
        target = names.var[node.name]
        lines.append(f"{target} = {expr}")
        placement[node.name] = strategy.outputs[0] if strategy.outputs and not node.tuple_output else None
        dead = [
            names.var[v]
            for v in node.inputs
            if last_use.get(v) == step and v not in final and v in names.var and v not in names.attr
        ]
        dead += [shared.pop(k) for k in shared_last.get(step, ()) if k in shared]
        if dead:
            lines.append(f"del {', '.join(dict.fromkeys(dead))}")
        where = " — ".join(x for x in (node.module_path, node.source) if x)
        comment = f"{where}{_placement_note(placement.get(node.name), mesh)}" if where else ""
        body.append(Statement(comment, tuple(lines)))
    # outputs: gathered so that every rank returns whole tensors
    out_strategy = strategies.get(OUTPUT_NODE)
    ref = {}
    lines = []
    if out_strategy is not None:
        for r in out_strategy.redistributes:
            current = ref.get(r.value, names.ref(r.value))
            new = names.fresh(f"{names.ref(r.value)}_{r.collective.split('+')[0]}")
            call = _collective_call(r, current, mesh, shape=shapes.get(r.value), schedules=schedules)
            lines.append(f"{new} = {call}")
            ref[r.value] = new
    if train and graph.buffer_updates:
        lines.append("with torch.no_grad():")
        for key, v in graph.buffer_updates:
            attr = names.attr[graph.param_by_key(key).name]
            lines.append(f"    self.{attr}.copy_({ref.get(v.name, names.ref(v.name))})")
    if lines:
        body.append(Statement("outputs: whole on every rank", tuple(lines)))
    outs = [_format(a, ref, names) for a in graph.outputs]
    returns = outs[0] if len(outs) == 1 else "(" + ", ".join(outs) + ("," if len(outs) == 1 else "") + ")"
    return body, returns


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
    ret = "(" + "".join(_format(o, local, names) + ", " for o in out) + ")" if isinstance(out, tuple) else _format(out, local, names)
    lines.append(f"    return {ret}")
    return "\n".join(lines)


def _libraries(graph: Graph) -> list[str]:
    """The modules to import for the custom ops the program calls (checked: they are written as code)."""
    bad = [m for m in graph.libraries if not _MODULE_NAME.match(m)]
    if bad:
        raise ValueError(f"not a Python module name: {bad[0]!r}")
    return list(graph.libraries)


def render_program(plan: ExecutionPlan, *, version: str, plan_id: str) -> str:
    """The generated module ``program.py`` for ``plan``."""
    graph, mesh = plan.graph, plan.mesh
    names = _Names(graph)
    body, returns = _body(plan, names)
    if plan.recompute:  # ranges recomputed in the backward (passes.remat): run under torch.utils.checkpoint
        ranges = recompute_ranges(plan, names.var, names.fresh)
        body = checkpoint_ranges(body, returns, ranges, [names.ref(i.name) for i in graph.inputs], Statement)
    body = save_activations_on_host(plan, body, names.var, Statement)  # plan.tiers (passes.offload)
    placements = dict(plan.param_placements)
    tensors = []
    for p in graph.params:
        spec = placements.get(p.key)
        splits = []
        if spec is not None:
            for axis, pl in zip(mesh.axis_names, spec.placements, strict=True):
                if isinstance(pl, Shard):
                    splits.append((axis, pl.dim))
        tensors.append(
            {
                "key": p.key,
                "attr": names.attr[p.name],
                "shape": repr(tuple(p.spec.shape)),
                "dtype": p.spec.dtype,
                "kind": p.kind if p.kind == "parameter" else "buffer",
                "placements": repr(tuple(splits)),
            }
        )
    aliases = {p.key: p.aliases for p in graph.params if p.aliases}
    parts = {p.key: (p.part_of, *p.part) for p in graph.params if p.part_of}
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
        tensors=tensors,
        aliases=repr(aliases),
        parts=repr(parts),
        training=repr(plan.mode == "train"),
        zero_stage=plan.zero_stage,
        offload_optimizer=repr(offloads_optimizer(plan)),
        grad_reduce=repr(dict(plan.param_grad_reduce)),
        model_name=plan.model_name,
        fused=bool(plan.fused_groups),
        libraries=_libraries(graph),
        functions=[_function_source(fn) for fn in graph.functions],
        inputs=[names.ref(i.name) for i in graph.inputs],
        body=body,
        returns=returns,
    )
