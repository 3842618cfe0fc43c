"""Realizing a flat layout (``pp = 1``): the placement ILP on its ``dp x tp`` mesh, the memory map,
recomputation, and the price.

``realize_flat(graph, cluster, layout, ...)``:

1. the graph, rewritten to expose tensor parallelism (``tp > 1``) and to split mean losses (more than one
   device), is placed by the ILP (``passes.sharding.auto.place``) on the mesh: the batch over ``dp``, the ops
   over ``tp`` (sequence parallelism allowed or not), ZeRO's sharding of parameters over ``dp`` (stage 3);
2. the memory-mapping pass maps every rank's step (``passes.memory.map_memory``: parameters, gradients,
   optimizer state as ZeRO shards them, activations, collective buffers): the plan's predicted peak;
3. recomputation: ``full`` recomputes every layer, ``selective`` the cheapest layers that bring the peak within
   the device (or the user's byte budget) (``passes.remat``);
4. when the fastest placement does not fit, the ILP places the mesh again under its memory budget;
5. fusion (``passes.fusion``) groups each rank's elementwise chains into kernels;
6. the plan is priced by the price list (``costs.step.predict_flat``).

Guarantees: the returned plan's ``predicted`` is ``costs.step.predict_flat`` of the plan, and its
``memory`` the memory map of what the generated program holds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from shardwise.cluster import ClusterSpec
from shardwise.costs.attention import CP_WAYS, way_of, ways_s
from shardwise.costs.compute import float_scale
from shardwise.costs.memory import optimizer_state
from shardwise.costs.prices import mesh_prices, price_list
from shardwise.costs.step import op_ways, predict_flat
from shardwise.errors import DoesNotFitError, PlanError
from shardwise.ir.graph import Graph
from shardwise.ir.placement import DeviceMesh, Replicate, Shard, ShardingSpec, zero_group
from shardwise.ir.plan import ExecutionPlan, NodeStrategy, Prediction, RankMemory
from shardwise.ir.registry import rule_for, tensor_operands
from shardwise.ir.tensor import TensorSpec
from shardwise.passes.memory.buffers import lower_bound
from shardwise.passes.memory.mapping import map_memory
from shardwise.passes.memory.program import step_buffers
from shardwise.passes.remat import apply_recomputation, cheapest_recomputation, recompute_all_layers
from shardwise.passes.sharding.auto import Analysis, ILPStats, Placed, PlaceOptions, place
from shardwise.passes.sharding.experts import expert_parallel
from shardwise.passes.sharding.gradients import param_grad_reduce
from shardwise.passes.sharding.redistribute import replicated
from shardwise.passes.sharding.rewrite import expose_tensor_parallelism, split_losses
from shardwise.planner.identity import plan_identity

__all__ = ["FlatAnalyses", "FlatOptions", "realize_flat", "input_placements", "sequence_length", "flat_mesh",
           "MEMORY_HEADROOM"]

MEMORY_HEADROOM = 0.9  # of device memory the ILP may plan for (the rest: allocator slack, workspaces)


class FlatAnalyses:
    """The graph rewritten to expose tensor parallelism (tp > 1) and to split mean losses (more than one
    device), with its placement analysis, made once per kind and shared by every mesh."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self._made: dict[tuple[bool, bool], Analysis] = {}

    def get(self, tp: bool, many: bool) -> Analysis:
        if (tp, many) not in self._made:
            g = expose_tensor_parallelism(self.graph) if tp else self.graph
            self._made[(tp, many)] = Analysis(split_losses(g) if many else g)
        return self._made[(tp, many)]


@dataclass(frozen=True)
class FlatOptions:
    mode: str = "inference"
    precision: str = "fp32"
    optimizer: str = "adamw"
    solver: str = "cbc"
    time_limit_s: float = 60.0
    recompute_budget: int | None = None  # bytes per rank for recompute="selective" (default: the device)
    fusion: bool = True  # fuse each rank's elementwise chains and epilogues (passes.fusion), priced as such
    fixed_params: tuple = ()  # (state_dict key, ShardingSpec) of parameters placed as given (PlaceOptions)


