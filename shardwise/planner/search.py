"""The one search: every layout of a model on a cluster, priced by the price list, ranked.

A layout (:class:`Candidate`) is a mesh ``pp x dp x tp`` (``planner.meshes``), sequence parallelism on the
tensor-parallel axis or not, a ZeRO stage (0: none; 1: optimizer state sharded over ``dp``; 2: and gradients;
3: and parameters), a micro-batch size (pipelines; flat layouts run the replica's whole batch at once), a
schedule (1F1B, interleaved with ``virtual`` chunks per device, GPipe) and recomputation (none; selective: the
fewest layers per device that make it fit; full: every layer). ``pp = 1`` is a flat layout: one chunk, one
micro-batch. For every candidate the search

1. prices every layer unit with the :class:`~shardwise.passes.stages.profile.UnitProfiler` (each distinct unit
   is placed once per ``(tp, sp)`` by the intra-op planner and priced op by op by the price list, on the
   micro-batch's rows; its memory comes from the memory map's own step program);
2. splits the units into ``pp * virtual`` chunks with the min-max partitioner, within device memory;
3. predicts each device stage's memory: parameters, gradients and optimizer state per element
   (``costs.memory.element_bytes``, ZeRO over ``dp``), the optimizer's scratch, the activations each
   micro-batch keeps times the micro-batches the schedule holds in flight, and the largest working set;
4. predicts the step: chunk forward and backward times (plus the recomputed forward), transfers between
   stages, each stage's tail (``costs.step.stage_tail_s``: gradient reduction with ZeRO's reduce-scatter and
   all-gather, tied weights, the optimizer step), in closed form (``costs.step.analytic_step``) for all and by
   event simulation (``costs.step.simulate``) for the ``top_k`` most promising.

Candidates are visited in order of a lower bound and pruned once the bound exceeds the best estimate by
``SLACK``. The result ranks them (fitting ones by step time; among those within ``MEMORY_TOLERANCE`` of the
fastest, less memory first); ``planner.plan`` realizes the best ones and prices the realized plans, which
is the price every view shows.

Expert parallelism (``ep``, a divisor of ``dp`` and of the expert count) and context parallelism (``cp``, an axis of
its own) are degrees of every layout, flat or pipelined (not both in one pipeline): the experts' weights at
``1 / ep`` per rank and their all-to-alls on each chunk's device stage (``costs.step.moe_exchange_s``), the
experts' gradients reduced over their ``dp / ep`` replicas only; each chunk's attention over ``cp`` by the
pinned or cheapest way (``costs.attention``) and, in pipelines, the chunk boundaries made whole over ``cp``.

Capabilities the generated programs have: ZeRO 0-3 for flat layouts, 0-2 with pipelines
(``PIPELINE_ZERO``); selective recomputation for flat layouts (per layer, ``passes.remat``), full
recomputation for both.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from itertools import accumulate

from shardwise.cluster import ClusterSpec
from shardwise.costs.attention import CP_WAYS, AttentionShape, context_attention_s, ulysses_problem
from shardwise.costs.compute import float_scale, is_causal_attention, is_low
from shardwise.costs.memory import element_bytes
from shardwise.costs.step import StageTail, analytic_step, moe_exchange_s, simulate, stage_tail_s
from shardwise.errors import PlanError
from shardwise.ir.experts import MOE_EXPERTS, expert_count
from shardwise.ir.graph import Graph, Value
from shardwise.ir.placement import pairs_chunks
from shardwise.ir.registry import rule_for, tensor_operands
from shardwise.ir.tensor import TensorSpec
from shardwise.passes.stages.partition import balance
from shardwise.passes.stages.profile import UnitCost, UnitProfiler, traced_batch
from shardwise.passes.stages.units import LayerUnits, layer_units
from shardwise.planner.constraints import Constraints, parse_constraints
from shardwise.planner.flat import sequence_length
from shardwise.planner.meshes import divisors, meshes
from shardwise.planner.schedule import peak_live_count, schedule_actions

__all__ = [
    "SearchOptions", "Candidate", "SearchResult", "search", "SLACK", "MEMORY_TOLERANCE", "PIPELINE_ZERO",
    "FLAT_ZERO",
]  # fmt: skip

# candidates whose lower bound is within this factor of the best estimate so far are evaluated in full
SLACK = 1.1
# layouts predicted within this fraction of the fastest are ranked by memory per device, least first
MEMORY_TOLERANCE = 0.01
FLAT_ZERO = (0, 1, 2, 3)
PIPELINE_ZERO = (0, 1, 2)


@dataclass(frozen=True)
class SearchOptions:
    mode: str = "train"
    precision: str = "fp32"
    optimizer_factor: int = 2  # optimizer state values per parameter (AdamW: 2)
    global_batch: int | None = None  # rows per step; default: the traced batch
    repeat_blocks: int | None = None  # plan as if the repeated block were repeated this many times
    max_microbatch: int = 64
    top_k: int = 12
    memory_headroom: float = 0.9  # of device memory a plan may use (allocator slack, workspaces)
    max_virtual: int = 8
    fusion: bool = True
    optimizer: str = "adamw"
    # another program's kernels (passes.stages.profile.UnitProfiler): how a published system is priced
    kernels: Callable[..., tuple] | None = None
    fused_backward: bool = False  # the program runs each fused group's backward as one kernel too
    pipelines: bool = True  # False: flat layouts only (pp = 1)


@dataclass(frozen=True)
class Candidate:
    """One layout and its predicted step and memory (the one candidate-plan record)."""

    pp: int
    dp: int
    tp: int
    sp: bool
    microbatch: int  # rows per micro-batch per replica
    microbatches: int
    schedule: str
    virtual: int
    recompute: str  # "none" | "selective" | "full"
    bounds: tuple[tuple[int, int], ...]  # unit positions [a, b) per chunk
    step_s: float
    compute_s: float  # the busiest device's compute (and tensor-parallel communication) over the step
    comm_s: float  # tensor-parallel communication of the busiest device plus its gradient/optimizer tail
    bubble_s: float
    memory_bytes: tuple[int, ...]  # per device stage
    fits: bool
    simulated: bool
    chunk_forward_s: tuple[float, ...] = ()
    chunk_backward_s: tuple[float, ...] = ()
    tail_s: tuple[float, ...] = ()
    transfer_s: tuple[float, ...] = ()
    note: str = ""
    zero: int = 0
    recomputed: tuple[int, ...] = ()  # unit positions recomputed (selective and full)
    memory_parts: tuple[tuple[str, int], ...] = ()  # the busiest device's memory by what it holds
    ep: int = 1  # expert parallelism: the experts of MoE layers split over ep of the data-parallel replicas
    cp: int = 1  # context parallelism: the sequence split over its own axis (flat layouts and pipelines)
    cp_attention: str = ""  # the way the estimate priced attention over cp (costs.attention.CP_WAYS)
    cp_ways: tuple[tuple[str, float], ...] = ()  # every way the estimate priced: (way, seconds per step)

    @property
    def degrees(self) -> tuple[tuple[str, int], ...]:
        base = (("dp", self.dp), ("tp", self.tp), ("pp", self.pp))
        return base + ((("ep", self.ep),) if self.ep > 1 else ()) + ((("cp", self.cp),) if self.cp > 1 else ())

    @property
    def flat(self) -> bool:
        return self.pp == 1 and self.microbatches == 1

    @property
    def peak_bytes(self) -> int:
        return max(self.memory_bytes) if self.memory_bytes else 0

    def key(self) -> tuple:
        return (self.pp, self.dp, self.tp, self.sp, self.microbatch, self.schedule, self.virtual, self.recompute,
                self.zero, self.ep, self.cp)  # fmt: skip

    def describe(self) -> str:
        sched = self.schedule + (f"x{self.virtual}" if self.virtual > 1 else "")
        sp = "+sp" if self.sp else ""
        zero = f" zero={self.zero}" if self.zero else ""
        batch = f" mb={self.microbatch}x{self.microbatches} {sched}" if not self.flat else ""
        ep = f" ep={self.ep}" if self.ep > 1 else ""
        cp = f" cp={self.cp}({self.cp_attention})" if self.cp > 1 else ""
        return f"pp={self.pp} dp={self.dp}{ep} tp={self.tp}{sp}{cp}{zero}{batch} recompute={self.recompute}"


@dataclass(frozen=True)
class SearchResult:
    best: Candidate
    ranked: tuple[Candidate, ...]  # fitting candidates first (by step time, memory within the tolerance)
    units: LayerUnits
    sequence: tuple[int, ...]  # the unit (index into ``units``) at each position of the planned model
    labels: tuple[str, ...]
    model_flops: float  # FLOPs of one training step (3x forward) or one forward, from the graph
    global_batch: int
    planning_s: float
    placements: int
    evaluated: int
    rejected: tuple[str, ...] = field(default_factory=tuple)
    capacity_bytes: float = 0.0


class _Tables:
    """Per-position costs of one (tp, sp, micro-batch) with prefix sums, so any unit range is priced in O(1)."""

    def __init__(self, costs: list[UnitCost]) -> None:
        self.costs = costs
        self.fwd = [c.forward_s for c in costs]
        self.bwd = [c.backward_s for c in costs]
        self.rec = [c.recompute_s for c in costs]
        self.act = [c.activation_bytes for c in costs]
        self.inp = [c.input_bytes for c in costs]
        self.working = [c.working_bytes for c in costs]

        def prefix(xs: list[float]) -> list[float]:
            return [0.0, *accumulate(xs)]

        self.p_fwd = prefix(self.fwd)
        self.p_bwd = prefix(self.bwd)
        self.p_rec = prefix(self.rec)
        self.p_commf = prefix([c.comm_forward_s for c in costs])
        self.p_commb = prefix([c.comm_backward_s for c in costs])
        self.p_param = prefix([float(c.param_elems) for c in costs])
        self.p_train = prefix([float(c.trainable_elems) for c in costs])
        self.p_tensors = prefix([float(c.tensors) for c in costs])
        self.p_act = prefix([float(c.activation_bytes) for c in costs])
        self.p_in = prefix([float(c.input_bytes) for c in costs])
        self.p_gr = prefix([float(c.grad_reduce_bytes) for c in costs])

    @staticmethod
    def range(p: list[float], a: int, z: int) -> float:
        return p[z] - p[a]


class _Context:
    """Everything the candidate evaluation reads, computed once per search."""

    def __init__(self, graph: Graph, cluster: ClusterSpec, options: SearchOptions, units: LayerUnits) -> None:
        self.graph = graph
        self.cluster = cluster
        self.options = options
        self.train = options.mode == "train"
        self.units = units
        self.profiler = UnitProfiler(
            graph, units, cluster, precision=options.precision, train=self.train, fusion=options.fusion,
            optimizer_state=options.optimizer_factor, kernels=options.kernels, fused_backward=options.fused_backward,
        )  # fmt: skip
        self.prices = self.profiler.prices
        n = len(units)
        if options.repeat_blocks is not None and units.family:
            self.sequence = (0, *([1] * options.repeat_blocks), n - 1)
            self.labels = ("pre", *(f"{units.family}.{k}" for k in range(options.repeat_blocks)), "post")
        else:
            self.sequence = tuple(range(n))
            self.labels = units.labels
        self.traced = traced_batch(graph)
        self.batch = options.global_batch or self.traced
        self.capacity = cluster.device.memory_bytes * options.memory_headroom
        self.selective_pinned = False  # set by the search when the user pinned recompute="selective"
        self.cp_pinned: str | None = None  # set by the search: the attention way the user pinned for cp
        # the optimizer steps tensors with foreach kernels where the host runs ahead (GPUs), else one by one
        self.foreach = cluster.efficiency.overhead_hidden
        # parameters read by several units (tied weights): (positions reading it, elements)
        readers: dict[str, set[int]] = {}
        unit_of = units.unit_of()
        names = {p.name: p for p in graph.params if p.requires_grad and p.kind == "parameter"}
        for node in graph.nodes:
            for v in node.inputs:
                if v in names:
                    readers.setdefault(names[v].key, set()).add(unit_of[node.name])
        self.tied: list[tuple[str, tuple[int, ...], int]] = []
        for key, us in readers.items():
            if len(us) > 1:
                positions = tuple(i for i, u in enumerate(self.sequence) if u in us)
                elems = next(p.spec.numel for p in names.values() if p.key == key)
                self.tied.append((key, positions, elems))
        self.experts = _unit_experts(graph, units, unit_of, options.precision)
        unit_flops = [0.0] * n
        for node in graph.nodes:
            unit_flops[unit_of[node.name]] += node.flops
        scale = self.batch / self.traced
        self.model_flops = sum(unit_flops[u] for u in self.sequence) * scale * (3 if self.train else 1)
        self._tables: dict[tuple[int, bool, int], _Tables] = {}
        self.work_sums: dict[tuple, float] = {}  # (tp, sp, rows, full recompute) -> the units' work (lower bounds)
        self.tail_bounds: dict[tuple, float] = {}  # the lower bounds' gradient reduction and optimizer step
        self._inflight: dict[tuple[str, int, int, int], list[int]] = {}
        self._partitions: dict[tuple, list[tuple[int, int]] | None] = {}
        self._cp: dict[tuple, dict[str, tuple[float, float] | str]] = {}
        # the attention calls (node, operand specs, output spec) and the sequence they split (cp)
        specs = {i.name: i.spec for i in graph.inputs} | {p.name: p.spec for p in graph.params}
        self.attention: list[tuple] = []
        for node in graph.nodes:
            if len(node.outputs) == 1 and not node.tuple_output:
                specs[node.name] = node.outputs[0]
            rule = rule_for(node.op)
            if rule is not None and rule.kind == "attention":
                ins = [specs[v] for v in tensor_operands(node) if isinstance(specs.get(v), TensorSpec)]
                if len(ins) >= 3 and ins[0].rank >= 3:
                    self.attention.append((node, ins, node.outputs[0]))
        self.sequence_length = sequence_length(graph)

    def context_attention(
        self, tp: int, cp: int, rows: float, replicas: int, units: Collection[int] | None = None
    ) -> dict[str, tuple[float, float] | str]:
        """way -> (forward, backward) seconds per micro-batch of every attention call's communication over
        ``cp`` (``costs.attention``), on ``rows`` rows of the cp rank's share; or why the way cannot run.
        ``units``: the calls of these layer units only, once each (a pipeline chunk's: summed over its
        positions by the caller)."""
        key = (tp, cp, rows, replicas, None if units is None else frozenset(units))
        if key in self._cp:
            return self._cp[key]
        unit_of = self.units.unit_of()
        count = {u: self.sequence.count(u) for u in set(self.sequence)}
        ranks = tuple(_rank(0, c, 0, replicas, tp) for c in range(cp))
        scale = rows / self.traced
        width = float_scale(self.options.precision)
        out: dict[str, tuple[float, float] | str] = {}
        for node, ins, out_spec in self.attention:
            times = count.get(unit_of[node.name], 0)
            if units is not None:
                times = 1 if unit_of[node.name] in units else 0
            if not times:
                continue
            heads, kv_heads = ins[0].shape[-3], ins[1].shape[-3]
            split_heads = heads % tp == 0
            share = scale / (tp if split_heads else 1)  # one rank's share of the call's bytes
            shape = AttentionShape(
                q_bytes=ins[0].nbytes * width * share, kv_bytes=(ins[1].nbytes + ins[2].nbytes) * width * share,
                out_bytes=out_spec.nbytes * width * share,
                mask_bytes=ins[3].nbytes * scale if len(ins) > 3 else 0.0,
                heads=heads // tp if split_heads else heads, causal=is_causal_attention(node) or len(ins) > 3,
                balanced=pairs_chunks(ins[0].shape[-2], cp),
                score_bytes=ins[0].nbytes * width * share / max(ins[0].shape[-1], 1) * ins[1].shape[-2] / cp,
            )  # fmt: skip
            ways = tp * cp if split_heads else cp
            whole = scale * cp  # the call's rows over the traced batch (its work split tp x cp ways)
            fwd = self.prices.forward_s(node, ways) * whole
            bwd = self.prices.backward_s(node, ways) * whole if self.train else 0.0
            for way in CP_WAYS:
                problem = ulysses_problem(shape.heads, max(kv_heads // (tp if split_heads else 1), 1), cp)
                if way == "ulysses" and problem:
                    out[way] = f"{problem} (attention {node.name})"
                old = out.get(way, (0.0, 0.0))
                if isinstance(old, str):
                    continue
                f, b = context_attention_s(
                    self.prices, ranks, way, shape, compute_forward_s=fwd, compute_backward_s=bwd, train=self.train,
                    fused_blocks=self.options.fused_backward,  # a published system's fused kernels
                )
                out[way] = (old[0] + f * times, old[1] + b * times)
        self._cp[key] = out
        return out

    def tables(self, tp: int, sp: bool, b: float, ep: int = 1) -> _Tables:
        """The units' costs at ``tp``, ``sp`` and ``b`` rows; under expert parallelism with the experts' weights'
        casts and collectives at ``1 / ep`` (each rank holds that share of the experts)."""
        key = (tp, sp, b, ep)
        if key not in self._tables:
            by_unit = {u: self.profiler.cost(u, tp, sp, b) for u in set(self.sequence)}
            if ep > 1:
                cut = 1 - 1 / ep
                by_unit = {
                    u: dataclasses.replace(
                        c, activation_bytes=int(c.activation_bytes - c.experts_saved_bytes * cut),
                        working_bytes=int(c.working_bytes - c.experts_working_bytes * cut),
                    )  # fmt: skip
                    for u, c in by_unit.items()
                }
            self._tables[key] = _Tables([by_unit[u] for u in self.sequence])
        return self._tables[key]

    def inflight(self, schedule: str, pp: int, v: int, m: int) -> list[int]:
        """Per device stage, the most micro-batch chunk activations it holds at once."""
        key = (schedule, pp, v, m)
        if key not in self._inflight:
            self._inflight[key] = peak_live_count(schedule, pp, m, v) if self.train else [1] * pp
        return self._inflight[key]

    def element(self, trainable: bool, zero: int, dp: int) -> float:
        """Bytes per parameter element on its device (``costs.memory.element_bytes``)."""
        return element_bytes(
            train=self.train, trainable=trainable, precision=self.options.precision,
            state=self.options.optimizer_factor, zero=zero, dp=dp,
        ).total  # fmt: skip


@dataclass(frozen=True)
class _Experts:
    """One layer unit's experts ops, what expert parallelism changes about it: expert weight elements, the bytes
    of the rows they route per traced sample (tokens x k x hidden at the precision's width), one count per
    expert and op (the first exchange)."""

    elems: float = 0.0
    rows_per_sample: float = 0.0
    counts_bytes: float = 0.0
    share: float = 0.0  # the experts' share of the unit's trainable parameter elements


def _unit_experts(graph: Graph, units: LayerUnits, unit_of: Mapping[str, int], precision: str) -> list[_Experts]:
    """Per unit, its experts figures (zeros for a unit without MoE layers)."""
    width = 2.0 if is_low(precision) else 4.0
    traced = max(traced_batch(graph), 1)
    out = [_Experts() for _ in range(len(units))]
    trainable = {p.name: p.spec.numel for p in graph.params if p.requires_grad and p.kind == "parameter"}
    read: list[set[str]] = [set() for _ in range(len(units))]
    for node in graph.nodes:
        read[unit_of[node.name]].update(v for v in node.inputs if v in trainable)
    for node in graph.nodes:
        if node.op != MOE_EXPERTS:
            continue
        specs = [graph.spec_of(v.name) for v in node.args[:5] if isinstance(v, Value)]
        if len(specs) != 5 or not all(isinstance(x, TensorSpec) for x in specs):
            continue
        hidden, index, gate_up, down = specs[0], specs[1], specs[3], specs[4]
        u = unit_of[node.name]
        old = out[u]
        out[u] = _Experts(
            old.elems + gate_up.numel + down.numel,  # type: ignore[union-attr]
            old.rows_per_sample + hidden.numel * index.shape[-1] * width / traced,  # type: ignore[union-attr]
            old.counts_bytes + 8 * gate_up.shape[0],  # type: ignore[union-attr]
        )
    for u, x in enumerate(out):
        total = sum(trainable[v] for v in read[u])
        if x.elems and total:
            out[u] = dataclasses.replace(x, share=min(x.elems / total, 1.0))
    return out


def _rank(pp_stage: int, replica: int, t: int, dp: int, tp: int) -> int:
    return (pp_stage * dp + replica) * tp + t


@functools.lru_cache(maxsize=4096)
def _replicas(pp_stage: int, count: int, dp: int, tp: int) -> tuple[int, ...]:
    """The first ``count`` data-parallel replicas' ranks (tensor-parallel index 0) of device stage ``pp_stage``:
    the groups gradients are reduced over, built once per shape (the search asks for them per candidate)."""
    return tuple(_rank(pp_stage, d, 0, dp, tp) for d in range(count))


@dataclass(frozen=True)
class _Config:
    pp: int
    dp: int
    tp: int
    sp: bool
    b: int
    m: int
    schedule: str
    v: int
    recompute: str
    zero: int
    ep: int = 1
    cp: int = 1

    @property
    def rows(self) -> float:
        """Rows of one micro-batch on one device's share of the sequence (its tokens, counted in rows)."""
        return self.b / self.cp

    @property
    def shards(self) -> int:
        """The ranks holding the same parameters, which ZeRO shards over: dp x cp (``ir.placement.zero_group``);
        in pipelines dp (their runtime reduces the cp axis first, then shards over the replicas)."""
        return self.dp * self.cp if self.pp == 1 else self.dp


def _work(ctx: _Context, t: _Tables, recomputed: frozenset[int]) -> list[float]:
    if not ctx.train:
        return list(t.fwd)
    return [f + b + (r if i in recomputed else 0.0) for i, (f, b, r) in enumerate(zip(t.fwd, t.bwd, t.rec, strict=True))]


class _Memory:
    """Per device stage memory of a candidate's chunks (see the module docstring, step 3)."""

    def __init__(self, ctx: _Context, cfg: _Config, t: _Tables) -> None:
        self.ctx, self.cfg, self.t = ctx, cfg, t
        self.inflight = ctx.inflight(cfg.schedule, cfg.pp, cfg.v, cfg.m)
        self._parts: dict[tuple[int, int], dict[str, float]] = {}

    def parts(self, a: int, z: int) -> dict[str, float]:
        """Bytes of units [a, z)'s weights, gradients and optimizer state (with its master copy and scratch) on
        one device, and their trainable elements (computed once per range)."""
        got = self._parts.get((a, z))
        if got is None:
            got = self._parts[(a, z)] = self._compute_parts(a, z)
        return got

    def _compute_parts(self, a: int, z: int) -> dict[str, float]:
        ctx, cfg, t = self.ctx, self.cfg, self.t
        rng = _Tables.range
        params = rng(t.p_param, a, z)
        trainable = rng(t.p_train, a, z)
        for _, positions, elems in ctx.tied:  # a tied weight read twice inside one chunk is stored once
            inside = sum(1 for i in positions if a <= i < z)
            if inside > 1:
                extra = (inside - 1) * elems / cfg.tp
                params -= extra
                trainable -= extra
        # ZeRO's group: in pipelines with experts split over part of dp, the dp / ep replicas (the runtime's outer
        # data-parallel axis, planner.pipeline.top_mesh), not dp
        shards = cfg.dp // cfg.ep if cfg.pp > 1 and 1 < cfg.ep < cfg.dp else cfg.shards
        e = element_bytes(
            train=ctx.train, trainable=True, precision=ctx.options.precision, state=ctx.options.optimizer_factor,
            zero=cfg.zero, dp=shards, accumulates=cfg.pp > 1,
        )  # fmt: skip
        # expert parallelism: each rank holds 1/ep of the experts, as the experts op reads them (whole over tp),
        # outside ZeRO's buckets (their gradients are not reduced over ep), so at ZeRO 0's bytes per element; the
        # unit prices hold them as placed without it (their share of the unit's local elements)
        experts = mine = 0.0
        if cfg.ep > 1:
            for i in range(a, z):
                x = ctx.experts[ctx.sequence[i]]
                experts += t.costs[i].trainable_elems * x.share
                mine += x.elems / cfg.ep
        params -= experts
        trainable -= experts
        # a weight tied across chunks (an embedding and the output head) stays whole under ZeRO in pipelines
        # (planner.pipeline: every chunk holding it keeps its own copy and state): ZeRO 0's bytes per element
        whole = 0.0
        if cfg.pp > 1 and cfg.zero >= 1:
            for _, positions, elems in ctx.tied:
                if any(a <= i < z for i in positions) and any(not a <= i < z for i in positions):
                    whole += elems / cfg.tp
        whole = min(whole, trainable)
        params -= whole
        trainable -= whole
        mine += whole
        own = element_bytes(
            train=ctx.train, trainable=True, precision=ctx.options.precision, state=ctx.options.optimizer_factor,
            zero=0, dp=1,
        )  # fmt: skip
        frozen = (params - trainable) * ctx.element(False, 0, 1)
        weights = trainable * e.weights
        if not ctx.train and cfg.zero >= 3:
            weights /= cfg.shards
        weights += mine * own.weights
        optimizer = trainable * (e.optimizer + e.master) + mine * (own.optimizer + own.master)
        if ctx.train:
            # the optimizer's scratch: a foreach step makes one value per (local) element at once, a per-tensor
            # step two of the largest tensor's (bounded by the chunk's mean tensor)
            local = trainable / (shards if cfg.zero >= 1 else 1)
            optimizer += 4 * local if ctx.foreach else 8 * local / max(rng(t.p_tensors, a, z), 1.0)
        return {"weights": weights + frozen, "gradients": trainable * e.grads + mine * own.grads,
                "optimizer state": optimizer, "trainable": trainable + mine, "experts": mine - whole}  # fmt: skip

    def fixed(self, a: int, z: int) -> tuple[float, float]:
        """(bytes of parameters, gradients, optimizer state and scratch of units [a, z), trainable elements)."""
        p = self.parts(a, z)
        return p["weights"] + p["gradients"] + p["optimizer state"], p["trainable"]

    def activations(self, a: int, z: int, recomputed: frozenset[int]) -> tuple[float, float]:
        """(bytes one micro-batch keeps from forward to backward, bytes held at once while it runs)."""
        t = self.t
        if not self.ctx.train:
            return 0.0, max(t.working[a:z]) + max(t.costs[i].output_bytes + t.costs[i].input_bytes for i in range(a, z))
        kept = 0.0
        again = 0.0  # a recomputed unit's activations come back at once in its backward
        for i in range(a, z):
            if i in recomputed:
                kept += t.inp[i]
                again = max(again, t.act[i])
            else:
                kept += t.act[i]
        if self.cfg.recompute == "full" and self.cfg.pp > 1 and any(i in recomputed for i in range(a, z)):
            # a pipeline's chunk runs again whole in its backward (a flat plan recomputes layer by layer), and
            # keeps only what it received, whole (planner.pipeline passes whole values between chunks)
            again = _Tables.range(t.p_act, a, z)
            kept = max(kept, float(t.costs[a].received_bytes))
        return kept, again + max(t.working[a:z])

    def devices(
        self, bounds: list[tuple[int, int]], recomputed: frozenset[int],
        chunk_activations: list[tuple[float, float]] | None = None,
    ) -> list[float]:  # fmt: skip
        """Per device stage: its chunks' fixed bytes, the activations its micro-batches in flight keep and the
        most it holds at once. ``chunk_activations``: ``activations`` of each chunk, when the caller has them."""
        pp = self.cfg.pp
        mem = [0.0] * pp
        kept = [0.0] * pp
        peak = [0.0] * pp
        for c, (a, z) in enumerate(bounds):
            fixed, _ = self.fixed(a, z)
            k, held = chunk_activations[c] if chunk_activations is not None else self.activations(a, z, recomputed)
            mem[c % pp] += fixed
            kept[c % pp] = max(kept[c % pp], k)
            peak[c % pp] = max(peak[c % pp], held)
        return [mem[p] + kept[p] * self.inflight[p] + peak[p] for p in range(pp)]


def _selective(ctx: _Context, mem: _Memory, bounds: list[tuple[int, int]]) -> frozenset[int] | None:
    """The fewest units to recompute so that every device stage fits: per chunk, the units that free the most
    bytes per recomputed second first; None when recomputing every unit does not fit either."""
    t = mem.t
    chosen: set[int] = set()
    order = sorted(
        (i for a, z in bounds for i in range(a, z)),
        key=lambda i: -(t.act[i] - t.inp[i]) / max(t.rec[i], 1e-12),
    )
    usage = mem.devices(bounds, frozenset())
    if max(usage) <= ctx.capacity:
        return frozenset()
    # each added unit changes only its own chunk's activations, so only its device stage's usage: the rest is
    # kept (the same sums and maxima ``devices`` computes)
    pp = mem.cfg.pp
    chunk_of = {i: c for c, (a, z) in enumerate(bounds) for i in range(a, z)}
    acts = [mem.activations(a, z, frozenset()) for a, z in bounds]
    fixed = [0.0] * pp
    for c, (a, z) in enumerate(bounds):
        fixed[c % pp] += mem.fixed(a, z)[0]

    def stage(p: int) -> float:
        kept = max((acts[c][0] for c in range(p, len(bounds), pp)), default=0.0)
        held = max((acts[c][1] for c in range(p, len(bounds), pp)), default=0.0)
        return fixed[p] + max(kept, 0.0) * mem.inflight[p] + max(held, 0.0)

    usage = [stage(p) for p in range(pp)]
    for i in order:
        if t.act[i] <= t.inp[i]:
            continue
        chosen.add(i)
        frozen = frozenset(chosen)
        c = chunk_of[i]
        acts[c] = mem.activations(*bounds[c], frozen)
        usage[c % pp] = stage(c % pp)
        if max(usage) <= ctx.capacity:
            return frozen
    return None


def _evaluate(ctx: _Context, cfg: _Config) -> Candidate | str:
    t = ctx.tables(cfg.tp, cfg.sp, cfg.rows, cfg.ep)
    costs = t.costs
    pp, tp, v, m = cfg.pp, cfg.tp, cfg.v, cfg.m
    dp = cfg.dp * cfg.cp  # replicas of the parameters: gradients are reduced over dp x cp (ranks laid so)
    train = ctx.train
    chunks = pp * v
    every = frozenset(range(len(costs)))
    recomputed = every if cfg.recompute == "full" else frozenset()
    key = (tp, cfg.sp, cfg.rows, cfg.recompute, chunks)
    if key not in ctx._partitions:
        ctx._partitions[key] = balance(_work(ctx, t, recomputed), chunks)
    bounds = ctx._partitions[key]
    if bounds is None:
        return f"{chunks} chunks need at least {chunks} layer units"
    memory = _Memory(ctx, cfg, t)
    rng = _Tables.range
    mem = memory.devices(bounds, recomputed)
    if max(mem) > ctx.capacity and cfg.recompute != "selective":
        inflight = memory.inflight

        def fits(c: int, a: int, z: int) -> bool:
            fixed, _ = memory.fixed(a, z)
            kept, held = memory.activations(a, z, recomputed)
            return fixed * v + kept * inflight[c % pp] + held <= ctx.capacity

        alt = balance(_work(ctx, t, recomputed), chunks, fits)
        if alt is not None:
            bounds = alt
            mem = memory.devices(bounds, recomputed)
    if cfg.recompute == "selective":
        chosen = _selective(ctx, memory, bounds)
        if chosen is not None and not chosen and not ctx.selective_pinned:
            return "fits without recomputation (the same layout with recompute=none)"
        # when even every layer does not make it fit by this estimate, the memory map may still say it fits
        recomputed = chosen if chosen is not None else every
        mem = memory.devices(bounds, recomputed)
    fits_all = max(mem) <= ctx.capacity
    cf = [rng(t.p_fwd, a, z) for a, z in bounds]
    if pp == 1 and dp > 1:  # a flat plan makes its outputs whole on every rank: gathered over dp (x cp)
        cf[-1] += ctx.prices.collective_s(
            "allgather", costs[-1].output_bytes * dp, _replicas(0, dp, dp, tp)
        )
    if train:
        cb = [rng(t.p_bwd, a, z) + sum(t.rec[i] for i in range(a, z) if i in recomputed) for a, z in bounds]
        comm_chunk = [
            rng(t.p_commf, a, z) + rng(t.p_commb, a, z)
            + sum(costs[i].comm_forward_s for i in range(a, z) if i in recomputed)
            for a, z in bounds
        ]  # fmt: skip
    else:
        cb = [0.0] * chunks
        comm_chunk = [rng(t.p_commf, a, z) for a, z in bounds]
    cp_way, cp_ways = "", ()
    if cfg.cp > 1:  # attention over the split sequence: the way the constraint pins, else the cheapest
        found = ctx.context_attention(tp, cfg.cp, cfg.rows, dp)
        priced = {w: fb for w, fb in found.items() if not isinstance(fb, str)}
        allowed = {w: fb for w, fb in priced.items() if ctx.cp_pinned in (None, w)}
        if not allowed:
            why = found.get(ctx.cp_pinned or "", "no way applies")
            return (f"attention cannot run over cp={cfg.cp} by {ctx.cp_pinned}: {why}; pin another cp_attention "
                    "(allgather, ulysses, ring) or leave it to the planner")  # fmt: skip
        cp_ways = tuple((w, f + (b if train else 0.0)) for w, (f, b) in priced.items())
        cp_way = min(allowed, key=lambda w: (allowed[w][0] + allowed[w][1], CP_WAYS.index(w)))
        if pp == 1:
            f, b = allowed[cp_way]
            cf[-1] += f
            comm_chunk[-1] += f + (b if train else 0.0)
            if train:
                cb[-1] += b
        else:
            _pipeline_context(ctx, cfg, t, bounds, cp_way, cf, cb, comm_chunk)
    if cfg.ep > 1:  # the experts' all-to-alls over an ep group of neighbouring replicas (costs.step.moe_exchange_s)
        for c, (a, z) in enumerate(bounds):
            group = _replicas(c % pp, cfg.ep, dp, tp)  # on the chunk's device stage
            for i in range(a, z):
                x = ctx.experts[ctx.sequence[i]]
                if not x.elems:
                    continue
                f, b = moe_exchange_s(
                    lambda n, g=group: ctx.prices.collective_s("alltoall", n, g), x.rows_per_sample * cfg.rows,
                    x.counts_bytes,
                )  # fmt: skip
                cf[c] += f
                comm_chunk[c] += f
                if train:
                    cb[c] += b
                    comm_chunk[c] += b
    transfer = []
    for c, (_, z) in enumerate(bounds[:-1]):
        src = _rank(c % pp, 0, 0, dp, tp)
        dst = _rank((c + 1) % pp, 0, 0, dp, tp)
        # under cp the chunks pass their values whole (every cp rank sends the whole value to its peer)
        transfer.append(ctx.prices.p2p_s(costs[z - 1].output_bytes * cfg.cp, src, dst))
    tail = [0.0] * pp
    if train:
        for p in range(pp):
            trainable = grad_reduce = tensors = 0.0
            for c in range(p, chunks, pp):
                a, z = bounds[c]
                trainable += memory.fixed(a, z)[1]
                grad_reduce += rng(t.p_gr, a, z)
                tensors += rng(t.p_tensors, a, z)
            tied = []
            for _, positions, elems in ctx.tied:
                stages = sorted({c % pp for c, (a, z) in enumerate(bounds) if any(a <= i < z for i in positions)})
                if len(stages) > 1 and p in stages:
                    tied.append((elems * 4 / tp, tuple(_rank(s, 0, 0, dp, tp) for s in stages)))
            replicas = _replicas(p, dp, dp, tp)
            experts: dict[str, object] = {}
            if cfg.ep > 1:
                # the experts' gradients are complete within their ep group: reduced over its dp/ep replicas only
                mine = sum(memory.parts(*bounds[c])["experts"] for c in range(p, chunks, pp))
                if cfg.ep < dp and pp == 1:
                    # flat, ep below dp: the data-parallel ranks are two mesh axes, dp/ep replicas (outer) and ep
                    # (inner); dense gradients are summed over both at once (their combined group,
                    # runtime.lib.gradients), the experts' over the replicas; ZeRO shards each over its group
                    experts = {"expert_elems": min(mine, trainable), "expert_ranks": replicas[:: cfg.ep]}
                elif cfg.ep < dp:
                    # pipelines, ep below dp: gradients replicated over both axes are summed over ep, then over the
                    # replicas (ZeRO's axis; the pipeline runtime reduces one axis after the other)
                    experts = {
                        "inner_ranks": _replicas(p, cfg.ep, dp, tp),
                        "inner_grad_bytes": 4.0 * max(trainable - mine, 0.0),
                    }  # fmt: skip
                    replicas = replicas[:: cfg.ep]
                else:
                    experts = {"unreduced_elems": mine}
            elif cfg.cp > 1 and pp > 1:
                # pipelines with cp: every gradient summed over the replica's cp ranks, then over the replicas
                # (ZeRO's axis; the pipeline runtime reduces one axis after the other)
                experts = {"inner_ranks": replicas[: cfg.cp], "inner_grad_bytes": 4.0 * trainable}
                replicas = replicas[:: cfg.cp]
            stage = StageTail(
                trainable_elems=trainable, tensors=int(tensors), tp_grad_bytes=grad_reduce, dp_ranks=replicas,
                tp_ranks=tuple(_rank(p, 0, k, dp, tp) for k in range(tp)), tied=tuple(tied),
                **experts,  # type: ignore[arg-type]
            )  # fmt: skip
            tail[p] = stage_tail_s(ctx.prices, stage, optimizer=ctx.options.optimizer, zero=cfg.zero)
            if cfg.zero >= 3 and dp > 1:
                tail[p] += _fsdp_s(ctx, cfg, trainable, m)
    device_work = [0.0] * pp
    device_comm = [0.0] * pp
    for c in range(chunks):
        device_work[c % pp] += cf[c] + cb[c]
        device_comm[c % pp] += comm_chunk[c]
    step = analytic_step(pp, v, m, device_work, [x + y for x, y in zip(cf, cb, strict=True)],
                         max(transfer, default=0.0), tail)  # fmt: skip
    busiest = max(range(pp), key=lambda p: device_work[p])
    busiest_mem = max(range(pp), key=lambda p: mem[p])
    parts = _memory_parts(memory, bounds, recomputed, busiest_mem)
    return Candidate(
        pp=pp, dp=cfg.dp, tp=tp, sp=cfg.sp, microbatch=cfg.b, microbatches=m, schedule=cfg.schedule, virtual=v,
        recompute=cfg.recompute, bounds=tuple(bounds), step_s=step, compute_s=device_work[busiest] * m,
        comm_s=device_comm[busiest] * m + tail[busiest],
        bubble_s=max(step - device_work[busiest] * m - tail[busiest], 0.0),
        memory_bytes=tuple(int(x) for x in mem), fits=fits_all, simulated=False, chunk_forward_s=tuple(cf),
        chunk_backward_s=tuple(cb), tail_s=tuple(tail), transfer_s=tuple(transfer), zero=cfg.zero,
        recomputed=tuple(sorted(recomputed)), memory_parts=parts, ep=cfg.ep, cp=cfg.cp, cp_attention=cp_way,
        cp_ways=cp_ways,
    )  # fmt: skip


def _pipeline_context(
    ctx: _Context, cfg: _Config, t: _Tables, bounds: list[tuple[int, int]], way: str, cf: list[float],
    cb: list[float], comm_chunk: list[float],
) -> None:  # fmt: skip
    """A pipeline's chunks under context parallelism (added in place, per micro-batch): each chunk's attention
    calls over ``cp`` by ``way``, and at each chunk boundary what the chunk programs do (``runtime.lib.pipeline``,
    ``planner.pipeline``): the sending chunk gathers its output whole over cp (its gradient: a slice, free), the
    receiving one cuts its piece (its gradient gathered over cp in the backward); the transfer itself carries the
    whole value (priced by the caller at the cp rank's share: the rest is added here)."""
    dp = cfg.dp * cfg.cp
    group = tuple(_rank(0, c, 0, dp, cfg.tp) for c in range(cfg.cp))
    for c, (a, z) in enumerate(bounds):
        f = b = 0.0
        for i in range(a, z):  # each position's attention calls once (cached per layer unit)
            got = ctx.context_attention(cfg.tp, cfg.cp, cfg.rows, dp, (ctx.sequence[i],)).get(way)
            if isinstance(got, tuple):
                f, b = f + got[0], b + got[1]
        cf[c] += f
        comm_chunk[c] += f + (b if ctx.train else 0.0)
        if ctx.train:
            cb[c] += b
        if c + 1 < len(bounds):
            whole = t.costs[z - 1].output_bytes * cfg.cp
            gather = ctx.prices.collective_s("allgather", whole, group)
            cf[c] += gather
            comm_chunk[c] += gather
            if ctx.train:
                cb[c + 1] += gather
                comm_chunk[c + 1] += gather


def _fsdp_s(ctx: _Context, cfg: _Config, trainable: float, m: int) -> float:
    """ZeRO-3's gathers: every micro-batch gathers the stage's parameters for its forward and again for its
    backward, and reduce-scatters their gradients (on the wire at the precision's width)."""
    width = 2.0 if is_low(ctx.options.precision) else 4.0
    ranks = _replicas(0, cfg.shards, cfg.shards, cfg.tp)
    gather = ctx.prices.collective_s("allgather", trainable * width, ranks)
    return m * 2 * gather


def _memory_parts(
    memory: _Memory, bounds: list[tuple[int, int]], recomputed: frozenset[int], p: int
) -> tuple[tuple[str, int], ...]:
    """The memory of device stage ``p`` by what it holds (for "does not fit" messages)."""
    cfg = memory.cfg
    totals = {"weights": 0.0, "gradients": 0.0, "optimizer state": 0.0}
    kept = held = 0.0
    for c, (a, z) in enumerate(bounds):
        if c % cfg.pp != p:
            continue
        parts = memory.parts(a, z)
        for name in totals:
            totals[name] += parts[name]
        k, h = memory.activations(a, z, recomputed)
        kept, held = max(kept, k), max(held, h)
    return (*((name, int(b)) for name, b in totals.items()), ("activations", int(kept * memory.inflight[p] + held)))


def _lower_bound(ctx: _Context, cfg: _Config) -> tuple[float, float]:
    """(time, memory) no plan of these choices can beat: the work spread perfectly over the pipeline, the
    fill-and-drain bubble of equal chunks, the optimizer step and gradient reduction of an average device;
    and the parameters and optimizer state spread evenly over the pipeline."""
    t = ctx.tables(cfg.tp, cfg.sp, cfg.rows)
    key = (cfg.tp, cfg.sp, cfg.rows, cfg.recompute == "full")
    work = ctx.work_sums.get(key)
    if work is None:
        recomputed = frozenset(range(len(t.costs))) if cfg.recompute == "full" else frozenset()
        work = ctx.work_sums[key] = sum(_work(ctx, t, recomputed))
    trainable = t.p_train[-1]
    for _, positions, elems in ctx.tied:
        trainable -= (len(positions) - 1) * elems / cfg.tp
    frozen = t.p_param[-1] - t.p_train[-1]
    fixed = trainable * ctx.element(True, cfg.zero, cfg.shards) + max(frozen, 0.0) * ctx.element(False, 0, 1)
    pp, v, m = cfg.pp, cfg.v, cfg.m
    step = (m + (pp - 1) / v) * work / pp
    if ctx.train:
        tail_key = (cfg.tp, cfg.sp, cfg.rows, pp, cfg.shards, cfg.zero >= 1)
        tail = ctx.tail_bounds.get(tail_key)
        if tail is None:
            per_device = trainable / pp
            ranks = _replicas(0, cfg.shards, cfg.shards, cfg.tp)
            kind = "reduce_scatter" if cfg.zero >= 1 and cfg.shards > 1 else "allreduce"
            shard = cfg.shards if cfg.zero >= 1 else 1
            tail = ctx.tail_bounds[tail_key] = ctx.prices.collective_s(
                kind, per_device * 4, ranks
            ) + ctx.prices.optimizer_step_s(per_device / shard, 1, ctx.options.optimizer, foreach=True)
        step += tail
    return step, fixed / pp


def _simulate(ctx: _Context, cand: Candidate) -> Candidate:
    actions = schedule_actions(cand.schedule, cand.pp, cand.microbatches, cand.virtual, train=ctx.train)
    result = simulate(actions, cand.chunk_forward_s, cand.chunk_backward_s, list(cand.transfer_s), cand.tail_s)
    worst = max(range(cand.pp), key=lambda p: result.device_busy_s[p])
    return dataclasses.replace(
        cand, step_s=result.step_s, bubble_s=result.bubble_s, simulated=True, compute_s=result.device_busy_s[worst]
    )


def rank_candidates(candidates: list[Candidate]) -> list[Candidate]:
    """Fitting candidates by step time, those within ``MEMORY_TOLERANCE`` of the fastest by memory first
    (least per device); then the ones that do not fit, by step time."""
    fitting = sorted((c for c in candidates if c.fits), key=lambda c: (c.step_s, c.pp, c.key()))
    if fitting:
        limit = fitting[0].step_s * (1 + MEMORY_TOLERANCE)
        close = sorted((c for c in fitting if c.step_s <= limit), key=lambda c: (c.peak_bytes, c.step_s, c.key()))
        fitting = close + [c for c in fitting if c.step_s > limit]
    return fitting + sorted((c for c in candidates if not c.fits), key=lambda c: (c.step_s, c.key()))


def search(
    graph: Graph,
    cluster: ClusterSpec,
    constraints: Mapping[str, object] | Constraints | None = None,
    options: SearchOptions | None = None,
    *,
    units: LayerUnits | None = None,
) -> SearchResult:
    """Search every layout (see the module docstring)."""
    t0 = time.perf_counter()
    options = options or SearchOptions()
    pinned = constraints if isinstance(constraints, Constraints) else parse_constraints(constraints, cluster)
    units = units or layer_units(graph)
    ctx = _Context(graph, cluster, options, units)
    ctx.selective_pinned = pinned.recompute == "selective"
    ctx.cp_pinned = pinned.cp_attention
    positions = len(ctx.sequence)
    rejected: list[str] = []
    if pinned.pp is not None and pinned.pp > positions:
        rejected.append(
            f"pp={pinned.pp} needs at least {pinned.pp} layers to put on the stages and the model has "
            f"{positions} ({', '.join(ctx.labels[:8])}{', ...' if positions > 8 else ''}): use pp <= {positions}"
        )
    configs = _configs(ctx, pinned, positions, rejected)
    # evaluate in order of the lower bound; stop once the bound exceeds the best estimate by the slack
    configs.sort(key=lambda c: c[0])
    if configs and all(mem_lb > ctx.capacity for _, mem_lb, _ in configs):
        # nothing can fit: evaluate the leanest few anyway, so that the planner can say what they need
        configs = sorted(configs, key=lambda c: c[1])[: options.top_k]
        floor = float("inf")
    else:
        floor = ctx.capacity
    candidates: list[Candidate] = []
    best = float("inf")
    evaluated = pruned = 0
    for lb, mem_lb, cfg in configs:
        if mem_lb > floor:
            continue
        if lb > best * SLACK and len(candidates) >= options.top_k:
            pruned += 1
            continue
        got = _evaluate(ctx, cfg)
        evaluated += 1
        if isinstance(got, str):
            cp = f" cp={cfg.cp}" if cfg.cp > 1 else ""
            rejected.append(f"pp={cfg.pp} dp={cfg.dp} tp={cfg.tp}{cp} recompute={cfg.recompute}: {got}")
            continue
        candidates.append(got)
        if got.fits:
            best = min(best, got.step_s)
    if pruned:
        rejected.append(f"{pruned} candidates pruned: their lower bound was over {SLACK}x the best estimate")
    if not candidates:
        over = [c for c in configs if c[1] > ctx.capacity]
        reasons = "; ".join(dict.fromkeys(rejected)) or "no candidate mesh"
        if over and len(over) == len(configs):
            reasons = "the parameters and optimizer state alone exceed a device under every mesh"
        raise PlanError(f"no plan could be made for {cluster.name}: {reasons}")
    ranked = rank_candidates(candidates)
    # time the most promising exactly with the schedule simulator
    top = [_simulate(ctx, c) if not c.flat else dataclasses.replace(c, simulated=True) for c in ranked[: options.top_k]]
    ranked = rank_candidates(top) + ranked[options.top_k :]
    return SearchResult(
        best=ranked[0], ranked=tuple(ranked), units=units, sequence=ctx.sequence, labels=ctx.labels,
        model_flops=ctx.model_flops, global_batch=ctx.batch, planning_s=time.perf_counter() - t0,
        placements=ctx.profiler.placements, evaluated=evaluated, rejected=tuple(dict.fromkeys(rejected)),
        capacity_bytes=ctx.capacity,
    )  # fmt: skip


def _configs(ctx: _Context, pinned: Constraints, positions: int, rejected: list[str]) -> list[tuple[float, float, _Config]]:
    """Every combination of degrees, ZeRO stage, micro-batch size, schedule and recomputation the constraints
    allow, with its lower bounds (time, memory)."""
    options, train = ctx.options, ctx.train
    out: list[tuple[float, float, _Config]] = []
    for pp, dp, tp, cp in _with_context(ctx, pinned, meshes(ctx.cluster, pinned, positions), rejected):
        if pp > 1 and not options.pipelines:
            continue
        if ctx.batch % dp:
            rejected.append(f"pp={pp} dp={dp} tp={tp}: the batch ({ctx.batch}) is not divisible by dp={dp}")
            continue
        per_replica = ctx.batch // dp
        if pp == 1 and pinned.microbatches in (None, 1) and pinned.microbatch_size in (None, per_replica):
            bs = [per_replica]  # flat: the replica's whole batch at once
        elif pinned.microbatch_size is not None:
            bs = [pinned.microbatch_size] if per_replica % pinned.microbatch_size == 0 else []
        elif pinned.microbatches is not None:
            bs = [per_replica // pinned.microbatches] if per_replica % pinned.microbatches == 0 else []
        else:
            bs = [b for b in divisors(per_replica) if b <= options.max_microbatch] or [1]
        if pp == 1:
            bs = [b for b in bs if b == per_replica]  # flat programs run no gradient accumulation
        if not bs:
            rejected.append(
                f"pp={pp} dp={dp} tp={tp}: the replica batch ({per_replica}) does not split into the pinned "
                "micro-batches" + (" (flat layouts run one micro-batch: pin pp > 1 to accumulate)" if pp == 1 else "")
            )
            continue
        if tp == 1 or pinned.sp is False:
            sps = [False]
        elif pinned.sp is True:
            sps = [True]
        else:
            sps = [False, True]
        allowed = FLAT_ZERO if pp == 1 else PIPELINE_ZERO
        if pinned.zero is not None:
            if pinned.zero not in allowed:
                rejected.append(
                    f"pp={pp} dp={dp} tp={tp}: ZeRO stage {pinned.zero} is not generated for "
                    f"{'flat plans' if pp == 1 else 'pipelines'} (stages {', '.join(map(str, allowed))})"
                )
                continue
            zeros = [pinned.zero if dp * cp > 1 else 0]  # ZeRO shards over dp x cp
        elif dp * cp > 1 and train:
            zeros = list(allowed)
        elif dp * cp > 1 and pp == 1:
            zeros = [0, 3]  # inference: only sharding the parameters changes anything
        else:
            zeros = [0]
        if pinned.recompute not in (None, "auto"):
            recomputes = [pinned.recompute] if train else ["none"]
        else:
            recomputes = ["none", "selective", "full"] if train else ["none"]
        eps = _expert_degrees(ctx, pinned, pp, dp, tp, rejected, cp)
        if not eps:
            continue
        for sp in sps:
            for b in bs:
                m = per_replica // b
                for zero in dict.fromkeys(zeros):
                    for rc in recomputes:
                        for schedule, v in _schedules(pinned, pp, m, positions, options, train):
                            for ep in eps:
                                cfg = _Config(pp, dp, tp, sp, b, m, schedule, v, rc, zero, ep=ep, cp=cp)
                                lb, mem_lb = _lower_bound(ctx, cfg)
                                out.append((lb, mem_lb, cfg))
    return out


def _expert_degrees(
    ctx: _Context, pinned: Constraints, pp: int, dp: int, tp: int, rejected: list[str], cp: int = 1
) -> list[int]:
    """The ``ep`` values of a mesh: 1, and for a model with MoE layers every divisor of ``dp`` above 1 that
    divides the expert count (the experts split over ``ep`` of the data-parallel ranks, replicated over
    ``dp / ep`` groups of them; with pipelines, over ``ep`` of each stage's replicas, unless the stage splits the
    sequence over cp: a pipeline's chunks split one or the other); a pinned ep alone."""
    experts = expert_count(ctx.graph)
    possible = [1]
    if experts and not (pp > 1 and cp > 1):
        possible += [e for e in divisors(dp)[1:] if experts % e == 0]
    if pinned.ep is None:
        return possible
    if pinned.ep in possible:
        return [pinned.ep]
    why = ("the model has no mixture-of-experts layers shardwise recognizes" if not experts
           else "pipelines split each stage's experts or its sequence, not both: drop cp or ep" if pp > 1 and cp > 1
           else f"ep must divide the {experts} experts and dp={dp}")  # fmt: skip
    rejected.append(f"pp={pp} dp={dp} tp={tp}: ep={pinned.ep} is not possible: {why}")
    return []


def _with_context(
    ctx: _Context, pinned: Constraints, found: list[tuple[int, int, int]], rejected: list[str]
) -> list[tuple[int, int, int, int]]:
    """(pp, dp, tp, cp) meshes: a pinned ``cp`` on every mesh (``meshes`` left it its devices); otherwise
    ``cp = 1``, and on a mesh whose batch does not split over ``dp``, ``dp`` divided into ``dp' x cp`` where
    the batch splits over ``dp'`` and the sequence over ``cp`` (context parallelism takes the devices the batch
    cannot: on the same devices a batch split costs no attention communication, so it is never slower)."""
    seq = ctx.sequence_length
    why = ""
    if not ctx.attention:
        why = "the model has no attention call to split the sequence of"
    elif seq is None:
        why = "the model has no sequence input (dim 1 of a rank >= 2 input)"
    out: list[tuple[int, int, int, int]] = []
    for pp, dp, tp in found:
        if pinned.cp is not None and pinned.cp > 1:
            if why or (seq is not None and seq % pinned.cp):
                rejected.append(f"cp={pinned.cp}: {why or f'the sequence ({seq}) does not divide by cp={pinned.cp}'}")
                continue
            out.append((pp, dp, tp, pinned.cp))
            continue
        out.append((pp, dp, tp, 1))
        if pinned.cp is None and not why and ctx.batch % dp and pinned.dp is None:
            for cp in divisors(dp)[1:]:
                if ctx.batch % (dp // cp) == 0 and seq is not None and seq % cp == 0:
                    out.append((pp, dp // cp, tp, cp))
    return out


def _schedules(
    pinned: Constraints, pp: int, m: int, positions: int, options: SearchOptions, train: bool
) -> list[tuple[str, int]]:
    if not train:
        return [("gpipe", 1)]
    if pp == 1:
        return [("1f1b", 1)]
    sched = pinned.schedule
    vpin = pinned.virtual
    out: list[tuple[str, int]] = []
    if sched in (None, "1f1b") and vpin in (None, 1):
        out.append(("1f1b", 1))
    if sched in (None, "gpipe") and vpin in (None, 1):
        out.append(("gpipe", 1))
    if sched in (None, "interleaved"):
        vs = [vpin] if vpin is not None else range(2, options.max_virtual + 1)
        for v in vs:
            if v > 1 and pp * v <= positions and m % pp == 0:
                out.append(("interleaved", v))
    return out
