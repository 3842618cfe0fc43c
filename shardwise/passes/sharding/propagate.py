"""Greedy placement: every op follows the placement its operands already have.

This is the simplest strategy chooser (data parallelism falls out of it: shard the inputs' batch
dimension and every op that can keep the split keeps it). The ILP chooser replaces the per-op choice
but reuses :func:`make_strategy`.

Requires: a verified graph; ``input_placements`` one per graph input; ``param_placements`` by value name.
Guarantees: one NodeStrategy per node in graph order, plus a final ``<output>`` strategy whose
redistributions make every graph output (and buffer update) Replicate.
"""

from __future__ import annotations

from collections.abc import Mapping

from shardwise.costs.prices import MeshPrices
from shardwise.ir.graph import Graph, Value
from shardwise.ir.placement import DeviceMesh, Shard, ShardingSpec
from shardwise.ir.plan import NodeStrategy
from shardwise.ir.registry import op_dims, runs_whole, tensor_operands
from shardwise.ir.tensor import TensorSpec
from shardwise.passes.sharding.redistribute import redistribute_steps, replicated
from shardwise.passes.sharding.strategy import make_strategy, scalar_strategy, split_is_valid

__all__ = ["follow_producers", "OUTPUT_NODE"]

OUTPUT_NODE = "<output>"


def follow_producers(
    graph: Graph,
    mesh: DeviceMesh,
    input_placements: Mapping[str, ShardingSpec],
    param_placements: Mapping[str, ShardingSpec],
    cost: MeshPrices | None,
    *,
    train: bool,
) -> tuple[tuple[NodeStrategy, ...], tuple[str, ...]]:
    """Returns the strategies and the names of nodes that run whole because no rule splits them."""
    placement: dict[str, ShardingSpec | None] = {}
    specs: dict[str, TensorSpec] = {}
    for i in graph.inputs:
        placement[i.name] = input_placements.get(i.name, replicated(mesh)) if isinstance(i.spec, TensorSpec) else None
        if isinstance(i.spec, TensorSpec):
            specs[i.name] = i.spec
    for p in graph.params:
        placement[p.name] = param_placements.get(p.name, replicated(mesh))
        specs[p.name] = p.spec
    tuple_outputs: dict[str, tuple[ShardingSpec, ...]] = {}
    strategies: list[NodeStrategy] = []
    run_whole: list[str] = []
    for node in graph.nodes:
        if node.op == "getitem":
            src, idx = node.args[0], node.args[1]
            assert isinstance(src, Value) and isinstance(idx, int)
            pl = tuple_outputs[src.name][idx]
            placement[node.name] = pl
            if isinstance(node.outputs[0], TensorSpec):
                specs[node.name] = node.outputs[0]
            strategies.append(NodeStrategy(node=node.name, split=(), inputs=(), outputs=(pl,)))
            continue
        operands = [n for n in tensor_operands(node) if n in specs]
        ins = [specs[n] for n in operands]
        outs = [o for o in node.outputs if isinstance(o, TensorSpec)]
        if not outs:  # scalar ops: no placement (those reading tensor values read them whole)
            placement[node.name] = None
            strategies.append(scalar_strategy(node, operands, specs, placement, mesh, cost))
            if runs_whole(node) and operands and node.op != "scalar_op":
                run_whole.append(node.name)
            continue
        dims = op_dims(node, ins)
        current = [placement.get(n) for n in operands]
        split: dict[str, str | None] = {}
        used: set[str] = set()
        for a, axis in enumerate(mesh.axis_names):
            split[axis] = None
            # candidates: labels operands are already split on along this axis, biggest operand first
            order = sorted(range(len(operands)), key=lambda i: -ins[i].nbytes)
            for i in order:
                pl = current[i]
                if pl is None or not isinstance(pl.placements[a], Shard) or i >= len(dims.inputs):
                    continue
                dim = pl.placements[a].dim  # type: ignore[union-attr]
                if dim >= len(dims.inputs[i]):
                    continue
                label = dims.inputs[i][dim].label
                if label in used or not split_is_valid(node, dims, label, mesh.shape[a], ins, outs, axis):
                    continue
                split[axis] = label
                used.add(label)
                break
        if runs_whole(node):
            run_whole.append(node.name)
        strategy = make_strategy(node, dims, operands, current, ins, outs, split, mesh, cost, train)
        strategies.append(strategy)
        if node.tuple_output:
            tuple_outputs[node.name] = tuple(strategy.outputs)
            placement[node.name] = None
        else:
            placement[node.name] = strategy.outputs[0]
            specs[node.name] = outs[0]
    # every output and buffer update ends replicated (rank 0 returns whole tensors)
    final = [a.name for a in graph.outputs if isinstance(a, Value)] + [v.name for _, v in graph.buffer_updates]
    steps = []
    for name in dict.fromkeys(final):
        have = placement.get(name)
        if have is not None and name in specs:
            steps.extend(redistribute_steps(name, specs[name], have, replicated(mesh), mesh, cost))
    strategies.append(
        NodeStrategy(
            node=OUTPUT_NODE,
            split=(),
            inputs=tuple(replicated(mesh) for _ in final),
            outputs=(),
            redistributes=tuple(steps),
            comm_s=sum(s.time_s for s in steps),
        )
    )
    return tuple(strategies), tuple(run_whole)
