"""Peak live bytes of a rank's program with some ops grouped into kernels.

Two evaluations of the same quantity:
- :func:`exact_peak` builds the fused program (``ir.fusion.schedule``, each kernel a step where its inputs
  and outputs are all live and its intermediates never exist) and asks ``passes.liveness`` for its peak;
- :class:`FastPeak` computes the same number from tables built once, in time linear in the program, for
  the many candidate groupings the greedy pass tries; the pass verifies its final answer with
  :func:`exact_peak` and tests check the two agree.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence

from shardwise.ir.fusion import FusedGroup, groups_inputs_outputs, schedule
from shardwise.ir.graph import Graph, Node, Value, iter_values
from shardwise.ir.placement import DeviceMesh
from shardwise.ir.plan import NodeStrategy
from shardwise.ir.tensor import TensorSpec
from shardwise.passes.liveness import _VIEW_OPS, _local_bytes, lifetimes, peak_live_bytes

__all__ = ["exact_peak", "FastPeak"]


def exact_peak(
    graph: Graph, strategies: Mapping[str, NodeStrategy], mesh: DeviceMesh, groups: Sequence[Sequence[str]]
) -> int:
    """``passes.liveness`` peak of the program with ``groups`` (lists of node names) as single kernels."""
    fused = [FusedGroup(f"g{k}", tuple(g), (), (), "", 0) for k, g in enumerate(groups) if len(g) > 1]
    io = dict(
        zip((g.name for g in fused), groups_inputs_outputs(graph, [g.nodes for g in fused]), strict=True)
    )
    nodes: list[Node] = []
    for step in schedule(graph, fused):
        if step not in io:
            nodes.append(graph.node(step))
            continue
        inputs, outputs = io[step]
        args = tuple(Value(v) for v in inputs)
        for o in outputs:  # each output "reads" every input: inputs and outputs coexist in the kernel
            nodes.append(Node(o, "fused", args, (), graph.node(o).outputs))
    return peak_live_bytes(lifetimes(graph.replace(nodes=tuple(nodes)), strategies, mesh))


class FastPeak:
    """The same peak as :func:`exact_peak`, from tables built once per program."""

    def __init__(self, graph: Graph, strategies: Mapping[str, NodeStrategy], mesh: DeviceMesh) -> None:
        nodes = graph.nodes
        self.n = len(nodes)
        self.names = [n.name for n in nodes]
        self.index = {n.name: i for i, n in enumerate(nodes)}
        self.inputs = [n.inputs for n in nodes]
        self.producers = [tuple(self.index[v] for v in ins if v in self.index) for ins in self.inputs]
        base: dict[str, str] = {}
        for node, ins in zip(nodes, self.inputs, strict=True):
            if node.op in _VIEW_OPS and ins:
                base[node.name] = base.get(ins[0], ins[0])
        self.base = base
        self.size: dict[str, int] = {}
        for node in nodes:
            if node.tuple_output or not isinstance(node.outputs[0], TensorSpec) or node.name in base:
                continue
            s = strategies.get(node.name)
            placement = s.outputs[0] if s is not None and s.outputs else None
            size = _local_bytes(node.outputs[0], placement, mesh)
            if size > 0:
                self.size[node.name] = size
        self.graph_inputs = {i.name: i.spec.nbytes for i in graph.inputs if isinstance(i.spec, TensorSpec)}
        finals = [v.name for a in graph.outputs for v in iter_values(a)]
        finals += [v.name for _, v in graph.buffer_updates]
        self.finals = finals
        self.users: dict[str, list[int]] = {}
        for i, ins in enumerate(self.inputs):
            for v in ins:
                self.users.setdefault(v, []).append(i)
        self.final_set = set(finals)

    def _order(self, owner: Sequence[int]) -> list[int]:
        """ir.fusion.schedule on step ids: ``owner[i]`` is node i's step (a group's id, or its own index)."""
        key: dict[int, int] = {}
        deps: dict[int, set[int]] = {}
        for i in range(self.n):
            s = owner[i]
            key[s] = i if i > key.get(s, -1) else key[s]
            d = deps.setdefault(s, set())
            for p in self.producers[i]:
                src = owner[p]
                if src != s:
                    d.add(src)
        users: dict[int, list[int]] = {s: [] for s in deps}
        waiting = {s: len(d) for s, d in deps.items()}
        for s, d in deps.items():
            for src in d:
                users[src].append(s)
        ready = [(key[s], s) for s, w in waiting.items() if w == 0]
        heapq.heapify(ready)
        order: list[int] = []
        while ready:
            _, s = heapq.heappop(ready)
            order.append(s)
            for u in users[s]:
                waiting[u] -= 1
                if waiting[u] == 0:
                    heapq.heappush(ready, (key[u], u))
        return order

    def _read_outside(self, value: str, inside: set[str]) -> bool:
        return any(self.names[u] not in inside for u in self.users.get(value, ()))

    def peak(self, groups: Sequence[Sequence[str]]) -> int:
        owner = list(range(self.n))
        members: dict[int, list[str]] = {}
        for k, g in enumerate(groups):
            if len(g) < 2:
                continue
            gid = self.n + k
            members[gid] = list(g)
            for name in g:
                owner[self.index[name]] = gid
        # steps: a plain node is one step; a group is one step per output, the last reading all inputs
        defined: dict[str, int] = {}
        last: dict[str, int] = {}
        step = 0

        def use(v: str, at: int) -> None:
            root = self.base.get(v, v)
            if at > last.get(root, -1):
                last[root] = at

        for s in self._order(owner):
            if s < self.n:
                for v in self.inputs[s]:
                    use(v, step)
                defined[self.names[s]] = step
                step += 1
                continue
            inside = set(members[s])
            outs = [m for m in members[s] if m in self.final_set or self._read_outside(m, inside)]
            if not outs:
                continue  # a kernel whose results nobody reads runs nowhere
            for o in outs:
                defined[o] = step
                step += 1
            end = step - 1
            for m in members[s]:
                for v in self.inputs[self.index[m]]:
                    if v not in inside:
                        use(v, end)
        for v in self.finals:
            use(v, step)
        events: dict[int, int] = {}
        for name, size in self.size.items():
            start = defined.get(name)
            if start is None:
                continue  # inside a kernel: never materialized
            stop = max(last.get(name, start), start) + 1
            events[start] = events.get(start, 0) + size
            events[stop] = events.get(stop, 0) - size
        for name, size in self.graph_inputs.items():
            stop = last.get(name, 0) + 1
            events[0] = events.get(0, 0) + size
            events[stop] = events.get(stop, 0) - size
        peak = cur = 0
        for t in sorted(events):
            cur += events[t]
            peak = max(peak, cur)
        return peak