def input_placements(graph: Graph, mesh: DeviceMesh, dp: int) -> dict[str, ShardingSpec]:
    """Batch inputs split along dim 0 over ``dp`` (where it divides), everything else replicated; on a mesh with
    a ``cp`` axis, the inputs' sequence (dim 1, the length of the first input's) split over it too."""
    out: dict[str, ShardingSpec] = {}
    cp = mesh.axis_size("cp") if "cp" in mesh.axis_names else 1
    seq = sequence_length(graph)
    for i in graph.inputs:
        if not isinstance(i.spec, TensorSpec):
            continue
        pl = [Replicate() for _ in mesh.shape]
        if dp > 1 and i.spec.rank > 0 and i.spec.shape[0] % dp == 0:
            for axis in ("dp", "ep"):  # the data-parallel axes (ep: the inner one of expert parallelism below dp)
                if axis in mesh.axis_names and mesh.axis_size(axis) > 1:
                    pl[mesh.axis_names.index(axis)] = Shard(0)
        if cp > 1 and i.spec.rank > 1 and i.spec.shape[1] == seq and seq % cp == 0:
            pl[mesh.axis_names.index("cp")] = Shard(1)
        out[i.name] = ShardingSpec(tuple(pl))
    return out


def sequence_length(graph: Graph) -> int | None:
    """The sequence length of the model's token inputs: dim 1 of the first tensor input of rank 2 or more."""
    for i in graph.inputs:
        if isinstance(i.spec, TensorSpec) and i.spec.rank > 1:
            return i.spec.shape[1]
    return None


def _step_inputs(
    graph: Graph, placed: Placed, inputs: Mapping[str, ShardingSpec], cluster: ClusterSpec, train: bool,
    options: FlatOptions, zero: int,
) -> dict:  # fmt: skip
    """The keyword arguments ``step_buffers`` and ``map_memory`` take for a placed candidate."""
    return {
        "param_placements": placed.param_placements, "input_placements": inputs, "train": train,
        "precision": options.precision, "optimizer_factor": optimizer_state(options.optimizer), "zero": zero,
        "grad_reduce": param_grad_reduce(graph, placed.strategies) if train else {},
        "optimizer_foreach": cluster.device.kind != "cpu",
    }  # fmt: skip


def map_placed(
    graph: Graph, mesh: DeviceMesh, placed: Placed, inputs: Mapping[str, ShardingSpec], cluster: ClusterSpec,
    options: FlatOptions, zero: int, exact: bool = False,
) -> tuple[RankMemory, ...]:  # fmt: skip
    """The memory-mapping pass on a placed candidate: per rank its arena (the predicted peak) and the lower
    bound of live bytes. The greedy arena first; the exact search when ``exact`` or when it decides whether the
    candidate fits (greedy above the capacity, lower bound within it)."""
    step = _step_inputs(graph, placed, inputs, cluster, options.mode == "train", options, zero)
    capacity = cluster.device.memory_bytes

    def run(search: bool) -> tuple[RankMemory, ...]:
        return map_memory(graph, mesh, placed.strategies, capacity_bytes=capacity, exact=search, **step).memory

    memory = run(exact)
    if not exact and max(m.arena_bytes for m in memory) > capacity >= max(m.lower_bound_bytes for m in memory):
        memory = run(True)
    return memory


def _cannot_fit(
    graph: Graph, mesh: DeviceMesh, placed: Placed, inputs: Mapping[str, ShardingSpec], cluster: ClusterSpec,
    options: FlatOptions, zero: int,
) -> bool:  # fmt: skip
    """Whether the placed candidate's live bytes at some step exceed the device (its buffers' lower bound):
    then no arena fits, and packing one (most of a memory map's time) can be skipped."""
    step = _step_inputs(graph, placed, inputs, cluster, options.mode == "train", options, zero)
    return lower_bound(step_buffers(graph, mesh, placed.strategies, **step)) > cluster.device.memory_bytes


