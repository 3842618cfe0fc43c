"""The recompute problem of one rank of a flat training plan, measured on the memory pass's buffers.

``rank_step(plan)`` builds the rank's step buffers for training and for inference
(``passes.memory.program.step_buffers``, with the arguments the planners give ``map_memory``);
``build_problem(step, segments)`` lays the units' phases on that step and reads each unit's kept bytes and
phase peak with the unit kept and with it recomputed (``peak.recompute_buffers``), one unit at a time.
By construction the model's peak with nothing recomputed equals the buffers' lower bound (the plan's
``lower_bound_bytes``); with several units recomputed the model adds their effects, which holds when the
units are cut where only their outputs cross (layers of a residual stream). ``choose`` checks every choice
on the buffers themselves.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from shardwise.errors import UserInputError
from shardwise.ir.graph import Graph
from shardwise.ir.plan import ExecutionPlan
from shardwise.passes.memory.buffers import Buffer
from shardwise.passes.memory.mapping import plan_memory_inputs
from shardwise.passes.memory.program import buffer_kind, step_buffers
from shardwise.passes.remat.peak import Timeline, recompute_buffers
from shardwise.passes.remat.problem import RematProblem, RematUnit

__all__ = ["RankStep", "rank_step", "build_problem"]

_MADE_BY_OPS = ("act", "mask", "coll")


@dataclass(frozen=True)
class RankStep:
    """One rank's training step as buffers (train and inference lifetimes) and each op's forward time."""

    graph: Graph
    train: tuple[Buffer, ...]
    inference: tuple[Buffer, ...]
    op_seconds: tuple[float, ...]  # per graph node: its predicted forward time (compute and collectives)
    step_time_s: float


def rank_step(plan: ExecutionPlan) -> RankStep:
    """The step of the plan's first rank (every rank of a flat plan runs the same shapes)."""
    if plan.mode != "train":
        raise UserInputError("recomputation applies to training plans: compile with mode='train'")
    if plan.pipeline is not None:
        raise UserInputError(
            "this is a pipeline plan: its stages recompute with the pipeline's own recompute='full' "
            "(constraints={'recompute': 'full'}); per-layer recomputation covers flat plans"
        )
    graph = plan.graph
    common = plan_memory_inputs(plan)
    del common["train"]  # both the training step and the inference pass are built
    common["optimizer_foreach"] = not plan.cluster_name.startswith("cpu")
    train = step_buffers(graph, plan.mesh, plan.strategies, train=True, **common)  # type: ignore[arg-type]
    inference = step_buffers(graph, plan.mesh, plan.strategies, train=False, **common)  # type: ignore[arg-type]
    by_node = {s.node: s for s in plan.strategies}
    seconds = tuple(
        (by_node[n.name].compute_s + by_node[n.name].comm_s) if n.name in by_node else 0.0 for n in graph.nodes
    )
    return RankStep(graph, tuple(train), tuple(inference), seconds, plan.predicted.step_time_s)


def _phases(nodes: int, units: Sequence[tuple[str, int, int]]) -> list[int]:
    """Old step -> phase: 0 gradient reduction and optimizer, i (1-based) unit i's, n + 1 the tail."""
    tail = len(units) + 1
    fwd = []
    u = 0
    for k in range(nodes):
        while u < len(units) and units[u][2] <= k:
            u += 1
        fwd.append(u + 1 if u < len(units) else tail)
    phases = fwd + [tail] + [fwd[2 * nodes - t] for t in range(nodes + 1, 2 * nodes + 1)]
    return phases + [0, 0]


def _profile(buffers: Sequence[Buffer], length: int) -> list[int]:
    delta = [0] * (length + 1)
    for b in buffers:
        delta[b.start] += b.size
        delta[b.end] -= b.size
    live, out = 0, []
    for d in delta[:length]:
        live += d
        out.append(live)
    return out


def build_problem(step: RankStep, units: Sequence[tuple[str, int, int]]) -> RematProblem:
    """The problem of ``units`` (``(name, start, stop)``, disjoint, in order; see the module docstring)."""
    n = len(step.graph.nodes)
    phases = _phases(n, units)
    end = 2 * n + 3
    base_live = _profile(step.train, end)
    base_kept = []
    for _, s, e in units:
        base_kept.append(
            sum(b.size for b in step.train if s <= b.start < e and b.start <= n < b.end and buffer_kind(b.id) in _MADE_BY_OPS)
        )
    prefix = [0]
    for k in base_kept:
        prefix.append(prefix[-1] + k)
    made: list[RematUnit] = []
    for i, (name, s, e) in enumerate(units, start=1):
        kept = [base_kept[i - 1], 0]
        phase = [0, 0]
        phase[0] = max((base_live[t] for t in range(end) if phases[t] == i), default=0) - prefix[i - 1]
        bufs = recompute_buffers(step.graph, step.train, step.inference, [(s, e)])
        tl = Timeline(n, [(s, e)])
        length = tl.map_end(end)
        live = _profile(bufs, length)
        mapped = [0] * length
        inserted = set(range(length)) - {tl.map(t) for t in range(end)}
        for t in range(end):
            mapped[tl.map(t)] = phases[t]
        for t in inserted:
            mapped[t] = i
        phase[1] = max((live[t] for t in range(length) if mapped[t] == i), default=0) - prefix[i - 1]
        kept[1] = sum(
            b.size for b in bufs
            if s <= b.start < e and b.start <= n < b.end and buffer_kind(b.id) in _MADE_BY_OPS
        )  # fmt: skip
        seconds = sum(step.op_seconds[s:e])
        made.append(RematUnit(name, s, e, seconds, (kept[0], kept[1]), (max(0, phase[0]), max(0, phase[1]))))
    fixed = max((base_live[t] for t in range(end) if phases[t] == 0), default=0)
    tail = max((base_live[t] for t in range(end) if phases[t] == len(units) + 1), default=0) - prefix[-1]
    return RematProblem(tuple(made), fixed, max(0, tail), step.step_time_s)
