"""Choosing what to recompute for a flat training plan under a memory budget, and applying the choice.

``choose_recomputation(plan, budget_bytes)``: units are the plan's repeated layers
(``segments.layer_segments``); the least recompute time whose peak fits the budget is solved exactly for
the additive model (``dp`` by default, ``ilp`` on request) and then checked on the rank's buffers with the
units recomputed (``peak.recompute_peak``): when the buffers' peak is above the budget (the units' effects
did not add up exactly), the model's budget is lowered by the excess and the solve repeated. The
returned choice's ``peak_bytes`` is always the buffers' peak. ``recompute_all_layers(plan)`` is the usual
hand setting (every layer recomputed), for comparison; ``cheapest_recomputation`` takes the cheaper of the
choices among layers and among the layers' children. ``apply_recomputation(plan, choice)`` records the
choice in the plan (``ExecutionPlan.recompute``, which codegen applies) with the memory map and the
predicted step time updated.
"""

from __future__ import annotations

import dataclasses

from shardwise.cluster.spec import ClusterSpec
from shardwise.costs.step import predict_flat
from shardwise.errors import DoesNotFitError, UserInputError
from shardwise.ir.plan import ExecutionPlan
from shardwise.passes.memory.assign import assign_offsets
from shardwise.passes.memory.buffers import lower_bound
from shardwise.passes.memory.mapping import NODE_LIMIT, TIME_LIMIT_S, rank_memory
from shardwise.passes.memory.verify import verify_assignment
from shardwise.passes.remat.build import RankStep, build_problem, rank_step
from shardwise.passes.remat.dp import pareto_front, solve_chain
from shardwise.passes.remat.ilp import solve_ilp
from shardwise.passes.remat.peak import recompute_buffers, recompute_peak
from shardwise.passes.remat.problem import RematChoice, RematProblem
from shardwise.passes.remat.segments import layer_segments, tensor_cut_segments

__all__ = [
    "choose_recomputation", "cheapest_recomputation", "recompute_all_layers", "apply_recomputation", "problem_of",
]  # fmt: skip

METHODS = ("dp", "ilp")
_RETRIES = 6


def problem_of(plan: ExecutionPlan, depth: int = 0) -> tuple[RankStep, RematProblem]:
    """The rank step and recompute problem of a flat training plan (units: its layers)."""
    step = rank_step(plan)
    # no numbered layers (a Sequential of convolutions): runs of ops cut where one gradient tensor crosses
    units = layer_segments(plan.graph, depth) or tensor_cut_segments(plan.graph)
    if not units:
        raise UserInputError(
            f"{plan.model_name} has no numbered layers (module paths like 'layers.3' or 'h.3') and no place "
            "where a single tensor carries the computation on: nothing to recompute"
        )
    return step, build_problem(step, units)


def _choice(step: RankStep, problem: RematProblem, chosen: tuple[int, ...], budget: int, method: str) -> RematChoice:
    units = [u for u, c in zip(problem.units, chosen, strict=True) if c]
    ranges = tuple((u.start, u.stop) for u in units)
    return RematChoice(
        units=tuple(u.name for u in units),
        ranges=ranges,
        peak_bytes=recompute_peak(step.graph, step.train, step.inference, ranges),
        baseline_bytes=lower_bound(step.train),
        recompute_s=sum(u.recompute_s for u in units),
        budget_bytes=budget,
        method=method,
    )


