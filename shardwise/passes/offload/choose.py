"""Choosing memory tiers jointly with recomputation for a flat training plan, and applying the choice.

``offload_candidates(plan, cluster)`` enumerates {recompute choice} x {tiers}: the recompute choices are the
Pareto front of the layer chain (``passes.remat.pareto_front``: every non-dominated (recompute time, peak)
choice, at most ``n + 1`` for ``n`` equal layers) plus every layer recomputed; the tiers are
``TIER_COMBINATIONS`` (at most 6). Each pair is measured on the rank's buffers (recompute rewrite, then the
tiers' rewrite, ``rewrite.offload_buffers``; the device peak is their lower bound, which the memory map
reaches) and costed (``cost``: recompute time + exposed transfers + host optimizer step).
``choose_offload(plan, cluster, budget)`` returns the cheapest pair whose device peak is within the budget
and whose host bytes fit the rank's share of host memory (ties: the lower device peak; recompute choices
are tried by recompute time and the search stops once that alone exceeds the best fitting cost), else raises
DoesNotFitError naming the smallest device memory any pair reaches. ``apply_offload`` records the choice:
``plan.recompute`` (via ``remat.apply_recomputation``), ``plan.tiers``, the memory map of the rewritten
buffers and the predicted step time.
"""

from __future__ import annotations

from collections.abc import Sequence

from shardwise.cluster.host import host_bytes_per_rank
from shardwise.cluster.spec import ClusterSpec
from shardwise.costs.step import predict_flat
from shardwise.errors import DoesNotFitError, UserInputError
from shardwise.ir.plan import ExecutionPlan
from shardwise.passes.memory.assign import assign_offsets
from shardwise.passes.memory.buffers import lower_bound
from shardwise.passes.memory.mapping import rank_memory
from shardwise.passes.memory.verify import verify_assignment
from shardwise.passes.offload.cost import host_traffic, offload_seconds
from shardwise.passes.offload.rewrite import Offloaded, offload_buffers
from shardwise.passes.offload.tiers import HOST, TIER_COMBINATIONS, OffloadChoice, Tiers
from shardwise.passes.remat import (
    apply_recomputation,
    layer_segments,
    pareto_front,
    problem_of,
    rank_step,
    recompute_buffers,
)
from shardwise.passes.remat.build import RankStep
from shardwise.passes.remat.problem import RematChoice
from shardwise.passes.remat.segments import tensor_cut_segments

__all__ = ["offload_candidates", "choose_offload", "apply_offload", "tier_record"]


def _recompute_choices(plan: ExecutionPlan, recompute: bool) -> tuple[RankStep, list[tuple[str, int, int]], list]:
    """The rank step, its layers and the recompute choices to try: (seconds, names, ranges)."""
    try:
        step, problem = problem_of(plan)
    except UserInputError:  # no numbered layers: nothing to recompute or stream per layer
        return rank_step(plan), [], [(0.0, (), ())]
    units = [(u.name, u.start, u.stop) for u in problem.units]
    picks = [c for _, _, c in pareto_front(problem)] if recompute else [(0,) * len(units)]
    if recompute:
        picks.append((1,) * len(units))
    out, seen = [], set()
    for c in picks:
        if c in seen:
            continue
        seen.add(c)
        chosen = [u for u, x in zip(problem.units, c, strict=True) if x]
        out.append((sum(u.recompute_s for u in chosen), tuple(u.name for u in chosen),
                    tuple((u.start, u.stop) for u in chosen)))  # fmt: skip
    return step, units, out


def _measure(
    plan: ExecutionPlan, step: RankStep, units: Sequence[tuple[str, int, int]], pick: tuple, tiers: Tiers,
    cluster: ClusterSpec, baseline: int,
) -> tuple[OffloadChoice, Offloaded]:
    seconds, names, ranges = pick
    bufs = recompute_buffers(step.graph, step.train, step.inference, ranges)
    off = offload_buffers(step, units, ranges, bufs, tiers, zero_stage=plan.zero_stage)
    exposed, host_optimizer = offload_seconds(plan, ranges, host_traffic(off, units), cluster)
    choice = OffloadChoice(
        tiers=tiers, units=names, ranges=ranges, offloaded_units=off.offloaded_units, streamed=off.streamed,
        device_peak_bytes=lower_bound(off.buffers), baseline_bytes=baseline, host_bytes=off.host_bytes,
        transfer_bytes=off.transfer_bytes,
        exposed_s=exposed, host_optimizer_s=host_optimizer,
        recompute_s=seconds,
    )  # fmt: skip
    return choice, off


def offload_candidates(
    plan: ExecutionPlan, cluster: ClusterSpec, *, tiers: Sequence[Tiers] = TIER_COMBINATIONS,
    recompute: bool = True,
) -> list[OffloadChoice]:
    """Every (recompute choice, tiers) pair measured and costed (see the module docstring)."""
    step, units, picks = _recompute_choices(plan, recompute)
    baseline = lower_bound(step.train)
    return [_measure(plan, step, units, p, t, cluster, baseline)[0] for p in picks for t in tiers]


