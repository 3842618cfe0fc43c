"""The execution plan: frozen data that says how every op and tensor is placed, what it costs, and why.

A plan is JSON (never pickle): ``to_json()`` / ``from_json()`` with ``SCHEMA_VERSION``. Codegen reads
only this; the CLI shows and explains it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shardwise.ir.fusion import FusedGroup
from shardwise.ir.graph import Graph
from shardwise.ir.placement import DeviceMesh, ShardingSpec

if TYPE_CHECKING:
    from shardwise.ir.pipeline import PipelineSpec

__all__ = [
    "SCHEMA_VERSION",
    "NodeStrategy",
    "Redistribute",
    "Prediction",
    "RankMemory",
    "Alternative",
    "HostTraffic",
    "ExecutionPlan",
]

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Redistribute:
    """Changing one value's placement before an op reads it (a collective, or a free local slice)."""

    value: str
    src: ShardingSpec
    dst: ShardingSpec
    collective: str  # "allgather" | "allreduce" | "reduce_scatter" | "alltoall" | "slice" | "to_partial" | "none"
    axis: str  # mesh axis name
    nbytes: int  # bytes of the full (unsharded) value
    time_s: float = 0.0
    algorithm: str = "library:ring"  # or "synth:<id>" when a synthesized schedule is faster


@dataclass(frozen=True)
class NodeStrategy:
    """The placement an op runs with. ``inputs`` is one spec per tensor operand (argument order)."""

    node: str
    split: tuple[tuple[str, str], ...]  # (mesh axis, dimops label split on it); empty = run whole
    inputs: tuple[ShardingSpec | None, ...]
    outputs: tuple[ShardingSpec | None, ...]
    redistributes: tuple[Redistribute, ...] = ()  # applied to the inputs before the op
    grad_reduce: tuple[tuple[int, tuple[str, ...]], ...] = ()  # (operand index, axes its gradient is partial over)
    compute_s: float = 0.0
    comm_s: float = 0.0
    reason: str = ""


@dataclass(frozen=True)
class RankMemory:
    """One rank's memory map (``passes.memory.map_memory``): the arena holding every tensor of its step.

    ``arena_bytes`` is the rank's predicted peak (parameters, gradients, optimizer state, activations,
    collective buffers, placed at fixed offsets) and never below ``lower_bound_bytes``, the largest total
    of bytes live at one step. The parts ``params_bytes + grads_bytes + optimizer_bytes +
    activation_bytes`` add up to ``arena_bytes`` (activations: everything else, gaps included).
    """

    rank: int
    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    arena_bytes: int
    lower_bound_bytes: int
    capacity_bytes: int

    @property
    def total_bytes(self) -> int:
        """The predicted peak: the arena (it holds the parameters, gradients and optimizer state too)."""
        return self.arena_bytes


@dataclass(frozen=True)
class Prediction:
    step_time_s: float
    compute_s: float
    comm_s: float
    bubble_s: float
    memory_bytes: tuple[int, ...]  # per rank, peak
    tflops_per_device: float = 0.0
    mfu: float = 0.0


@dataclass(frozen=True)
class Alternative:
    """A candidate the planner scored, with why it won or lost."""

    degrees: tuple[tuple[str, int], ...]
    step_time_s: float
    memory_bytes: int
    fits: bool
    chosen: bool
    note: str = ""


@dataclass(frozen=True)
class HostTraffic:
    """What host offload (``plan.tiers``) moves over the host link per step, and where compute may hide it.

    ``segments``: node index ranges ``[start, stop)`` of the layers, segment ``0..n-1``; segment ``-1`` is the
    ops before the first layer, ``n`` those after the last. ``moves``: ``(phase, segment, direction, bytes)``
    with phase ``"fwd"``/``"bwd"`` (hidden by that segment's forward or backward) or ``"step"`` (hidden by
    nothing), direction ``"h2d"``/``"d2h"``. ``host_optimizer_bytes``: the host's DRAM traffic of the
    optimizer step it runs. The price list turns these into seconds (``costs.step``).
    """

    segments: tuple[tuple[int, int], ...]
    moves: tuple[tuple[str, int, str, int], ...]
    host_optimizer_bytes: int = 0


