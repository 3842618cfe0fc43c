"""The memory-mapping pass for pipeline plans: each device stage's schedule, micro-batches in flight.

``map_pipeline_memory(spec, ...)`` builds, for every device stage, the buffers of one training step from
its chunks' step programs (``program.step_buffers`` on each chunk's micro-batch plan) laid along the
stage's schedule (``spec.actions``): action ``i`` of the stage gets its own window of steps, a forward
``("F", c, m)`` the forward steps of chunk ``c``'s program, a backward ``("B", c, m)`` its backward steps.

* Per micro-batch (ids suffixed ``#m``): activations, their gradients, dropout masks, collective buffers,
  weight casts and the values received from the previous chunk. A buffer live from chunk ``c``'s forward
  into its backward (kept for backward) is live from the forward of micro-batch ``m`` to its backward,
  across every action the stage runs in between: the micro-batches in flight. With ``recompute="full"``
  a chunk keeps only what it received; the backward recomputes the rest (live within the backward). A chunk
  whose plan recomputes ranges of its ops (``ExecutionPlan.recompute``: selective recomputation) drops what
  those ops made after the forward the same way, and makes it again in the backward.
* Inference: the last chunk's outputs of every micro-batch are kept to the end of the step, where the last
  stage joins them (one copy) and pickles them for ``gather_object`` (a byte storage of their size), and
  rank 0 (first stage) holds the gathered objects: its own padded one, the gathered ones and the collective's
  flat copy of them, ``(2 x world + 1)`` times the joined outputs (``runtime.lib.pipeline``'s ``infer``).
* Once per stage: parameters and optimizer state (the whole step), the whole input batch on the stage
  holding chunk 0, parameter gradients (from the chunk's first backward to the optimizer step; gradients
  of all micro-batches accumulate in place), gradient buckets and the optimizer's scratch at the end (one
  optimizer step over the stage's chunks; under ZeRO its sharded parameters are stepped as this rank's slices,
  ``program.optimizer_scratch``).
* Gradient buckets as the runtime makes them (``shardwise.runtime.lib.gradients``, one ``Trainer`` over the
  stage's chunks): every parameter summed over its chunk's ``tp`` axes and over ``dp``, bucketed across
  chunks in reverse order by those axes; a bucket of several gradients is flattened when the last backward
  of its chunks ends and kept until the reduction finishes. ZeRO (``spec.zero``, over ``dp``; tied weights
  stay whole): the optimizer state and fp32 master copy of the sharded buckets are this rank's slices;
  stage 1 reduce-scatters at the optimizer step (a bucket's flat copy and the slices there), stage 2 when a
  bucket is complete (its gradients dropped then, one flat copy in flight, the slices kept to the step).
  Expert parallelism (``spec.ep``): a chunk's experts (sharded on its ``ep`` axis) are summed over their
  ``dp / ep`` replicas only (none when ``ep = dp``), the other gradients over ``ep`` then ``dp``; ZeRO shards
  over the ``dp / ep`` replicas when ``ep < dp`` (the runtime's outer ``dp`` axis).

Guarantees: per rank (global rank ``(p * dp + d) * tp + t`` on stage ``p``) a ``RankMemory`` whose arena
packs the stage's buffers (``verify_assignment`` passes) and is never below the lower bound; ranks of
one stage share it, and it is never larger than an online allocator's replay of the step. Stages of more than
``MAX_PACKED`` buffers (long pipelines of many micro-batches) are packed by that replay instead of best-fit and
the exact search. A training step of a 1F1B or interleaved schedule is laid out for its first
``steady_microbatches`` micro-batches (the stages' live sets repeat after the warm-up: the same lower bound) and
packed by the replay; stage 0 holds the whole input batch all the same.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

from shardwise.costs.compute import is_low
from shardwise.ir.pipeline import PipelineSpec
from shardwise.ir.placement import Replicate
from shardwise.ir.plan import ExecutionPlan, RankMemory
from shardwise.ir.tensor import TensorSpec
from shardwise.passes.memory.assign import assign_offsets
from shardwise.passes.memory.buffers import Assignment, Buffer, lower_bound
from shardwise.passes.memory.mapping import NODE_LIMIT, TIME_LIMIT_S, rank_memory
from shardwise.passes.memory.program import ALIGN, BUCKET_BYTES, buffer_kind, optimizer_scratch, step_buffers
from shardwise.passes.memory.verify import verify_assignment

__all__ = [
    "MAX_PACKED", "PipelineMemoryMap", "map_pipeline_memory", "online_assignment", "stage_buffers",
    "steady_microbatches",
]

_PER_MICROBATCH = frozenset(("act", "agrad", "mask", "coll", "cgrad", "cast"))
# buffers per stage above which the offsets come from an online allocator's replay: above a few thousand the
# smallest-arena search costs tens of seconds per stage and rarely beats the replay (Mixtral-8x7B pp=4 ep=8
# interleaved x8, 13.3k buffers per stage: 38-47 s of CPU per stage for arenas 0.6-1.6 GiB larger than the
# replay's; the first 2000 buffers of a stage: 0.1 s, proven smallest; 4000: 15 s, not proven)
MAX_PACKED = 2_000
# micro-batches per device stage a training map of a 1F1B or interleaved schedule lays out (steady_microbatches):
# DeepSeek-V3 cut to 16 layers, pp=8 1f1b, 320 micro-batches: every stage's lower bound and replayed arena the
# same as the whole step's with 32, 24, 16 and 9 of them (stage 0 less by the whole batch's input: it is added),
# 12.6 s -> 1.2 s; interleaved x2 too, 14.3 s -> 0.8 s. A GPT pp=2 of 16 micro-batches: the same lower bounds,
# arenas 0.5-0.7% below the whole step's replay (tests/passes/memory/test_pipeline_steady.py)
STEADY_ROUNDS = 2


def online_assignment(buffers: Sequence[Buffer], bound: int | None = None) -> Assignment:
    """Offsets as an allocator running the step would give them: buffers allocated in order of their
    first step (frees of a step first), each in the smallest free gap that holds it, else on top.
    Valid for any size; the arena is not searched (``method="online-best-fit"``). ``bound``: the buffers'
    lower bound when the caller has it (``lower_bound(buffers)``)."""
    t0 = time.perf_counter()
    order = sorted(range(len(buffers)), key=lambda i: (buffers[i].start, -buffers[i].size, buffers[i].id))
    ending = sorted(range(len(buffers)), key=lambda i: buffers[i].end)
    free: list[tuple[int, int]] = []  # (offset, size) of the gaps below the top, sorted by offset
    by_size: list[tuple[int, int]] = []  # the same gaps as (size, offset), sorted: the smallest that holds first
    top = arena = 0
    offsets = [0] * len(buffers)
    k = 0

    def take(at: int) -> tuple[int, int]:
        off, size = free.pop(at)
        del by_size[bisect.bisect_left(by_size, (size, off))]
        return off, size

    for i in order:
        b = buffers[i]
        while k < len(ending) and buffers[ending[k]].end <= b.start:  # free what died before b starts
            j = ending[k]
            k += 1
            off, size = offsets[j], buffers[j].size
            at = bisect.bisect_left(free, (off, size))
            if at < len(free) and off + size == free[at][0]:  # join the gap above
                size += take(at)[1]
            if at > 0 and free[at - 1][0] + free[at - 1][1] == off:  # and the one below
                at -= 1
                below, below_size = take(at)
                off, size = below, below_size + size
            if off + size == top:
                top = off
            else:
                free.insert(at, (off, size))
                bisect.insort(by_size, (size, off))
        fit = bisect.bisect_left(by_size, (b.size, -1))
        if fit < len(by_size):
            size, off = by_size[fit]
            take(bisect.bisect_left(free, (off, size)))
            if size > b.size:
                bisect.insort(free, (off + b.size, size - b.size))
                bisect.insort(by_size, (size - b.size, off + b.size))
        else:
            off, top = top, top + b.size
        offsets[i] = off
        arena = max(arena, off + b.size)
    bound = lower_bound(buffers) if bound is None else bound
    return Assignment(
        offsets=tuple(sorted((b.id, o) for b, o in zip(buffers, offsets))),
        arena_bytes=arena,
        lower_bound_bytes=bound,
        method="online-best-fit",
        optimal=arena == bound,
        solve_s=time.perf_counter() - t0,
    )


@dataclass(frozen=True)
class PipelineMemoryMap:
    """Per rank: the plan's record; per device stage: the buffers and their offsets."""

    memory: tuple[RankMemory, ...]
    buffers: tuple[tuple[Buffer, ...], ...]  # per device stage
    assignments: tuple[Assignment, ...]  # per device stage
    # every stage's offsets are those the smallest-arena search gives (a ``within_capacity`` map skipped no
    # search that it would run)
    exact: bool = True


