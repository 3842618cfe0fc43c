"""Automatic placement: candidates per op, costs from the cluster, the ILP, and the plan's strategies.

``place(graph, mesh, cost, ...)`` decides, for a mesh ``dp x tp``, how every op and parameter is split:

- the ``dp`` axis splits the batch dimension wherever the greedy rule can keep it (``candidates.batch_dims``);
- on the ``tp`` axis every op may run whole, split any valid label of its annotation, or pass a partial sum
  through; every parameter may be replicated or split on any dimension that divides (with ZeRO-3 also on
  the ``dp`` axis);
- costs, all from the price list (``shardwise.costs``), so that the objective of a placement is the price
  list's step price of the plan it makes (``costs.step.price_flat``): each op's forward on its share of the
  work and, in training, its backward; the time of every redistribution (forward and its backward
  conjugate), the all-reduce of partial gradients (an all-gather whose gradient is partial becomes a
  reduce-scatter in the backward); in training, the parameters' side of the step (``tail.StepTail``): the
  optimizer step per local element of each parameter, the gradient accumulation per tensor, and the
  bucketed reduction of the gradients read as stored (bandwidth and the bucket's copies per parameter, the
  bucket's latency once per bucket as an ILP charge); and per-device memory (parameters, gradients and
  optimizer state by placement, per element as ``costs.memory.element_bytes`` says; saved activations in
  training). Deliberately approximate: the optimizer and copy prices are linear in the elements (their
  secant over the replicated model), bucket boundaries are spread as a latency share per byte plus one
  whole latency per bucket group, and the whole bucketed reduction is charged (``price_flat`` hides what
  outlasts no backward, ``efficiency.comm_overlap``; on a small model the last bucket is ready at the
  backward's end, so nothing is hidden);
- the ILP (``ilp.solve``) over the classes of the shrunk problem (``shrink``) picks one candidate per class.

Requires: a verified graph; ``inputs`` one placement per tensor graph input. Guarantees: one NodeStrategy
per node in graph order plus the final ``<output>`` one (all outputs Replicate), a placement for every
parameter, and that every strategy's input placements are reached from its producers' placements by the
listed redistributions.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Mapping
from dataclasses import dataclass

from shardwise.costs.attention import CP_WAYS, node_context_attention_s, ulysses_problem, way_label, way_of
from shardwise.costs.compute import is_low
from shardwise.costs.memory import element_bytes
from shardwise.costs.prices import MeshPrices
from shardwise.errors import PlanError
from shardwise.ir.graph import Graph, Value
from shardwise.ir.placement import DeviceMesh, Partial, Replicate, Shard, ShardingSpec, chunks_cleanly
from shardwise.ir.plan import NodeStrategy
from shardwise.ir.registry import rule_for, runs_whole, tensor_operands
from shardwise.ir.tensor import TensorSpec
from shardwise.passes.sharding.candidates import (
    Choice,
    NodeInfo,
    batch_dims,
    follow_choice,
    make_choice,
    node_choices,
    node_info,
    tensor_specs,
    token_dims,
)
from shardwise.passes.sharding.ilp import (
    TIME_TOLERANCE,
    Charge,
    ClassVar,
    Consumer,
    Problem,
    SharedValue,
    solve,
)
from shardwise.passes.sharding.redistribute import redistribute_steps, replicated
from shardwise.passes.sharding.shrink import Structure, build_structure
from shardwise.passes.sharding.strategy import context_attention_inputs, scalar_strategy
from shardwise.passes.sharding.tail import StepTail, local_elements, zero_shard

__all__ = [
    "PlaceOptions", "ILPStats", "Placed", "Analysis", "place", "final_placements", "OUTPUT_NODE", "BACKWARD_OF",
]  # fmt: skip

OUTPUT_NODE = "<output>"
_SINK = "<sink>"
_WRITE = -1  # the reader slot of a buffer update: its buffer, written as stored
# the backward of each forward step (its adjoint); "allgather" is a local chunk unless fused (see module doc)
BACKWARD_OF = {
    "slice": "allgather",
    "allgather": "",
    "allreduce": "",
    "reduce_scatter": "allgather",
    "alltoall": "alltoall",
    "to_partial": "",
    "allgather+to_partial": "",
    "allreduce+to_partial": "",
}
_FLOAT = ("float", "bfloat")
FORBIDDEN_S = 1e3  # the cost of a choice the options rule out (far above any real step time)


@dataclass(frozen=True)
class PlaceOptions:
    dp_axis: str = "dp"
    tp_axis: str = "tp"
    cp_axis: str = "cp"  # context parallelism: splits the inputs' sequence dimension, followed greedily like dp
    # expert parallelism below dp (planner.flat): an inner data-parallel axis whose ranks split the experts;
    # it splits the batch as dp does
    ep_axis: str = "ep"
    cp_ways: tuple[str, ...] = CP_WAYS  # how attention may run over the cp split (costs.attention)
    train: bool = False
    precision: str = "fp32"
    sequence_parallel: bool = True  # may the tp axis split dimensions that come from the inputs (tokens)?
    zero: int = 0  # 0: none; 1: optimizer state sharded over dp; 3: parameters may be sharded over dp too
    optimizer_factor: int = 2  # optimizer state values per parameter element (AdamW: 2, SGD+momentum: 1)
    optimizer: str = "adamw"  # whose step the objective prices (PriceList.optimizer_step_s)
    memory_budget_bytes: float | None = None
    solver: str = "cbc"
    time_limit_s: float = 60.0
    shrink: bool = True
    # placements predicted within this fraction of the fastest are compared by memory (ilp.TIME_TOLERANCE);
    # None: time alone
    time_tolerance: float | None = TIME_TOLERANCE
    # parameters (by state_dict key) whose placement is given, not chosen: a program that shares its tensors
    # with another program of the same model (generation's prefill takes its decode step's)
    fixed_params: tuple[tuple[str, ShardingSpec], ...] = ()


@dataclass(frozen=True)
class ILPStats:
    nodes: int
    units: int
    groups: int
    classes: int
    variables_before: int  # Alpa's formulation on the whole graph (one-hot per op + pair per edge)
    constraints_before: int
    variables: int  # the ILP actually solved
    constraints: int
    build_s: float
    solve_s: float
    status: str
    repeated_blocks: tuple[tuple[str, int], ...]
    mesh: tuple[int, ...] = ()
    objective_s: float = 0.0  # the ILP's step time of the placement it chose (Placed.time_s)


@dataclass(frozen=True)
class Placed:
    strategies: tuple[NodeStrategy, ...]
    param_placements: dict[str, ShardingSpec]  # parameter value name -> placement
    run_whole: tuple[str, ...]
    # the ILP objective: the step's compute and communication (forward and backward in training, and the
    # parameters' gradient reduction and optimizer step: tail.StepTail), as costs.step.price_flat prices the plan
    time_s: float
    compute_s: float
    memory_bytes: float  # the ILP's memory estimate per device
    stats: ILPStats
    saved_bytes: int = 0  # training: activations kept for the backward on one device (the ILP's estimate)


class _Costs:
    """Cached cost functions of one (mesh, cluster, precision, mode)."""

    def __init__(self, cost: MeshPrices, mesh: DeviceMesh, opts: PlaceOptions, tail: StepTail) -> None:
        self.cost = cost
        self.mesh = mesh
        self.opts = opts
        self.tail = tail
        self.low = is_low(opts.precision)
        self._edge: dict[Hashable, tuple[float, Hashable]] = {}

    def comm_spec(self, spec: TensorSpec) -> TensorSpec:
        if self.low and spec.dtype.startswith(_FLOAT):
            return TensorSpec(spec.shape, "bfloat16")
        return spec

    def local_bytes(self, spec: TensorSpec, placement: ShardingSpec) -> int:
        n = self.comm_spec(spec).nbytes
        for size, p in zip(self.mesh.shape, placement.placements, strict=True):
            if isinstance(p, Shard):
                n //= size
        return n

    def compute(self, info: NodeInfo, choice: Choice, grad: bool) -> float:
        """The op's forward on its share of the work, and its backward when ``grad`` (the price list's); a
        context-parallel attention done by Ulysses or ring adds its way's communication (costs.attention)."""
        t = self.cost.step_s(info.node, choice.ways, grad)
        way = next((way_of(lab) for a, lab in choice.split if a == self.opts.cp_axis and way_of(lab)), None)
        if way is None:
            return t
        prices = self.cost.prices
        forward = self.cost.compute_s(info.node, choice.ways)
        f, b = node_context_attention_s(
            prices, self.mesh, self.opts.cp_axis, way, info.node, info.ins, info.outs[0], choice.inputs,
            compute_forward_s=forward, compute_backward_s=max(t - forward, 0.0), train=grad,
            width=0.5 if self.low else 1.0,
        )  # fmt: skip
        return t + f + b

    def edge(
        self,
        spec: TensorSpec,
        src: ShardingSpec,
        dst: ShardingSpec,
        grad_axes: tuple[str, ...],
        grad: bool,
        param: bool = False,
        sink: bool = False,
    ) -> tuple[float, Hashable]:
        """(seconds, sharing key) of turning ``src`` into ``dst`` for one consumer, forward and backward,
        plus the all-reduce of the consumer's partial gradient. A parameter read as stored has its gradient
        reduced after backward in large buckets (``tail.StepTail.bucketed_s``: bandwidth and copies; the bucket's
        latency is the ILP's charge)."""
        key = (spec, src, dst, grad_axes if grad else (), grad, param, sink)
        hit = self._edge.get(key)
        if hit is not None:
            return hit
        steps = redistribute_steps("v", spec, src, dst, self.mesh, self.cost) if src != dst else ()
        t = sum(s.time_s for s in steps)
        if not self.opts.sequence_parallel and not param and not sink:
            # without sequence parallelism activations between tensor-parallel regions are whole: partial
            # sums are all-reduced, never scattered, and nothing is gathered (Megatron's f and g only)
            tp = self.opts.tp_axis
            if any(
                s.axis == tp and s.collective.startswith(("reduce_scatter", "allgather", "alltoall"))
                for s in steps
            ):
                t += FORBIDDEN_S
        remaining = list(grad_axes) if grad else []
        fused: list[str] = []
        if grad:
            for s in steps:
                if s.collective == "allgather" and s.axis in remaining:
                    fused.append(s.axis)
                    remaining.remove(s.axis)
                    t += self.cost.collective_s("reduce_scatter", s.nbytes, s.axis)
                    continue
                back = BACKWARD_OF.get(s.collective, "")
                if back:
                    t += self.cost.collective_s(back, s.nbytes, s.axis)
            local = self.local_bytes(spec, dst)
            if param and not steps:
                axes = tuple(a for a in remaining if self.mesh.axis_size(a) > 1)
                if axes:
                    t += self.tail.bucketed_s(local_elements(spec, dst, self.mesh), axes)
            else:
                for axis in remaining:
                    t += self.cost.collective_s("allreduce", local, axis)
        # the sharing key must not depend on the source (one per value in the final plan)
        out = (t, (dst, tuple(grad_axes) if grad else ()))
        self._edge[key] = out
        return out


