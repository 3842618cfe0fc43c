"""Expert parallelism: split the experts of every MoE layer over a data-parallel axis of a placed plan.

``expert_parallel(graph, mesh, placed, axis)`` takes a placement whose experts ops
(``shardwise.moe_experts``) split their tokens over ``axis`` (``dp``, or the inner ``ep`` axis of a mesh with
expert parallelism below ``dp``, see ``planner.flat.flat_mesh``: each rank routes its own batch, as the
placement ILP places an op whose tokens are independent) and keeps every expert on every rank, and returns the
placement in which the ranks of ``axis`` hold ``E / n`` experts each instead: both expert weights are sharded
along dim 0 over ``axis`` (parameters and the op's operands alike), and the op dispatches each row to its
expert's rank and combines the results back by all-to-all (``runtime.lib.moe``; codegen reads the split from
``ir.experts.expert_axis``). This is the layout of Megatron-LM and torchtitan: expert parallelism borrows the
ranks of data parallelism; the other parameters stay replicated over ``axis``, their gradients all-reduced
over it (and over ``dp`` when ``axis`` is the inner ``ep`` axis, where the experts' gradients are reduced too:
over their ``dp / ep`` replicas).

A pipeline chunk (``local_tokens=True``) is the program of one data-parallel replica: its graph holds that
replica's rows, its mesh an ``ep`` axis of the replicas that share the experts (``planner.pipeline``); there the
tokens are each rank's own by construction, so the op's token split is not asked for (its work per rank is the
graph's: ``E / n`` experts on about as many rows as the replica routes).

Requires: ``axis`` splits each experts op's tokens (label ``t``; or ``local_tokens``) and its size divides the
number of experts;
the expert weights are read by their experts op alone.
Guarantees: every experts op's weights, in its strategy and in ``param_placements``, are ``Shard(0)`` on
``axis`` and otherwise placed as the op reads them (stored so: no redistribution before the op); their gradients are no longer reduced over ``axis`` (each
expert's gradient is complete on its rank: it saw every row routed to it); nothing else changes. Raises
PlanError, saying why, when an experts op cannot be split so.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from shardwise.errors import PlanError
from shardwise.ir.experts import MOE_EXPERTS, weight_operands
from shardwise.ir.graph import Graph, Value
from shardwise.ir.placement import DeviceMesh, Replicate, Shard, ShardingSpec
from shardwise.ir.plan import NodeStrategy
from shardwise.ir.tensor import TensorSpec
from shardwise.passes.sharding.auto import Placed

__all__ = ["expert_parallel", "split_experts"]


def _sharded(spec: ShardingSpec | None, a: int, n_axes: int) -> ShardingSpec:
    """``spec`` with ``Shard(0)`` on axis ``a``: the experts split there (other axes kept, minus a split of
    dim 0, which the experts now take)."""
    places = list(spec.placements) if spec is not None else [Replicate()] * n_axes
    places = [Replicate() if p == Shard(0) else p for p in places]
    places[a] = Shard(0)
    return ShardingSpec(tuple(places))


def expert_parallel(graph: Graph, mesh: DeviceMesh, placed: Placed, axis: str) -> Placed:
    """Split every experts op's experts over ``axis`` (see the module docstring)."""
    strategies, param_placements = split_experts(graph, mesh, placed.strategies, placed.param_placements, axis)
    return dataclasses.replace(placed, strategies=strategies, param_placements=param_placements)


def split_experts(
    graph: Graph, mesh: DeviceMesh, strategies_in: Sequence[NodeStrategy], params_in: Mapping[str, ShardingSpec],
    axis: str, *, local_tokens: bool = False,
) -> tuple[tuple[NodeStrategy, ...], dict[str, ShardingSpec]]:  # fmt: skip
    """The strategies and parameter placements (value name -> placement) of a placement with every experts op's
    experts split over ``axis`` (see the module docstring; ``local_tokens``: a pipeline chunk's)."""
    a = mesh.axis_names.index(axis)
    n = mesh.shape[a]
    readers: dict[str, int] = {}
    for node in graph.nodes:
        for v in node.inputs:
            readers[v] = readers.get(v, 0) + 1
    params = {p.name for p in graph.params}
    strategies = list(strategies_in)
    param_placements = dict(params_in)
    by_node = {s.node: i for i, s in enumerate(strategies)}
    found = 0
    for node in graph.nodes:
        if node.op != MOE_EXPERTS:
            continue
        found += 1
        where = f"{node.module_path or node.name}"
        i = by_node.get(node.name)
        s = strategies[i] if i is not None else None
        if s is None or (not local_tokens and (axis, "t") not in s.split):
            raise PlanError(
                f"{where}: expert parallelism over {axis} needs the layer's tokens split over {axis} (each rank "
                "routing its own batch), and this placement keeps them whole there: pin dp to a degree that "
                "divides the batch"
            )
        positions = weight_operands(sum(isinstance(x, Value) for x in node.args))
        weights = [node.args[k] for k in positions]
        if not all(isinstance(w, Value) and w.name in params and readers.get(w.name) == 1 for w in weights):
            raise PlanError(f"{where}: its expert weights are read by other ops too; expert parallelism needs "
                            "them read by the experts alone: use ep=1")  # fmt: skip
        experts = graph.spec_of(weights[0].name)  # type: ignore[union-attr]
        assert isinstance(experts, TensorSpec)
        if experts.shape[0] % n:
            raise PlanError(f"{where}: {experts.shape[0]} experts cannot be split evenly over {axis}={n}: choose "
                            f"an ep that divides {experts.shape[0]}")  # fmt: skip
        inputs = list(s.inputs)
        for k, w in zip(positions, weights, strict=True):
            inputs[k] = _sharded(inputs[k], a, len(mesh.shape))
            # stored as the op reads it (the ILP may have stored it split elsewhere and gathered it before use:
            # the experts' split replaces that, and nothing is gathered)
            param_placements[w.name] = inputs[k]  # type: ignore[union-attr]
        names = {w.name for w in weights}  # type: ignore[union-attr]
        grad_reduce = tuple(
            (k, tuple(x for x in axes if x != axis)) if k in positions else (k, axes) for k, axes in s.grad_reduce
        )  # fmt: skip
        strategies[i] = dataclasses.replace(  # type: ignore[index]
            s, inputs=tuple(inputs), grad_reduce=tuple((k, axes) for k, axes in grad_reduce if axes),
            redistributes=tuple(r for r in s.redistributes if r.value not in names),
            reason=f"experts split over {axis}={n} (expert parallelism): tokens dispatched and combined by all-to-all",
        )  # fmt: skip
    if not found:
        raise PlanError("expert parallelism (ep > 1) needs mixture-of-experts layers, and this model has none "
                        "shardwise recognizes: use ep=1")  # fmt: skip
    return tuple(strategies), param_placements
