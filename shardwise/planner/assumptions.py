"""What a plan assumed about the model that the trace could not observe, said in the plan's notes."""

from __future__ import annotations

from shardwise.ir.graph import Graph

__all__ = ["BALANCED_ROUTING", "assumptions"]

BALANCED_ROUTING = (
    "balanced routing assumed: the model is on the meta device, so the rows that each group of a split by "
    "tensor values receives (the tokens each expert of a mixture of experts gets) cannot be observed; every "
    "group is taken to receive an equal share (frontend.trace.balanced_values)"
)


def assumptions(graph: Graph) -> tuple[str, ...]:
    """The notes a plan of ``graph`` carries about sizes it assumed: on the meta device, the sizes that depend
    on tensor values (the ops that read or make them run whole) are those of balanced routing."""
    if graph.meta_device and any(n.whole for n in graph.nodes):
        return (BALANCED_ROUTING,)
    return ()
