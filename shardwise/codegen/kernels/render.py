"""A plan's fused groups → the generated ``kernels.py``: per group a Triton kernel, its launcher, the eager
PyTorch equivalent and a function that picks one. Every decision is made here; templates/kernels.py.j2
lays the code out.

Kernel shapes (both read inputs through broadcast strides, so views and broadcasts cost no copy):
- elementwise: the domain is flattened; each program handles ``POINTWISE_BLOCK`` elements, the last one
  masked; an element's coordinates are recovered from its flat index to address every input;
- row-wise (reduction, softmax, layernorm, rmsnorm): one program per row of the last dimension, ``BLOCK``
  the next power of two of the row length, lanes past the row masked; reductions run over the row.
The eager function is the same statements the unfused program would run (emit's own formatting), so on
CPU the fused program computes bit for bit what the unfused one does.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass

from shardwise.codegen.blocks import _relative_name, _relative_path
from shardwise.codegen.emit import _call, _Names, template_env
from shardwise.codegen.kernels.lower import lower_node
from shardwise.codegen.pysource import WIDTH, identifier, wrap_lines
from shardwise.codegen.spelling import uses_aten
from shardwise.codegen.tables import layer_of, repeated_family
from shardwise.ir.fusion import FusedGroup, check_groups
from shardwise.ir.graph import Node
from shardwise.ir.placement import ShardingSpec
from shardwise.ir.plan import ExecutionPlan
from shardwise.ir.registry import tensor_operands
from shardwise.ir.tensor import TensorSpec

__all__ = ["render_kernels", "kernel_names", "POINTWISE_BLOCK", "MAX_ROW", "GroupCode", "group_code"]

POINTWISE_BLOCK = 1024
MAX_ROW = 32768
_FLOATS = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class GroupCode:
    """What the template needs for one group (all strings and lists of source lines)."""

    name: str
    kind: str
    summary: str
    where: tuple[str, ...]
    doc: str
    params: tuple[str, ...]
    dtypes: str
    input_specs: str
    output_specs: str
    eager_lines: tuple[str, ...]
    eager_returns: str
    rowwise: bool
    kernel_params: tuple[str, ...]
    kernel_lines: tuple[str, ...]
    launch_params: tuple[str, ...]
    shapes_of: str
    alloc_lines: tuple[str, ...]
    launch_args: tuple[str, ...]
    launch_returns: str


class _Local:
    """Local (this rank's) shape of any value of a plan."""

    def __init__(self, plan: ExecutionPlan) -> None:
        self.plan = plan
        self.placement: dict[str, ShardingSpec | None] = {}
        for i, p in zip(plan.graph.inputs, plan.input_placements, strict=True):
            self.placement[i.name] = p
        keyed = dict(plan.param_placements)
        for prm in plan.graph.params:
            self.placement[prm.name] = keyed.get(prm.key)
        for s in plan.strategies:
            self.placement[s.node] = s.outputs[0] if s.outputs else None

    def spec(self, value: str) -> TensorSpec:
        spec = self.plan.graph.spec_of(value)
        assert isinstance(spec, TensorSpec), value
        p = self.placement.get(value)
        if p is None:
            return spec
        return TensorSpec(p.local_shape(spec.shape, self.plan.mesh), spec.dtype)


_MODULE_NAMES = {"math", "os", "torch", "F", "triton", "tl", "inputs", "shape", "KERNELS", "GROUPS"}


def _param(name: str) -> str:
    return name + "_" if name in _MODULE_NAMES else name


def _specs(specs: list[TensorSpec]) -> str:
    return "(" + "".join(f"({tuple(s.shape)!r}, {s.dtype!r}), " for s in specs) + ")"


def _index_lines(rank: int, flat: str, prefix: str) -> list[str]:
    """Coordinates ``{prefix}0..`` of the flat index ``flat`` over sizes ``size0..size{rank-1}``."""
    if rank == 0:
        return []
    if rank == 1:
        return [f"{prefix}0 = {flat}"]
    lines = [f"rem = {flat}"]
    for d in range(rank - 1, 0, -1):
        lines.append(f"{prefix}{d} = rem % size{d}")
        lines.append(f"rem = rem // size{d}")
    lines.append(f"{prefix}0 = rem")
    return lines


def _value_names(
    group: FusedGroup, names: _Names, relative: Callable[[str], str], canonical: bool
) -> tuple[tuple[str, ...], dict[str, str]]:
    """(parameter names, member value -> variable) of a group's eager function: the program's names made
    relative to the group's layer (unique), or numbered (``canonical``: to compare groups by structure)."""
    if canonical:
        return tuple(f"p{k}" for k in range(len(group.inputs))), {n: f"v{j}" for j, n in enumerate(group.nodes)}
    taken = set(_MODULE_NAMES)
    params = []
    for v in group.inputs:
        params.append(_unique(_param(relative(names.ref(v).removeprefix("self."))), taken))
    members = {n: _unique(relative(names.var[n]), taken) for n in group.nodes}
    return tuple(params), members


def _unique(base: str, taken: set[str]) -> str:
    name, k = base, 1
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    taken.add(name)
    return name


def group_code(
    plan: ExecutionPlan, group: FusedGroup, names: _Names, local: _Local, *,
    relative: Callable[[str], str] = str, path: Callable[[str], str] = str, canonical: bool = False,
) -> GroupCode:  # fmt: skip
    """The code of one group; ``relative``/``path`` write its names and module paths relative to its layer;
    ``canonical`` numbers its names and leaves out comments (two groups of one structure give equal code)."""
    graph = plan.graph
    members: list[Node] = [graph.node(n) for n in group.nodes]
    rowwise = group.kind != "elementwise"
    in_specs = [local.spec(v) for v in group.inputs]
    out_specs = [local.spec(v) for v in group.outputs]
    domain_rank = max((s.rank for s in in_specs), default=0)
    params, member_names = _value_names(group, names, relative, canonical)
    # eager: emit's own statements, with the group's inputs as parameters
    ref = dict(zip(group.inputs, params, strict=True))
    ref.update(member_names)
    eager_lines: list[str] = []
    last = ""
    # an intermediate value is dropped after its last use in the group, as the unfused program drops it
    # (Python keeps a function's locals until it returns: without the del, every intermediate of a group
    # run eagerly would be alive at once)
    member_names = {m.name for m in members}
    last_use: dict[str, int] = {}
    for k, m in enumerate(members):
        for v in m.inputs:
            if v in member_names:
                last_use[v] = k
    kept = set(group.outputs)
    for k, m in enumerate(members):
        detail = f"{m.source}: {m.source_text}" if m.source and m.source_text else m.source
        where = " — ".join(x for x in (path(m.module_path) if m.module_path else "", detail) if x)
        if where and where != last and not canonical:
            eager_lines.append(f"# {where}")
            last = where
        eager_lines.append(f"{ref[m.name]} = {_call(m, m.args, ref, names)}")
        dead = [ref[v] for v in dict.fromkeys(m.inputs) if last_use.get(v) == k and v not in kept]
        if dead:
            eager_lines.append("del " + ", ".join(dead))
    eager_returns = ", ".join(ref[o] for o in group.outputs)
    # the Triton kernel
    kin = [f"in{k}" for k in range(len(group.inputs))]
    kout = [f"out{k}" for k in range(len(group.outputs))]
    lead = domain_rank - 1 if rowwise else domain_rank
    sizes = [f"size{d}" for d in range(domain_rank)]
    strides = [f"s{k}_{d}" for k in range(len(kin)) for d in range(domain_rank)]
    kernel_params = tuple(kin + kout + ["n_cols" if rowwise else "numel"] + sizes + strides)
    lines = _index_lines(lead, "row" if rowwise else "offs", "i")
    var: dict[str, str] = {}
    bools: set[str] = set()
    for k, (v, spec) in enumerate(zip(group.inputs, in_specs, strict=True)):
        terms = [f"i{d} * s{k}_{d}" for d in range(lead)]
        if rowwise:
            terms.append(f"col * s{k}_{domain_rank - 1}")
        offset = " + ".join(terms) if terms else "offs * 0"  # a 0-d domain: one element, still a block
        load = f"tl.load(in{k} + {offset}, mask=mask, other=0)"
        if spec.dtype == "bool":
            lines.append(f"x{k} = {load} != 0")
            bools.add(f"x{k}")
        else:
            lines.append(f"x{k} = {load}.to(tl.float32)")
        var[v] = f"x{k}"
    for j, m in enumerate(members):
        var[m.name] = f"v{j}"
        first = tensor_operands(m)[0]
        first_spec = graph.spec_of(first)
        x_dtype = first_spec.dtype if isinstance(first_spec, TensorSpec) else "float32"
        lines.extend(lower_node(m, var, bools, f"v{j}", x_dtype))
    reduced = {
        o for o, s in zip(group.outputs, out_specs, strict=True) if rowwise and s.rank and s.shape[-1] == 1
    }
    for o in reduced:
        if not _is_row_scalar(graph, group, o):
            raise ValueError(
                f"{group.name}: output {o} has one column but is not a per-row value: bad fused group"
            )
    for k, o in enumerate(group.outputs):
        if not rowwise:
            lines.append(f"tl.store(out{k} + offs, {var[o]}.to(out{k}.dtype.element_ty), mask=mask)")
        elif o in reduced:
            lines.append(f"tl.store(out{k} + row, {var[o]}.to(out{k}.dtype.element_ty))")
        else:
            lines.append(
                f"tl.store(out{k} + row * n_cols + col, {var[o]}.to(out{k}.dtype.element_ty), mask=mask)"
            )
    # the launcher
    device = "in0.device" if kin else "None"
    alloc = []
    for k, (o, s) in enumerate(zip(group.outputs, out_specs, strict=True)):
        shape = "shape[:-1] + (1,)" if o in reduced else "shape"
        alloc.append(f"out{k} = torch.empty({shape}, dtype=torch.{s.dtype}, device={device})")
    launch_args = tuple(
        kin
        + kout
        + ["n_cols" if rowwise else "numel", "*shape"]
        + [f"*in{k}.expand(shape).stride()" for k in range(len(kin))]
    )
    where_lines = tuple(dict.fromkeys(path(m.module_path) for m in members if m.module_path))
    ops = ", ".join(m.op.split(".")[1] for m in members)
    dtypes = repr(tuple(s.dtype for s in in_specs))
    return GroupCode(
        name=group.name,
        kind=group.kind,
        summary=f"{group.kind}, {len(members)} ops ({ops}); saves {group.bytes_saved} bytes of traffic",
        where=where_lines,
        doc=_doc(f"{group.kind}: {ops}", where_lines),
        params=params,
        dtypes=dtypes,
        input_specs=_specs(in_specs),
        output_specs=_specs(out_specs),
        eager_lines=tuple(eager_lines),
        eager_returns=eager_returns,
        rowwise=rowwise,
        kernel_params=kernel_params,
        kernel_lines=tuple(lines),
        launch_params=tuple(kin),
        shapes_of=", ".join(f"in{k}.shape" for k in range(len(kin))),
        alloc_lines=tuple(alloc),
        launch_args=launch_args,
        launch_returns=", ".join(kout),
    )


def _doc(what: str, where: tuple[str, ...], room: int = 100) -> str:
    """A one-line docstring: what the kernel computes, and where in the model when that fits."""
    full = f"{what} ({', '.join(where)})." if where else f"{what}."
    if len(full) <= room:
        return full
    return f"{what}." if len(what) < room else what[: room - 4].rsplit(",", 1)[0] + ", ..."


def _is_row_scalar(graph, group: FusedGroup, value: str) -> bool:  # type: ignore[no-untyped-def]
    """A reduction's result, or a pointwise result of row scalars only (see passes.fusion.groups)."""
    inside = set(group.nodes)
    scalars: set[str] = set()
    for n in group.nodes:
        node = graph.node(n)
        name = node.op.split(".")[1]
        if name in ("sum", "mean", "amax"):
            scalars.add(n)
        elif name not in ("softmax", "_softmax", "log_softmax", "_log_softmax", "layer_norm", "rms_norm"):
            operands = tensor_operands(node)
            if operands and all(v in scalars and v in inside for v in operands):
                scalars.add(n)
    return value in scalars


def _structure(code: GroupCode) -> tuple:
    """What makes a kernel: its code with numbered names (name, summary and comments left out)."""
    return tuple(v for k, v in vars(code).items() if k not in ("name", "summary", "where", "doc"))


def _layer_naming(plan: ExecutionPlan, group: FusedGroup) -> tuple[Callable[[str], str], Callable[[str], str]]:
    """(variable namer, module path writer) relative to the layer of the group's first op."""
    family = repeated_family(plan.graph)
    layer = layer_of(plan.graph.node(group.nodes[0]).module_path, family) if family else None
    if layer is None:
        return str, str
    family_id = identifier(family)
    parent_id = identifier(family.rpartition(".")[0]) if "." in family else ""
    return (lambda name: _relative_name(name, layer, family_id, parent_id)), (lambda p: _relative_path(p, layer, family))


def kernel_names(plan: ExecutionPlan) -> dict[str, str]:
    """fused group -> the kernel that runs it: groups of one structure (the same ops, arguments, local
    shapes and dtypes) share one kernel, named ``<kind>_<k>`` (the k-th kernel, in order of first use)."""
    check_groups(plan.graph, plan.fused_groups)  # a plan file's groups are checked before any is rendered
    names = _Names(plan.graph)
    local = _Local(plan)
    first: dict[tuple, str] = {}
    out = {}
    for g in plan.fused_groups:
        key = _structure(group_code(plan, g, names, local, canonical=True))
        out[g.name] = first.setdefault(key, f"{g.kind}_{len(first)}")
    return out


def render_kernels(plan: ExecutionPlan, *, version: str, plan_id: str) -> str:
    """The generated module ``kernels.py`` for ``plan`` (call only when ``plan.fused_groups`` is not empty):
    one kernel per structure (see :func:`kernel_names`)."""
    check_groups(plan.graph, plan.fused_groups)
    names = _Names(plan.graph)
    local = _Local(plan)
    kernels = kernel_names(plan)
    users: dict[str, list[str]] = {}
    for g in plan.fused_groups:
        users.setdefault(kernels[g.name], []).append(g.name)
    groups = []
    written: set[str] = set()
    for g in plan.fused_groups:
        if kernels[g.name] in written:
            continue
        written.add(kernels[g.name])
        relative, path = _layer_naming(plan, g)
        code = dataclasses.replace(group_code(plan, g, names, local, relative=relative, path=path), name=kernels[g.name])
        used = users[kernels[g.name]]
        listed = ", ".join(used) if len(used) <= 3 else f"{used[0]}, {used[1]}, ... {used[-1]}"
        runs = f"runs {len(used)} groups ({listed})" if len(used) > 1 else f"runs group {used[0]}"
        if used != [code.name]:  # (the plan's groups it runs, when not just the one it is named after)
            code = dataclasses.replace(code, summary=f"{code.summary}; {runs}")
        groups.append(code)
    eager = "\n".join(line for g in groups for line in g.eager_lines)
    text = template_env().get_template("kernels.py.j2").render(
        aten=uses_aten(eager),
        functional=re.search(r"(?<![\w.])F\.", eager) is not None,
        model_name=plan.model_name,
        version=version,
        plan_id=plan_id,
        groups=groups,
        pointwise_block=POINTWISE_BLOCK,
        max_row=MAX_ROW,
    )
    return "\n".join(wrap_lines(text.split("\n"), WIDTH))
