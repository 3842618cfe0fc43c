"""The simplest planner: run replicated, or data parallel over the whole cluster.

For each candidate mesh it places the inputs (batch dimension split over ``dp`` when it divides evenly),
lets every op follow its producers, predicts time and memory, and keeps the fastest plan that fits.
The losers stay in ``plan.alternatives`` with the reason they lost.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from shardwise.cluster import ClusterSpec
from shardwise.costs.prices import MeshPrices, mesh_prices
from shardwise.costs.step import predict_flat
from shardwise.errors import DoesNotFitError, PlanError
from shardwise.ir.graph import Graph
from shardwise.ir.placement import DeviceMesh, Replicate, Shard, ShardingSpec
from shardwise.ir.plan import SCHEMA_VERSION, Alternative, ExecutionPlan, NodeStrategy, Prediction, RankMemory
from shardwise.ir.serialize import graph_to_json
from shardwise.ir.tensor import TensorSpec
from shardwise.passes.memory.mapping import OPTIMIZER_STATE_FACTOR, map_memory
from shardwise.passes.sharding.propagate import follow_producers
from shardwise.passes.sharding.redistribute import replicated

__all__ = ["plan_simple", "graph_fingerprint", "plan_identity", "KNOWN_DEGREES"]

KNOWN_DEGREES = ("dp", "tp", "pp", "sp", "ep")


def graph_fingerprint(graph: Graph) -> str:
    return hashlib.sha256(graph_to_json(graph).encode()).hexdigest()[:16]


def plan_identity(
    graph: Graph, cluster: ClusterSpec, mode: str, precision: str, mesh: DeviceMesh
) -> dict[str, object]:
    """The ExecutionPlan fields every planner fills alike: what was planned (the traced graph, before any
    rewrite, is fingerprinted), for which cluster, mode and precision, on which mesh."""
    return {
        "schema_version": SCHEMA_VERSION, "model_name": graph.model_name,
        "model_fingerprint": graph_fingerprint(graph), "cluster_name": cluster.name,
        "cluster_fingerprint": cluster.fingerprint(), "mode": mode, "precision": precision,
        "world_size": mesh.size, "mesh": mesh,
    }  # fmt: skip


def _input_placements(graph: Graph, mesh: DeviceMesh, dp: int) -> dict[str, ShardingSpec]:
    out: dict[str, ShardingSpec] = {}
    for i in graph.inputs:
        if not isinstance(i.spec, TensorSpec):
            continue
        if dp > 1 and i.spec.rank > 0 and i.spec.shape[0] % dp == 0 and i.spec.shape[0] >= dp:
            out[i.name] = ShardingSpec((Shard(0),) + tuple(Replicate() for _ in mesh.shape[1:]))
        else:
            out[i.name] = replicated(mesh)
    return out


def _consistent_param_grad_reduce(graph: Graph, strategies: tuple[NodeStrategy, ...]) -> dict[str, tuple[str, ...]]:
    """Parameters whose every use leaves a partial gradient over the same axes: reduce them once, after
    backward (bucketed), instead of at each use."""
    from shardwise.ir.registry import tensor_operands

    by_node = {s.node: s for s in strategies}
    param_names = {p.name: p for p in graph.params if p.requires_grad}
    uses: dict[str, set[tuple[str, ...]]] = {}
    for node in graph.nodes:
        s = by_node.get(node.name)
        if s is None or node.op == "getitem":
            continue
        reduce = dict(s.grad_reduce)
        operands = tensor_operands(node)
        for i, name in enumerate(operands):
            if name in param_names:
                uses.setdefault(name, set()).add(tuple(reduce.get(i, ())))
    out = {}
    for name, axes_set in uses.items():
        if len(axes_set) == 1:
            axes = next(iter(axes_set))
            if axes:
                out[param_names[name].key] = axes
    return out


def _memory(
    graph: Graph, mesh: DeviceMesh, strategies: tuple[NodeStrategy, ...], inputs: Mapping[str, ShardingSpec],
    cluster: ClusterSpec, train: bool, optimizer_factor: int, precision: str,
) -> tuple[RankMemory, ...]:  # fmt: skip
    """The memory-mapping pass (``passes.memory.map_memory``) on a candidate (parameters replicated): per
    rank, the arena of its whole step and the lower bound of live bytes; the arena is the prediction."""
    rep = replicated(mesh)
    return map_memory(
        graph, mesh, strategies, param_placements={p.name: rep for p in graph.params}, input_placements=inputs,
        train=train, capacity_bytes=cluster.device.memory_bytes, precision=precision,
        optimizer_factor=optimizer_factor,
        grad_reduce=_consistent_param_grad_reduce(graph, strategies) if train else {},
        optimizer_foreach=cluster.device.kind != "cpu",
    ).memory  # fmt: skip


def _score(
    graph: Graph, cluster: ClusterSpec, mesh: DeviceMesh, dp: int, mode: str, precision: str
) -> tuple[tuple[NodeStrategy, ...], tuple[str, ...], dict[str, ShardingSpec], MeshPrices]:
    cost = mesh_prices(cluster, mesh, precision)
    inputs = _input_placements(graph, mesh, dp)
    strategies, run_whole = follow_producers(graph, mesh, inputs, {}, cost, train=mode == "train")
    return strategies, run_whole, inputs, cost


def plan_simple(
    graph: Graph,
    cluster: ClusterSpec,
    *,
    mode: str = "inference",
    precision: str = "fp32",
    constraints: Mapping[str, int] | None = None,
    optimizer: str = "adamw",
) -> ExecutionPlan:
    """Choose between replicated and data-parallel execution; see the module docstring."""
    constraints = dict(constraints or {})
    for key, value in constraints.items():
        if key not in KNOWN_DEGREES:
            raise PlanError(f"unknown constraint {key!r}: allowed are {', '.join(KNOWN_DEGREES)}")
        if not isinstance(value, int) or value < 1:
            raise PlanError(f"constraint {key}={value!r}: must be a positive integer")
    for key in ("tp", "pp", "sp", "ep"):
        if constraints.get(key, 1) != 1:
            raise PlanError(
                f"constraint {key}={constraints[key]}: this planner makes replicated and data-parallel plans only "
                f"({key} > 1 is not available yet)"
            )
    world = cluster.world_size
    if "dp" in constraints:
        if constraints["dp"] > world:
            raise PlanError(f"constraint dp={constraints['dp']} needs more devices than {cluster.name} has ({world})")
        candidates = [constraints["dp"]]
    else:
        candidates = sorted({world, 1}, reverse=True)
    batch = [i.spec.shape[0] for i in graph.inputs if isinstance(i.spec, TensorSpec) and i.spec.rank > 0]
    scored = []
    for dp in candidates:
        mesh = DeviceMesh((dp, 1), ("dp", "tp"), tuple(range(dp)))
        if dp > 1 and batch and all(b % dp for b in batch):
            if "dp" in constraints:
                raise PlanError(f"dp={dp} needs a batch size divisible by {dp}; the example inputs have {batch}")
            continue
        strategies, run_whole, inputs, _ = _score(graph, cluster, mesh, dp, mode, precision)
        memory = _memory(
            graph, mesh, strategies, inputs, cluster, mode == "train", OPTIMIZER_STATE_FACTOR.get(optimizer, 2),
            precision,
        )  # fmt: skip
        peak = max(m.arena_bytes for m in memory)
        grad_reduce = _consistent_param_grad_reduce(graph, strategies) if mode == "train" else {}
        candidate = ExecutionPlan(
            **plan_identity(graph, cluster, mode, precision, mesh), degrees_=(("dp", dp), ("tp", 1), ("pp", 1)),
            graph=graph, strategies=strategies,
            input_placements=tuple(inputs.get(i.name, replicated(mesh)) for i in graph.inputs),
            param_placements=tuple((p.key, replicated(mesh)) for p in graph.params),
            output_placements=tuple(replicated(mesh) for _ in graph.outputs),
            param_grad_reduce=tuple(sorted(grad_reduce.items())), predicted=Prediction(0.0, 0.0, 0.0, 0.0, ()),
            memory=memory, optimizer=optimizer,
        )  # fmt: skip
        pred = predict_flat(candidate, cluster)
        fits = peak <= cluster.device.memory_bytes
        scored.append((dp, mesh, strategies, run_whole, pred, inputs, memory, fits, peak))
    if not scored:
        raise PlanError("no candidate plan could be made for this model and cluster")
    fitting = [s for s in scored if s[7]]
    if not fitting:
        need = min(s[8] for s in scored)
        raise DoesNotFitError(
            f"the model needs at least {need / 2**30:.2f} GiB per device under every plan this planner can make, "
            f"and {cluster.name} has {cluster.device.memory_bytes / 2**30:.2f} GiB per device: choose a cluster "
            "with more memory per device"
        )
    best = min(fitting, key=lambda s: (s[4].step_time_s, -s[0]))
    dp, mesh, strategies, run_whole, pred, inputs, memory, _, _ = best
    alternatives = tuple(
        Alternative(
            degrees=(("dp", s[0]), ("tp", 1), ("pp", 1)), step_time_s=s[4].step_time_s, memory_bytes=s[8], fits=s[7],
            chosen=s is best,
            note="chosen: fastest plan that fits" if s is best else (
                "does not fit in device memory" if not s[7] else
                f"{s[4].step_time_s / best[4].step_time_s:.2f}x the chosen plan's predicted step time"),
        )  # fmt: skip
        for s in sorted(scored, key=lambda s: s[4].step_time_s)
    )
    notes = []
    if dp == 1 and world > 1:
        notes.append(f"runs on 1 of the {world} devices: data parallelism is predicted slower or not possible")
    grad_reduce = _consistent_param_grad_reduce(graph, strategies) if mode == "train" else {}
    return ExecutionPlan(
        **plan_identity(graph, cluster, mode, precision, mesh),
        degrees_=(("dp", dp), ("tp", 1), ("pp", 1)),
        graph=graph,
        strategies=strategies,
        input_placements=tuple(inputs.get(i.name, replicated(mesh)) for i in graph.inputs),
        param_placements=tuple((p.key, replicated(mesh)) for p in graph.params),
        output_placements=tuple(replicated(mesh) for _ in graph.outputs),
        param_grad_reduce=tuple(sorted(grad_reduce.items())),
        predicted=pred,
        memory=memory,
        replicated_ops=run_whole,
        alternatives=alternatives,
        passes=("trace", "sharding.follow_producers", "memory.map", "planner.simple"),
        notes=tuple(notes),
        optimizer=optimizer,
    )