def flat_plan(
    source: Graph, graph: Graph, cluster: ClusterSpec, mesh: DeviceMesh, placed: Placed,
    inputs: Mapping[str, ShardingSpec], memory: tuple[RankMemory, ...], options: FlatOptions, zero: int,
    ep: int = 1,
) -> ExecutionPlan:  # fmt: skip
    """The ExecutionPlan of a placed flat layout, priced (``source``: the graph as traced, fingerprinted)."""
    train = options.mode == "train"
    keys = {p.name: p.key for p in graph.params}
    stats = placed.stats
    notes = [
        f"placement ILP: {stats.classes} classes from {stats.nodes} ops "
        f"({stats.repeated_blocks or 'no repeated blocks'}); {stats.variables} variables, {stats.constraints} "
        f"constraints (unshrunk: {stats.variables_before}, {stats.constraints_before}); {stats.status} in "
        f"{stats.solve_s:.2f} s; objective {stats.objective_s * 1e3:.3f} ms per step (the ILP's price of this "
        "placement; the prediction prices the final plan)"
    ]
    if mesh.size < cluster.world_size:
        notes.append(f"runs on {mesh.size} of the {cluster.world_size} devices")
    if "cp" in mesh.axis_names:
        notes.append(context_note(graph, mesh, placed.strategies, cluster, options.precision, train))
    if zero:
        group = zero_group(mesh, None) or ("dp",)
        over = " x ".join(f"{a}={mesh.axis_size(a)}" for a in group)
        parts = [f"optimizer state sharded over {over}"] + (["gradients too"] if zero >= 2 else []) if train else []
        if zero >= 3:
            weights = [a for a in group if a != "ep"]  # the experts' axis splits them by expert, not by ZeRO
            along = [mesh.axis_names.index(a) for a in weights]
            split = sum(
                any(isinstance(s.placements[i], Shard) for i in along) for s in placed.param_placements.values()
            )
            over3 = " x ".join(f"{a}={mesh.axis_size(a)}" for a in weights)
            parts.append(f"{split} of {len(placed.param_placements)} parameters split over {over3}")
        notes.append(f"ZeRO stage {zero}: " + ", ".join(parts))
    plan = ExecutionPlan(
        **plan_identity(source, cluster, options.mode, options.precision, mesh),
        degrees_=(("dp", mesh.axis_size("dp") * mesh.axis_size("ep")), ("tp", mesh.axis_size("tp")), ("pp", 1))
        + ((("ep", ep),) if ep > 1 else ())
        + ((("cp", mesh.axis_size("cp")),) if "cp" in mesh.axis_names else ()),
        graph=graph, strategies=placed.strategies,
        input_placements=tuple(inputs.get(i.name, replicated(mesh)) for i in graph.inputs),
        param_placements=tuple((keys[name], spec) for name, spec in placed.param_placements.items()),
        output_placements=tuple(replicated(mesh) for _ in graph.outputs),
        param_grad_reduce=tuple(sorted(param_grad_reduce(graph, placed.strategies).items())) if train else (),
        predicted=Prediction(0.0, 0.0, 0.0, 0.0, ()), memory=memory, replicated_ops=placed.run_whole,
        passes=("trace", "sharding.rewrite", "sharding.ilp", "memory.map", "planner.search"),
        optimizer=options.optimizer, zero_stage=zero, notes=tuple(notes),
    )  # fmt: skip
    return plan.replace(predicted=predict_flat(plan, cluster))


