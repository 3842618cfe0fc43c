"""The memory-mapping pass: each rank's step as buffers, packed into one arena per rank.

``map_memory`` runs after placement. Requires: the graph, mesh and per-op strategies of a placed plan,
with parameter and input placements keyed by graph value name. Guarantees, for every rank ``r`` of the
mesh, ``memory[r]`` with

* ``lower_bound_bytes``: the largest total of bytes live at one step of the rank's step (parameters,
  gradients, optimizer state, activations kept for backward, their gradients, collective buffers);
* ``arena_bytes >= lower_bound_bytes``: the size of an arena holding every buffer at an offset where no two
  buffers live at a common step share a byte (``assignments[r]``, checked by ``verify_assignment``);
  it is the rank's predicted peak memory, the number the planners compare with the device's capacity;
* ``params_bytes``, ``grads_bytes``, ``optimizer_bytes``: those buffers' bytes; ``activation_bytes``: the
  rest of the arena (activations, their gradients, collective buffers, gaps), so the four parts add up to
  ``arena_bytes``.

Ranks whose buffers are equal (the ranks of a dp x tp mesh: the planners only propose even splits) share
one assignment. The search is bounded by ``node_limit`` (deterministic) and ``time_limit_s``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from shardwise.ir.graph import Graph
from shardwise.ir.placement import DeviceMesh, ShardingSpec
from shardwise.ir.plan import ExecutionPlan, NodeStrategy, RankMemory
from shardwise.passes.memory.assign import assign_offsets
from shardwise.passes.memory.buffers import Assignment, Buffer
from shardwise.passes.memory.program import buffer_kind, step_buffers
from shardwise.passes.memory.verify import verify_assignment

__all__ = [
    "MemoryMap", "map_memory", "rank_memory", "plan_memory_inputs", "OPTIMIZER_STATE_FACTOR", "NODE_LIMIT",
    "TIME_LIMIT_S",
]  # fmt: skip

# fp32 optimizer state values per parameter element, by the optimizer a plan records
OPTIMIZER_STATE_FACTOR = {"adamw": 2, "adam": 2, "sgd": 1, "none": 0}


def plan_memory_inputs(plan: ExecutionPlan) -> dict:
    """The keyword arguments of ``step_buffers`` / ``map_memory`` that a flat plan records: parameter and
    input placements, mode, precision, optimizer state per parameter, ZeRO stage and the parameters whose
    gradients are reduced after the backward."""
    by_key = {p.key: p.name for p in plan.graph.params}
    return {
        "param_placements": {by_key[k]: s for k, s in plan.param_placements if k in by_key},
        "input_placements": dict(zip((i.name for i in plan.graph.inputs), plan.input_placements, strict=True)),
        "train": plan.mode == "train",
        "precision": plan.precision,
        "optimizer_factor": OPTIMIZER_STATE_FACTOR.get(plan.optimizer.lower(), 2),
        "zero": plan.zero_stage,
        "grad_reduce": dict(plan.param_grad_reduce),
    }

NODE_LIMIT = 20_000  # search nodes per rank class: keeps planning deterministic and quick
TIME_LIMIT_S = 10.0  # a safety net only: the node limit normally ends the search first


@dataclass(frozen=True)
class MemoryMap:
    """Per rank (mesh rank order): the summary the plan records, the buffers and their offsets."""

    memory: tuple[RankMemory, ...]
    buffers: tuple[tuple[Buffer, ...], ...]
    assignments: tuple[Assignment, ...]

    @property
    def arena_bytes(self) -> tuple[int, ...]:
        return tuple(m.arena_bytes for m in self.memory)


def rank_memory(
    rank: int, buffers: Sequence[Buffer], assignment: Assignment, capacity_bytes: int
) -> RankMemory:
    """The plan's record for one rank, from its buffers and their assignment (see the module docstring)."""
    parts = {"param": 0, "grad": 0, "opt": 0}
    for b in buffers:
        kind = buffer_kind(b.id).rsplit("/", 1)[-1]  # a pipeline stage's buffers are named c<chunk>/<kind>:...
        if kind in parts:
            parts[kind] += b.size
    arena = assignment.arena_bytes
    return RankMemory(
        rank=rank,
        params_bytes=parts["param"],
        grads_bytes=parts["grad"],
        optimizer_bytes=parts["opt"],
        activation_bytes=max(0, arena - sum(parts.values())),
        arena_bytes=arena,
        lower_bound_bytes=assignment.lower_bound_bytes,
        capacity_bytes=capacity_bytes,
    )


def map_memory(
    graph: Graph,
    mesh: DeviceMesh,
    strategies: Sequence[NodeStrategy],
    *,
    param_placements: Mapping[str, ShardingSpec],
    input_placements: Mapping[str, ShardingSpec],
    train: bool,
    capacity_bytes: int,
    precision: str = "fp32",
    optimizer_factor: int = 2,
    zero: int = 0,
    grad_reduce: Mapping[str, tuple[str, ...]] | None = None,
    optimizer_foreach: bool = False,
    node_limit: int = NODE_LIMIT,
    time_limit_s: float = TIME_LIMIT_S,
    exact: bool = True,
) -> MemoryMap:
    """Map every rank's memory (see the module docstring); ``grad_reduce`` is keyed by state_dict key.
    ``exact=False`` keeps the best greedy arena (no search): for scoring many candidate plans quickly."""
    bufs = tuple(
        step_buffers(
            graph, mesh, strategies, param_placements=param_placements, input_placements=input_placements,
            train=train, precision=precision, optimizer_factor=optimizer_factor, zero=zero,
            grad_reduce=grad_reduce, optimizer_foreach=optimizer_foreach,
        )
    )  # fmt: skip
    # the search aims at the lower bound; the capacity only matters when even that does not fit
    if exact:
        assignment = assign_offsets(bufs, time_limit_s=time_limit_s, node_limit=node_limit)
    else:
        assignment = assign_offsets(bufs, time_limit_s=0.0, node_limit=0, use_cpsat=False)
    verify_assignment(bufs, assignment)
    ranks = mesh.ranks
    # every rank runs the same program on pieces of the same shapes: one record, renumbered per rank
    first = rank_memory(ranks[0], bufs, assignment, capacity_bytes)
    return MemoryMap(
        memory=tuple(replace(first, rank=r) for r in ranks),
        buffers=tuple(bufs for _ in ranks),
        assignments=tuple(assignment for _ in ranks),
    )