def _chunk_inputs(plan: ExecutionPlan) -> dict:
    names = {p.key: p.name for p in plan.graph.params}
    return {
        "param_placements": {names[k]: s for k, s in plan.param_placements if k in names},
        "input_placements": {i.name: s for i, s in zip(plan.graph.inputs, plan.input_placements)},
        "grad_reduce": dict(plan.param_grad_reduce),
    }


def stage_buffers(
    spec: PipelineSpec,
    stage: int,
    *,
    train: bool,
    precision: str = "fp32",
    optimizer_factor: int = 2,
    optimizer_foreach: bool = False,
    batch_microbatches: int | None = None,
) -> list[Buffer]:
    """The buffers of device stage ``stage``'s step (see the module docstring). ``batch_microbatches``: the
    micro-batches the whole input batch holds (default ``spec.microbatches``; a map of the schedule's first
    micro-batches, :func:`steady_microbatches`, still holds the whole batch)."""
    whole = batch_microbatches or spec.microbatches
    chunks = {s.chunk: s for s in spec.stages if s.device_stage == stage}
    local: dict[int, list[Buffer]] = {}
    nodes: dict[int, int] = {}
    rerun: dict[int, set[int]] = {}  # per chunk: the indices of the ops its plan recomputes
    for c, s in chunks.items():
        index = {n.name: k for k, n in enumerate(s.plan.graph.nodes)}
        rerun[c] = {k for first, last in s.plan.recompute for k in range(index[first], index[last] + 1)}
        local[c] = step_buffers(
            s.plan.graph, s.plan.mesh, s.plan.strategies, train=train, precision=precision,
            optimizer_factor=optimizer_factor, optimizer_foreach=optimizer_foreach, **_chunk_inputs(s.plan),
        )  # fmt: skip
        nodes[c] = len(s.plan.graph.nodes)
    # windows: where each action's local steps fall on the stage's timeline
    fwd: dict[tuple[int, int], int] = {}
    bwd: dict[tuple[int, int], int] = {}
    clock = 0
    for kind, c, m in spec.actions[stage]:
        if kind == "F":
            fwd[(c, m)] = clock
            clock += nodes[c] + 1  # forward steps 0..N (N: the outputs' collectives)
        else:
            bwd[(c, m)] = clock
            clock += nodes[c]  # backward steps N+1..2N
    reduce_step, optimizer_step = clock, clock + 1
    gather_step = clock  # inference: the outputs joined and gathered to rank 0
    end = clock + 2 if train else clock + 1

    def at(c: int, m: int, t: int) -> int:
        n = nodes[c]
        if t <= n:
            return fwd[(c, m)] + t
        if t <= 2 * n and (c, m) in bwd:
            return bwd[(c, m)] + t - n - 1
        return reduce_step if t == 2 * n + 1 else optimizer_step

    last_b = {c: max((bwd[k] + nodes[c] - 1 for k in bwd if k[0] == c), default=reduce_step) for c in chunks}
    last_chunk = spec.chunks - 1
    kept_outputs = set() if train or last_chunk not in chunks else set(spec.stages[last_chunk].plan.graph.output_names)
    reduction = (
        _StageReduction(spec, chunks, last_b, reduce_step, end, optimizer_factor, optimizer_foreach) if train else None
    )
    out: list[Buffer] = []
    for c, bufs in local.items():
        n = nodes[c]
        first_b = min((bwd[(c, m)] for m in range(spec.microbatches) if (c, m) in bwd), default=end - 1)
        for b in bufs:
            kind = buffer_kind(b.id)
            name = f"c{c}/{b.id}"
            key = b.id.split(":", 1)[1]
            if kind == "opt" and reduction is not None and (c, key) in reduction.sharded:
                continue  # this rank's slice of the sharded buckets' state (below)
            if kind in ("param", "opt") or (kind == "input" and c == 0):
                size = b.size * (whole if kind == "input" else 1)  # the whole batch
                out.append(Buffer(name, 0, end, size))
            elif kind == "grad":
                dropped = reduction.dropped.get((c, key)) if reduction is not None else None  # ZeRO-2
                until = max(first_b + 1, dropped + 1) if dropped is not None else end
                out.append(Buffer(name, first_b, until, b.size))
            elif kind == "scratch" and reduction is not None:
                continue  # the stage's one optimizer step (below)
            elif kind in ("scratch", "zero"):
                out.append(Buffer(name, optimizer_step, optimizer_step + 1, b.size))
            elif kind == "bucket":
                continue  # the stage's buckets (below): the runtime buckets across chunks
            elif kind in _PER_MICROBATCH or kind == "input":
                kept = kind == "input"  # a received value: its gradient is sent back after the backward
                # the same for every micro-batch: whether it is kept from forward into backward, recomputed,
                # or an output kept to the end (inference joins every micro-batch's outputs)
                spans = b.start < n < b.end - 1 and kind != "agrad"
                again = spec.recompute == "full" or b.start in rerun[c]  # (an op's buffers start at its step)
                dropped_again = again and spans and not kept and train
                joined = c == last_chunk and _output_of(key) in kept_outputs
                for m in range(spec.microbatches):
                    start, last = at(c, m, b.start), at(c, m, b.end - 1)
                    if train and (c, m) in bwd:
                        # the chunk's outputs are kept until its backward, their gradients arrive with it
                        last = min(last, bwd[(c, m)] + n - 1)
                        if kind == "agrad" and b.start == n:
                            start = bwd[(c, m)]
                    if joined:
                        last = max(last, gather_step)
                    if dropped_again:
                        # dropped after the forward, made again at the start of the backward
                        out.append(Buffer(f"{name}#{m}", start, fwd[(c, m)] + n + 1, b.size))
                        out.append(Buffer(f"{name}#{m}.re", bwd[(c, m)], last + 1, b.size))
                    else:
                        out.append(Buffer(f"{name}#{m}", start, max(last + 1, start + 1), b.size))
    if reduction is not None:
        out += reduction.buffers
    if not train:
        out += _gathered_outputs(spec, stage, gather_step, precision)
    return out


