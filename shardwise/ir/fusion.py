"""Fused groups: sets of a rank's ops that run as one kernel, and the execution order they imply.

A :class:`FusedGroup` is plan data (made by ``shardwise.passes.fusion``, read by codegen). Invariants:
- ``nodes`` are names of graph nodes in graph order; no node belongs to two groups;
- ``inputs`` are the values the group reads that it does not make (graph inputs, parameters, outputs of
  other nodes or groups), in first-use order; ``outputs`` are the member values read after the group (by
  other nodes, graph outputs or buffer updates), in member order; every other member value lives only
  inside the kernel;
- the graph with each group contracted to one step is acyclic, so :func:`schedule` always succeeds.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

from shardwise.ir.graph import Graph, iter_values

__all__ = [
    "FusedGroup",
    "FUSED_KINDS",
    "schedule",
    "group_inputs_outputs",
    "groups_inputs_outputs",
    "check_groups",
]

FUSED_KINDS = ("elementwise", "reduction", "softmax", "layernorm", "rmsnorm")


@dataclass(frozen=True)
class FusedGroup:
    """Ops of one rank that run as one kernel (Triton on CUDA, the same ops eagerly elsewhere).

    ``kind`` is one of :data:`FUSED_KINDS`: ``elementwise`` for chains over one iteration space, the others
    for row-wise kernels whose reductions run over the last dimension. ``bytes_saved`` is the rank-local
    memory traffic (bytes read plus written) the group avoids compared with one kernel per op.
    """

    name: str
    nodes: tuple[str, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    kind: str
    bytes_saved: int

    def __str__(self) -> str:
        return f"{self.name} [{self.kind}, {len(self.nodes)} ops, -{self.bytes_saved} B]"


def group_inputs_outputs(graph: Graph, members: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The (inputs, outputs) of a group made of ``members`` (see the module invariants)."""
    return groups_inputs_outputs(graph, [members])[0]


def groups_inputs_outputs(
    graph: Graph, groups: Sequence[Sequence[str]]
) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    """:func:`group_inputs_outputs` of many disjoint groups in one pass over the graph."""
    owner = {n: k for k, members in enumerate(groups) for n in members}
    read_outside: set[str] = set(graph.output_names) | {v.name for _, v in graph.buffer_updates}
    inputs: list[dict[str, None]] = [{} for _ in groups]
    for node in graph.nodes:
        k = owner.get(node.name)
        for v in node.inputs:
            if owner.get(v) != k or k is None:
                read_outside.add(v)
            if k is not None and owner.get(v) != k:
                inputs[k].setdefault(v, None)
    for a in graph.outputs:
        read_outside.update(v.name for v in iter_values(a))
    return [
        (tuple(ins), tuple(n for n in members if n in read_outside))
        for ins, members in zip(inputs, groups, strict=True)
    ]


def check_groups(graph: Graph, groups: Sequence[FusedGroup]) -> None:
    """Raise PlanFileError unless ``groups`` keep the module invariants for ``graph`` (a plan read from a
    file may hold anything: codegen checks before it writes a line)."""
    from shardwise.errors import PlanFileError

    seen_names: set[str] = set()
    owner: dict[str, str] = {}
    for g in groups:
        if not g.name.isidentifier() or g.name in seen_names or g.kind not in FUSED_KINDS:
            raise PlanFileError(f"fused group {g.name!r} ({g.kind!r}) is malformed: make the plan again")
        seen_names.add(g.name)
        for n in g.nodes:
            if not graph.has_node(n) or n in owner:
                raise PlanFileError(
                    f"fused group {g.name} names op {n!r} that is not in the graph or in two groups"
                )
            owner[n] = g.name
        if len(g.nodes) < 2 or not g.outputs:
            raise PlanFileError(
                f"fused group {g.name} has fewer than two ops or no output: make the plan again"
            )
    for g, io in zip(groups, groups_inputs_outputs(graph, [g.nodes for g in groups]), strict=True):
        if (tuple(g.inputs), tuple(g.outputs)) != io:
            raise PlanFileError(
                f"fused group {g.name}: its inputs/outputs do not match the graph; make the plan again"
            )
    try:
        schedule(graph, groups)
    except ValueError as exc:
        raise PlanFileError(f"{exc}: make the plan again") from None


def schedule(graph: Graph, groups: Sequence[FusedGroup]) -> list[str]:
    """The execution order with every group as one step: node names and group names.

    A stable topological order: among the steps whose inputs are ready, the one whose (last) member comes
    first in the graph runs first, so a graph without groups keeps its order and a group runs where its
    last member did; a node that reads an early member's output moves after the group.
    """
    owner: dict[str, str] = {}
    for g in groups:
        for n in g.nodes:
            owner[n] = g.name
    index = {n.name: i for i, n in enumerate(graph.nodes)}
    key: dict[str, int] = {}
    deps: dict[str, set[str]] = {}
    for node in graph.nodes:
        step = owner.get(node.name, node.name)
        key[step] = max(key.get(step, -1), index[node.name])
        d = deps.setdefault(step, set())
        for v in node.inputs:
            if v in index:
                src = owner.get(v, v)
                if src != step:
                    d.add(src)
    users: dict[str, list[str]] = {s: [] for s in deps}
    waiting = {s: len(d) for s, d in deps.items()}
    for s, d in deps.items():
        for src in d:
            users[src].append(s)
    ready = [(key[s], s) for s, n in waiting.items() if n == 0]
    heapq.heapify(ready)
    order: list[str] = []
    while ready:
        _, s = heapq.heappop(ready)
        order.append(s)
        for u in users[s]:
            waiting[u] -= 1
            if waiting[u] == 0:
                heapq.heappush(ready, (key[u], u))
    if len(order) != len(deps):
        stuck = sorted(s for s, n in waiting.items() if n > 0)[:5]
        raise ValueError(
            f"fused groups make a cycle in the graph (steps {', '.join(stuck)} never become ready)"
        )
    return order
