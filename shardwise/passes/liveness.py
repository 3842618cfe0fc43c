"""Per-rank liveness of the values of a placed program, in local (sharded) sizes.

Requires: strategies from a sharding chooser (one per node, graph order). Guarantees: one lifetime per
tensor value that the rank holds: [definition step, step after its last use), parameters excluded
(they live for the whole program and are counted apart).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from shardwise.ir.graph import Graph, iter_values
from shardwise.ir.placement import DeviceMesh, ShardingSpec
from shardwise.ir.plan import NodeStrategy
from shardwise.ir.tensor import TensorSpec, dtype_bytes

__all__ = ["Lifetime", "lifetimes", "peak_live_bytes"]


@dataclass(frozen=True)
class Lifetime:
    value: str
    start: int  # first step it is live
    end: int  # first step it is dead
    size: int  # local bytes


def _local_bytes(spec: TensorSpec, placement: ShardingSpec | None, mesh: DeviceMesh) -> int:
    if placement is None:
        return spec.nbytes
    shape = placement.local_shape(spec.shape, mesh)
    n = 1
    for s in shape:
        n *= s
    return n * dtype_bytes(spec.dtype)


_VIEW_OPS = ("aten.view.default", "aten._unsafe_view.default", "aten.alias.default")


def lifetimes(graph: Graph, strategies: Mapping[str, NodeStrategy], mesh: DeviceMesh) -> list[Lifetime]:
    base: dict[str, str] = {}  # a view's storage is its base's: the base lives as long as any view of it
    for node in graph.nodes:
        if node.op in _VIEW_OPS and node.inputs:
            base[node.name] = base.get(node.inputs[0], node.inputs[0])
    last_use: dict[str, int] = {}

    def use(name: str, step: int) -> None:
        root = base.get(name, name)
        last_use[root] = max(last_use.get(root, step), step)

    for step, node in enumerate(graph.nodes):
        for v in node.inputs:
            use(v, step)
    end = len(graph.nodes)
    for a in graph.outputs:
        for v in iter_values(a):
            use(v.name, end)
    for _, v in graph.buffer_updates:
        use(v.name, end)
    out = []
    for step, node in enumerate(graph.nodes):
        if node.tuple_output or not isinstance(node.outputs[0], TensorSpec):
            continue
        strategy = strategies.get(node.name)
        placement = strategy.outputs[0] if strategy is not None and strategy.outputs else None
        if node.name in base:
            continue  # views share their base's storage
        size = _local_bytes(node.outputs[0], placement, mesh)
        if size <= 0:
            continue
        out.append(Lifetime(node.name, step, max(last_use.get(node.name, step), step) + 1, size))
    for i in graph.inputs:
        if isinstance(i.spec, TensorSpec):
            out.append(Lifetime(i.name, 0, last_use.get(i.name, 0) + 1, i.spec.nbytes))
    return out


def peak_live_bytes(lives: list[Lifetime]) -> int:
    """The largest total of simultaneously live bytes (a lower bound for any arena)."""
    events: dict[int, int] = {}
    for lt in lives:
        events[lt.start] = events.get(lt.start, 0) + lt.size
        events[lt.end] = events.get(lt.end, 0) - lt.size
    peak = cur = 0
    for t in sorted(events):
        cur += events[t]
        peak = max(peak, cur)
    return peak