@dataclass(frozen=True)
class ExecutionPlan:
    schema_version: int
    model_name: str
    model_fingerprint: str
    cluster_name: str
    cluster_fingerprint: str
    mode: str  # "inference" | "train"
    precision: str  # "fp32" | "bf16" | "fp16"
    world_size: int
    mesh: DeviceMesh
    degrees_: tuple[tuple[str, int], ...]
    graph: Graph
    strategies: tuple[NodeStrategy, ...]
    input_placements: tuple[ShardingSpec, ...]
    param_placements: tuple[tuple[str, ShardingSpec], ...]  # (state_dict key, placement)
    output_placements: tuple[ShardingSpec, ...]
    param_grad_reduce: tuple[tuple[str, tuple[str, ...]], ...]  # (key, axes): gradients reduced after backward
    predicted: Prediction
    memory: tuple[RankMemory, ...]
    replicated_ops: tuple[str, ...] = ()  # node names run whole because no rule splits them
    alternatives: tuple[Alternative, ...] = ()
    passes: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    optimizer: str = ""  # a description of the optimizer factory, for the record
    # how the plan was made, as (key, value) pairs, e.g. ("model", "gpt2:small"), ("cluster", "cpu:2"),
    # ("seed", "0"): `shardwise run plan.json` rebuilds the same model from it. Empty for API-made plans.
    source: tuple[tuple[str, str], ...] = ()
    # ops that run as one kernel on every rank (shardwise.passes.fusion); empty: one kernel per op
    fused_groups: tuple[FusedGroup, ...] = ()
    # ZeRO: 0 none; 1 optimizer state sharded over the "dp" axis, each rank stepping its own slice; 2 the
    # gradients too (reduce-scattered while the backward runs); 3 also parameters sharded over "dp" (see
    # param_placements)
    zero_stage: int = 0
    # pipeline parallelism (pp > 1): the chunks, their intra-op plans and the schedule; None otherwise
    pipeline: PipelineSpec | None = None
    # flat training plans: ranges of forward ops (first node, last node, inclusive, graph order) that run under
    # activation checkpointing and are recomputed in the backward (shardwise.passes.remat); empty: none
    recompute: tuple[tuple[str, str], ...] = ()
    # the point-to-point programs of the collectives that do not use the library's algorithm, as
    # (algorithm, JSON text of a ``shardwise.collective.v1`` program): Redistribute.algorithm names them and
    # the generated program runs them with sends and receives (see planner.collectives)
    collective_programs: tuple[tuple[str, str], ...] = ()
    # memory tier of what is moved off the device (shardwise.passes.offload), as (name, tier) pairs: a
    # state_dict key or a buffer kind ("optimizer", "activations") -> "host"; empty: everything on the device
    tiers: tuple[tuple[str, str], ...] = ()
    # the host-link traffic of those tiers (priced by costs.step); None: nothing moves
    host_traffic: HostTraffic | None = None

    @property
    def degrees(self) -> dict[str, int]:
        return dict(self.degrees_)

    def strategy(self, node: str) -> NodeStrategy:
        for s in self.strategies:
            if s.node == node:
                return s
        raise KeyError(f"no strategy for node {node!r}")

    def replace(self, **changes: Any) -> ExecutionPlan:
        return dataclasses.replace(self, **changes)

    def to_json(self, indent: int | None = 1) -> str:
        from shardwise.ir.serialize import plan_to_json

        return plan_to_json(self, indent=indent)

    @staticmethod
    def from_json(text: str) -> ExecutionPlan:
        from shardwise.ir.serialize import plan_from_json

        return plan_from_json(text)

    def summary(self) -> str:
        from shardwise.ir.text import plan_summary

        return plan_summary(self)
