"""Placing one chunk (or one layer unit) on its tensor-parallel group: the intra-op planner, by adapter.

Pipeline chunks run on a ``(dp=1, tp)`` mesh: data parallelism is handled by the pipeline runtime (each replica
runs its own copy of the pipeline), so the intra-op placement only decides the tensor-parallel split.
With ``tp > 1`` this uses the placement ILP (``passes.sharding.auto.place``, after the rewrites that expose
tensor parallelism); with ``tp == 1`` every op runs whole (``follow_producers``). With context parallelism
(``cp > 1``) the mesh is ``(cp, tp)`` and the ILP places the chunk as it places a flat plan's ``cp x tp`` ranks:
the inputs whose dimension 1 is the model's sequence are read split along it over ``cp`` (each rank cuts its
piece of the whole value it receives), attention runs one of ``cp_ways`` over the split, mean losses are summed
per piece and read their logits unflattened, split over the sequence (``rewrite.split_losses``).

Guarantees: the returned graph is the one the strategies are for (the rewrite may split fused projections
into parameter parts); one strategy per node plus the ``<output>`` one, whose redistributions make every
chunk output whole (replicated) on every rank of the group; inputs are read replicated (under ``cp``, those of
the sequence's length split over it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from shardwise.cluster import ClusterSpec
from shardwise.costs.attention import CP_WAYS
from shardwise.costs.prices import mesh_prices
from shardwise.errors import PlanError
from shardwise.ir.graph import Arg, Graph, Value
from shardwise.ir.placement import DeviceMesh, Replicate, Shard, ShardingSpec
from shardwise.ir.plan import NodeStrategy
from shardwise.ir.tensor import TensorSpec
from shardwise.passes.sharding.propagate import follow_producers
from shardwise.passes.sharding.redistribute import replicated

__all__ = [
    "PlacedChunk", "place_chunk", "chunk_mesh", "context_mesh", "ilp_available", "structure_key", "PlacementCache",
    "value_names",
]  # fmt: skip

#: placed chunks by the structure of their graph and the placement's settings (see ``place_chunk``)
PlacementCache = dict[tuple, tuple[Graph, "PlacedChunk", tuple]]


@dataclass(frozen=True)
class PlacedChunk:
    graph: Graph
    mesh: DeviceMesh
    strategies: tuple[NodeStrategy, ...]
    param_placements: dict[str, ShardingSpec]  # parameter value name -> placement
    input_placements: dict[str, ShardingSpec]
    run_whole: tuple[str, ...]
    method: str  # "ilp" | "follow_producers"
    # when placed through a cache: the placed graph's structure_key and the placement's settings (two chunks
    # with equal ones have the same placement up to names, and so the same results derived from it)
    structure: tuple = ()


def chunk_mesh(tp: int, ranks: tuple[int, ...] | None = None) -> DeviceMesh:
    """The mesh a chunk is placed on: ``dp=1 x tp`` over ``ranks`` (default ``0..tp-1``)."""
    return DeviceMesh((1, tp), ("dp", "tp"), ranks if ranks is not None else tuple(range(tp)))


def ilp_available() -> bool:
    try:
        from shardwise.passes.sharding import auto, rewrite  # noqa: F401
    except ImportError:
        return False
    return True


def _names(graph: Graph) -> list[str]:
    """Every value name of ``graph`` in order: inputs, parameters, nodes."""
    return [*(i.name for i in graph.inputs), *(p.name for p in graph.params), *(n.name for n in graph.nodes)]


def _canonical(arg: Arg, index: Mapping[str, int]) -> object:
    if isinstance(arg, Value):
        return ("v", index.get(arg.name, arg.name))
    if isinstance(arg, tuple):
        return tuple(_canonical(a, index) for a in arg)
    return arg


def structure_key(graph: Graph) -> tuple:
    """What a placement of ``graph`` depends on, without its names: graphs with equal keys are the same program
    up to the names of their values and parameters (the repeated layers of a model cut into equal chunks)."""
    index = {name: k for k, name in enumerate(_names(graph))}
    return (
        tuple(i.spec for i in graph.inputs),
        tuple((p.spec, p.kind, p.requires_grad, len(p.aliases), p.part) for p in graph.params),
        tuple(
            (n.op, _canonical(n.args, index), tuple((k, _canonical(a, index)) for k, a in n.kwargs), n.outputs,
             n.flops, n.bytes_moved, n.tuple_output, n.whole)
            for n in graph.nodes
        ),  # fmt: skip
        _canonical(graph.outputs, index),
        tuple((k, _canonical(v, index)) for k, v in graph.buffer_updates),
        graph.functions,
    )


def _renamed(placed: PlacedChunk, graph: Graph) -> PlacedChunk:
    """``placed`` (of a graph with ``graph``'s structure) for ``graph``: every name mapped by position."""
    names = dict(zip(_names(placed.graph), _names(graph), strict=True))

    def value(name: str) -> str:
        return names.get(name, name)

    strategies = tuple(
        dataclasses.replace(
            st, node=value(st.node),
            redistributes=tuple(dataclasses.replace(r, value=value(r.value)) for r in st.redistributes),
        )  # fmt: skip
        for st in placed.strategies
    )
    return PlacedChunk(
        graph, placed.mesh, strategies, {value(k): v for k, v in placed.param_placements.items()},
        {value(k): v for k, v in placed.input_placements.items()}, tuple(value(n) for n in placed.run_whole),
        placed.method, placed.structure,
    )  # fmt: skip


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
    cache: PlacementCache | None = None,
    cp: int = 1,
    sequence: int | None = None,
    cp_ways: tuple[str, ...] = CP_WAYS,
) -> PlacedChunk:
    """Place ``graph`` on a ``1 x tp`` mesh, or ``cp x tp`` (see the module docstring; ``sequence``: the model's
    sequence length, which ``cp`` splits). ``cache`` (one planning run's, for one cluster): a chunk with the
    structure of one placed before (``structure_key``) takes that placement, its names mapped to this chunk's;
    it is the same program, so the placement and its price are the same."""
    context = (cp, sequence, cp_ways)
    if cache is None:
        return _place_chunk(graph, cluster, tp, sequence_parallel, train, precision, optimizer_factor, time_limit_s,
                            context)  # fmt: skip
    key = (structure_key(graph), tp, sequence_parallel, train, precision, optimizer_factor, time_limit_s, context)
    hit = cache.get(key)
    if hit is not None:
        original, placed, placed_key = hit
        # the placement's graph (rewritten to expose tensor parallelism) carries the original's names
        mine = _rewritten(graph, original, placed.graph, tp, cp)
        if mine is graph or structure_key(mine) == placed_key:
            return _renamed(placed, mine)
    placed = _place_chunk(graph, cluster, tp, sequence_parallel, train, precision, optimizer_factor, time_limit_s,
                          context)  # fmt: skip
    placed_key = key[0] if placed.graph is graph else structure_key(placed.graph)
    placed = dataclasses.replace(placed, structure=(placed_key, *key[1:]))  # the placed graph and the settings
    cache[key] = (graph, placed, placed_key)
    return placed


