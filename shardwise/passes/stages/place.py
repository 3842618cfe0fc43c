"""Placing one chunk (or one layer unit) on its tensor-parallel group: the intra-op planner, by adapter.

Pipeline chunks run on a ``(dp=1, tp)`` mesh: data parallelism is handled by the pipeline runtime (each replica
runs its own copy of the pipeline), so the intra-op placement only decides the tensor-parallel split.
With ``tp > 1`` this uses the placement ILP (``passes.sharding.auto.place``, after the rewrites that expose
tensor parallelism); with ``tp == 1`` every op runs whole (``follow_producers``).

Guarantees: the returned graph is the one the strategies are for (the rewrite may split fused projections
into parameter parts); one strategy per node plus the ``<output>`` one, whose redistributions make every
chunk output whole (replicated) on every rank of the group; inputs are read replicated.
"""

from __future__ import annotations

from dataclasses import dataclass

from shardwise.cluster import ClusterSpec
from shardwise.costs.prices import mesh_prices
from shardwise.errors import PlanError
from shardwise.ir.graph import Graph
from shardwise.ir.placement import DeviceMesh, ShardingSpec
from shardwise.ir.plan import NodeStrategy
from shardwise.ir.tensor import TensorSpec
from shardwise.passes.sharding.propagate import follow_producers
from shardwise.passes.sharding.redistribute import replicated

__all__ = ["PlacedChunk", "place_chunk", "chunk_mesh", "ilp_available"]


@dataclass(frozen=True)
class PlacedChunk:
    graph: Graph
    mesh: DeviceMesh
    strategies: tuple[NodeStrategy, ...]
    param_placements: dict[str, ShardingSpec]  # parameter value name -> placement
    input_placements: dict[str, ShardingSpec]
    run_whole: tuple[str, ...]
    method: str  # "ilp" | "follow_producers"


def chunk_mesh(tp: int, ranks: tuple[int, ...] | None = None) -> DeviceMesh:
    """The mesh a chunk is placed on: ``dp=1 x tp`` over ``ranks`` (default ``0..tp-1``)."""
    return DeviceMesh((1, tp), ("dp", "tp"), ranks if ranks is not None else tuple(range(tp)))


def ilp_available() -> bool:
    try:
        from shardwise.passes.sharding import auto, rewrite  # noqa: F401
    except ImportError:
        return False
    return True


def place_chunk(
    graph: Graph,
    cluster: ClusterSpec,
    tp: int,
    *,
    sequence_parallel: bool,
    train: bool,
    precision: str,
    optimizer_factor: int = 2,
    time_limit_s: float = 30.0,
) -> PlacedChunk:
    """Place ``graph`` on a ``1 x tp`` mesh (see the module docstring)."""
    mesh = chunk_mesh(tp)
    inputs = {i.name: replicated(mesh) for i in graph.inputs if isinstance(i.spec, TensorSpec)}
    if tp == 1:
        cost = mesh_prices(cluster, mesh, precision)
        strategies, run_whole = follow_producers(graph, mesh, inputs, {}, cost, train=train)
        params = {p.name: replicated(mesh) for p in graph.params}
        return PlacedChunk(graph, mesh, strategies, params, inputs, run_whole, "follow_producers")
    if not ilp_available():
        raise PlanError(
            f"tp={tp} inside a pipeline stage needs the placement ILP (shardwise.passes.sharding.auto), "
            "which this installation lacks: use tp=1"
        )
    from shardwise.passes.sharding.auto import PlaceOptions, place
    from shardwise.passes.sharding.rewrite import expose_tensor_parallelism

    g = expose_tensor_parallelism(graph)
    inputs = {i.name: replicated(mesh) for i in g.inputs if isinstance(i.spec, TensorSpec)}
    cost = mesh_prices(cluster, mesh, precision)
    opts = PlaceOptions(
        train=train, precision=precision, sequence_parallel=sequence_parallel, zero=0,
        optimizer_factor=optimizer_factor, solver="cbc", time_limit_s=time_limit_s,
    )  # fmt: skip
    placed = place(g, mesh, cost, inputs, opts)
    return PlacedChunk(
        g, mesh, placed.strategies, dict(placed.param_placements), inputs, placed.run_whole, "ilp"
    )