def context_note(
    graph: Graph, mesh: DeviceMesh, strategies: Sequence[NodeStrategy], cluster: ClusterSpec, precision: str,
    train: bool,
) -> str:  # fmt: skip
    """What the cp axis does in a placed plan: the sequence split, how each attention runs over it, and what
    each way is predicted to cost (``costs.attention.ways_s``) — why the placement took the way it did."""
    cp = mesh.axis_size("cp")
    prices = price_list(cluster, precision)
    by_node = {s.node: s for s in strategies}
    ways: dict[str, int] = {}
    totals: dict[str, float] = {}
    impossible: dict[str, str] = {}
    for node in graph.nodes:
        st = by_node.get(node.name)
        rule = rule_for(node.op)
        if st is None or rule is None or rule.kind != "attention":
            continue
        label = dict(st.split).get("cp")
        if label is None:
            continue
        ways[way_of(label) or "allgather"] = ways.get(way_of(label) or "allgather", 0) + 1
        ins = [graph.spec_of(v) for v in tensor_operands(node)]
        tensors = [x for x in ins if isinstance(x, TensorSpec)]
        n = op_ways(st, mesh)
        fwd = prices.forward_s(node, n)
        bwd = prices.backward_s(node, n) if train else 0.0
        for way, got in ways_s(
            prices, mesh, "cp", node, tensors, node.outputs[0], st.outputs[0],  # type: ignore[arg-type]
            compute_forward_s=fwd, compute_backward_s=bwd, train=train, width=float_scale(precision),
        ).items():  # fmt: skip
            if isinstance(got, str):
                impossible[way] = got
            else:
                totals[way] = totals.get(way, 0.0) + got[0] + got[1]
    done = ", ".join(f"{k} by {way}" for way, k in sorted(ways.items())) or "none split"
    priced = "; ".join(f"{way} {t * 1e3:.3f} ms" for way, t in sorted(totals.items(), key=lambda x: x[1]))
    priced += "".join(f"; {way} not possible ({why})" for way, why in impossible.items())
    return (
        f"context parallelism: the sequence ({sequence_length(graph)}) split over cp={cp}; attention calls: {done}. "
        f"Their cp communication per step, predicted by way: {priced} (allgather: keys and values gathered; "
        "ulysses: all-to-all to a head split and back; ring: key/value blocks passed around the ring, hidden "
        "behind each block's compute where it is shorter)"
    )


@dataclass(frozen=True)
class Realized:
    """A realized flat layout: its plan (priced, memory mapped) and the ILP statistics of its placement."""

    plan: ExecutionPlan
    stats: ILPStats
    fits: bool