def _param_choices(spec: TensorSpec, mesh: DeviceMesh, opts: PlaceOptions) -> list[Choice]:
    per_axis: list[list[object]] = []
    for size, axis in zip(mesh.shape, mesh.axis_names, strict=True):
        options: list[object] = [Replicate()]
        # ZeRO-3 splits a parameter over the data-parallel axes it is replicated on: dp, and cp (whose ranks hold
        # the same weights: torchtitan's FSDP over dp x cp); the ep axis is the experts' (passes.sharding.experts)
        zero_axis = axis in (opts.dp_axis, opts.cp_axis) and opts.zero >= 3
        if size > 1 and (axis == opts.tp_axis or zero_axis):
            # uneven torch.chunk pieces on the tensor-parallel axis (a vocabulary of 50257 rows): the ops
            # reading the weight accept them only where exact (strategy.split_is_valid), else it is gathered
            options += [
                Shard(d)
                for d in range(spec.rank)
                if (spec.shape[d] % size == 0 and spec.shape[d] >= size)
                or (axis == opts.tp_axis and chunks_cleanly(spec.shape[d], size))
            ]
        per_axis.append(options)
    combos: list[list[object]] = [[]]
    for options in per_axis:
        combos = [c + [o] for c in combos for o in options]
    out = []
    for c in combos:
        dims = [p.dim for p in c if isinstance(p, Shard)]
        if len(dims) != len(set(dims)):
            continue  # one dimension split on two axes: allowed by the IR, not worth the search
        out.append(Choice((), (), (ShardingSpec(tuple(c)),), (), 1))  # type: ignore[arg-type]
    return out


