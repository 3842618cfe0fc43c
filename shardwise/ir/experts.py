"""Expert parallelism in a plan: which mesh axis splits the experts of a ``shardwise.moe_experts`` op.

The op (``ir.registry.MOE_EXPERTS``) takes ``(hidden, index, weights, gate_up, down, activation)``, or, once
``passes.sharding.rewrite`` has cut the fused gate and up projections into parameter parts (so that tensor
parallelism may split each expert's intermediate dimension), ``(hidden, index, weights, gate, up, down,
activation)``. Its experts are split over an axis when its strategy wants every expert weight sharded along
dim 0 on that axis
(``passes.sharding.experts`` makes such strategies); its tokens are then split over the same axis, each rank
holding its own, and the op dispatches rows to their experts' ranks by all-to-all (``runtime.lib.moe``).
Codegen, the price list and the planner read it from here.
"""

from __future__ import annotations

from shardwise.ir.graph import Graph, Value
from shardwise.ir.placement import DeviceMesh, Shard, ShardingSpec
from shardwise.ir.plan import NodeStrategy
from shardwise.ir.registry import MOE_EXPERTS
from shardwise.ir.tensor import TensorSpec

__all__ = ["MOE_EXPERTS", "FIRST_WEIGHT", "weight_operands", "expert_axis", "expert_count", "moe_nodes"]

FIRST_WEIGHT = 3  # the expert weights are the tensor operands from this one on (after hidden, index, weights)


def weight_operands(count: int) -> tuple[int, ...]:
    """The positions of the expert weights among an experts op's ``count`` tensor operands (or its arguments:
    they come first): (gate_up, down) or (gate, up, down)."""
    return tuple(range(FIRST_WEIGHT, count))


def expert_axis(strategy: NodeStrategy | None, mesh: DeviceMesh) -> str | None:
    """The mesh axis (of more than one rank) over which ``strategy`` splits the experts, None when every rank
    holds them all."""
    if strategy is None or len(strategy.inputs) <= FIRST_WEIGHT + 1:
        return None
    specs: list[ShardingSpec | None] = [strategy.inputs[i] for i in weight_operands(len(strategy.inputs))]
    for a, axis in enumerate(mesh.axis_names):
        if mesh.shape[a] > 1 and all(s is not None and s.placements[a] == Shard(0) for s in specs):
            return axis
    return None


def moe_nodes(graph: Graph) -> list[str]:
    """The names of the experts ops, in graph order."""
    return [n.name for n in graph.nodes if n.op == MOE_EXPERTS]


def expert_count(graph: Graph) -> int | None:
    """The number of experts every MoE layer of ``graph`` has (what ``ep`` must divide); None without MoE
    layers, 0 when layers differ."""
    counts = set()
    for n in graph.nodes:
        weight = n.args[3] if n.op == MOE_EXPERTS and len(n.args) > 3 else None
        if isinstance(weight, Value):
            spec = graph.spec_of(weight.name)
            if isinstance(spec, TensorSpec):
                counts.add(spec.shape[0])
    if not counts:
        return None
    return counts.pop() if len(counts) == 1 else 0
