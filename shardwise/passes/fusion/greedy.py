"""Greedy fusion of a rank's placed program, ranked by bytes of memory traffic saved.

Requires: a graph and one strategy per node (a sharding chooser's output). Guarantees:
- every group can be computed by one kernel (see :mod:`shardwise.passes.fusion.groups`), holds ops of one
  placement only, and none of its ops has a redistribution or gradient reduction (collectives stay between
  groups);
- the program with the groups contracted to one step each is acyclic (``ir.fusion.schedule`` succeeds);
- the rank's peak live bytes (``passes.liveness`` on that schedule, each kernel holding its inputs and
  outputs at once and nothing else) is never above the unfused program's;
- each merge saves traffic: like Inductor, candidate pairs of groups (producer and consumer, or two readers
  of one tensor) are merged best-first by the bytes they save, until no legal merge saves anything.

Traffic is counted per rank in local (sharded) bytes: a kernel reads each distinct input once and writes
each output once; views, getitem and scalar ops move nothing.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from shardwise.ir.fusion import FusedGroup, groups_inputs_outputs, schedule
from shardwise.ir.graph import Graph, Node, iter_values
from shardwise.ir.placement import DeviceMesh, ShardingSpec
from shardwise.ir.plan import ExecutionPlan, NodeStrategy
from shardwise.ir.registry import rule_for
from shardwise.ir.tensor import TensorSpec, dtype_bytes
from shardwise.passes.fusion.groups import analyze
from shardwise.passes.fusion.memory import FastPeak, exact_peak
from shardwise.passes.fusion.ops import role_of

__all__ = ["FusionOptions", "FusionStats", "FusionResult", "fuse", "fuse_plan", "fusion_stats", "PASS_NAME"]

PASS_NAME = "fusion"


@dataclass(frozen=True)
class FusionOptions:
    """``max_nodes``: ops per group at most; ``siblings``: also fuse ops that only share an input;
    ``keep_peak``: refuse merges that raise the rank's peak live bytes (on by default); ``batch``: merges
    whose result is checked against the peak at once (a failing batch is replayed one merge at a time)."""

    max_nodes: int = 64
    siblings: bool = True
    keep_peak: bool = True
    batch: int = 32  # merges checked against the peak together (1: check every merge on its own)


@dataclass(frozen=True)
class FusionStats:
    """Before/after numbers for one rank: kernels launched, bytes moved, peak live bytes."""

    groups: int
    fused_ops: int
    kernels_before: int
    kernels_after: int
    bytes_before: int
    bytes_after: int
    peak_before: int
    peak_after: int


@dataclass(frozen=True)
class FusionResult:
    groups: tuple[FusedGroup, ...]
    stats: FusionStats


class _Program:
    """The facts about one rank's placed program that fusion reads (local sizes, users, traffic)."""

    def __init__(
        self,
        graph: Graph,
        strategies: Mapping[str, NodeStrategy],
        mesh: DeviceMesh,
        input_placements: Mapping[str, ShardingSpec],
        param_placements: Mapping[str, ShardingSpec],
    ) -> None:
        self.graph, self.strategies, self.mesh = graph, strategies, mesh
        self.index = {n.name: i for i, n in enumerate(graph.nodes)}
        self.nodes = {n.name: n for n in graph.nodes}
        self.spec: dict[str, object] = {}
        self.placement: dict[str, ShardingSpec | None] = {}
        for i in graph.inputs:
            self.spec[i.name] = i.spec
            self.placement[i.name] = input_placements.get(i.name)
        for p in graph.params:
            self.spec[p.name] = p.spec
            self.placement[p.name] = param_placements.get(p.key)
        for n in graph.nodes:
            s = strategies.get(n.name)
            self.spec[n.name] = n.outputs[0] if len(n.outputs) == 1 and not n.tuple_output else None
            self.placement[n.name] = s.outputs[0] if s is not None and s.outputs else None
        self.users: dict[str, list[str]] = {}
        for n in graph.nodes:
            for v in n.inputs:
                self.users.setdefault(v, []).append(n.name)
        self.final = set(graph.output_names) | {v.name for _, v in graph.buffer_updates}
        for a in graph.outputs:
            self.final.update(v.name for v in iter_values(a))
        self._bytes: dict[str, int] = {}
        self.traffic = {n.name: self._node_traffic(n) for n in graph.nodes}

    def local_bytes(self, value: str) -> int:
        if value not in self._bytes:
            spec = self.spec.get(value)
            if not isinstance(spec, TensorSpec):
                self._bytes[value] = 0
            else:
                self._bytes[value] = _local_nbytes(spec, self.placement.get(value), self.mesh)
        return self._bytes[value]

    def _node_traffic(self, node: Node) -> int:
        rule = rule_for(node.op)
        if rule is not None and not rule.moves_data:
            return 0
        reads = sum(self.local_bytes(v) for v in node.inputs)
        s = self.strategies.get(node.name)
        writes = 0
        for k, out in enumerate(node.outputs):
            if isinstance(out, TensorSpec):
                p = s.outputs[k] if s is not None and k < len(s.outputs) else None
                writes += _local_nbytes(out, p, self.mesh)
        return reads + writes

    def is_kernel(self, node: Node) -> bool:
        rule = rule_for(node.op)
        return rule is None or rule.moves_data

    def io(self, members: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
        inside = set(members)
        inputs: dict[str, None] = {}
        for m in members:
            for v in self.nodes[m].inputs:
                if v not in inside:
                    inputs.setdefault(v, None)
        outputs = tuple(
            m for m in members if m in self.final or any(u not in inside for u in self.users.get(m, ()))
        )
        return tuple(inputs), outputs

    def saved(self, members: Sequence[str]) -> int:
        if len(members) < 2:
            return 0
        inputs, outputs = self.io(members)
        fused = sum(self.local_bytes(v) for v in inputs) + sum(self.local_bytes(v) for v in outputs)
        return sum(self.traffic[m] for m in members) - fused

    def peak(self, groups: Sequence[Sequence[str]]) -> int:
        """Peak live bytes with ``groups`` (lists of node names) run as single kernels (passes.liveness)."""
        return exact_peak(self.graph, self.strategies, self.mesh, groups)


def _local_nbytes(spec: TensorSpec, placement: ShardingSpec | None, mesh: DeviceMesh) -> int:
    shape = placement.local_shape(spec.shape, mesh) if placement is not None else spec.shape
    n = 1
    for s in shape:
        n *= s
    return n * dtype_bytes(spec.dtype)


def _eligible(prog: _Program, node: Node, train: bool) -> str | None:
    s = prog.strategies.get(node.name)
    if s is None or s.redistributes or (train and s.grad_reduce):
        return None
    if _uneven(prog, node):  # kernels are written for one local shape: uneven pieces differ per rank
        return None
    return role_of(prog.graph, node)


def _uneven(prog: _Program, node: Node) -> bool:
    """Whether any value ``node`` reads or writes is split in pieces of different sizes."""
    for name in [node.name, *(v.name for a in node.args for v in iter_values(a))]:
        spec, placement = prog.spec.get(name), prog.placement.get(name)
        if isinstance(spec, TensorSpec) and placement is not None and placement.uneven_dims(spec.shape, prog.mesh):
            return True
    return False


def fuse(
    graph: Graph,
    strategies: Mapping[str, NodeStrategy] | Sequence[NodeStrategy],
    mesh: DeviceMesh,
    *,
    input_placements: Mapping[str, ShardingSpec] | None = None,
    param_placements: Mapping[str, ShardingSpec] | None = None,
    train: bool = False,
    options: FusionOptions | None = None,
    exact: bool = False,
) -> FusionResult:
    """Group this rank's ops into fused kernels (see the module docstring for the guarantees).

    Candidate groupings are checked against the peak with :class:`~shardwise.passes.fusion.memory.FastPeak`
    and the result with ``passes.liveness`` (``exact=True`` uses liveness for every check)."""
    options = options or FusionOptions()
    if not isinstance(strategies, Mapping):
        strategies = {s.node: s for s in strategies}
    prog = _Program(graph, strategies, mesh, input_placements or {}, param_placements or {})
    roles: dict[str, str] = {}
    for n in graph.nodes:
        role = _eligible(prog, n, train)
        if role is not None:
            roles[n.name] = role
    owner: dict[str, int] = {}
    members: dict[int, list[str]] = {}
    version: dict[int, int] = {}
    for k, name in enumerate(roles):
        owner[name] = k
        members[k] = [name]
        version[k] = 0
    next_id = len(members)
    baseline_peak = prog.peak([])
    fast = FastPeak(graph, strategies, mesh) if not exact else None

    def peak(groups: list[list[str]]) -> int:
        return fast.peak(groups) if fast is not None else prog.peak(groups)

    def neighbours(g: int) -> set[int]:
        out: set[int] = set()
        inside = set(members[g])
        for m in members[g]:
            for v in prog.nodes[m].inputs:
                if v in owner and v not in inside:
                    out.add(owner[v])
                elif options.siblings and v not in inside:
                    out.update(owner[u] for u in prog.users.get(v, ()) if u in owner and u not in inside)
            out.update(owner[u] for u in prog.users.get(m, ()) if u in owner and u not in inside)
        out.discard(g)
        return out

    def merged(a: int, b: int) -> list[str]:
        return sorted(members[a] + members[b], key=prog.index.__getitem__)

    heap: list[tuple[int, int, int, int, int, int]] = []

    def push(a: int, b: int) -> None:
        if a > b:
            a, b = b, a
        m = merged(a, b)
        if len(m) > options.max_nodes:
            return
        gain = prog.saved(m) - prog.saved(members[a]) - prog.saved(members[b])
        if gain > 0:
            heapq.heappush(heap, (-gain, prog.index[m[0]], a, b, version[a], version[b]))

    for g in list(members):
        for h in neighbours(g):
            if g < h:
                push(g, h)

    def merge(a: int, b: int, m: list[str]) -> None:
        nonlocal next_id
        new = next_id
        next_id += 1
        for name in m:
            owner[name] = new
        del members[a], members[b]
        members[new] = m
        version[new] = 0
        for h in neighbours(new):
            push(new, h)

    def current() -> list[list[str]]:
        return [ms for ms in members.values() if len(ms) > 1]

    # Best-first merges, checked against the peak a batch at a time (one evaluation for many merges); a
    # batch that raises the peak is undone and replayed one merge, and one check, at a time.
    while heap:
        snapshot = (dict(owner), {g: list(ms) for g, ms in members.items()}, next_id)
        batch: list[tuple[int, int]] = []
        while heap and len(batch) < options.batch:
            _, _, a, b, va, vb = heapq.heappop(heap)
            if a not in members or b not in members or version[a] != va or version[b] != vb:
                continue
            m = merged(a, b)
            if not _legal(prog, m, roles, owner, members, a, b):
                continue
            batch.append((a, b))
            merge(a, b, m)
        if not batch or not options.keep_peak or peak(current()) <= baseline_peak:
            continue
        owner.clear()
        owner.update(snapshot[0])
        members.clear()
        members.update(snapshot[1])
        for a, b in batch:
            if a not in members or b not in members:
                continue  # made inside the undone batch: its merges come back through the heap
            m = merged(a, b)
            if not _legal(prog, m, roles, owner, members, a, b):
                continue
            trial = [ms for g, ms in members.items() if g not in (a, b) and len(ms) > 1] + [m]
            if peak(trial) <= baseline_peak:
                merge(a, b, m)

    multi = [ms for ms in members.values() if len(ms) > 1]
    ordered = _named_groups(prog, multi, roles)
    peak_after = prog.peak([list(g.nodes) for g in ordered])
    if options.keep_peak and peak_after > baseline_peak:
        if exact:
            raise AssertionError(f"fusion raised the peak ({baseline_peak} -> {peak_after} bytes)")
        # the fast evaluation disagreed with passes.liveness: choose again with it at every step
        return fuse(graph, strategies, mesh, input_placements=input_placements,
                    param_placements=param_placements, train=train, options=options, exact=True)  # fmt: skip
    return FusionResult(ordered, _stats(prog, ordered, baseline_peak, peak_after))


def _legal(
    prog: _Program, m: list[str], roles: Mapping[str, str], owner: Mapping[str, int],
    members: Mapping[int, list[str]], a: int, b: int,
) -> bool:  # fmt: skip
    inputs, outputs = prog.io(m)
    if not outputs:
        return False
    if analyze(prog.graph, [prog.nodes[n] for n in m], roles, outputs, prog.placement) is None:
        return False
    return not _makes_cycle(prog, set(m), owner, members)


def _makes_cycle(
    prog: _Program, inside: set[str], owner: Mapping[str, int], members: Mapping[int, list[str]]
) -> bool:
    """Is there a path leaving the merged group and coming back to it (other groups contracted)?"""
    seen: set[str] = set()
    stack = [u for m in inside for u in prog.users.get(m, ()) if u not in inside]
    while stack:
        x = stack.pop()
        if x in seen:
            continue
        seen.add(x)
        group = members.get(owner[x], [x]) if x in owner else [x]
        for y in group:
            if y in inside:
                return True
            seen.add(y)
            for u in prog.users.get(y, ()):
                if u in inside:
                    return True
                if u not in seen:
                    stack.append(u)
    return False


def _named_groups(prog: _Program, multi: list[list[str]], roles: Mapping[str, str]) -> tuple[FusedGroup, ...]:
    tmp = [FusedGroup(f"g{k}", tuple(ms), (), (), "", 0) for k, ms in enumerate(multi)]
    position = {step: i for i, step in enumerate(schedule(prog.graph, tmp))}
    tmp.sort(key=lambda g: position[g.name])
    out = []
    io = groups_inputs_outputs(prog.graph, [g.nodes for g in tmp])
    for k, (g, (inputs, outputs)) in enumerate(zip(tmp, io, strict=True)):
        shape = analyze(prog.graph, [prog.nodes[n] for n in g.nodes], roles, outputs, prog.placement)
        assert shape is not None
        out.append(FusedGroup(f"{shape.kind}_{k}", g.nodes, inputs, outputs, shape.kind, prog.saved(g.nodes)))
    return tuple(out)


def _stats(prog: _Program, groups: Sequence[FusedGroup], peak_before: int, peak_after: int) -> FusionStats:
    kernels = sum(1 for n in prog.graph.nodes if prog.is_kernel(n))
    fused_ops = sum(len(g.nodes) for g in groups)
    before = sum(prog.traffic.values())
    saved = sum(g.bytes_saved for g in groups)
    return FusionStats(
        groups=len(groups), fused_ops=fused_ops, kernels_before=kernels, kernels_after=kernels - fused_ops + len(groups),
        bytes_before=before, bytes_after=before - saved, peak_before=peak_before, peak_after=peak_after,
    )  # fmt: skip


def _program_of(plan: ExecutionPlan) -> _Program:
    inputs = {i.name: p for i, p in zip(plan.graph.inputs, plan.input_placements, strict=True)}
    return _Program(
        plan.graph, {s.node: s for s in plan.strategies}, plan.mesh, inputs, dict(plan.param_placements)
    )


def fuse_plan(plan: ExecutionPlan, options: FusionOptions | None = None) -> ExecutionPlan:
    """``plan`` with its fused groups chosen (any earlier choice is replaced) and "fusion" in its passes."""
    inputs = {i.name: p for i, p in zip(plan.graph.inputs, plan.input_placements, strict=True)}
    result = fuse(
        plan.graph, plan.strategies, plan.mesh, input_placements=inputs, param_placements=dict(plan.param_placements),
        train=plan.mode == "train", options=options,
    )  # fmt: skip
    passes = plan.passes if PASS_NAME in plan.passes else (*plan.passes, PASS_NAME)
    return plan.replace(fused_groups=result.groups, passes=passes)


def fusion_stats(plan: ExecutionPlan) -> FusionStats:
    """Kernels, bytes moved and peak live bytes of one rank, without and with ``plan.fused_groups``."""
    prog = _program_of(plan)
    groups = plan.fused_groups
    return _stats(prog, groups, prog.peak([]), prog.peak([list(g.nodes) for g in groups]))