def flat_mesh(dp: int, tp: int, cp: int = 1, ep: int = 1) -> DeviceMesh:
    """The mesh of a flat layout: ``dp x tp``, or ``dp x cp x tp`` with context parallelism (tp innermost, so
    that it stays inside a node; cp next). Expert parallelism over fewer ranks than ``dp`` (``1 < ep < dp``)
    splits the data-parallel ranks in two axes, ``dp`` (``dp / ep`` replicas of the experts, outer) and ``ep``
    (the ranks that split them, inner: neighbours, inside a node where they fit); ``ep = dp`` uses the ``dp``
    axis itself."""
    outer = ((dp // ep, ep), ("dp", "ep")) if 1 < ep < dp else ((dp,), ("dp",))
    shape, names = outer[0] + ((cp,) if cp > 1 else ()) + (tp,), outer[1] + (("cp",) if cp > 1 else ()) + ("tp",)
    return DeviceMesh(shape, names, tuple(range(dp * cp * tp)))


def expert_axis_of(mesh: DeviceMesh, ep: int) -> str | None:
    """The mesh axis a flat layout with ``ep`` splits the experts over (see :func:`flat_mesh`)."""
    if ep <= 1:
        return None
    return "ep" if "ep" in mesh.axis_names else "dp"


def realize_flat(
    graph: Graph, cluster: ClusterSpec, *, dp: int, tp: int, sp: bool, zero: int, recompute: str,
    options: FlatOptions, analyses: FlatAnalyses, stats_out: list[ILPStats] | None = None, ep: int = 1,
    cp: int = 1, cp_ways: tuple[str, ...] = CP_WAYS,
) -> Realized:  # fmt: skip
    """Realize one flat layout (see the module docstring). ``ep`` > 1 (a divisor of ``dp``): the experts of every
    MoE layer split over ``ep`` of the data-parallel ranks (``passes.sharding.experts``, on the axis
    :func:`flat_mesh` gives them). Raises DoesNotFitError when no placement of the ILP fits its memory budget
    and recomputation cannot make the layout fit either."""
    if ep > 1 and dp % ep:
        raise PlanError(f"ep={ep} with dp={dp}: expert parallelism splits the experts over ep of the data-parallel "
                        "ranks, so ep divides dp")  # fmt: skip
    train = options.mode == "train"
    analysis = analyses.get(tp > 1, dp * tp * cp > 1)
    g = analysis.graph
    mesh = flat_mesh(dp, tp, cp, ep)
    cost = mesh_prices(cluster, mesh, options.precision)
    inputs = input_placements(g, mesh, dp)
    capacity = cluster.device.memory_bytes
    free = PlaceOptions(
        train=train, precision=options.precision, sequence_parallel=sp, zero=zero,
        optimizer_factor=optimizer_state(options.optimizer), optimizer=options.optimizer, memory_budget_bytes=None,
        solver=options.solver, time_limit_s=options.time_limit_s, cp_ways=cp_ways,
        fixed_params=options.fixed_params,
    )  # fmt: skip
    # the fastest placement first: the memory map decides whether it fits (the ILP's own estimate sums saved
    # activations without lifetimes); only if it does not (and recomputation is not asked to make it fit),
    # the placement under the ILP's memory budget
    attempts = [free]
    if recompute == "none":
        attempts.append(dataclasses.replace(free, memory_budget_bytes=capacity * MEMORY_HEADROOM))
    last: Realized | None = None
    error = ""
    for attempt in attempts:
        try:
            placed = place(g, mesh, cost, inputs, attempt, analysis)
        except DoesNotFitError as exc:
            error = str(exc)
            continue
        if ep > 1:
            placed = expert_parallel(g, mesh, placed, expert_axis_of(mesh, ep))  # type: ignore[arg-type]
        if stats_out is not None:
            stats_out.append(placed.stats)
        if attempt is not attempts[-1] and _cannot_fit(g, mesh, placed, inputs, cluster, options, zero):
            continue
        memory = map_placed(g, mesh, placed, inputs, cluster, options, zero)
        plan = flat_plan(graph, g, cluster, mesh, placed, inputs, memory, options, zero, ep)
        if train and recompute == "full":
            plan = apply_recomputation(plan, recompute_all_layers(plan), cluster)
        elif train and recompute == "selective":
            budget = options.recompute_budget or capacity
            plan = apply_recomputation(plan, cheapest_recomputation(plan, budget), cluster)
        peak = max(m.arena_bytes for m in plan.memory)
        last = Realized(plan, placed.stats, peak <= capacity)
        if last.fits:
            break
    if last is None:
        raise DoesNotFitError(error or "no placement fits the device's memory")
    plan = last.plan
    if last.fits and not plan.recompute and any(m.arena_bytes > m.lower_bound_bytes for m in plan.memory):
        # the memory map searched exactly (the greedy arena decided what fits)
        exact = map_placed(g, mesh, _as_placed(plan, last.stats), inputs, cluster, options, zero, exact=True)
        plan = plan.replace(memory=exact)
    if options.fusion:
        from shardwise.passes.fusion import fuse_plan

        plan = fuse_plan(plan)
    return Realized(plan.replace(predicted=predict_flat(plan, cluster)), last.stats, last.fits)


def _as_placed(plan: ExecutionPlan, stats: ILPStats) -> Placed:
    names = {p.key: p.name for p in plan.graph.params}
    return Placed(
        strategies=plan.strategies, param_placements={names[k]: s for k, s in plan.param_placements if k in names},
        run_whole=plan.replicated_ops, time_s=plan.predicted.step_time_s, compute_s=plan.predicted.compute_s,
        memory_bytes=0.0, stats=stats,
    )  # fmt: skip
