"""Which parameter gradients a placed graph reduces once after the backward instead of at each use.

``param_grad_reduce(graph, strategies)``: a parameter read as it is stored (no redistribution) by every
consumer, each consumer leaving a partial gradient over the same mesh axes, has its gradient reduced once
after the backward (bucketed, in the runtime's gradient reduction) over those axes; every other parameter's
partial gradients are reduced where they are made. Guarantees: keys are state_dict keys of trainable
parameters; axes are non-empty.
"""

from __future__ import annotations

from collections.abc import Sequence

from shardwise.ir.graph import Graph
from shardwise.ir.plan import NodeStrategy
from shardwise.ir.registry import tensor_operands

__all__ = ["param_grad_reduce"]


def param_grad_reduce(graph: Graph, strategies: Sequence[NodeStrategy]) -> dict[str, tuple[str, ...]]:
    """state_dict key -> the axes its gradient is reduced over after the backward (see the module docstring)."""
    by_node = {s.node: s for s in strategies}
    params = {p.name: p for p in graph.params if p.requires_grad}
    uses: dict[str, set[tuple[str, ...] | None]] = {}
    for node in graph.nodes:
        s = by_node.get(node.name)
        if s is None or node.op == "getitem":
            continue
        reduce = dict(s.grad_reduce)
        moved = {r.value for r in s.redistributes}
        for i, name in enumerate(tensor_operands(node)):
            if name in params:
                uses.setdefault(name, set()).add(None if name in moved else tuple(reduce.get(i, ())))
    out: dict[str, tuple[str, ...]] = {}
    for name, axes_set in uses.items():
        if len(axes_set) == 1 and None not in axes_set:
            axes = next(iter(axes_set))
            if axes:
                out[params[name].key] = axes  # type: ignore[assignment]
    return out
