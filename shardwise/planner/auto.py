"""The planner: search meshes ``dp x tp`` (tp inside a node), place each with the sharding ILP, keep the
fastest plan that fits.

For every candidate mesh (all devices, tensor-parallel degree a divisor of the devices per node, honouring
the user's ``constraints``) it rewrites the graph to expose tensor parallelism (tp > 1), splits the batch
over ``dp``, solves the placement ILP (``passes.sharding.auto.place``) and predicts time and memory. The
memory map decides what fits: the fastest placement is kept when its map fits the device, else the ILP
places the mesh again under a memory budget (its own estimate, coarser than the map). When no placement
fits it retries with ZeRO (optimizer state sharded over ``dp``, then parameters too). Losers stay in
``plan.alternatives`` with the reason they lost.

Constraints: ``dp``, ``tp`` pin degrees; ``sp=1`` forbids sequence parallelism (the default lets the ILP
choose it); ``zero`` pins the ZeRO stage (0, 1 or 3); ``pp``/``ep`` must be 1 here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from shardwise.cluster import ClusterSpec
from shardwise.costs.prices import mesh_prices
from shardwise.costs.step import predict_flat
from shardwise.errors import DoesNotFitError, PlanError
from shardwise.ir.graph import Graph
from shardwise.ir.placement import DeviceMesh, Replicate, Shard, ShardingSpec
from shardwise.ir.plan import Alternative, ExecutionPlan, Prediction, RankMemory
from shardwise.ir.tensor import TensorSpec
from shardwise.passes.memory.buffers import lower_bound
from shardwise.passes.memory.mapping import map_memory
from shardwise.passes.memory.program import step_buffers
from shardwise.passes.sharding.auto import Analysis, ILPStats, Placed, PlaceOptions, place
from shardwise.passes.sharding.gradients import param_grad_reduce
from shardwise.passes.sharding.redistribute import replicated
from shardwise.passes.sharding.rewrite import expose_tensor_parallelism, mean_losses_as_sums
from shardwise.planner.simple import KNOWN_DEGREES, OPTIMIZER_STATE_FACTOR, plan_identity

__all__ = ["plan_auto", "candidate_meshes", "param_grad_reduce", "CONSTRAINT_KEYS"]

CONSTRAINT_KEYS = KNOWN_DEGREES + ("zero",)
MEMORY_HEADROOM = 0.9  # of device memory the ILP may plan for (the rest: allocator slack, workspaces)


@dataclass(frozen=True)
class _Scored:
    dp: int
    tp: int
    zero: int
    graph: Graph
    mesh: DeviceMesh
    placed: Placed | None
    inputs: dict[str, ShardingSpec]
    memory: tuple[RankMemory, ...]
    prediction: Prediction | None
    fits: bool
    need_bytes: int
    note: str = ""


def _relative_time(time_s: float, chosen_s: float) -> str:
    """An alternative's predicted step time against the chosen plan's (a graph of views alone costs 0 s)."""
    if chosen_s <= 0:
        return "the same predicted step time" if time_s <= 0 else "slower than the chosen plan (which costs nothing)"
    return f"{time_s / chosen_s:.2f}x the chosen plan's predicted step time"


def _check_constraints(constraints: Mapping[str, int], cluster: ClusterSpec) -> dict[str, int]:
    out = dict(constraints)
    for key, value in out.items():
        if key not in CONSTRAINT_KEYS:
            raise PlanError(f"unknown constraint {key!r}: allowed are {', '.join(CONSTRAINT_KEYS)}")
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if key == "zero" else 1):
            raise PlanError(f"constraint {key}={value!r}: must be a positive integer")
    for key in ("pp", "ep"):
        if out.get(key, 1) != 1:
            raise PlanError(
                f"constraint {key}={out[key]}: this planner makes data-, tensor- and sequence-parallel plans "
                f"({key} > 1 is not available yet)"
            )
    if out.get("zero", 0) not in (0, 1, 3):
        raise PlanError(
            f"constraint zero={out['zero']}: ZeRO stages 0, 1 (optimizer state) and 3 (parameters)"
        )
    world = cluster.world_size
    if "dp" in out and out["dp"] > world:
        raise PlanError(f"constraint dp={out['dp']} needs more devices than {cluster.name} has ({world})")
    if "tp" in out and out["tp"] > world:
        raise PlanError(f"constraint tp={out['tp']} needs more devices than {cluster.name} has ({world})")
    if out.get("dp", 1) * out.get("tp", 1) > world:
        raise PlanError(
            f"constraints dp={out.get('dp', 1)} x tp={out.get('tp', 1)} need more devices than {cluster.name} "
            f"has ({world})"
        )
    sp = out.get("sp")
    if sp is not None and sp != 1 and "tp" in out and sp != out["tp"]:
        raise PlanError(
            f"constraint sp={sp}: sequence parallelism runs on the tensor-parallel axis, so sp is 1 (off) or "
            f"equal to tp ({out['tp']})"
        )
    return out


def candidate_meshes(cluster: ClusterSpec, constraints: Mapping[str, int]) -> list[tuple[int, int]]:
    """(dp, tp) pairs to try: every device used, tp dividing the devices per node (unless pinned)."""
    world = cluster.world_size
    per_node = cluster.devices_per_node
    if "dp" in constraints and "tp" in constraints:
        return [(constraints["dp"], constraints["tp"])]
    if "tp" in constraints:
        tp = constraints["tp"]
        return [(max(1, world // tp), tp)]
    tps = [t for t in range(1, per_node + 1) if per_node % t == 0 and world % t == 0]
    if "dp" in constraints:
        dp = constraints["dp"]
        return [(dp, t) for t in tps if dp * t <= world and (dp * t == world or t == 1)]
    out = [(world // t, t) for t in tps]
    if (1, 1) not in out:
        out.append((1, 1))
    return out


def _input_placements(graph: Graph, mesh: DeviceMesh, dp: int) -> dict[str, ShardingSpec]:
    out: dict[str, ShardingSpec] = {}
    for i in graph.inputs:
        if not isinstance(i.spec, TensorSpec):
            continue
        if dp > 1 and i.spec.rank > 0 and i.spec.shape[0] % dp == 0:
            out[i.name] = ShardingSpec((Shard(0),) + tuple(Replicate() for _ in mesh.shape[1:]))
        else:
            out[i.name] = replicated(mesh)
    return out


def _step_inputs(
    graph: Graph, placed: Placed, inputs: Mapping[str, ShardingSpec], cluster: ClusterSpec, train: bool,
    optimizer_factor: int, precision: str, zero: int,
) -> dict:  # fmt: skip
    """The keyword arguments ``step_buffers`` and ``map_memory`` take for a placed candidate."""
    return {
        "param_placements": placed.param_placements, "input_placements": inputs, "train": train,
        "precision": precision, "optimizer_factor": optimizer_factor, "zero": zero,
        "grad_reduce": param_grad_reduce(graph, placed.strategies) if train else {},
        "optimizer_foreach": cluster.device.kind != "cpu",
    }  # fmt: skip


def _memory(
    graph: Graph, mesh: DeviceMesh, placed: Placed, inputs: Mapping[str, ShardingSpec], cluster: ClusterSpec,
    train: bool, optimizer_factor: int, precision: str, zero: int, exact: bool = False,
) -> tuple[RankMemory, ...]:  # fmt: skip
    """The memory-mapping pass (``passes.memory.map_memory``) on a placed candidate: per rank, the arena
    of its whole step (parameters, gradients, optimizer state, activations, collective buffers) and the
    lower bound of live bytes; the arena is the plan's predicted peak (``Prediction.memory_bytes``).
    Candidates are scored with the greedy arena, and searched exactly only when that decides whether they
    fit (greedy above the capacity, lower bound within it); ``exact`` searches always (the chosen plan)."""
    step = _step_inputs(graph, placed, inputs, cluster, train, optimizer_factor, precision, zero)
    capacity = cluster.device.memory_bytes

    def run(search: bool) -> tuple[RankMemory, ...]:
        return map_memory(graph, mesh, placed.strategies, capacity_bytes=capacity, exact=search, **step).memory

    memory = run(exact)
    if not exact and max(m.arena_bytes for m in memory) > capacity >= max(m.lower_bound_bytes for m in memory):
        memory = run(True)
    return memory


def _predict(
    graph: Graph, cluster: ClusterSpec, mesh: DeviceMesh, placed: Placed, inputs: Mapping[str, ShardingSpec],
    mode: str, precision: str, zero: int, optimizer: str, memory: tuple[RankMemory, ...],
) -> Prediction:  # fmt: skip
    """The price list's prediction of a placed candidate (``costs.step.price_flat``)."""
    keys = {p.name: p.key for p in graph.params}
    candidate = ExecutionPlan(
        **plan_identity(graph, cluster, mode, precision, mesh),
        degrees_=(("dp", mesh.axis_size("dp")), ("tp", mesh.axis_size("tp")), ("pp", 1)),
        graph=graph, strategies=placed.strategies,
        input_placements=tuple(inputs.get(i.name, replicated(mesh)) for i in graph.inputs),
        param_placements=tuple((keys[n], s) for n, s in placed.param_placements.items()),
        output_placements=tuple(replicated(mesh) for _ in graph.outputs),
        param_grad_reduce=tuple(sorted(param_grad_reduce(graph, placed.strategies).items())) if mode == "train" else (),
        predicted=Prediction(0.0, 0.0, 0.0, 0.0, ()), memory=memory, optimizer=optimizer, zero_stage=zero,
    )  # fmt: skip
    return predict_flat(candidate, cluster)


