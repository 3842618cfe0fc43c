"""The whole-plan search: pipeline x data x tensor (x sequence) parallelism, micro-batching, recomputation.

For every candidate — tensor-parallel degree ``tp`` (a divisor of the devices per node), sequence parallelism
on or off, pipeline degree ``pp``, data-parallel degree ``dp = devices / (tp pp)`` (dividing the batch),
micro-batch size (a divisor of the replica's batch), schedule (1F1B, interleaved with ``virtual`` chunks per
device, GPipe) and recomputation (none / full) — it

1. prices every layer unit with the :class:`~shardwise.passes.stages.profile.UnitProfiler` (the intra-op
   planner places each distinct unit once per ``(tp, sp)``; repeated blocks share the result, so a model of
   hundreds of blocks costs a handful of placements);
2. splits the units into ``pp * virtual`` chunks with the min-max partitioner
   (:func:`~shardwise.passes.stages.partition.balance`), within device memory;
3. predicts per-device memory (parameters, gradients, optimizer state, the activations of the micro-batches
   the schedule keeps in flight, the recomputed unit's working set) and a closed-form step time;
4. times the ``top_k`` most promising candidates exactly with the schedule simulator
   (:func:`~shardwise.planner.schedule.simulate`: compute, point-to-point transfers overlapping compute,
   bubbles, then each device's data-parallel gradient all-reduce, tied-weight reduction and optimizer step).

The fastest simulated candidate that fits wins; ``SearchResult.ranked`` keeps the others with their
predictions (the planner turns them into ``plan.alternatives``).

Constraints pin choices: ``pp``, ``dp``, ``tp`` (ints); ``sp`` (1 = off, or equal to tp = on);
``microbatches`` or ``microbatch_size``; ``virtual`` (chunks per device; > 1 means interleaved);
``schedule`` ("gpipe", "1f1b", "interleaved"); ``recompute`` ("none"/"full", or 0/1).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from itertools import accumulate

from shardwise.cluster import ClusterSpec
from shardwise.costs.memory import element_bytes
from shardwise.costs.step import StageTail, analytic_step, simulate, stage_tail_s
from shardwise.errors import DoesNotFitError, PlanError
from shardwise.ir.graph import Graph
from shardwise.ir.pipeline import RECOMPUTE, SCHEDULES
from shardwise.passes.stages.partition import balance
from shardwise.passes.stages.profile import UnitCost, UnitProfiler, traced_batch
from shardwise.passes.stages.units import LayerUnits, layer_units
from shardwise.planner.schedule import peak_live_count, schedule_actions

__all__ = ["SearchOptions", "Candidate", "SearchResult", "search", "PIPELINE_CONSTRAINTS"]

# candidates whose lower bound is within this factor of the best estimate so far are evaluated in full
SLACK = 1.1
PIPELINE_CONSTRAINTS = ("pp", "dp", "tp", "sp", "microbatches", "microbatch_size", "virtual", "schedule",
                        "recompute", "zero", "ep")  # fmt: skip


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


@dataclass(frozen=True)
class Candidate:
    pp: int
    dp: int
    tp: int
    sp: bool
    microbatch: int  # rows per micro-batch per replica
    microbatches: int
    schedule: str
    virtual: int
    recompute: str
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

    @property
    def degrees(self) -> tuple[tuple[str, int], ...]:
        return (("dp", self.dp), ("tp", self.tp), ("pp", self.pp))

    @property
    def peak_bytes(self) -> int:
        return max(self.memory_bytes) if self.memory_bytes else 0

    def key(self) -> tuple:
        return (
            self.pp,
            self.dp,
            self.tp,
            self.sp,
            self.microbatch,
            self.schedule,
            self.virtual,
            self.recompute,
        )

    def describe(self) -> str:
        sched = self.schedule + (f"x{self.virtual}" if self.virtual > 1 else "")
        sp = "+sp" if self.sp else ""
        return (
            f"pp={self.pp} dp={self.dp} tp={self.tp}{sp} mb={self.microbatch}x{self.microbatches} {sched} "
            f"recompute={self.recompute}"
        )


@dataclass(frozen=True)
class SearchResult:
    best: Candidate
    ranked: tuple[Candidate, ...]  # simulated candidates first (by step time), then the estimated ones
    units: LayerUnits
    sequence: tuple[int, ...]  # the unit (index into ``units``) at each position of the planned model
    labels: tuple[str, ...]
    model_flops: float  # FLOPs of one training step (3x forward) or one forward, from the graph
    global_batch: int
    planning_s: float
    placements: int
    evaluated: int
    rejected: tuple[str, ...] = field(default_factory=tuple)


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, int(math.isqrt(n)) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def _parse(constraints: Mapping[str, object], cluster: ClusterSpec) -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in constraints.items():
        if k not in PIPELINE_CONSTRAINTS:
            raise PlanError(f"unknown constraint {k!r}: allowed are {', '.join(PIPELINE_CONSTRAINTS)}")
        if k == "schedule":
            if v not in SCHEDULES:
                raise PlanError(f"constraint schedule={v!r}: choose one of {', '.join(SCHEDULES)}")
        elif k == "recompute":
            if isinstance(v, int):
                v = "full" if v else "none"
            if v not in RECOMPUTE:
                raise PlanError(f"constraint recompute={v!r}: choose 'none' or 'full' (or 0/1)")
        elif isinstance(v, bool) or not isinstance(v, int) or v < (0 if k in ("zero", "sp") else 1):
            raise PlanError(f"constraint {k}={v!r}: must be a positive integer")
        out[k] = v
    if out.get("zero", 0) and out.get("pp", 1) > 1:
        raise PlanError(
            "ZeRO (constraint zero) is not combined with pipeline parallelism yet: use zero=0 or pp=1"
        )
    if out.get("ep", 1) != 1:
        raise PlanError("expert parallelism (ep) is not available: use ep=1")
    world = cluster.world_size
    prod = int(out.get("pp", 1)) * int(out.get("dp", 1)) * int(out.get("tp", 1))  # type: ignore[call-overload]
    if prod > world:
        raise PlanError(
            f"constraints pp={out.get('pp', 1)} x dp={out.get('dp', 1)} x tp={out.get('tp', 1)} need {prod} devices; "
            f"{cluster.name} has {world}"
        )
    sp = out.get("sp")
    if sp not in (None, 0, 1) and "tp" in out and sp != out["tp"]:
        raise PlanError(
            f"constraint sp={sp}: sequence parallelism runs on the tensor-parallel axis: sp=1 or sp=tp"
        )
    return out


class _Tables:
    """Per-position costs of one (tp, sp, micro-batch) with prefix sums, so any unit range is priced in O(1)."""

    def __init__(self, costs: list[UnitCost]) -> None:
        self.costs = costs
        self.fwd = [c.forward_s for c in costs]
        self.bwd = [c.backward_s for c in costs]

        def prefix(xs: list[float]) -> list[float]:
            return [0.0, *accumulate(xs)]

        self.rec = [c.recompute_s for c in costs]
        self.p_fwd = prefix(self.fwd)
        self.p_bwd = prefix(self.bwd)
        self.p_rec = prefix(self.rec)
        self.p_tensors = prefix([float(c.tensors) for c in costs])
        self.working = [c.working_bytes for c in costs]
        self.p_commf = prefix([c.comm_forward_s for c in costs])
        self.p_commb = prefix([c.comm_backward_s for c in costs])
        self.p_param = prefix([float(c.param_elems) for c in costs])
        self.p_train = prefix([float(c.trainable_elems) for c in costs])
        self.p_act = prefix([float(c.activation_bytes) for c in costs])
        self.p_in = prefix([float(c.input_bytes) for c in costs])
        self.p_gr = prefix([float(c.grad_reduce_bytes) for c in costs])
        self.act = [c.activation_bytes for c in costs]

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
        self.comm = self.prices.comm
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
        # bytes per parameter element on its device (costs.memory): weights, gradients, optimizer state
        per = {"train": self.train, "precision": options.precision, "state": options.optimizer_factor}
        self.train_bytes = element_bytes(trainable=True, **per).total  # type: ignore[arg-type]
        self.frozen_bytes = element_bytes(trainable=False, **per).total  # type: ignore[arg-type]
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
        unit_flops = [0.0] * n
        for node in graph.nodes:
            unit_flops[unit_of[node.name]] += node.flops
        scale = self.batch / self.traced
        self.model_flops = sum(unit_flops[u] for u in self.sequence) * scale * (3 if self.train else 1)
        self._tables: dict[tuple[int, bool, int], _Tables] = {}
        self._inflight: dict[tuple[str, int, int, int], list[int]] = {}
        self._partitions: dict[tuple, list[tuple[int, int]] | None] = {}
        self._coll: dict[tuple, float] = {}

    def tables(self, tp: int, sp: bool, b: int) -> _Tables:
        key = (tp, sp, b)
        if key not in self._tables:
            by_unit = {u: self.profiler.cost(u, tp, sp, b) for u in set(self.sequence)}
            self._tables[key] = _Tables([by_unit[u] for u in self.sequence])
        return self._tables[key]

    def collective(self, kind: str, nbytes: float, ranks: tuple[int, ...]) -> float:
        key = (kind, int(nbytes), ranks)
        if key not in self._coll:
            self._coll[key] = self.comm.collective_s(kind, nbytes, ranks)
        return self._coll[key]

    def inflight(self, schedule: str, pp: int, v: int, m: int) -> list[int]:
        """Per device stage, the most micro-batch chunk activations it holds at once."""
        key = (schedule, pp, v, m)
        if key not in self._inflight:
            self._inflight[key] = peak_live_count(schedule, pp, m, v) if self.train else [1] * pp
        return self._inflight[key]


def _rank(pp_stage: int, replica: int, t: int, dp: int, tp: int) -> int:
    return (pp_stage * dp + replica) * tp + t


def _work(ctx: _Context, t: _Tables, recompute: str) -> list[float]:
    full = recompute == "full"
    if not ctx.train:
        return list(t.fwd)
    return [f + b + (r if full else 0.0) for f, b, r in zip(t.fwd, t.bwd, t.rec, strict=True)]


def _evaluate(
    ctx: _Context, pp: int, dp: int, tp: int, sp: bool, b: int, m: int, schedule: str, v: int, recompute: str,
) -> Candidate | str:  # fmt: skip
    t = ctx.tables(tp, sp, b)
    costs = t.costs
    full = recompute == "full"
    train = ctx.train
    chunks = pp * v
    key = (tp, sp, b, recompute, chunks)
    if key not in ctx._partitions:
        ctx._partitions[key] = balance(_work(ctx, t, recompute), chunks)
    bounds = ctx._partitions[key]
    if bounds is None:
        return f"{chunks} chunks need at least {chunks} layer units"
    inflight = ctx.inflight(schedule, pp, v, m)
    rng = _Tables.range

    def chunk_memory(a: int, z: int) -> tuple[float, float]:
        """(fixed bytes: parameters and state, per-micro-batch activation bytes)."""
        params = rng(t.p_param, a, z)
        trainable = rng(t.p_train, a, z)
        for _, positions, elems in ctx.tied:  # a tied weight read twice inside one chunk is stored once
            inside = sum(1 for i in positions if a <= i < z)
            if inside > 1:
                extra = (inside - 1) * elems / tp
                params -= extra
                trainable -= extra
        fixed = trainable * ctx.train_bytes + (params - trainable) * ctx.frozen_bytes
        working = max(t.working[a:z])
        if not train:
            return fixed + working, max(costs[i].output_bytes + costs[i].input_bytes for i in range(a, z))
        # the optimizer's scratch: a foreach step makes one value per element at once, a per-tensor step two
        # of the largest tensor's (bounded here by the chunk's share per tensor)
        scratch = 4 * trainable if ctx.foreach else 8 * trainable / max(rng(t.p_tensors, a, z), 1.0)
        if full:  # the backward runs the whole chunk's forward again: all its activations at once
            return fixed + scratch + rng(t.p_act, a, z) + working, rng(t.p_in, a, z)
        return fixed + scratch + working, rng(t.p_act, a, z)

    def device_memory(bnds: list[tuple[int, int]]) -> list[float]:
        mem = [0.0] * pp
        act_max = [0.0] * pp
        for c, (a, z) in enumerate(bnds):
            fixed, act = chunk_memory(a, z)
            mem[c % pp] += fixed
            act_max[c % pp] = max(act_max[c % pp], act)
        return [mem[p] + act_max[p] * inflight[p] for p in range(pp)]

    mem = device_memory(bounds)
    if max(mem) > ctx.capacity:

        def fits(c: int, a: int, z: int) -> bool:
            fixed, act = chunk_memory(a, z)
            return fixed * v + act * inflight[c % pp] <= ctx.capacity

        alt = balance(_work(ctx, t, recompute), chunks, fits)
        if alt is not None:
            bounds = alt
            mem = device_memory(bounds)
    fits_all = max(mem) <= ctx.capacity
    cf = [rng(t.p_fwd, a, z) for a, z in bounds]
    if train:
        cb = [rng(t.p_bwd, a, z) + (rng(t.p_rec, a, z) if full else 0.0) for a, z in bounds]
        comm_chunk = [rng(t.p_commf, a, z) * (2 if full else 1) + rng(t.p_commb, a, z) for a, z in bounds]
    else:
        cb = [0.0] * chunks
        comm_chunk = [rng(t.p_commf, a, z) for a, z in bounds]
    transfer = []
    for c, (_, z) in enumerate(bounds[:-1]):
        src = _rank(c % pp, 0, 0, dp, tp)
        dst = _rank((c + 1) % pp, 0, 0, dp, tp)
        transfer.append(ctx.comm.p2p_s(costs[z - 1].output_bytes, src, dst))
    tail = [0.0] * pp
    if train:
        for p in range(pp):
            trainable = grad_reduce = tensors = 0.0
            for c in range(p, chunks, pp):
                a, z = bounds[c]
                trainable += rng(t.p_train, a, z)
                grad_reduce += rng(t.p_gr, a, z)
                tensors += rng(t.p_tensors, a, z)
            tied = []
            for _, positions, elems in ctx.tied:
                stages = sorted({c % pp for c, (a, z) in enumerate(bounds) if any(a <= i < z for i in positions)})
                if len(stages) > 1 and p in stages:
                    tied.append((elems * 4 / tp, tuple(_rank(s, 0, 0, dp, tp) for s in stages)))
            stage = StageTail(
                trainable_elems=trainable, tensors=int(tensors), tp_grad_bytes=grad_reduce,
                dp_ranks=tuple(_rank(p, d, 0, dp, tp) for d in range(dp)),
                tp_ranks=tuple(_rank(p, 0, k, dp, tp) for k in range(tp)), tied=tuple(tied),
            )  # fmt: skip
            tail[p] = stage_tail_s(ctx.prices, stage, optimizer=ctx.options.optimizer, zero=0)
    device_work = [0.0] * pp
    device_comm = [0.0] * pp
    for c in range(chunks):
        device_work[c % pp] += cf[c] + cb[c]
        device_comm[c % pp] += comm_chunk[c]
    step = analytic_step(pp, v, m, device_work, [x + y for x, y in zip(cf, cb, strict=True)],
                         max(transfer, default=0.0), tail)  # fmt: skip
    busiest = max(range(pp), key=lambda p: device_work[p])
    return Candidate(
        pp=pp, dp=dp, tp=tp, sp=sp, microbatch=b, microbatches=m, schedule=schedule, virtual=v,
        recompute=recompute, bounds=tuple(bounds), step_s=step, compute_s=device_work[busiest] * m,
        comm_s=device_comm[busiest] * m + tail[busiest],
        bubble_s=max(step - device_work[busiest] * m - tail[busiest], 0.0),
        memory_bytes=tuple(int(x) for x in mem), fits=fits_all, simulated=False, chunk_forward_s=tuple(cf),
        chunk_backward_s=tuple(cb), tail_s=tuple(tail), transfer_s=tuple(transfer),
    )  # fmt: skip


def _lower_bound(
    ctx: _Context, pp: int, dp: int, tp: int, sp: bool, b: int, m: int, recompute: str, v: int
) -> tuple[float, float]:
    """(time, memory) no plan of these choices can beat: the work spread perfectly over the pipeline, the
    fill-and-drain bubble of equal chunks, the optimizer step and gradient all-reduce of an average device;
    and the parameters and optimizer state spread evenly over the pipeline."""
    t = ctx.tables(tp, sp, b)
    work = sum(_work(ctx, t, recompute))
    trainable = t.p_train[-1]
    fixed = trainable * ctx.train_bytes + (t.p_param[-1] - trainable) * ctx.frozen_bytes
    for _, positions, elems in ctx.tied:
        fixed -= (len(positions) - 1) * elems / tp * ctx.train_bytes
        trainable -= (len(positions) - 1) * elems / tp
    step = (m + (pp - 1) / v) * work / pp
    if ctx.train:
        per_device = trainable / pp
        step += ctx.prices.optimizer_step_s(per_device, 1, ctx.options.optimizer, foreach=True)
        step += ctx.collective("allreduce", per_device * 4, tuple(_rank(0, d, 0, dp, tp) for d in range(dp)))
    return step, fixed / pp


def _simulate(ctx: _Context, cand: Candidate) -> Candidate:
    actions = schedule_actions(cand.schedule, cand.pp, cand.microbatches, cand.virtual, train=ctx.train)
    result = simulate(
        actions, cand.chunk_forward_s, cand.chunk_backward_s, list(cand.transfer_s), cand.tail_s
    )
    worst = max(range(cand.pp), key=lambda p: result.device_busy_s[p])
    return dataclasses.replace(
        cand,
        step_s=result.step_s,
        bubble_s=result.bubble_s,
        simulated=True,
        compute_s=result.device_busy_s[worst],
    )


def search(
    graph: Graph,
    cluster: ClusterSpec,
    constraints: Mapping[str, object] | None = None,
    options: SearchOptions | None = None,
    *,
    units: LayerUnits | None = None,
) -> SearchResult:
    """Search the whole plan space (see the module docstring)."""
    t0 = time.perf_counter()
    options = options or SearchOptions()
    pinned = _parse(constraints or {}, cluster)
    units = units or layer_units(graph)
    ctx = _Context(graph, cluster, options, units)
    positions = len(ctx.sequence)
    train = ctx.train
    rejected: list[str] = []
    # 1. every combination of degrees, micro-batch size, schedule and recomputation, with a lower bound
    configs: list[tuple[float, float, tuple]] = []
    need_fixed = float("inf")
    if "pp" in pinned and int(pinned["pp"]) > positions:  # type: ignore[call-overload]
        rejected.append(
            f"pp={pinned['pp']} needs at least {pinned['pp']} layers to put on the stages and the model has "
            f"{positions} ({', '.join(ctx.labels[:8])}{', ...' if positions > 8 else ''}): use pp <= {positions}"
        )
    for tp, pp, dp in _meshes(pinned, cluster, positions):
        if ctx.batch % dp:
            rejected.append(f"pp={pp} dp={dp} tp={tp}: the batch ({ctx.batch}) is not divisible by dp={dp}")
            continue
        per_replica = ctx.batch // dp
        if "microbatch_size" in pinned:
            bs = [int(pinned["microbatch_size"])]  # type: ignore[call-overload]
        elif "microbatches" in pinned:
            count = int(pinned["microbatches"])  # type: ignore[call-overload]
            bs = [per_replica // count] if per_replica % count == 0 else []
        else:
            bs = [b for b in _divisors(per_replica) if b <= options.max_microbatch] or [1]
        if not bs or any(b < 1 or per_replica % b for b in bs):
            rejected.append(
                f"pp={pp} dp={dp} tp={tp}: the replica batch ({per_replica}) does not split into the pinned micro-batches"
            )
            continue
        sp_pin = pinned.get("sp")
        if tp == 1 or sp_pin in (0, 1):
            sps = [False]
        elif sp_pin is not None:
            sps = [True]
        else:
            sps = [False, True]
        recomputes = (
            [str(pinned["recompute"])] if "recompute" in pinned else (["none", "full"] if train else ["none"])
        )
        for sp in sps:
            for b in bs:
                m = per_replica // b
                for rc in recomputes:
                    for schedule, v in _schedules(pinned, pp, m, positions, options, train):
                        lb, mem_lb = _lower_bound(ctx, pp, dp, tp, sp, b, m, rc, v)
                        if mem_lb > ctx.capacity:
                            rejected.append(
                                f"pp={pp} dp={dp} tp={tp}: parameters and optimizer state alone exceed a device"
                            )
                            need_fixed = min(need_fixed, mem_lb)
                            break
                        configs.append((lb, mem_lb, (pp, dp, tp, sp, b, m, schedule, v, rc)))
    configs.sort(key=lambda c: c[0])
    # 2. evaluate in order of the bound; stop once the bound exceeds the best estimate by the slack
    slack = SLACK
    candidates: list[Candidate] = []
    best = float("inf")
    evaluated = pruned = 0
    for lb, _, cfg in configs:
        if lb > best * slack and len(candidates) >= options.top_k:
            pruned += 1
            continue
        got = _evaluate(ctx, *cfg)
        evaluated += 1
        if isinstance(got, str):
            rejected.append(f"pp={cfg[0]} dp={cfg[1]} tp={cfg[2]}: {got}")
            continue
        candidates.append(got)
        if got.fits:
            best = min(best, got.step_s)
    if not candidates and need_fixed < float("inf"):
        raise DoesNotFitError(
            f"the model needs at least {need_fixed / 2**30:.2f} GiB per device for its parameters and optimizer "
            f"state under every plan searched, and {cluster.name} has {cluster.device.memory_bytes / 2**30:.2f} "
            "GiB per device: allow more pipeline or tensor parallelism, use more devices or a lower precision"
        )
    if not candidates:
        reasons = "; ".join(dict.fromkeys(rejected)) or "no candidate mesh"
        raise PlanError(f"no plan could be made for {cluster.name}: {reasons}")
    fitting = sorted((c for c in candidates if c.fits), key=lambda c: c.step_s)
    if not fitting:
        need = min(c.peak_bytes for c in candidates)
        raise DoesNotFitError(
            f"the model needs at least {need / 2**30:.2f} GiB per device under every plan searched "
            f"(pipeline, tensor and data parallelism, micro-batches, recomputation), and {cluster.name} has "
            f"{cluster.device.memory_bytes / 2**30:.2f} GiB per device: use more devices or a lower precision"
        )
    # 3. time the most promising exactly with the schedule simulator
    top = [_simulate(ctx, c) for c in fitting[: options.top_k]]
    top.sort(key=lambda c: (c.step_s, c.pp, c.key()))
    rest = fitting[options.top_k :] + sorted((c for c in candidates if not c.fits), key=lambda c: c.step_s)
    if pruned:
        rejected.append(f"{pruned} candidates pruned: their lower bound was over {slack}x the best estimate")
    return SearchResult(
        best=top[0], ranked=tuple(top) + tuple(rest), units=units, sequence=ctx.sequence, labels=ctx.labels,
        model_flops=ctx.model_flops, global_batch=ctx.batch, planning_s=time.perf_counter() - t0,
        placements=ctx.profiler.placements, evaluated=evaluated, rejected=tuple(dict.fromkeys(rejected)),
    )  # fmt: skip


def _meshes(pinned: Mapping[str, object], cluster: ClusterSpec, positions: int) -> list[tuple[int, int, int]]:
    """(tp, pp, dp) triples: tp divides the devices per node; every device is used unless degrees are pinned."""
    world = cluster.world_size
    if "tp" in pinned:
        tps = [int(pinned["tp"])]  # type: ignore[call-overload]
    else:
        tps = [t for t in _divisors(cluster.devices_per_node) if world % t == 0]
    out = []
    for tp in tps:
        if "pp" in pinned:
            pps = [int(pinned["pp"])]  # type: ignore[call-overload]
        else:
            pps = [p for p in _divisors(max(world // tp, 1)) if p <= positions]
        for pp in pps:
            if pp > positions:
                continue
            dp = int(pinned["dp"]) if "dp" in pinned else max(1, world // (tp * pp))  # type: ignore[call-overload]
            if tp * pp * dp > world:
                continue
            if tp * pp * dp != world and not any(k in pinned for k in ("dp", "pp", "tp")):
                continue
            out.append((tp, pp, dp))
    return out


def _schedules(
    pinned: Mapping[str, object], pp: int, m: int, positions: int, options: SearchOptions, train: bool
) -> list[tuple[str, int]]:
    if not train:
        return [("gpipe", 1)]
    if pp == 1:
        return [("1f1b", 1)]
    sched = pinned.get("schedule")
    vpin = pinned.get("virtual")
    out: list[tuple[str, int]] = []
    if sched in (None, "1f1b") and vpin in (None, 1):
        out.append(("1f1b", 1))
    if sched in (None, "gpipe") and vpin in (None, 1):
        out.append(("gpipe", 1))
    if sched in (None, "interleaved"):
        vs = [int(vpin)] if vpin is not None else range(2, options.max_virtual + 1)  # type: ignore[call-overload]
        for v in vs:
            if v > 1 and pp * v <= positions and m % pp == 0:
                out.append(("interleaved", v))
        if sched == "interleaved" and vpin == 1:
            out.append(("interleaved", 1))
    return out
