"""Which kernels a published system's program runs, as fused groups of a traced graph (for the benchmarks that
compare predictions with published measurements; see bench/torchtitan_h100.py and bench/megatron_table.py).

The price list prices a fused group as one kernel that moves only its inputs and outputs (forward, and with
``fused_backward`` its backward too). What a program fuses is a fact about that program (Inductor's Triton
kernels, Megatron-LM's hand-written ones), stated in each benchmark from the system's source; this module
turns such a statement into groups: :func:`connected_groups` joins the memory-bound ops of one block that feed
each other without a library kernel (matmul, attention) in between, except the ops a program keeps apart.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

__all__ = ["connected_groups"]

LIBRARY = ("gemm", "attention")  # cost classes that run as library kernels, never inside a generated one


def connected_groups(
    graph, strategies: Sequence, mesh, block_of: Callable[[object], Hashable | None],
    apart: Callable[[object], bool] = lambda node: False,
) -> tuple:  # fmt: skip
    """Fused groups of ``graph`` placed by ``strategies`` on ``mesh``: within each block (``block_of(node)``,
    None for ops outside every block), each connected set of memory-bound ops, joined producer to consumer
    (through views) when no matmul or attention lies between them; ``apart(node)``: an op that runs as its own
    kernel. ``bytes_saved`` is rank-local: the members' traffic minus that of the group's inputs and outputs.
    Contracting the groups keeps the graph acyclic (a group never spans a library kernel)."""
    from shardwise.costs.compute import cost_class
    from shardwise.costs.step import op_ways
    from shardwise.ir.fusion import FusedGroup, check_groups, groups_inputs_outputs

    by_node = {s.node: s for s in strategies}
    ways = {n.name: op_ways(by_node.get(n.name), mesh) for n in graph.nodes}
    klass = {n.name: cost_class(n.op) for n in graph.nodes}
    block = {n.name: block_of(n) for n in graph.nodes}
    member = {n.name for n in graph.nodes if klass[n.name] == "memory" and block[n.name] is not None and not apart(n)}
    views = {n.name: n for n in graph.nodes if klass[n.name] == "free"}
    # how many library kernels lie before each op (a group never spans one)
    level: dict[str, int] = {}
    for n in graph.nodes:
        here = 0
        for v in n.inputs:
            if v in level:
                here = max(here, level[v] + (1 if klass[v] in LIBRARY else 0))
        level[n.name] = here
    parent = {name: name for name in member}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def sources(v: str, seen: frozenset[str] = frozenset()) -> set[str]:
        if v in member:
            return {v}
        if v in views and v not in seen:
            return set().union(set(), *(sources(u, seen | {v}) for u in views[v].inputs))
        return set()

    for n in graph.nodes:
        if n.name in member:
            for v in n.inputs:
                for u in sources(v):
                    if block[u] == block[n.name] and level[u] == level[n.name]:
                        parent[find(u)] = find(n.name)
    sets: dict[str, list[str]] = {}
    for n in graph.nodes:
        if n.name in member:
            sets.setdefault(find(n.name), []).append(n.name)
    members = [m for m in sets.values() if len(m) > 1]
    local: dict[str, float] = {p.name: float(p.spec.nbytes) for p in graph.params}  # parameters: used whole
    for n in graph.nodes:
        if not n.tuple_output:
            local[n.name] = getattr(n.outputs[0], "nbytes", 0) / ways[n.name]
    groups = []
    for k, (nodes, (ins, outs)) in enumerate(zip(members, groups_inputs_outputs(graph, members), strict=True)):
        moved = sum(graph.node(n).bytes_moved / ways[n] for n in nodes)
        boundary = sum(local.get(v, 0.0) for v in (*ins, *outs))
        groups.append(FusedGroup(f"kernel_{k}", tuple(nodes), ins, outs, "elementwise", int(max(moved - boundary, 0))))
    check_groups(graph, groups)
    return tuple(groups)