def value_names(graph: Graph) -> list[str]:
    """Every value name of ``graph`` in order (inputs, parameters, nodes): two graphs with equal
    ``structure_key`` correspond name for name by position."""
    return _names(graph)


def _rewritten(graph: Graph, original: Graph, rewritten: Graph, tp: int, cp: int) -> Graph:
    """``graph`` rewritten as ``original`` was into ``rewritten`` (for tp = 1 and cp = 1 no rewrite runs)."""
    if rewritten is original:
        return graph
    from shardwise.passes.sharding.rewrite import expose_tensor_parallelism, split_losses

    g = expose_tensor_parallelism(graph) if tp > 1 else graph
    return split_losses(g) if cp > 1 else g


def _place_chunk(
    graph: Graph, cluster: ClusterSpec, tp: int, sequence_parallel: bool, train: bool, precision: str,
    optimizer_factor: int, time_limit_s: float, context: tuple = (1, None, CP_WAYS),
) -> PlacedChunk:  # fmt: skip
    cp, sequence, cp_ways = context
    if cp > 1:
        return _place_context_chunk(graph, cluster, tp, cp, sequence, cp_ways, sequence_parallel, train, precision,
                                    optimizer_factor, time_limit_s)  # fmt: skip
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


def context_mesh(cp: int, tp: int, ranks: tuple[int, ...] | None = None) -> DeviceMesh:
    """The mesh a chunk is placed on under context parallelism: ``cp x tp`` over ``ranks`` (default
    ``0..cp*tp-1``)."""
    return DeviceMesh((cp, tp), ("cp", "tp"), ranks if ranks is not None else tuple(range(cp * tp)))


def _place_context_chunk(
    graph: Graph, cluster: ClusterSpec, tp: int, cp: int, sequence: int | None, cp_ways: tuple[str, ...],
    sequence_parallel: bool, train: bool, precision: str, optimizer_factor: int, time_limit_s: float,
) -> PlacedChunk:  # fmt: skip
    if sequence is None or sequence % cp:
        raise PlanError(f"cp={cp} splits the model's sequence, and its length ({sequence}) does not divide by {cp}")
    if not ilp_available():
        raise PlanError("cp inside a pipeline stage needs the placement ILP (shardwise.passes.sharding.auto), "
                        "which this installation lacks: use cp=1")  # fmt: skip
    from shardwise.passes.sharding.auto import PlaceOptions, place
    from shardwise.passes.sharding.rewrite import expose_tensor_parallelism, split_losses

    g = split_losses(expose_tensor_parallelism(graph) if tp > 1 else graph)
    mesh = context_mesh(cp, tp)
    a = mesh.axis_names.index("cp")
    inputs: dict[str, ShardingSpec] = {}
    for i in g.inputs:
        if not isinstance(i.spec, TensorSpec):
            continue
        places: list = [Replicate(), Replicate()]
        if i.spec.rank > 1 and i.spec.shape[1] == sequence:
            places[a] = Shard(1)
        inputs[i.name] = ShardingSpec(tuple(places))
    opts = PlaceOptions(
        train=train, precision=precision, sequence_parallel=sequence_parallel, zero=0,
        optimizer_factor=optimizer_factor, solver="cbc", time_limit_s=time_limit_s, cp_ways=cp_ways,
    )  # fmt: skip
    placed = place(g, mesh, mesh_prices(cluster, mesh, precision), inputs, opts)
    return PlacedChunk(g, mesh, placed.strategies, dict(placed.param_placements), inputs, placed.run_whole, "ilp")