def _cannot_fit(
    graph: Graph, mesh: DeviceMesh, placed: Placed, inputs: Mapping[str, ShardingSpec], cluster: ClusterSpec,
    train: bool, optimizer_factor: int, precision: str, zero: int,
) -> bool:  # fmt: skip
    """Whether the placed candidate's live bytes at some step exceed the device (its buffers' lower bound):
    then no arena fits, and packing one (most of a memory map's time) can be skipped."""
    step = _step_inputs(graph, placed, inputs, cluster, train, optimizer_factor, precision, zero)
    return lower_bound(step_buffers(graph, mesh, placed.strategies, **step)) > cluster.device.memory_bytes


def _score(
    analyses: Callable[[bool, bool], Analysis], cluster: ClusterSpec, dp: int, tp: int, *, mode: str, precision: str,
    zero_options: list[int],
    sequence_parallel: bool, optimizer_factor: int, solver: str, time_limit_s: float, budget: bool = True,
    stats_out: list[ILPStats] | None = None, optimizer: str = "adamw",
) -> _Scored:  # fmt: skip
    train = mode == "train"
    analysis = analyses(tp > 1, dp * tp > 1)
    g = analysis.graph
    mesh = DeviceMesh((dp, tp), ("dp", "tp"), tuple(range(dp * tp)))
    cost = mesh_prices(cluster, mesh, precision)
    inputs = _input_placements(g, mesh, dp)
    memory_budget = cluster.device.memory_bytes * MEMORY_HEADROOM if budget else None
    last_error = ""
    # ZeRO needs dp > 1; in inference only stage 3 (parameters) changes anything
    levels = list(dict.fromkeys(z if dp > 1 and (train or z != 1) else 0 for z in zero_options))
    for zero in levels:
        free = PlaceOptions(
            train=train, precision=precision, sequence_parallel=sequence_parallel, zero=zero,
            optimizer_factor=optimizer_factor, memory_budget_bytes=None, solver=solver, time_limit_s=time_limit_s,
        )  # fmt: skip
        # the fastest placement first: the memory map decides whether it fits (the ILP's own estimate sums the
        # bytes of every saved activation without lifetimes, and can be far from the map either way); only if
        # it does not fit, the placement under the ILP's memory budget
        attempts = [free] if memory_budget is None else [free, dataclasses.replace(free, memory_budget_bytes=memory_budget)]
        for attempt in attempts:
            try:
                placed = place(g, mesh, cost, inputs, attempt, analysis)
            except DoesNotFitError as exc:
                last_error = str(exc)
                continue
            if stats_out is not None:
                stats_out.append(placed.stats)
            state = (train, optimizer_factor, precision, zero)
            if attempt is not attempts[-1] and _cannot_fit(g, mesh, placed, inputs, cluster, *state):
                continue
            memory = _memory(g, mesh, placed, inputs, cluster, *state)
            peak = max(m.arena_bytes for m in memory)
            pred = _predict(g, cluster, mesh, placed, inputs, mode, precision, zero, optimizer, memory)
            fits = peak <= cluster.device.memory_bytes
            if fits or (zero == levels[-1] and attempt is attempts[-1]) or not budget:
                return _Scored(dp, tp, zero, g, mesh, placed, inputs, memory, pred, fits, peak)
    # nothing fits even with the most sharding: report what the parameters alone need
    need = 0
    for p in g.params:
        need += p.spec.nbytes // (tp if any(s % tp == 0 for s in p.spec.shape) else 1)
    return _Scored(dp, tp, levels[-1], g, mesh, None, inputs, (), None, False, need, last_error)


