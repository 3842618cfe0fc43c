"""Pipeline plans: the search's winner turned into an ExecutionPlan with its chunks, transfers and schedule.

``plan_pipeline(graph, cluster, micro_graph=...)`` runs the whole-plan search
(:mod:`shardwise.planner.search`) on ``graph`` (the model traced at the full batch), then builds what codegen
needs for the winner:

- the model traced at the winner's micro-batch size (``micro_graph(rows)``; the batch dimension changes
  view sizes, so the chunks are cut from a graph traced at the size they run at);
- its layer units cut into the winner's chunks (:func:`~shardwise.passes.stages.extract_chunks`), each
  placed on its ``1 x tp`` tensor-parallel group by the intra-op planner and fused like any program;
- the schedule's per-device action lists and the chunk-to-chunk transfers;
- the top-level plan: mesh ``pp x dp x tp``, predictions (step time, bubble, per-rank memory from the
  memory-mapping pass on each stage's schedule (``passes.memory.pipeline``), TFLOP/s,
  MFU) and the ranked alternatives of the search.

The batch is cut only if that is exact (:mod:`shardwise.passes.stages.rows`: rows independent, outputs
batch-first, the loss a mean over the batch, no batch size written into the model); otherwise the plan runs
one micro-batch on one replica (``dp=1``), or, if the constraints pin more, a PlanError says why.

Requires: ``graph`` and ``micro_graph(rows)`` trace the same model (same layer units); training losses are
means over the batch (a step's loss is the mean of its micro-batches' losses, and each micro-batch's
gradient is scaled by ``1 / microbatches``). Guarantees: ``plan.pipeline`` passes
:func:`~shardwise.ir.pipeline.check_pipeline`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

from shardwise.cluster import ClusterSpec
from shardwise.costs.attention import CP_WAYS
from shardwise.costs.prices import price_list
from shardwise.costs.step import mfu, price_pipeline
from shardwise.errors import PlanError, ShardwiseError
from shardwise.ir.experts import MOE_EXPERTS
from shardwise.ir.graph import Graph
from shardwise.ir.pipeline import PipelineSpec, PipelineStage, check_pipeline
from shardwise.ir.placement import DeviceMesh, Replicate, Shard, ShardingSpec
from shardwise.ir.plan import Alternative, ExecutionPlan, NodeStrategy, Prediction
from shardwise.ir.tensor import TensorSpec
from shardwise.passes.memory.mapping import OPTIMIZER_STATE_FACTOR
from shardwise.passes.memory.pipeline import PipelineMemoryMap, map_pipeline_memory
from shardwise.passes.sharding.experts import split_experts
from shardwise.passes.stages import chunk_owner, extract_chunks, layer_units
from shardwise.passes.stages.place import PlacementCache, place_chunk, value_names
from shardwise.passes.stages.profile import traced_batch
from shardwise.passes.stages.rows import micro_shapes_problem, rows_problem
from shardwise.planner.flat import context_note, sequence_length
from shardwise.planner.identity import plan_identity
from shardwise.planner.schedule import schedule_actions
from shardwise.planner.search import Candidate, SearchOptions, SearchResult, search

__all__ = [
    "plan_pipeline", "realize_pipeline", "batch_inputs", "batch_cut_problem", "priced_pipeline", "PIPELINE_KEYS",
    "wants_pipeline", "with_exact_memory", "top_mesh", "expert_chunk_mesh",
]  # fmt: skip

# constraint keys only a pipeline plan can honour
PIPELINE_KEYS = ("microbatches", "microbatch_size", "virtual", "schedule", "recompute")
MAX_ALTERNATIVES = 24


def wants_pipeline(constraints: Mapping[str, object] | None) -> bool:
    """Whether the constraints ask for a pipeline (pp > 1 or a pipeline-only choice)."""
    c = dict(constraints or {})
    pp = c.get("pp", 1)
    return (isinstance(pp, int) and pp > 1) or any(k in c for k in PIPELINE_KEYS)


def batch_inputs(graph: Graph) -> tuple[int, ...]:
    """Indices of the graph inputs that carry the batch (dim 0 equal to the first input's dim 0)."""
    first = next(
        (i.spec.shape[0] for i in graph.inputs if isinstance(i.spec, TensorSpec) and i.spec.rank), None
    )
    return tuple(
        k for k, i in enumerate(graph.inputs)
        if isinstance(i.spec, TensorSpec) and i.spec.rank and i.spec.shape[0] == first
    )  # fmt: skip


def _grad_reduce(graph: Graph, strategies: tuple[NodeStrategy, ...]) -> dict[str, tuple[str, ...]]:
    from shardwise.passes.sharding.gradients import param_grad_reduce

    return param_grad_reduce(graph, strategies)


def expert_chunk_mesh(cand: Candidate, stage: int) -> DeviceMesh:
    """The mesh of a chunk of device stage ``stage`` under expert parallelism: ``ep x tp``, its ``ep`` axis the
    first ``ep`` data-parallel replicas of the stage (every group of them is laid alike), so that the price list
    prices the experts' all-to-alls on the links of that stage's ranks."""
    ranks = tuple((stage * cand.dp + e) * cand.tp + t for e in range(cand.ep) for t in range(cand.tp))
    return DeviceMesh((cand.ep, cand.tp), ("ep", "tp"), ranks)


def _chunk_plan(
    graph: Graph, cluster: ClusterSpec, cand: Candidate, *, mode: str, precision: str, optimizer: str, fusion: bool,
    placements: PlacementCache | None = None, stage: int = 0, sequence: int | None = None,
    cp_ways: tuple[str, ...] = CP_WAYS,
) -> ExecutionPlan:  # fmt: skip
    """Chunk ``graph`` placed on its tensor-parallel group (``passes.stages.place``), or with context parallelism
    (``cand.cp > 1``) on its replica's ``cp x tp`` ranks, attention by one of ``cp_ways`` (``sequence``: the
    model's sequence length); with expert parallelism (``cand.ep > 1``) then lifted to the ``ep x tp`` mesh of its
    stage (:func:`expert_chunk_mesh`), every experts op's experts split over ``ep``
    (``passes.sharding.experts.split_experts``, the tokens each replica's own)."""
    train = mode == "train"
    placed = place_chunk(
        graph, cluster, cand.tp, sequence_parallel=cand.sp, train=train, precision=precision,
        optimizer_factor=OPTIMIZER_STATE_FACTOR.get(optimizer, 2), cache=placements, cp=cand.cp, sequence=sequence,
        cp_ways=cp_ways,
    )  # fmt: skip
    g, mesh = placed.graph, placed.mesh
    if cand.cp > 1:  # priced on the links of the stage's first replica
        first = stage * cand.dp * cand.cp * cand.tp
        mesh = DeviceMesh(mesh.shape, mesh.axis_names, tuple(first + r for r in range(cand.cp * cand.tp)))
    strategies, param_placements = placed.strategies, placed.param_placements
    if cand.ep > 1 and any(n.op == MOE_EXPERTS for n in g.nodes):
        mesh = expert_chunk_mesh(cand, stage)
        strategies, param_placements = split_experts(
            g, mesh, strategies, param_placements, "ep", local_tokens=True
        )  # fmt: skip
    keys = {p.name: p.key for p in g.params}
    rep = ShardingSpec(tuple(Replicate() for _ in mesh.shape))
    plan = ExecutionPlan(
        **plan_identity(g, cluster, mode, precision, mesh),
        degrees_=(("dp", 1), ("tp", cand.tp), ("pp", 1)),
        graph=g,
        strategies=strategies,
        input_placements=tuple(placed.input_placements.get(i.name, rep) for i in g.inputs),
        param_placements=tuple((keys[n], s) for n, s in param_placements.items() if n in keys),
        output_placements=tuple(rep for _ in g.outputs),
        param_grad_reduce=tuple(sorted(_grad_reduce(g, strategies).items())) if train else (),
        predicted=Prediction(0.0, 0.0, 0.0, 0.0, ()),
        memory=(),
        replicated_ops=placed.run_whole,
        passes=("trace", "stages.extract", f"sharding.{placed.method}"),
        optimizer=optimizer,
    )
    if fusion:
        plan = _fused(plan, placed.structure, placements)
    return plan


def _fused(plan: ExecutionPlan, structure: tuple, placements: PlacementCache | None) -> ExecutionPlan:
    """``plan`` fused (``passes.fusion``); a chunk with the structure of one fused before in this planning run
    (``structure``, from the placement cache) takes its groups, names mapped: the same program, the same
    kernels."""
    from shardwise.ir.fusion import FusedGroup
    from shardwise.passes.fusion import PASS_NAME, fuse_plan

    if placements is None or not structure:
        return fuse_plan(plan)
    key = ("fusion", structure, plan.mode, plan.mesh.shape)
    hit = placements.get(key)
    if hit is None:
        plan = fuse_plan(plan)
        placements[key] = (value_names(plan.graph), plan.fused_groups, ())  # type: ignore[assignment]
        return plan
    names = dict(zip(hit[0], value_names(plan.graph), strict=True))
    groups = tuple(
        FusedGroup(g.name, tuple(names[n] for n in g.nodes), tuple(names.get(n, n) for n in g.inputs),
                   tuple(names.get(n, n) for n in g.outputs), g.kind, g.bytes_saved)  # fmt: skip
        for g in hit[1]
    )
    passes = plan.passes if PASS_NAME in plan.passes else (*plan.passes, PASS_NAME)
    return plan.replace(fused_groups=groups, passes=passes)


def _alternatives(result: SearchResult) -> tuple[Alternative, ...]:
    best = result.best
    out = []
    seen = set()
    for c in result.ranked:
        if c.key() in seen:
            continue
        seen.add(c.key())
        if c is best:
            note = f"chosen: fastest plan that fits ({c.describe()})"
        elif not c.fits:
            note = f"does not fit in device memory ({c.describe()})"
        else:
            how = "simulated" if c.simulated else "estimated"
            note = f"{c.step_s / best.step_s:.2f}x the chosen plan's step time, {how} ({c.describe()})"
        out.append(
            Alternative(
                degrees=c.degrees,
                step_time_s=c.step_s,
                memory_bytes=c.peak_bytes,
                fits=c.fits,
                chosen=c is best,
                note=note,
            )  # fmt: skip
        )
        if len(out) >= MAX_ALTERNATIVES:
            break
    return tuple(out)


def plan_pipeline(
    graph: Graph,
    cluster: ClusterSpec,
    *,
    micro_graph: Callable[[int], Graph] | None = None,
    mode: str = "train",
    precision: str = "fp32",
    constraints: Mapping[str, object] | None = None,
    optimizer: str = "adamw",
    fusion: bool = True,
    options: SearchOptions | None = None,
    result: SearchResult | None = None,
) -> ExecutionPlan:
    """Search, then build the best pipeline layout's plan (see the module docstring)."""
    check_static_batch(graph)
    options = options or SearchOptions(
        mode=mode, precision=precision, optimizer_factor=OPTIMIZER_STATE_FACTOR.get(optimizer, 2), optimizer=optimizer,
    )
    result = result or search(graph, cluster, dict(constraints or {}), options)
    best = next((c for c in result.ranked if c.fits and not c.flat), None) or result.best
    return realize_pipeline(
        graph, cluster, best, result, micro_graph=micro_graph, mode=mode, precision=precision, optimizer=optimizer,
        fusion=fusion,
    )  # fmt: skip


def check_static_batch(graph: Graph) -> None:
    if any(d.dim == 0 for i in graph.inputs for d in i.dynamic):
        raise PlanError(
            "pipeline plans need a static batch size (micro-batches are cut from it): compile without "
            "dynamic_shapes on the batch dimension"
        )


def batch_cut_problem(graph: Graph, micro_graph: Callable[[int], Graph] | None, rows: int) -> str:
    """"" when the batch can be run in parts of ``rows`` rows with the whole batch's results, else why not."""
    return _micro_graph(graph, micro_graph, rows)[1]


def realize_pipeline(
    graph: Graph,
    cluster: ClusterSpec,
    best: Candidate,
    result: SearchResult,
    *,
    micro_graph: Callable[[int], Graph] | None = None,
    mode: str = "train",
    precision: str = "fp32",
    optimizer: str = "adamw",
    fusion: bool = True,
    placements: PlacementCache | None = None,
    exact_memory: bool = True,
    exact_out: list[bool] | None = None,
    cp_ways: tuple[str, ...] = CP_WAYS,
) -> ExecutionPlan:
    """Build the plan of the pipeline layout ``best`` (one of ``result``'s candidates): the model traced at the
    micro-batch size, cut into the layout's chunks, each placed and fused; priced by the price list.
    ``placements``: chunk placements to share with other layouts of the same planning run (a chunk with the
    structure of one placed before takes its placement: ``passes.stages.place.place_chunk``).
    ``exact_memory=False``: the stages' memory maps search offsets only when the greedy arena does not fit the
    device (``map_pipeline_memory(within_capacity=True)``); :func:`with_exact_memory` maps them exactly.
    ``exact_out`` (if given) gets whether the maps made are the exact ones anyway. ``cp_ways``: the ways
    attention may run over ``cp`` (the placement of each chunk takes the cheapest)."""
    check_static_batch(graph)
    rows = best.microbatch
    traced = next(
        (i.spec.shape[0] for i in graph.inputs if isinstance(i.spec, TensorSpec) and i.spec.rank), 1
    )
    mg = graph
    if rows != traced:
        mg, problem = _micro_graph(graph, micro_graph, rows)
        if problem:
            raise PlanError(
                f"the batch of {graph.model_name or 'the model'} cannot be cut into parts that run separately: "
                f"{problem}. Pipeline micro-batches and data-parallel pipeline replicas each run a part of the "
                "batch; compile with pp=1 (intra-op plans split such ops exactly), or with dp=1 and "
                "microbatches=1, or make the rows independent (e.g. x.view(x.shape[0], -1), not x.view(8, -1))"
            )
    units = layer_units(mg)
    if units.labels != result.units.labels or len(result.sequence) != len(units):
        raise PlanError(
            "the model traced at the micro-batch size has other layers than at the full batch "
            f"({len(units)} vs {len(result.sequence)} units): its structure depends on the batch size"
        )
    chunks = extract_chunks(mg, chunk_owner(units.nodes, best.bounds), len(best.bounds))
    train = mode == "train"
    selective = set(best.recomputed) if train and best.recompute == "selective" else set()
    plans = []
    for c, g in enumerate(chunks.graphs):
        plan = _chunk_plan(
            g, cluster, best, mode=mode, precision=precision, optimizer=optimizer, fusion=fusion,
            placements=placements if placements is not None else {}, stage=c % best.pp,
            sequence=sequence_length(graph), cp_ways=cp_ways,
        )  # fmt: skip
        a, z = best.bounds[c]
        ranges = _unit_ranges(plan.graph, [units.nodes[i] for i in range(a, z) if i in selective])
        plans.append(plan.replace(recompute=ranges) if ranges else plan)
    for t in chunks.transfers:
        if t.value not in plans[t.src].graph.output_names or t.value not in {
            i.name for i in plans[t.dst].graph.inputs
        }:
            raise PlanError(f"the placement renamed the pipeline boundary value {t.value}: a shardwise bug")
    actions = schedule_actions(best.schedule, best.pp, best.microbatches, best.virtual, train=train)
    stages = tuple(
        PipelineStage(
            chunk=c,
            device_stage=c % best.pp,
            units=tuple(result.labels[a:b]),
            plan=plans[c],
            forward_s=best.chunk_forward_s[c],
            backward_s=best.chunk_backward_s[c],
            memory_bytes=best.memory_bytes[c % best.pp],
        )  # fmt: skip
        for c, (a, b) in enumerate(best.bounds)
    )
    spec = PipelineSpec(
        schedule=best.schedule, pp=best.pp, virtual=best.virtual, dp=best.dp, tp=best.tp,
        sequence_parallel=best.sp, microbatches=best.microbatches, microbatch_size=rows,
        recompute="full" if best.recompute == "full" else "none", stages=stages, transfers=chunks.transfers,
        tied=chunks.tied, actions=tuple(tuple(a) for a in actions), batch_inputs=batch_inputs(graph),
        zero=best.zero, ep=best.ep, cp=best.cp,
    )  # fmt: skip
    check_pipeline(spec, train=train)
    plan, exact = _top_plan(
        graph, cluster, spec, result, mode=mode, precision=precision, optimizer=optimizer, exact=exact_memory
    )
    if exact_out is not None:
        exact_out.append(exact)
    if best.ep > 1:
        plan = plan.replace(notes=(*plan.notes, expert_note(spec, cluster, best, result)))
    if best.cp > 1:
        plan = plan.replace(notes=(*plan.notes, *_context_notes(spec, cluster)))
    return priced_pipeline(plan, cluster, result.model_flops)


def _memory(
    spec: PipelineSpec, cluster: ClusterSpec, *, mode: str, precision: str, optimizer: str, exact: bool
) -> PipelineMemoryMap:
    """The memory-mapping pass on each device stage's schedule (micro-batches in flight)."""
    return map_pipeline_memory(
        spec, train=mode == "train", capacity_bytes=cluster.device.memory_bytes, precision=precision,
        optimizer_factor=OPTIMIZER_STATE_FACTOR.get(optimizer, 2), optimizer_foreach=cluster.device.kind != "cpu",
        within_capacity=not exact,
    )  # fmt: skip


def with_exact_memory(plan: ExecutionPlan, cluster: ClusterSpec) -> ExecutionPlan:
    """A pipeline plan realized with ``exact_memory=False``, its stages' memory mapped exactly (the smallest
    arena the search finds): the memory figures ``realize_pipeline`` gives by default."""
    spec = plan.pipeline
    assert spec is not None
    memory = _memory(
        spec, cluster, mode=plan.mode, precision=plan.precision, optimizer=plan.optimizer, exact=True
    ).memory
    predicted = dataclasses.replace(plan.predicted, memory_bytes=tuple(m.arena_bytes for m in memory))
    return plan.replace(memory=memory, predicted=predicted)


def _unit_ranges(graph: Graph, units: list[tuple[str, ...]]) -> tuple[tuple[str, str], ...]:
    """(first node, last node) in ``graph`` of each of ``units`` (node names; a unit's nodes are contiguous in
    graph order), for ``ExecutionPlan.recompute``."""
    index = {n.name: k for k, n in enumerate(graph.nodes)}
    out = []
    for names in units:
        present = sorted(index[n] for n in names if n in index)
        if present:
            out.append((graph.nodes[present[0]].name, graph.nodes[present[-1]].name))
    return tuple(out)


def priced_pipeline(plan: ExecutionPlan, cluster: ClusterSpec, model_flops: float) -> ExecutionPlan:
    """``plan`` with its prediction and its stages' times from the price list (``costs.step.price_pipeline``
    on the realized chunks): the one price of this layout. ``model_flops``: FLOPs of one step."""
    spec = plan.pipeline
    assert spec is not None
    prices = price_list(cluster, plan.precision)
    priced = price_pipeline(plan, prices)
    stages = tuple(
        dataclasses.replace(st, forward_s=priced.chunk_forward_s[c], backward_s=priced.chunk_backward_s[c])
        for c, st in enumerate(spec.stages)
    )
    step = priced.step
    tflops, util = mfu(model_flops, plan.world_size, step.step_s, prices.peak_flops)
    predicted = dataclasses.replace(
        plan.predicted, step_time_s=step.step_s, compute_s=step.compute_s, comm_s=step.comm_s,
        bubble_s=step.bubble_s, tflops_per_device=tflops, mfu=util,
    )  # fmt: skip
    return plan.replace(pipeline=dataclasses.replace(spec, stages=stages), predicted=predicted)


def _micro_graph(graph: Graph, micro_graph: Callable[[int], Graph] | None, rows: int) -> tuple[Graph, str]:
    """The model traced at ``rows`` rows, and "" if running the batch in parts of ``rows`` rows gives the
    whole batch's results, else why not (:mod:`shardwise.passes.stages.rows`). ``micro_graph(n)`` may be
    asked for more rows than the traced batch (3 for a batch of 2)."""
    batch = batch_inputs(graph)
    if micro_graph is None:
        problem = rows_problem(graph, batch)  # tensors made at the batch size count as a problem
        if problem:
            return graph, problem
        raise PlanError(
            f"the chosen plan runs micro-batches of {rows} rows but no tracer for that size was given: pass "
            "micro_graph=, or pin constraints={'microbatches': 1, 'dp': 1}"
        )
    traced = traced_batch(graph)
    # torch.export specializes dims of size 1 (other ops at 1 row): the comparison traces at 2 (or 3) rows then
    size = rows if rows > 1 else (2 if traced > 2 else 3)
    try:
        check = micro_graph(size)
    except ShardwiseError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return graph, f"the model does not trace with {size} rows, so it depends on its batch size ({first})"
    problem = micro_shapes_problem(graph, check, batch, size)
    if problem:
        return graph, problem
    return (check if size == rows else micro_graph(rows)), ""


def _top_plan(
    graph: Graph, cluster: ClusterSpec, spec: PipelineSpec, result: SearchResult, *, mode: str, precision: str,
    optimizer: str, exact: bool = True,
) -> tuple[ExecutionPlan, bool]:  # fmt: skip
    best = result.best
    pp, dp, tp, ep = spec.pp, spec.dp, spec.tp, spec.ep
    world = spec.world_size
    mesh = top_mesh(spec)
    rep = ShardingSpec(tuple(Replicate() for _ in mesh.shape))
    split = ShardingSpec(tuple(Shard(0) if a in ("dp", "ep") else Replicate() for a in mesh.axis_names))
    batch = set(spec.batch_inputs)
    params: dict[str, ShardingSpec] = {}
    expert_axis = "ep" if "ep" in mesh.axis_names else "dp"  # where the chunks' ep axis lies on the whole mesh
    for stage in spec.stages:
        chunk_axes = stage.plan.mesh.axis_names
        for key, s in stage.plan.param_placements:
            by_axis = dict(zip(chunk_axes, s.placements, strict=True))
            top = [by_axis.get(a, Replicate()) if a in ("tp", "cp") else Replicate() for a in mesh.axis_names]
            if ep > 1 and by_axis.get("ep", Replicate()) != Replicate():
                top[mesh.axis_names.index(expert_axis)] = by_axis["ep"]
            params.setdefault(key, ShardingSpec(tuple(top)))
    tflops, util = mfu(result.model_flops, world, best.step_s, price_list(cluster, precision).peak_flops)
    # the memory-mapping pass on each device stage's schedule (micro-batches in flight): the prediction
    mapped = _memory(spec, cluster, mode=mode, precision=precision, optimizer=optimizer, exact=exact)
    memory = mapped.memory
    per_rank = tuple(m.arena_bytes for m in memory)
    notes = [
        f"pipeline: {spec}",
        "chunks: "
        + "; ".join(f"{s.chunk}@stage{s.device_stage}: {s.units[0]}..{s.units[-1]}" for s in spec.stages),
        f"search: {result.evaluated} candidates evaluated, {result.placements} unit placements, "
        f"{result.planning_s:.2f} s; bubble {best.bubble_s:.4g} s of a {best.step_s:.4g} s step",
    ]
    if spec.tied:
        notes.append(
            "tied weights (one copy per chunk, gradients summed): " + ", ".join(k for k, _ in spec.tied)
        )
    if world < cluster.world_size:
        notes.append(f"runs on {world} of the {cluster.world_size} devices")
    plan = ExecutionPlan(
        **plan_identity(graph, cluster, mode, precision, mesh),
        degrees_=(("dp", dp), ("tp", tp), ("pp", pp)) + ((("ep", ep),) if ep > 1 else ())
        + ((("cp", spec.cp),) if spec.cp > 1 else ()),
        graph=graph,
        strategies=(),
        input_placements=tuple(split if k in batch and dp > 1 else rep for k in range(len(graph.inputs))),
        param_placements=tuple(sorted(params.items())),
        output_placements=tuple(rep for _ in graph.outputs),
        param_grad_reduce=(),
        predicted=Prediction(
            step_time_s=best.step_s,
            compute_s=best.compute_s,
            comm_s=best.comm_s,
            bubble_s=best.bubble_s,
            memory_bytes=per_rank,
            tflops_per_device=tflops,
            mfu=util,
        ),  # fmt: skip
        memory=memory,
        alternatives=_alternatives(result),
        passes=(
            "trace",
            "stages.units",
            "stages.partition",
            "sharding",
            f"schedule.{spec.schedule}",
            "memory.map",
            "planner.search",
        ),
        notes=tuple(notes),
        optimizer=optimizer,
        pipeline=spec,
    )
    return plan, mapped.exact


def top_mesh(spec: PipelineSpec) -> DeviceMesh:
    """The whole pipeline's mesh: ``pp x dp x tp`` (rank ``(p * dp + d) * tp + t``); with expert parallelism
    below ``dp`` (``1 < ep < dp``) its data-parallel ranks are two axes, ``dp / ep`` replicas of the experts
    (outer: ZeRO's axis) and ``ep`` (inner), as ``planner.flat.flat_mesh`` lays a flat plan's; ``ep = dp``
    splits the experts over the ``dp`` axis itself. With context parallelism: ``pp x dp x cp x tp`` (rank
    ``((p * dp + d) * cp + c) * tp + t``)."""
    pp, dp, tp, ep = spec.pp, spec.dp, spec.tp, spec.ep
    ranks = tuple(range(spec.world_size))
    if spec.cp > 1:
        return DeviceMesh((pp, dp, spec.cp, tp), ("pp", "dp", "cp", "tp"), ranks)
    if 1 < ep < dp:
        return DeviceMesh((pp, dp // ep, ep, tp), ("pp", "dp", "ep", "tp"), ranks)
    return DeviceMesh((pp, dp, tp), ("pp", "dp", "tp"), ranks)


def expert_note(spec: PipelineSpec, cluster: ClusterSpec, cand: Candidate, result: SearchResult) -> str:
    """Why this pipeline splits its experts over ``ep``: what a rank holds, the all-to-all it pays per
    micro-batch (the realized chunks' price), and the best estimated layout with another ``ep``."""
    from shardwise.costs.compute import traced_scale
    from shardwise.costs.step import expert_exchange_s
    from shardwise.ir.experts import expert_axis
    from shardwise.ir.registry import tensor_operands

    experts = layers = 0
    exchange = [0.0] * spec.pp  # per device stage, every chunk of it
    for st in spec.stages:
        plan = st.plan
        by_node = {s.node: s for s in plan.strategies}
        prices = price_list(cluster, plan.precision)
        for node in plan.graph.nodes:
            s = by_node.get(node.name)
            axis = expert_axis(s, plan.mesh) if node.op == MOE_EXPERTS else None
            if axis is None or s is None:
                continue
            layers += 1
            w = plan.graph.spec_of(tensor_operands(node)[3])
            experts = w.shape[0] if isinstance(w, TensorSpec) else experts
            f, b = expert_exchange_s(prices, plan.mesh, axis, node, s, plan.graph, traced_scale(plan.graph, plan.precision))
            exchange[st.device_stage] += f + (b if plan.mode == "train" else 0.0)
    other = next((c for c in result.ranked if c.ep != cand.ep and c.fits), None)
    alt = (f"; the best layout with ep={other.ep} is estimated at {other.step_s / cand.step_s:.2f}x this one's "
           f"step ({other.describe()})") if other is not None else ""  # fmt: skip
    held = f"{experts // spec.ep} of {experts} experts of each of {layers} MoE layers" if experts else "its experts"
    return (
        f"expert parallelism: ep={spec.ep}: each stage's experts split over {spec.ep} of its {spec.dp} data-parallel "
        f"replicas (a rank holds {held}; tokens dispatched and combined by all-to-all, "
        f"{max(exchange) * 1e3:.3f} ms per micro-batch on the stage that spends the most on them, predicted); "
        f"expert gradients reduced over their "
        f"{spec.dp // spec.ep} replica(s), the others over dp={spec.dp}{alt}"
    )


def _context_notes(spec: PipelineSpec, cluster: ClusterSpec) -> list[str]:
    """What the cp axis does in each chunk (``planner.flat.context_note``: the sequence split, how each attention
    runs over it and what each way is predicted to cost), and how the chunks pass their values."""
    out = [
        f"context parallelism in the pipeline: each replica's {spec.cp} x {spec.tp} ranks split the sequence over "
        f"cp={spec.cp} in every chunk; a chunk cuts its piece of the values it receives whole and makes its outputs "
        "whole (all-gather over cp) before they are sent on"
    ]
    for st in spec.stages:
        plan = st.plan
        if "cp" not in plan.mesh.axis_names or not any(dict(s.split).get("cp") for s in plan.strategies):
            continue
        note = context_note(plan.graph, plan.mesh, plan.strategies, cluster, plan.precision, plan.mode == "train")
        out.append(f"chunk {st.chunk} (its program runs once per micro-batch, {spec.microbatches} per step): {note}")
    return out