def choose_offload(
    plan: ExecutionPlan, cluster: ClusterSpec, budget_bytes: int | None = None, *,
    tiers: Sequence[Tiers] = TIER_COMBINATIONS, recompute: bool = True,
) -> OffloadChoice:
    """The cheapest pair that fits ``budget_bytes`` per rank (default: the device's memory) and the host."""
    budget = budget_bytes if budget_bytes is not None else cluster.device.memory_bytes
    host = host_bytes_per_rank(cluster)
    step, units, picks = _recompute_choices(plan, recompute)
    baseline = lower_bound(step.train)
    made: list[OffloadChoice] = []
    best: OffloadChoice | None = None
    # by recompute time: a pick whose recompute time alone exceeds the best fitting cost cannot win (cost >=
    # recompute time); when nothing fits, every pair is measured, so the error's lowest peak is exact
    for pick in sorted(picks, key=lambda p: p[0]):
        if best is not None and pick[0] > best.cost_s:
            break
        for t in tiers:
            c = _measure(plan, step, units, pick, t, cluster, baseline)[0]
            made.append(c)
            fits = c.device_peak_bytes <= budget and c.host_bytes <= host
            if fits and (best is None or (c.cost_s, c.device_peak_bytes) < (best.cost_s, best.device_peak_bytes)):
                best = c
    if best is not None:
        return best
    on_host = [c for c in made if c.host_bytes <= host] or made
    lowest = min(on_host, key=lambda c: c.device_peak_bytes)
    raise DoesNotFitError(
        f"{plan.model_name} does not fit {budget / 2**20:.2f} MiB per rank with recomputation and host offload "
        f"({', '.join(sorted({str(t) for t in tiers}))}): the smallest device memory reachable is "
        f"{lowest.device_peak_bytes / 2**20:.2f} MiB ({lowest.device_peak_bytes} bytes; tiers {lowest.tiers}, "
        f"{len(lowest.units)} layers recomputed, {lowest.host_bytes / 2**30:.2f} GiB on the host of "
        f"{host / 2**30:.2f} GiB per rank); use devices with at least that memory, or shard the model further "
        "(more tensor or pipeline parallelism)"
    )


def tier_record(plan: ExecutionPlan, choice: OffloadChoice) -> tuple[tuple[str, str], ...]:
    """``ExecutionPlan.tiers`` for ``choice``: each tensor (or layer's activations) in host memory."""
    out: list[tuple[str, str]] = []
    if choice.tiers.optimizer:
        keys = sorted({p.key for p in plan.graph.params if p.requires_grad and p.kind == "parameter"})
        out += [(f"optimizer:{k}", HOST) for k in keys]
    out += [(f"parameter:{k}", HOST) for k in choice.streamed]
    nodes = plan.graph.nodes
    spans = {name: (s, e) for name, s, e in _layers(plan)}
    for u in choice.offloaded_units:
        s, e = spans[u]
        out.append((f"activations:{u}:{nodes[s].name}..{nodes[e - 1].name}", HOST))
    return tuple(out)


def _layers(plan: ExecutionPlan) -> list[tuple[str, int, int]]:
    return layer_segments(plan.graph) or tensor_cut_segments(plan.graph)  # the units of problem_of


def apply_offload(plan: ExecutionPlan, choice: OffloadChoice, cluster: ClusterSpec) -> ExecutionPlan:
    """The plan with ``choice`` recorded (recompute ranges, tiers), its memory map made from the rewritten
    buffers and its predicted step time raised by the exposed transfers and the host optimizer step."""
    if choice.ranges:
        plan = apply_recomputation(plan, RematChoice(
            units=choice.units, ranges=choice.ranges, peak_bytes=choice.device_peak_bytes,
            baseline_bytes=choice.baseline_bytes, recompute_s=choice.recompute_s,
            budget_bytes=cluster.device.memory_bytes, method="offload",
        ), cluster)  # fmt: skip
    if not choice.tiers.any:
        return plan
    step = rank_step(plan)
    segs = _layers(plan)
    bufs = recompute_buffers(step.graph, step.train, step.inference, choice.ranges)
    off = offload_buffers(step, segs, choice.ranges, bufs, choice.tiers, zero_stage=plan.zero_stage)
    assignment = assign_offsets(tuple(off.buffers))
    verify_assignment(tuple(off.buffers), assignment)
    capacity = plan.memory[0].capacity_bytes if plan.memory else cluster.device.memory_bytes
    memory = tuple(rank_memory(m.rank, off.buffers, assignment, capacity) for m in plan.memory)
    note = (
        f"offload: {choice.tiers} in host memory ({choice.host_bytes / 2**20:.2f} MiB per rank), "
        f"{len(choice.units)} layers recomputed; predicted device peak {choice.device_peak_bytes / 2**20:.2f} MiB "
        f"(from {choice.baseline_bytes / 2**20:.2f}); {choice.transfer_bytes / 2**20:.2f} MiB over the host link "
        f"per step, +{choice.exposed_s * 1e3:.3f} ms exposed, +{choice.host_optimizer_s * 1e3:.3f} ms host optimizer"
    )
    passes = plan.passes if "offload" in plan.passes else (*plan.passes, "offload")
    plan = plan.replace(
        tiers=tier_record(plan, choice), memory=memory, notes=(*plan.notes, note), passes=passes,
        host_traffic=host_traffic(off, segs),
    )  # fmt: skip
    return plan.replace(predicted=predict_flat(plan, cluster))  # its one price: costs.step.price_flat