def _fastest_made_to_fit(
    scored: list[_Scored], fitting: list[_Scored], assemble: Callable[[_Scored], ExecutionPlan],
    make_fit: Callable[[ExecutionPlan], ExecutionPlan], unbudgeted: Callable[[_Scored], _Scored],
    tries: int = 3,
) -> ExecutionPlan | None:
    """The fastest of the meshes that do not fit as they are, placed without a memory budget
    (``unbudgeted``) and made to fit by ``make_fit``, if it is predicted faster than every plan in
    ``fitting``; else None. The ``tries`` fastest such meshes are tried in order; the first made to fit in
    less time than the fastest plan that fits as it is wins."""
    as_is = min((s.prediction.step_time_s for s in fitting if s.prediction), default=float("inf"))
    others = [unbudgeted(s) for s in scored if not (s.fits and s.prediction is not None)]
    faster = sorted(
        (s for s in others if s.prediction is not None and s.prediction.step_time_s < as_is),
        key=lambda s: s.prediction.step_time_s,  # type: ignore[union-attr]
    )
    for candidate in faster[:tries]:
        try:
            fitted = make_fit(assemble(candidate))
        except DoesNotFitError:
            continue
        if fitted.predicted.step_time_s >= as_is or max(fitted.predicted.memory_bytes) > fitted.memory[0].capacity_bytes:
            continue
        step = fitted.predicted.step_time_s
        alternatives = tuple(
            dataclasses.replace(a, step_time_s=step, memory_bytes=max(fitted.predicted.memory_bytes), fits=True)
            if a.chosen
            else dataclasses.replace(a, note=f"{a.step_time_s / step:.2f}x the chosen plan's predicted step time")
            if a.fits and a.step_time_s < float("inf")
            else a
            for a in fitted.alternatives
        )
        why = (
            f"made to fit: the fastest layout does not fit as it is; with recomputation/offload it is predicted "
            f"{step * 1e3:.4g} ms per step, against {as_is * 1e3:.4g} ms for the fastest layout that fits as it is"
            if as_is < float("inf")
            else "made to fit: no layout fits as it is"
        )
        return dataclasses.replace(fitted, alternatives=alternatives, notes=(*fitted.notes, why))
    return None