def _output_of(key: str) -> str:
    """The value a per-micro-batch buffer holds when it may be an output of its chunk's program: an
    activation's value, or a collective's on the outputs (``@out``); "" for other collective buffers."""
    if "->" in key:
        return key.split("->", 1)[0] if "@out" in key else ""
    return key


def _gathered_outputs(spec: PipelineSpec, stage: int, step: int, precision: str) -> list[Buffer]:
    """An inference step's end (``runtime.lib.pipeline.PipelineRank.infer``): the last stage joins its
    micro-batches' outputs (one copy) and pickles them for ``torch.distributed.gather_object`` (a byte
    storage of their size); rank 0, on the first stage, receives every rank's pickled object padded to the
    largest: its own padded object, the gathered objects and the collective's flat copy of them."""
    last = spec.stages[-1].plan.graph
    width = 2 if is_low(precision) else 4
    per_microbatch = 0
    for name in last.output_names:
        value = last.spec_of(name)
        if isinstance(value, TensorSpec):
            floating = value.dtype.startswith(("float", "bfloat"))
            per_microbatch += value.numel * width if floating else value.nbytes
    joined = -(-per_microbatch * spec.microbatches // ALIGN) * ALIGN
    world = spec.world_size
    out: list[Buffer] = []
    if joined <= 0 or world < 2:
        return out
    if stage == (spec.chunks - 1) % spec.pp:
        out += [Buffer("end:joined", step, step + 1, joined), Buffer("end:pickled", step, step + 1, joined)]
    if stage == 0:
        out.append(Buffer("end:gathered", step, step + 1, (2 * world + 1) * joined))
    return out


class _StageReduction:
    """The runtime's gradient buckets of one device stage (see the module docstring): ``sharded`` the
    (chunk, key) of parameters ZeRO shards, ``dropped`` the step where a ZeRO-2 gradient is dropped,
    ``buffers`` the flat copies, the ZeRO state and the step's scratch."""

    def __init__(
        self, spec: PipelineSpec, chunks: dict, last_b: dict[int, int], reduce_step: int, end: int,
        optimizer_factor: int, optimizer_foreach: bool = False,
    ) -> None:  # fmt: skip
        optimizer_step = end - 1
        tied = {(c, key) for key, holders in spec.tied for c in holders}
        ep = getattr(spec, "ep", 1)
        # the replicas a gradient is summed over (runtime.lib.pipeline): with expert parallelism below dp, the
        # ep group then the dp/ep replicas (ZeRO's axis, of dp/ep ranks); an expert's, its replicas only
        if 1 < ep < spec.dp:
            dense, experts, ways = ("ep", "dp"), ("dp",), spec.dp // ep
        else:
            dense, experts, ways = (("dp",) if spec.dp > 1 else ()), (), spec.dp
        params = []  # (chunk, key, numel, axes) in the runtime's order: chunks ascending, graph order in each
        for c in sorted(chunks):
            plan = chunks[c].plan
            mesh, reduce = plan.mesh, dict(plan.param_grad_reduce)
            placements = dict(plan.param_placements)
            a_ep = mesh.axis_names.index("ep") if "ep" in mesh.axis_names else None
            for p in plan.graph.params:
                if not (p.requires_grad and p.spec.dtype.startswith(("float", "bfloat"))):
                    continue
                pl = placements.get(p.key)
                shape = pl.local_shape(p.spec.shape, mesh) if pl is not None else p.spec.shape
                numel = 1
                for d in shape:
                    numel *= d
                axes = tuple(a for a in reduce.get(p.key, ()) if a not in ("dp", "ep") and mesh.axis_size(a) > 1)
                expert = a_ep is not None and pl is not None and pl.placements[a_ep] != Replicate()
                params.append((c, p.key, numel, axes + (experts if expert else dense)))
        shard = spec.zero >= 1 and ways > 1
        # (sharded, axes, members) like gradients.make_buckets: reverse order, one open bucket per set of axes
        buckets: list[tuple[bool, tuple[str, ...], list[tuple[int, str, int]]]] = []
        open_buckets: dict[tuple, list[tuple[int, str, int]]] = {}
        sizes: dict[tuple, int] = {}
        for c, key, numel, axes in reversed(params):
            if not axes:
                continue
            sharded = shard and (c, key) not in tied and "dp" in axes
            if 4 * numel >= BUCKET_BYTES:
                buckets.append((sharded, axes, [(c, key, numel)]))
                continue
            k = (axes, sharded)
            open_buckets.setdefault(k, []).append((c, key, numel))
            sizes[k] = sizes.get(k, 0) + 4 * numel
            if sizes[k] >= BUCKET_BYTES:
                buckets.append((sharded, axes, open_buckets.pop(k)))
                sizes.pop(k)
        buckets += [(k[1], k[0], members) for k, members in open_buckets.items()]
        self.sharded = {(c, key) for sharded, _, members in buckets if sharded for c, key, _ in members}
        self.dropped: dict[tuple[int, str], int] = {}
        self.buffers: list[Buffer] = []
        ready = [max(last_b[c] for c, _, _ in members) for _, _, members in buckets]
        padded = [-(-sum(n for _, _, n in m) // ways) * ways for _, _, m in buckets]
        zero_now = spec.zero >= 2
        for i, (sharded, axes, members) in enumerate(buckets):
            if (sharded and zero_now) or len(members) < 2 or (sharded and axes == ("dp",)):
                continue  # one gradient: reduced in place; ZeRO-2: flats below; ZeRO-1 over dp: at the step
            size = 4 * sum(n for _, _, n in members)
            self.buffers.append(Buffer(f"bucket:{i}", ready[i], reduce_step + 1, size))
        sharded_ids = [i for i, (sharded, _, _) in enumerate(buckets) if sharded]
        chunk = sum(padded[i] for i in sharded_ids) // ways
        # one optimizer step for the stage's chunks (one Trainer): the sharded parameters as this rank's slices
        unsharded = [n for c, key, n, _ in params if (c, key) not in self.sharded]
        scratch = optimizer_scratch(unsharded, chunk, optimizer_foreach)
        if scratch and optimizer_factor > 0:
            self.buffers.append(Buffer("scratch:optimizer", optimizer_step, optimizer_step + 1, 4 * scratch))
        if not sharded_ids:
            return
        for what, factor in (("master", 1), ("state", optimizer_factor)):
            self.buffers.append(Buffer(f"opt:zero-{what}", 0, end, 4 * factor * chunk))
        biggest = 4 * max(padded[i] for i in sharded_ids)
        self.buffers.append(Buffer("zero:gathered", optimizer_step, optimizer_step + 1, biggest))
        if not zero_now:
            self.buffers.append(Buffer("zero:flat-grads", optimizer_step, optimizer_step + 1, biggest))
            self.buffers.append(Buffer("zero:chunk-grad", optimizer_step, optimizer_step + 1, 4 * chunk))
            return
        order = sorted(sharded_ids, key=lambda i: (ready[i], i))
        for j, i in enumerate(order):
            for c, key, _ in buckets[i][2]:
                self.dropped[(c, key)] = ready[i]
            until = ready[order[j + 1]] if j + 1 < len(order) else reduce_step + 1
            self.buffers.append(Buffer(f"zero:bucket{i}", ready[i], max(until, ready[i] + 1), 4 * padded[i]))
        self.buffers.append(Buffer("zero:grad-shard", min(ready[i] for i in sharded_ids), end, 4 * chunk))


def steady_microbatches(spec: PipelineSpec, train: bool) -> int:
    """The micro-batches of ``spec``'s schedule a training map lays out: ``STEADY_ROUNDS x pp`` at most under
    1F1B and interleaved schedules, whose stages hold a bounded number of micro-batches in flight (reached in
    the warm-up, then the same live set shifted by one micro-batch at each step of the steady state), so that
    the first micro-batches' actions (in the schedule's order) reach every live set the whole step does; every
    micro-batch under GPipe (all in flight at once) and in inference (every output kept to the end)."""
    if not train or spec.schedule == "gpipe":
        return spec.microbatches
    return min(spec.microbatches, STEADY_ROUNDS * spec.pp)


def map_pipeline_memory(
    spec: PipelineSpec,
    *,
    train: bool,
    capacity_bytes: int,
    precision: str = "fp32",
    optimizer_factor: int = 2,
    optimizer_foreach: bool = False,
    node_limit: int = NODE_LIMIT,
    time_limit_s: float = TIME_LIMIT_S,
    within_capacity: bool = False,
) -> PipelineMemoryMap:
    """Map every device stage's memory and record it per global rank (see the module docstring).
    ``within_capacity``: offsets from the online allocator's replay when they fit ``capacity_bytes``, else
    best-fit and the search for an arena within the capacity, instead of the search for the smallest arena:
    whether the plan fits is known as surely, and quicker; the arena recorded may be larger than the smallest.
    And when a stage's lower bound (the most bytes live at one step) already exceeds the capacity, no offsets
    are assigned at all: every stage is recorded at its lower bound (``method="lower-bound"``,
    ``exact=False``), which is what the plan needs at least, and enough to know that it does not fit."""
    whole = spec.microbatches
    short = steady_microbatches(spec, train)
    if short < whole:  # the first micro-batches' schedule: the rest repeats its steady state
        spec = replace(spec, microbatches=short, actions=tuple(
            tuple(a for a in actions if a[2] < short) for actions in spec.actions
        ))  # fmt: skip
    per_stage = [
        tuple(
            stage_buffers(
                spec, p, train=train, precision=precision, optimizer_factor=optimizer_factor,
                optimizer_foreach=optimizer_foreach, batch_microbatches=whole,
            )
        )  # fmt: skip
        for p in range(spec.pp)
    ]
    group = spec.dp * spec.cp * spec.tp
    bounds: list[int | None] = [None] * len(per_stage)
    if within_capacity:
        bounds = [lower_bound(bufs) for bufs in per_stage]
        if max(bounds, default=0) > capacity_bytes:
            unmapped = [Assignment((), lb, lb, "lower-bound", False, 0.0) for lb in bounds]
            records = [rank_memory(p * group, per_stage[p], unmapped[p], capacity_bytes) for p in range(spec.pp)]
            memory = tuple(replace(records[r // group], rank=r) for r in range(spec.pp * group))
            return PipelineMemoryMap(memory, tuple(per_stage), tuple(unmapped), exact=False)
    assignments: list[Assignment] = []
    exact = True
    for bufs, bound in zip(per_stage, bounds, strict=True):
        if len(bufs) > MAX_PACKED or short < whole:
            assignment = online_assignment(bufs, bound)  # best-fit packing is quadratic: an allocator's replay
        else:
            # within the capacity: the allocator's replay first (quick); best-fit and the search only if it
            # does not fit
            online = online_assignment(bufs, bound)
            if within_capacity and online.arena_bytes <= capacity_bytes:
                assignment = online
            else:
                assignment = assign_offsets(
                    bufs, time_limit_s=time_limit_s, node_limit=node_limit,
                    capacity=capacity_bytes if within_capacity else None,
                )  # fmt: skip
                if online.arena_bytes < assignment.arena_bytes:  # never larger than the replay's
                    assignment = online
            exact = exact and (not within_capacity or assignment.optimal)
        verify_assignment(bufs, assignment)
        assignments.append(assignment)
    # the ranks of one stage share its buffers and offsets: one record per stage, renumbered per rank
    records = [rank_memory(p * group, per_stage[p], assignments[p], capacity_bytes) for p in range(spec.pp)]
    memory = tuple(replace(records[r // group], rank=r) for r in range(spec.pp * group))
    return PipelineMemoryMap(memory, tuple(per_stage), tuple(assignments), exact)
