"""The memory-mapping pass for pipeline plans: each device stage's schedule, micro-batches in flight.

``map_pipeline_memory(spec, ...)`` builds, for every device stage, the buffers of one training step from
its chunks' step programs (``program.step_buffers`` on each chunk's micro-batch plan) laid along the
stage's schedule (``spec.actions``): action ``i`` of the stage gets its own window of steps, a forward
``("F", c, m)`` the forward steps of chunk ``c``'s program, a backward ``("B", c, m)`` its backward steps.

* Per micro-batch (ids suffixed ``#m``): activations, their gradients, dropout masks, collective buffers,
  weight casts and the values received from the previous chunk. A buffer live from chunk ``c``'s forward
  into its backward (kept for backward) is live from the forward of micro-batch ``m`` to its backward,
  across every action the stage runs in between: the micro-batches in flight. With ``recompute="full"``
  a chunk keeps only what it received; the backward recomputes the rest (live within the backward).
* Once per stage: parameters and optimizer state (the whole step), the whole input batch on the stage
  holding chunk 0, parameter gradients (from the chunk's first backward to the optimizer step; gradients
  of all micro-batches accumulate in place), gradient buckets (all-reduced over ``dp`` and over the
  chunk's ``tp`` axes) and the optimizer's scratch at the end.

Guarantees: per rank (global rank ``(p * dp + d) * tp + t`` on stage ``p``) a ``RankMemory`` whose arena
packs the stage's buffers (``verify_assignment`` passes) and is never below the lower bound; ranks of
one stage share it. Stages of more than ``MAX_PACKED`` buffers (long pipelines of many micro-batches) are
packed by an online allocator's replay instead of best-fit and the exact search.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Sequence
from dataclasses import dataclass

from shardwise.ir.pipeline import PipelineSpec
from shardwise.ir.plan import ExecutionPlan, RankMemory
from shardwise.passes.memory.assign import assign_offsets
from shardwise.passes.memory.buffers import Assignment, Buffer, lower_bound
from shardwise.passes.memory.mapping import NODE_LIMIT, TIME_LIMIT_S, rank_memory
from shardwise.passes.memory.program import BUCKET_BYTES, buffer_kind, step_buffers
from shardwise.passes.memory.verify import verify_assignment

__all__ = ["MAX_PACKED", "PipelineMemoryMap", "map_pipeline_memory", "online_assignment", "stage_buffers"]

_PER_MICROBATCH = frozenset(("act", "agrad", "mask", "coll", "cgrad", "cast"))
MAX_PACKED = 20_000  # buffers per stage above which the offsets come from an online allocator's replay


def online_assignment(buffers: Sequence[Buffer]) -> Assignment:
    """Offsets as an allocator running the step would give them: buffers allocated in order of their
    first step (frees of a step first), each in the smallest free gap that holds it, else on top.
    Valid for any size; the arena is not searched (``method="online-best-fit"``)."""
    t0 = time.perf_counter()
    order = sorted(range(len(buffers)), key=lambda i: (buffers[i].start, -buffers[i].size, buffers[i].id))
    ending = sorted(range(len(buffers)), key=lambda i: buffers[i].end)
    free: list[tuple[int, int]] = []  # (offset, size) of the gaps below the top, sorted by offset
    top = arena = 0
    offsets = [0] * len(buffers)
    k = 0
    for i in order:
        b = buffers[i]
        while k < len(ending) and buffers[ending[k]].end <= b.start:  # free what died before b starts
            j = ending[k]
            k += 1
            off, size = offsets[j], buffers[j].size
            at = bisect.bisect_left(free, (off, size))
            if at < len(free) and off + size == free[at][0]:  # join the gap above
                size += free.pop(at)[1]
            if at > 0 and free[at - 1][0] + free[at - 1][1] == off:  # and the one below
                at -= 1
                off, size = free[at][0], free[at][1] + size
                free.pop(at)
            if off + size == top:
                top = off
            else:
                free.insert(at, (off, size))
        fits = [(size, off) for off, size in free if size >= b.size]
        if fits:
            size, off = min(fits)
            free.remove((off, size))
            if size > b.size:
                bisect.insort(free, (off + b.size, size - b.size))
        else:
            off, top = top, top + b.size
        offsets[i] = off
        arena = max(arena, off + b.size)
    return Assignment(
        offsets=tuple(sorted((b.id, o) for b, o in zip(buffers, offsets))),
        arena_bytes=arena,
        lower_bound_bytes=lower_bound(buffers),
        method="online-best-fit",
        optimal=arena == lower_bound(buffers),
        solve_s=time.perf_counter() - t0,
    )


@dataclass(frozen=True)
class PipelineMemoryMap:
    """Per rank: the plan's record; per device stage: the buffers and their offsets."""

    memory: tuple[RankMemory, ...]
    buffers: tuple[tuple[Buffer, ...], ...]  # per device stage
    assignments: tuple[Assignment, ...]  # per device stage


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
) -> list[Buffer]:
    """The buffers of device stage ``stage``'s step (see the module docstring)."""
    chunks = {s.chunk: s for s in spec.stages if s.device_stage == stage}
    local: dict[int, list[Buffer]] = {}
    nodes: dict[int, int] = {}
    for c, s in chunks.items():
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
    end = clock + 2 if train else clock

    def at(c: int, m: int, t: int) -> int:
        n = nodes[c]
        if t <= n:
            return fwd[(c, m)] + t
        if t <= 2 * n and (c, m) in bwd:
            return bwd[(c, m)] + t - n - 1
        return reduce_step if t == 2 * n + 1 else optimizer_step

    out: list[Buffer] = []
    grads: list[int] = []
    for c, bufs in local.items():
        n = nodes[c]
        first_b = min((bwd[(c, m)] for m in range(spec.microbatches) if (c, m) in bwd), default=end - 1)
        for b in bufs:
            kind = buffer_kind(b.id)
            name = f"c{c}/{b.id}"
            if kind in ("param", "opt") or (kind == "input" and c == 0):
                size = b.size * (spec.microbatches if kind == "input" else 1)  # the whole batch
                out.append(Buffer(name, 0, end, size))
            elif kind == "grad":
                out.append(Buffer(name, first_b, end, b.size))
                grads.append(b.size)
            elif kind in ("scratch", "zero"):
                out.append(Buffer(name, optimizer_step, optimizer_step + 1, b.size))
            elif kind == "bucket":
                out.append(Buffer(name, reduce_step, reduce_step + 1, b.size))
            elif kind in _PER_MICROBATCH or kind == "input":
                kept = kind == "input"  # a received value: its gradient is sent back after the backward
                for m in range(spec.microbatches):
                    start, last = at(c, m, b.start), at(c, m, b.end - 1)
                    if train and (c, m) in bwd:
                        # the chunk's outputs are kept until its backward, their gradients arrive with it
                        last = min(last, bwd[(c, m)] + n - 1)
                        if kind == "agrad" and b.start == n:
                            start = bwd[(c, m)]
                    spans = b.start < n < b.end - 1 and kind != "agrad"  # kept from forward into backward
                    if spec.recompute == "full" and spans and not kept and train:
                        # dropped after the forward, made again at the start of the backward
                        out.append(Buffer(f"{name}#{m}", start, fwd[(c, m)] + n + 1, b.size))
                        out.append(Buffer(f"{name}#{m}.re", bwd[(c, m)], last + 1, b.size))
                    else:
                        out.append(Buffer(f"{name}#{m}", start, max(last + 1, start + 1), b.size))
    if train and spec.dp > 1 and grads:
        run = biggest = 0
        for size in grads:
            run += size
            if run >= BUCKET_BYTES:
                biggest, run = max(biggest, run), 0
        out.append(Buffer("bucket:dp", reduce_step, reduce_step + 1, max(biggest, run)))
    return out


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
) -> PipelineMemoryMap:
    """Map every device stage's memory and record it per global rank (see the module docstring)."""
    per_stage: list[tuple[Buffer, ...]] = []
    assignments: list[Assignment] = []
    for p in range(spec.pp):
        bufs = tuple(
            stage_buffers(
                spec, p, train=train, precision=precision, optimizer_factor=optimizer_factor,
                optimizer_foreach=optimizer_foreach,
            )
        )  # fmt: skip
        if len(bufs) > MAX_PACKED:
            assignment = online_assignment(bufs)  # best-fit packing is quadratic: an allocator's replay
        else:
            assignment = assign_offsets(bufs, time_limit_s=time_limit_s, node_limit=node_limit)
        verify_assignment(bufs, assignment)
        per_stage.append(bufs)
        assignments.append(assignment)
    group = spec.dp * spec.tp
    memory = tuple(
        rank_memory(r, per_stage[r // group], assignments[r // group], capacity_bytes)
        for r in range(spec.pp * group)
    )
    return PipelineMemoryMap(memory, tuple(per_stage), tuple(assignments))