def plan_auto(
    graph: Graph,
    cluster: ClusterSpec,
    *,
    mode: str = "inference",
    precision: str = "fp32",
    constraints: Mapping[str, int] | None = None,
    optimizer: str = "adamw",
    solver: str = "cbc",
    time_limit_s: float = 60.0,
    require_fit: bool = True,
    stats_out: list[ILPStats] | None = None,
    collectives: str = "library",
    make_fit: Callable[[ExecutionPlan], ExecutionPlan] | None = None,
) -> ExecutionPlan:
    """Search meshes and place each with the ILP; see the module docstring. ``require_fit=False`` returns
    the fastest plan even when none fits in device memory (with a note saying how much it needs) instead
    of raising DoesNotFitError: for sizing clusters. ``stats_out`` receives the ILP statistics of every
    placement solved (one per mesh and ZeRO stage tried). ``collectives="synthesize"`` then gives every
    collective of the chosen plan a synthesized schedule where one is predicted faster than the library's
    (``planner.collectives``; the plan records each one's algorithm).

    ``make_fit`` (training: recomputation and/or host offload, e.g. ``planner.recompute.fit_by_recomputation``)
    makes the choice joint: the meshes that do not fit as they are are placed again without a memory budget,
    and the fastest of them, made to fit by ``make_fit``, is chosen when it is predicted faster than the
    fastest plan that fits as it is (or when none does). Its cost (recompute time, transfers) is in its
    predicted step time, so a layout that fits as it is wins whenever recomputing would cost more."""
    if collectives not in ("library", "synthesize"):
        raise PlanError(f"collectives={collectives!r} is not allowed: use 'library' or 'synthesize'")
    constraints = _check_constraints(constraints or {}, cluster)
    batch = [i.spec.shape[0] for i in graph.inputs if isinstance(i.spec, TensorSpec) and i.spec.rank > 0]
    zero_options = [constraints["zero"]] if "zero" in constraints else [0, 1, 3]
    sp = constraints.get("sp", 0) != 1
    factor = OPTIMIZER_STATE_FACTOR.get(optimizer, 2)
    made: dict[tuple[bool, bool], Analysis] = {}

    def analyses(tp: bool, many: bool) -> Analysis:
        """The graph, rewritten to expose tensor parallelism (tp > 1) and to split mean losses (more than one
        device), with its analysis, made once per kind."""
        if (tp, many) not in made:
            g = expose_tensor_parallelism(graph) if tp else graph
            made[(tp, many)] = Analysis(mean_losses_as_sums(g) if many else g)
        return made[(tp, many)]

    scored: list[_Scored] = []
    for dp, tp in candidate_meshes(cluster, constraints):
        if dp > 1 and batch and all(b % dp for b in batch):
            if "dp" in constraints:
                raise PlanError(
                    f"dp={dp} needs a batch size divisible by {dp}; the example inputs have {batch}"
                )
            continue
        scored.append(
            _score(
                analyses,
                cluster,
                dp,
                tp,
                mode=mode,
                precision=precision,
                zero_options=zero_options,
                sequence_parallel=sp,
                optimizer_factor=factor,
                solver=solver,
                time_limit_s=time_limit_s,
                stats_out=stats_out,
                optimizer=optimizer,
            )  # fmt: skip
        )
    if not scored:
        raise PlanError(
            f"no mesh of {cluster.name} suits this model: the batch sizes {batch} are not divisible by any "
            "data-parallel degree; pin constraints={'dp': 1, 'tp': N} or change the batch size"
        )
    def assemble(best: _Scored, overflow: str, unbudgeted: bool = False) -> ExecutionPlan:
        """The ExecutionPlan of candidate ``best`` (``scored`` are the alternatives it is ranked among)."""
        assert best.placed is not None and best.prediction is not None
        # an unbudgeted candidate stands in for its mesh's entry among the alternatives
        ranked = [best, *(s for s in scored if (s.dp, s.tp) != (best.dp, best.tp))] if unbudgeted else scored
        chosen = (
            "chosen: fastest plan, made to fit" if unbudgeted
            else "chosen: fastest plan that fits" if best.fits else "chosen: fastest plan (none fits)"
        )  # fmt: skip
        alternatives = tuple(
            Alternative(
                degrees=(("dp", s.dp), ("tp", s.tp), ("pp", 1)),
                step_time_s=s.prediction.step_time_s if s.prediction else float("inf"),
                memory_bytes=s.need_bytes,
                fits=s.fits,
                chosen=s is best,
                note=chosen
                if s is best
                else (
                    "does not fit in device memory"
                    if not s.fits
                    else _relative_time(s.prediction.step_time_s, best.prediction.step_time_s)
                    if s.prediction
                    else s.note
                ),
            )  # fmt: skip
            for s in sorted(ranked, key=lambda s: s.prediction.step_time_s if s.prediction else float("inf"))
        )
        g, mesh, placed = best.graph, best.mesh, best.placed
        stats = placed.stats
        notes = []
        if overflow and not best.fits:
            notes.append(
                f"does not fit: the plan needs {best.need_bytes / 2**30:.1f} GiB per device, {cluster.name} has "
                f"{cluster.device.memory_bytes / 2**30:.1f} GiB (pipeline parallelism or activation recomputation "
                "would be needed)"
            )
        notes += [
            f"placement ILP: {stats.classes} classes from {stats.nodes} ops ({stats.repeated_blocks or 'no repeated blocks'}); "
            f"{stats.variables} variables, {stats.constraints} constraints (unshrunk: {stats.variables_before}, "
            f"{stats.constraints_before}); {stats.status} in {stats.solve_s:.2f} s"
        ]
        if best.dp * best.tp < cluster.world_size:
            notes.append(f"runs on {best.dp * best.tp} of the {cluster.world_size} devices")
        if best.zero:
            notes.append(f"ZeRO stage {best.zero}: optimizer state sharded over dp={best.dp}" + (
                ", parameters too" if best.zero == 3 else ""))  # fmt: skip
        # the chosen plan's memory map, searched exactly (candidates were scored with the greedy arena); a greedy
        # arena already equal to the lower bound is optimal, and the exact search would return it unchanged
        memory = best.memory
        if any(m.arena_bytes > m.lower_bound_bytes for m in memory) or not memory:
            memory = _memory(
                g, mesh, placed, best.inputs, cluster, mode == "train", factor, precision, best.zero, exact=True
            )
        predicted = dataclasses.replace(best.prediction, memory_bytes=tuple(m.arena_bytes for m in memory))
        grad_reduce = param_grad_reduce(g, placed.strategies) if mode == "train" else {}
        keys = {p.name: p.key for p in g.params}
        plan = ExecutionPlan(
            **plan_identity(graph, cluster, mode, precision, mesh),
            degrees_=(("dp", best.dp), ("tp", best.tp), ("pp", 1)),
            graph=g,
            strategies=placed.strategies,
            input_placements=tuple(best.inputs.get(i.name, replicated(mesh)) for i in g.inputs),
            param_placements=tuple((keys[name], spec) for name, spec in placed.param_placements.items()),
            output_placements=tuple(replicated(mesh) for _ in g.outputs),
            param_grad_reduce=tuple(sorted(grad_reduce.items())),
            predicted=predicted,
            memory=memory,
            replicated_ops=placed.run_whole,
            alternatives=alternatives,
            passes=("trace", "sharding.rewrite", "sharding.ilp", "memory.map", "planner.auto"),
            notes=tuple(notes),
            optimizer=optimizer,
            zero_stage=best.zero,
        )
        return plan

    def unbudgeted(s: _Scored, zero: int) -> _Scored:
        """Mesh ``s`` placed again at ZeRO stage ``zero`` without a memory budget (its fastest placement)."""
        return _score(
            analyses, cluster, s.dp, s.tp, mode=mode, precision=precision, zero_options=[zero],
            sequence_parallel=sp, optimizer_factor=factor, solver=solver, time_limit_s=time_limit_s,
            budget=False, stats_out=stats_out, optimizer=optimizer,
        )  # fmt: skip

    def choose(plan: ExecutionPlan) -> ExecutionPlan:
        if collectives == "synthesize":
            from shardwise.planner.collectives import choose_collectives

            plan = choose_collectives(plan, cluster)
        return plan

    fitting = [s for s in scored if s.fits and s.prediction is not None]
    overflow = ""
    if make_fit is not None and mode == "train" and len(fitting) < len(scored):
        made_fit = _fastest_made_to_fit(
            scored, fitting, lambda s: assemble(s, "", unbudgeted=True), make_fit, lambda s: unbudgeted(s, s.zero)
        )
        if made_fit is not None:
            return choose(made_fit)
    if not fitting and not require_fit:
        need = min(s.need_bytes for s in scored)
        scored = [unbudgeted(s, zero_options[-1]) if s.prediction is None else s for s in scored]
        fitting = [s for s in scored if s.prediction is not None]
        overflow = "does not fit"
    if not fitting:
        need = min(s.need_bytes for s in scored)
        raise DoesNotFitError(
            f"the model needs at least {need / 2**30:.2f} GiB per device under every plan this planner can make, "
            f"and {cluster.name} has {cluster.device.memory_bytes / 2**30:.2f} GiB per device: choose a cluster "
            "with more memory per device (or more devices), or a lower precision"
        )
    best = min(fitting, key=lambda s: (not s.fits, s.prediction.step_time_s, -s.dp * s.tp, s.tp))  # type: ignore[union-attr]
    return choose(assemble(best, overflow))
