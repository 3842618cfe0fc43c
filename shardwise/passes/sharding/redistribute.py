"""Which collective turns one placement into another, per mesh axis, and what it costs (the price list's
collective time, on the wire at the plan's precision)."""

from __future__ import annotations

from shardwise.costs.compute import wire_spec
from shardwise.costs.prices import MeshPrices
from shardwise.ir.placement import DeviceMesh, Partial, Placement, Replicate, Shard, ShardingSpec
from shardwise.ir.plan import Redistribute
from shardwise.ir.tensor import TensorSpec

__all__ = ["collective_for", "redistribute_steps", "replicated"]


def replicated(mesh: DeviceMesh) -> ShardingSpec:
    return ShardingSpec(tuple(Replicate() for _ in mesh.shape))


def collective_for(src: Placement, dst: Placement) -> str:
    """The step that turns ``src`` into ``dst`` on one mesh axis."""
    if src == dst:
        return "none"
    if isinstance(src, Replicate):
        return "slice" if isinstance(dst, Shard) else "to_partial"
    if isinstance(src, Shard):
        if isinstance(dst, Replicate):
            return "allgather"
        if isinstance(dst, Shard):
            return "alltoall"
        return "allgather+to_partial"
    # src is Partial
    if isinstance(dst, Replicate):
        return "allreduce"
    if isinstance(dst, Shard):
        return "reduce_scatter"
    return "allreduce+to_partial"


def redistribute_steps(
    value: str, spec: TensorSpec, src: ShardingSpec, dst: ShardingSpec, mesh: DeviceMesh, cost: MeshPrices | None
) -> tuple[Redistribute, ...]:
    """One step per mesh axis whose placement changes, in axis order.

    ``nbytes`` is the size of the buffer the collective moves on that axis: the value as sharded by the
    other axes (the full value along this one), floats at the precision's width when ``cost`` is given.
    """
    if cost is not None:
        spec = wire_spec(spec, cost.precision)
    steps = []
    for axis_index, (s, d) in enumerate(zip(src.placements, dst.placements, strict=True)):
        kind = collective_for(s, d)
        if kind == "none":
            continue
        axis = mesh.axis_names[axis_index]
        other = 1
        for j, p in enumerate(src.placements):
            if j != axis_index and isinstance(p, Shard):
                other *= mesh.shape[j]
        nbytes = spec.nbytes // other
        time_s = 0.0
        if cost is not None:
            time_s = sum(cost.collective_s(k, nbytes, axis) for k in kind.split("+"))
        steps.append(
            Redistribute(value=value, src=src, dst=dst, collective=kind, axis=axis, nbytes=nbytes, time_s=time_s)
        )
    return tuple(steps)


def is_partial(spec: ShardingSpec | None) -> bool:
    return spec is not None and any(isinstance(p, Partial) for p in spec.placements)