def choose_recomputation(
    plan: ExecutionPlan, budget_bytes: int, *, method: str = "dp", depth: int = 0, time_limit_s: float = 30.0
) -> RematChoice:
    """The least recompute time whose predicted peak (the rank's buffers) is within ``budget_bytes``.

    Raises DoesNotFitError, naming the lowest peak recomputation reaches, when no choice fits."""
    if method not in METHODS:
        raise UserInputError(f"method={method!r}: choose one of {', '.join(METHODS)}")
    step, problem = problem_of(plan, depth)
    target = budget_bytes
    for _ in range(_RETRIES):
        try:
            chosen = solve_chain(problem, target) if method == "dp" else solve_ilp(problem, target, time_limit_s=time_limit_s)
        except DoesNotFitError:
            break
        made = _choice(step, problem, chosen, budget_bytes, method)
        if made.peak_bytes <= budget_bytes:
            return made
        target -= made.peak_bytes - budget_bytes
    lowest = min(
        _choice(step, problem, pareto_front(problem)[-1][2], budget_bytes, method).peak_bytes,
        _choice(step, problem, (1,) * len(problem.units), budget_bytes, method).peak_bytes,
    )
    raise DoesNotFitError(
        f"no recomputation of {plan.model_name}'s layers fits {budget_bytes / 2**20:.2f} MiB per rank: the "
        f"lowest peak recomputation reaches is {lowest / 2**20:.2f} MiB ({lowest} bytes); raise the budget "
        "to at least that, or shard the model further (more tensor or pipeline parallelism)"
    )


def cheapest_recomputation(plan: ExecutionPlan, budget_bytes: int, *, method: str = "dp") -> RematChoice:
    """The cheaper of the choices among whole layers (``depth=0``) and among the layers' children
    (``depth=1``: attention, MLP, norms; finer, so often less recompute for the same budget); ties go to
    the lower peak. Raises DoesNotFitError (the lowest peak of either) when neither fits."""
    made: list[RematChoice] = []
    errors: list[DoesNotFitError] = []
    for depth in (0, 1):
        try:
            made.append(choose_recomputation(plan, budget_bytes, method=method, depth=depth))
        except DoesNotFitError as exc:
            errors.append(exc)
    if not made:
        raise min(errors, key=lambda e: _lowest_in(str(e)))
    return min(made, key=lambda c: (c.recompute_s, c.peak_bytes))


def _lowest_in(message: str) -> int:
    digits = message.rsplit("(", 1)[-1].split(" ", 1)[0]
    return int(digits) if digits.isdigit() else 0


def recompute_all_layers(plan: ExecutionPlan, depth: int = 0) -> RematChoice:
    """Every layer recomputed (the usual hand setting), with its predicted peak and recompute time."""
    step, problem = problem_of(plan, depth)
    return _choice(step, problem, (1,) * len(problem.units), 0, "all")


def apply_recomputation(plan: ExecutionPlan, choice: RematChoice, cluster: ClusterSpec | None = None) -> ExecutionPlan:
    """The plan with ``choice`` recorded for codegen, its memory map (the recomputed buffers, packed) and its
    predicted step time updated: priced again by the price list on ``cluster`` (``costs.step.price_flat``,
    which runs the recorded ranges again in the backward); without it, the recompute time added to the
    plan's prediction (the same sum of the recomputed ops' forward prices)."""
    step = rank_step(plan)
    nodes = plan.graph.nodes
    ranges = tuple((nodes[s].name, nodes[e - 1].name) for s, e in choice.ranges)
    bufs = recompute_buffers(step.graph, step.train, step.inference, choice.ranges)
    assignment = assign_offsets(bufs, time_limit_s=TIME_LIMIT_S, node_limit=NODE_LIMIT)  # as map_memory
    verify_assignment(bufs, assignment)
    capacity = plan.memory[0].capacity_bytes if plan.memory else 0
    memory = tuple(rank_memory(m.rank, bufs, assignment, capacity) for m in plan.memory)
    predicted = dataclasses.replace(
        plan.predicted,
        step_time_s=plan.predicted.step_time_s + choice.recompute_s,
        compute_s=plan.predicted.compute_s + choice.recompute_s,
        memory_bytes=tuple(m.arena_bytes for m in memory),
    )
    note = (
        f"recompute: {len(choice.units)} layers recomputed in the backward ({choice.method}), predicted peak "
        f"{choice.peak_bytes / 2**20:.2f} MiB (from {choice.baseline_bytes / 2**20:.2f}), "
        f"+{choice.recompute_s * 1e3:.3f} ms per step"
    )
    passes = plan.passes if "remat" in plan.passes else (*plan.passes, "remat")
    plan = plan.replace(recompute=ranges, memory=memory, predicted=predicted, notes=(*plan.notes, note), passes=passes)
    if cluster is not None:
        plan = plan.replace(predicted=predict_flat(plan, cluster))
    return plan