def _is_attention(info: NodeInfo) -> bool:
    rule = rule_for(info.node.op)
    return rule is not None and rule.kind == "attention" and len(info.ins) >= 3 and info.ins[0].rank >= 3


def _context_attention_choices(
    info: NodeInfo, choices: list[Choice], mesh: DeviceMesh, opts: PlaceOptions
) -> list[Choice]:
    """An attention op whose queries the cp axis splits on their sequence (label of q's dimension -2) runs
    one of ``opts.cp_ways``: ``allgather`` is the plain choice (keys and values gathered by redistribution);
    ``ulysses`` and ``ring`` keep queries, keys, values and the mask's rows split on the sequence and do their
    own communication (recorded as the label ``s@ulysses``/``s@ring``, ``costs.attention``). Raises PlanError
    when no way the options allow applies."""
    axis = opts.cp_axis
    a = mesh.axis_names.index(axis)
    cp = mesh.shape[a]
    q_label = info.dims.inputs[0][info.ins[0].rank - 2].label
    out: list[Choice] = []
    problems: list[str] = []
    # an is_causal call (no mask tensor): a plain split would mask by local positions, so every way is the
    # program's own (C.context_attention), the all-gather included
    causal = q_label in info.dims.context
    for ch in choices:
        split = dict(ch.split)
        if split.get(axis) != q_label:
            out.append(ch)  # the cp axis does not split this attention's sequence here
            continue
        if "allgather" in opts.cp_ways and not causal:
            out.append(ch)
        for way in ("allgather", "ulysses", "ring") if causal else ("ulysses", "ring"):
            if way not in opts.cp_ways:
                continue
            if way == "ulysses":
                heads, kv_heads = info.ins[0].shape[-3], info.ins[1].shape[-3]
                for b, p in zip(mesh.shape, ch.inputs[0].placements, strict=True):
                    if isinstance(p, Shard) and p.dim == info.ins[0].rank - 3:
                        heads //= b
                        kv_heads = max(kv_heads // b, 1)
                problem = ulysses_problem(heads, kv_heads, cp)
                if problem:
                    problems.append(f"ulysses: {problem}")
                    continue
            inputs = context_attention_inputs(info.ins, ch.inputs, mesh, axis)
            grads = tuple(tuple(x for x in g if x != axis) for g in ch.grad_axes)
            labels = tuple((ax, way_label(lab, way, causal) if ax == axis else lab) for ax, lab in ch.split)
            out.append(Choice(labels, tuple(inputs), ch.outputs, grads, ch.ways))
    if not out:
        raise PlanError(
            f"attention {info.node.name} ({info.node.source or info.node.module_path}) cannot run over cp={cp} "
            f"the way pinned ({', '.join(opts.cp_ways)}): {'; '.join(dict.fromkeys(problems))}. Pin another "
            "cp_attention (allgather, ulysses, ring) or leave it to the planner"
        )
    return out


def _requires_grad(graph: Graph) -> set[str]:
    out = {p.name for p in graph.params if p.requires_grad and p.spec.dtype.startswith(_FLOAT)}
    for n in graph.nodes:
        if any(v in out for v in n.inputs) and any(
            isinstance(o, TensorSpec) and o.dtype.startswith(_FLOAT) for o in n.outputs
        ):
            out.add(n.name)
    return out


def _param_memory(p: Value, opts: PlaceOptions, shard: int) -> float:
    """Bytes per element of parameter ``p`` on a device (weights, gradients, optimizer), its state sharded over
    ``shard`` ranks by ZeRO (``tail.zero_shard``)."""
    if not p.spec.dtype.startswith(_FLOAT):
        return p.spec.nbytes / max(p.spec.numel, 1)
    # ZeRO-3 shards the weights through their placement (Shard on a data axis): the per-element bytes stop at
    # stage 2, over the data axes the placement keeps it whole on
    return element_bytes(
        train=opts.train, trainable=p.requires_grad and p.kind == "parameter", precision=opts.precision,
        state=opts.optimizer_factor, zero=min(opts.zero, 2), dp=shard,
    ).total  # fmt: skip


class Analysis:
    """Facts about one graph that the placement of every mesh reuses, each computed on first use."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.specs = tensor_specs(graph)
        self.infos: dict[str, NodeInfo] = {}
        self.operands: dict[str, list[str]] = {}
        for n in graph.nodes:
            if n.op == "getitem" or not any(isinstance(o, TensorSpec) for o in n.outputs):
                self.operands[n.name] = []
                continue
            self.infos[n.name] = node_info(n, self.specs)
            self.operands[n.name] = list(self.infos[n.name].operands)
        self._cache: dict[Hashable, object] = {}

    def _get(self, key: Hashable, make):  # noqa: ANN001, ANN202
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def structure(self, shrink: bool) -> Structure:
        return self._get(
            ("structure", shrink),
            lambda: build_structure(self.graph, self.specs, self.operands, shrink=shrink),
        )  # type: ignore[return-value]

    def tokens(self, batch_only: bool) -> dict[str, frozenset[str]]:
        return self._get(("tokens", batch_only), lambda: token_dims(self.graph, batch_only=batch_only))  # type: ignore[return-value]

    def requires_grad(self) -> set[str]:
        return self._get("grad", lambda: _requires_grad(self.graph))  # type: ignore[return-value]

    def batch_labels(
        self, mesh: DeviceMesh, axis: str, inputs: Mapping[str, ShardingSpec]
    ) -> dict[str, str | None]:
        a = mesh.axis_names.index(axis)
        key = ("batch", mesh.shape[a], tuple(sorted((k, str(v.placements[a])) for k, v in inputs.items())))
        return self._get(key, lambda: batch_dims(self.graph, mesh, axis, inputs))  # type: ignore[return-value]


def place(
    graph: Graph,
    mesh: DeviceMesh,
    cost: MeshPrices,
    inputs: Mapping[str, ShardingSpec],
    opts: PlaceOptions | None = None,
    analysis: Analysis | None = None,
) -> Placed:
    """Solve the placement ILP for ``mesh`` (see the module docstring). ``analysis`` (of this graph) saves
    recomputing what does not depend on the mesh when several meshes are tried."""
    opts = opts or PlaceOptions()
    t0 = time.perf_counter()
    analysis = analysis if analysis is not None and analysis.graph is graph else Analysis(graph)
    specs, infos, operands = analysis.specs, analysis.infos, analysis.operands
    structure = analysis.structure(opts.shrink)
    dp_size = mesh.axis_size(opts.dp_axis)
    dp_labels = analysis.batch_labels(mesh, opts.dp_axis, inputs) if dp_size > 1 else {}
    cp_size = mesh.axis_size(opts.cp_axis) if opts.cp_axis in mesh.axis_names else 1
    cp_labels = analysis.batch_labels(mesh, opts.cp_axis, inputs) if cp_size > 1 else {}
    ep_size = mesh.axis_size(opts.ep_axis) if opts.ep_axis in mesh.axis_names else 1
    ep_labels = analysis.batch_labels(mesh, opts.ep_axis, inputs) if ep_size > 1 else {}
    # the tp axis never splits the batch (that is the dp axis's job, or another mesh's), and splits the
    # other input-derived dimensions (sequence parallelism) only when allowed
    tokens = analysis.tokens(opts.sequence_parallel)
    grad = analysis.requires_grad() if opts.train else set()
    # the parameters the optimizer steps (as costs.step counts them: trainable floating-point parameters)
    trainable = {p.name for p in graph.params if p.name in grad and p.kind == "parameter"}
    tail = StepTail(cost, mesh, opts, [p.spec for p in graph.params if p.name in trainable])
    costs = _Costs(cost, mesh, opts, tail)
    pmem_cache: dict[tuple[str, int], float] = {}

    def pmem(name: str, shard: int) -> float:
        if (name, shard) not in pmem_cache:
            pmem_cache[(name, shard)] = _param_memory(params[name], opts, shard)
        return pmem_cache[(name, shard)]
    params = {p.name: p for p in graph.params}
    data_axes = (opts.dp_axis, opts.cp_axis, opts.ep_axis)
    free = [a for a in mesh.axis_names if a not in data_axes and mesh.axis_size(a) > 1]
    given = dict(opts.fixed_params)

    # --- candidates of every class representative's group --------------------------------------------
    follow_cache: dict[tuple[str, ShardingSpec], Choice] = {}

    def own_choices(unit: str) -> list[Choice]:
        kind = structure.units[unit].kind
        if kind == "input":
            return [Choice((), (), (inputs.get(unit, replicated(mesh)),), (), 1)]
        if kind == "param":
            if params[unit].key in given:
                return [Choice((), (), (given[params[unit].key],), (), 1)]
            return _param_choices(params[unit].spec, mesh, opts)
        info = infos[unit]
        fixed = {opts.dp_axis: dp_labels.get(unit)} if dp_size > 1 else {}
        if cp_size > 1:
            fixed[opts.cp_axis] = cp_labels.get(unit)
        if ep_size > 1:
            fixed[opts.ep_axis] = ep_labels.get(unit)
        choices = node_choices(info, mesh, fixed, free, tokens.get(unit, frozenset()))
        if cp_size > 1 and _is_attention(info):
            choices = _context_attention_choices(info, choices, mesh, opts)
        return choices

    def follow(unit: str, src: ShardingSpec) -> Choice:
        hit = follow_cache.get((unit, src))
        if hit is None:
            info = infos[unit]
            hit = make_choice(info, follow_choice(info, [src], mesh), mesh)
            follow_cache[(unit, src)] = hit
        return hit

    group_choices: dict[str, list[tuple[Choice, ...]]] = {}
    own_count: dict[str, int] = {}
    for root, members in structure.members.items():
        if structure.group_class[root] != root:
            continue
        roots = own_choices(root)
        own_count[root] = len(roots)
        index = {m: i for i, m in enumerate(members)}
        rows = []
        for rc in roots:
            row: list[Choice] = [rc]
            for m in members[1:]:
                src_name = operands[m][0]
                u, k = structure.producer[src_name]
                row.append(follow(m, row[index[u]].outputs[k]))
            rows.append(tuple(row))
        group_choices[root] = rows
        for m in members[1:]:
            own_count[m] = len(own_choices(m)) if structure.units[m].kind == "node" else 1

    # --- classes: compute and memory ---------------------------------------------------------------------
    class_ids: dict[str, int] = {}
    problem = Problem(classes=[])
    for root in group_choices:
        class_ids[root] = len(problem.classes)
        count = structure.class_count[root]
        members = structure.members[root]
        cost_row, mem_row, state_row = [], [], []
        for row in group_choices[root]:
            t = m = state = 0.0
            for member, ch in zip(members, row, strict=True):
                unit = structure.units[member]
                if unit.kind == "node":
                    t += costs.compute(infos[member], ch, member in grad)
                    rule = rule_for(infos[member].node.op)
                    if opts.train and member in grad and (rule is None or rule.moves_data):
                        m += sum(
                            costs.local_bytes(o, pl)
                            for o, pl in zip(infos[member].outs, ch.outputs, strict=False)
                        )
                elif unit.kind == "param":
                    spec = params[member].spec
                    local = spec.numel
                    for size, p in zip(mesh.shape, ch.outputs[0].placements, strict=True):
                        if isinstance(p, Shard):
                            local //= size
                    shard = zero_shard(ch.outputs[0], mesh, opts.zero)
                    m += local * pmem(member, shard)
                    state += local * pmem(member, shard)
                    if member in trainable:
                        elements = local_elements(spec, ch.outputs[0], mesh)
                        t += tail.optimizer_s(elements, shard) + tail.gather_s(elements, shard)
            cost_row.append(t * count)
            mem_row.append(m * count)
            state_row.append(state * count)
        problem.classes.append(ClassVar(root, cost_row, mem_row, state_row))
    sink = len(problem.classes)
    problem.classes.append(ClassVar(_SINK, [0.0], [0.0]))
    problem.constant_time = tail.constant_s if trainable else 0.0

    # --- edges: every read of a value, grouped into value classes -----------------------------------------
    position: dict[str, tuple[str, int]] = {}  # unit -> (class root, position in its group)
    for root, members in structure.members.items():
        cls = structure.group_class[root]
        for i, m in enumerate(members):
            position[m] = (cls, i)
    readers: dict[tuple[str, int], list[tuple[str, int, int]]] = {}  # value -> [(class, pos, slot)]
    for n in graph.nodes:
        if n.name not in infos:
            continue
        cls, pos = position[n.name]
        for slot, name in enumerate(operands[n.name]):
            if name in structure.producer:
                readers.setdefault(structure.producer[name], []).append((cls, pos, slot))
    finals = [a.name for a in graph.outputs if isinstance(a, Value)]
    for name in dict.fromkeys(finals):
        if name in structure.producer:
            readers.setdefault(structure.producer[name], []).append((_SINK, 0, 0))
    # a buffer's new value is written into the buffer as it is stored: read in the buffer's placement
    for key, v in graph.buffer_updates:
        buffer = graph.param_by_key(key).name
        if v.name in structure.producer and buffer in position:
            readers.setdefault(structure.producer[v.name], []).append((*position[buffer], _WRITE))
    value_classes: dict[tuple, int] = {}
    value_spec: dict[tuple, tuple[TensorSpec, bool, bool]] = {}
    for (unit, k), rs in readers.items():
        pcls, ppos = position[unit]
        key = (pcls, ppos, k, tuple(sorted(rs)))
        value_classes[key] = value_classes.get(key, 0) + 1
        if key not in value_spec:
            spec = specs.get(unit) if structure.units[unit].kind != "node" else infos[unit].outs[k]
            assert spec is not None
            value_spec[key] = (spec, unit in grad, structure.units[unit].kind == "param")

    def consumer_requirement(cls: str, pos: int, slot: int, b: int) -> tuple[ShardingSpec, tuple[str, ...]]:
        if cls == _SINK:
            return replicated(mesh), ()
        if slot == _WRITE:  # the buffer's candidate b stores it so
            return group_choices[cls][b][pos].outputs[0], ()
        ch = group_choices[cls][b][pos]
        return ch.inputs[slot], ch.grad_axes[slot]

    # a bucket of gradients over some axes costs its latency once: charged when any reader of a trainable
    # parameter leaves a partial gradient over exactly those axes
    buckets: dict[tuple[str, ...], set[tuple[int, int]]] = {}
    for (pcls, ppos, k, rs), count in value_classes.items():
        spec, needs_grad, is_param = value_spec[(pcls, ppos, k, rs)]
        p = class_ids[pcls]
        srcs = [row[ppos].outputs[k] for row in group_choices[pcls]]
        consumers = []
        to_sink = any(cls == _SINK or slot == _WRITE for cls, _, slot in rs)
        for cls, pos, slot in rs:
            q = sink if cls == _SINK else class_ids[cls]
            nq = len(problem.classes[q].cost)
            consumers.append((q, [consumer_requirement(cls, pos, slot, b) for b in range(nq)]))
            if is_param and needs_grad and structure.members[pcls][ppos] in trainable:
                for b, (_t, ax) in enumerate(consumers[-1][1]):
                    axes = tuple(a for a in ax if mesh.axis_size(a) > 1)
                    if axes:
                        buckets.setdefault(axes, set()).add((q, b))
        if len(consumers) == 1:
            q, reqs = consumers[0]
            matrix = [
                [costs.edge(spec, s, t, ax, needs_grad, is_param, to_sink)[0] * count for t, ax in reqs]
                for s in srcs
            ]
            problem.add_pair(p, q, matrix)
            continue
        shared = SharedValue(p, [], {})
        for q, reqs in consumers:
            targets: list[Hashable | None] = [None] * len(reqs)
            for a, s in enumerate(srcs):
                for t, ax in reqs:
                    seconds, tkey = costs.edge(spec, s, t, ax, needs_grad, is_param, to_sink)
                    if seconds:
                        shared.cost[(a, tkey)] = seconds * count
            for b, (t, ax) in enumerate(reqs):
                targets[b] = costs.edge(spec, srcs[0], t, ax, needs_grad, is_param, to_sink)[1]
            shared.consumers.append(Consumer(q, targets))
        problem.shared.append(shared)
    for axes, triggers in sorted(buckets.items()):
        problem.charges.append(Charge(tail.bucket_latency_s(axes), sorted(triggers)))
    problem.memory_budget = opts.memory_budget_bytes

    # --- statistics of the unshrunk formulation ----------------------------------------------------------
    n_own: dict[str, int] = {}
    for u in structure.units:
        cls, pos = position[u]
        n_own[u] = own_count.get(structure.members[cls][pos], 1)
    vars_before = sum(n for n in n_own.values() if n > 1)
    cons_before = sum(1 for n in n_own.values() if n > 1)
    for (unit, _k), rs in readers.items():
        nu = n_own[unit]
        for cls, pos, _slot in rs:
            nv = 1 if cls == _SINK else own_count.get(structure.members[cls][pos], 1)
            if nu > 1 and nv > 1:
                vars_before += nu * nv
                cons_before += nu + nv
    build_s = time.perf_counter() - t0

    solution = solve(problem, solver=opts.solver, time_limit_s=opts.time_limit_s, time_tolerance=opts.time_tolerance)

    # --- expand the solution to every node -----------------------------------------------------------------
    chosen: dict[str, Choice] = {}
    for root, members in structure.members.items():
        cls = structure.group_class[root]
        row = group_choices[cls][solution.choice[class_ids[cls]]]
        for m, ch in zip(members, row, strict=True):
            chosen[m] = ch
    strategies, run_whole, compute = _strategies(graph, mesh, cost, costs, inputs, chosen, infos, grad)
    saved = 0
    for name in grad:
        info = infos.get(name)
        rule = rule_for(info.node.op) if info is not None else None
        if info is not None and (rule is None or rule.moves_data):
            saved += sum(
                costs.local_bytes(o, pl) for o, pl in zip(info.outs, chosen[name].outputs, strict=False)
            )
    param_placements = {p.name: chosen[p.name].outputs[0] for p in graph.params}
    stats = ILPStats(
        nodes=len(graph.nodes), units=len(structure.units), groups=len(structure.members),
        classes=len(problem.classes) - 1, variables_before=vars_before, constraints_before=cons_before,
        variables=solution.variables, constraints=solution.constraints, build_s=build_s, solve_s=solution.solve_s,
        status=solution.status, repeated_blocks=structure.layers.blocks, mesh=tuple(mesh.shape),
        objective_s=solution.objective_s,
    )  # fmt: skip
    return Placed(
        strategies,
        param_placements,
        run_whole,
        solution.objective_s,
        compute,
        solution.memory_bytes,
        stats,
        saved,
    )


def _strategies(
    graph: Graph,
    mesh: DeviceMesh,
    cost: MeshPrices,
    costs: _Costs,
    inputs: Mapping[str, ShardingSpec],
    chosen: Mapping[str, Choice],
    infos: Mapping[str, NodeInfo],
    grad: set[str],
) -> tuple[tuple[NodeStrategy, ...], tuple[str, ...], float]:
    placement: dict[str, ShardingSpec] = {}
    specs: dict[str, TensorSpec] = {}
    for i in graph.inputs:
        if isinstance(i.spec, TensorSpec):
            placement[i.name] = inputs.get(i.name, replicated(mesh))
            specs[i.name] = i.spec
    for p in graph.params:
        placement[p.name] = chosen[p.name].outputs[0]
        specs[p.name] = p.spec
    tuple_outputs: dict[str, tuple[ShardingSpec, ...]] = {}
    out: list[NodeStrategy] = []
    run_whole: list[str] = []
    compute_total = 0.0
    for node in graph.nodes:
        if node.op == "getitem":
            src, idx = node.args[0], node.args[1]
            assert isinstance(src, Value) and isinstance(idx, int)
            pl = tuple_outputs[src.name][idx]
            placement[node.name] = pl
            if isinstance(node.outputs[0], TensorSpec):
                specs[node.name] = node.outputs[0]
            out.append(NodeStrategy(node=node.name, split=(), inputs=(), outputs=(pl,)))
            continue
        info = infos.get(node.name)
        if info is None:  # no tensor outputs: size arithmetic, or a read of tensor values (read whole)
            operands = [n for n in tensor_operands(node) if n in specs]
            comm = {n: costs.comm_spec(specs[n]) for n in operands}
            out.append(scalar_strategy(node, operands, comm, placement, mesh, cost))
            if runs_whole(node) and operands and node.op != "scalar_op":
                run_whole.append(node.name)
            continue
        ch = chosen[node.name]
        if runs_whole(node):
            run_whole.append(node.name)
        steps = []
        for name, spec, want in zip(info.operands, info.ins, ch.inputs, strict=True):
            have = placement.get(name)
            if have is not None and have != want:
                steps.extend(redistribute_steps(name, costs.comm_spec(spec), have, want, mesh, cost))
        compute = costs.compute(info, ch, False)
        compute_total += costs.compute(info, ch, node.name in grad)
        out.append(
            NodeStrategy(
                node=node.name,
                split=ch.split,
                inputs=ch.inputs,
                outputs=ch.outputs,
                redistributes=tuple(steps),
                grad_reduce=tuple((i, ax) for i, ax in enumerate(ch.grad_axes) if ax),
                compute_s=compute,
                comm_s=sum(s.time_s for s in steps),
            )  # fmt: skip
        )
        if node.tuple_output:
            tuple_outputs[node.name] = ch.outputs
        else:
            placement[node.name] = ch.outputs[0]
            specs[node.name] = info.outs[0]
    final = final_placements(graph, placement, mesh)
    steps = []
    for name, want in final.items():
        have = placement.get(name)
        if have is not None and name in specs:
            steps.extend(redistribute_steps(name, costs.comm_spec(specs[name]), have, want, mesh, cost))
    out.append(
        NodeStrategy(
            node=OUTPUT_NODE,
            split=(),
            inputs=tuple(final.values()),
            outputs=(),
            redistributes=tuple(steps),
            comm_s=sum(s.time_s for s in steps),
        )  # fmt: skip
    )
    return tuple(out), tuple(run_whole), compute_total


def final_placements(
    graph: Graph, placement: Mapping[str, ShardingSpec], mesh: DeviceMesh
) -> dict[str, ShardingSpec]:
    """What the program ends with, value by value: the outputs whole on every rank, each buffer update as its
    buffer is stored (``placement``: the placement of every value and parameter)."""
    out = {a.name: replicated(mesh) for a in graph.outputs if isinstance(a, Value)}
    for key, v in graph.buffer_updates:
        out.setdefault(v.name, placement.get(graph.param_by_key(key).name, replicated(mesh)))
    return out


def is_partial(spec: ShardingSpec) -> bool:
    return any(isinstance(p, Partial) for p in spec.placements)
