"""Lower bounds on collective time for a topology view, under the simulator's model.

Bandwidth (cuts): for a set S of ranks, some bytes B must cross into S (or out of it) whatever the
algorithm; the most S can take in per second is the LP ``max sum x_e`` over direct edges e entering S,
subject to ``sum_{e uses r} beta_e x_e <= 1`` for every resource r (each resource carries one transfer at
a time, and a transfer on e holds all of e's resources at e's rate). By LP duality every execution takes
``T >= (B + min_e alpha_e / beta_e) / cap(S)`` (each crossing transfer also pays its alpha). Sets tried:
every rank, every rank's complement, every union of whole nodes, subsets of small linked nodes, and the
whole network (all transfers, e.g. ``2(p-1) n`` bytes in total for allreduce: every byte position needs
p-1 messages to combine and p-1 to spread — the one-way gossip bound), and the same count with every node
taken as one vertex over the inter-node links (``2(G-1) n`` crossing bytes for allreduce over G nodes,
``(G-1) n`` for allgather, reduce-scatter and broadcast, every byte's own crossings for alltoall).

Why the node-level count holds: make intra-node transfers free and instant (a relaxation, so its optimum
is no larger). A node's result at byte position x depends on every node's input at x, so there is a
time-respecting chain of crossing transfers carrying x from every node to every other. Let t* be the
first time some set E of nodes holds every input at x. Each node of E got its last piece by a transfer
ending at t* (E's last transfers are |E| distinct ones that end at t*, so no chain uses them to reach
another node by t*); every node must still have a chain into each node of E not using them: at least
G-1 + |E|-1 transfers end by t*. Each of the G-|E| other nodes needs one more transfer ending after t*.
Total ``2(G-1)`` per byte position; a transfer of b bytes carries b positions.

Bytes per collective (n as in ``chunks``): allgather into S ``(p-|S|)/p n``, out of S ``|S|/p n``;
reduce_scatter the reverse; allreduce ``n`` each way; alltoall ``|S|(p-|S|)/p n`` each way; broadcast
``n`` into S if the root is outside it.

Latency: data must travel from every source to every rank needing it: the largest least-alpha path.

Which resource bounds the transfer (``LowerBound.terms``, read by the synthesizer's rules): the largest
bandwidth term of each class of cut, with the least alpha of a message across it:

* ``nic`` — sets of whole nodes and the all-inter-node count: every crossing goes through the nodes' NICs
  (the bytes through a node's NICs over their bandwidth);
* ``rank`` — one rank or all but one: that rank's own links or switch port;
* ``subset`` — other sets of ranks inside nodes (e.g. a quad of NDv2's cube-mesh);
* ``links`` — every link at once (the total bytes over the total capacity).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from ortools.linear_solver import pywraplp

from shardwise.passes.collectives.chunks import check_collective
from shardwise.passes.collectives.topology import TopologyView

__all__ = ["LowerBound", "lower_bound", "cut_capacities", "TERM_CLASSES"]

_CAPS: dict[str, list[tuple[frozenset[int], float, float, float, float]]] = {}
_AGG: dict[str, tuple[float, float]] = {}
_AGGN: dict[str, tuple[float, float]] = {}
_SUBSET_NODE_MAX = 8
#: the classes of ``LowerBound.terms`` (see the module docstring)
TERM_CLASSES = ("nic", "rank", "subset", "links")
_SCALE = 2.0**20 * 1e6  # bytes/s per MiB/us


@dataclass(frozen=True)
class LowerBound:
    """``time`` = max(``bandwidth``, ``latency``) seconds; ``cut`` names the binding set of ranks;
    ``terms``: per class of cut (``TERM_CLASSES``), (class, its largest bandwidth term in seconds, the least
    alpha of a message across that cut), for the classes the view has."""

    time: float
    bandwidth: float
    latency: float
    cut: str
    terms: tuple[tuple[str, float, float], ...] = ()

    def term(self, kind: str) -> tuple[float, float]:
        """(seconds, alpha) of the class ``kind``; (0, 0) when the view has no such cut."""
        for name, seconds, alpha in self.terms:
            if name == kind:
                return seconds, alpha
        return 0.0, 0.0


def _capacity(topo: TopologyView, edges: list[tuple[int, int]]) -> tuple[float, float]:
    """(max byte rate over ``edges`` under resource limits, min alpha/beta over them)."""
    if not edges:
        return 0.0, 0.0
    solver = pywraplp.Solver.CreateSolver("GLOP")
    inf = solver.infinity()
    objective = solver.Objective()
    rows: dict[int, pywraplp.Constraint] = {}
    for u, v in edges:
        e = topo.edges[(u, v)]
        x = solver.NumVar(0.0, inf, "")
        objective.SetCoefficient(x, 1.0)
        for r in e.resources:
            row = rows.get(r)
            if row is None:
                row = rows[r] = solver.Constraint(-inf, 1.0)
            # x in MiB/us and beta in us/MiB keep the coefficients near 1 for GLOP
            row.SetCoefficient(x, e.beta * _SCALE)
    objective.SetMaximization()
    if solver.Solve() != pywraplp.Solver.OPTIMAL:
        raise RuntimeError("capacity LP did not solve")
    cap = objective.Value() * _SCALE
    ab = min(topo.edges[uv].alpha / topo.edges[uv].beta for uv in edges)
    return cap, ab


def _candidate_sets(topo: TopologyView) -> list[frozenset[int]]:
    p = topo.size
    everyone = frozenset(range(p))
    sets: set[frozenset[int]] = set()
    for r in range(p):
        sets.add(frozenset((r,)))
        sets.add(everyone - {r})
    by_node = topo.ranks_by_node()
    nodes = sorted(by_node)
    if len(nodes) <= 6:
        for k in range(1, len(nodes)):
            for combo in itertools.combinations(nodes, k):
                sets.add(frozenset(r for n in combo for r in by_node[n]))
    else:
        for n in nodes:
            sets.add(frozenset(by_node[n]))
            sets.add(everyone - frozenset(by_node[n]))
    for n in nodes:
        members = by_node[n]
        linked = any(
            topo.edges[(u, v)].kind == "link" for u in members for v in members if (u, v) in topo.edges
        )
        if linked and len(members) <= _SUBSET_NODE_MAX:
            for k in range(2, len(members)):
                for combo in itertools.combinations(members, k):
                    sets.add(frozenset(combo))
        else:
            for k in range(2, len(members)):
                sets.add(frozenset(members[:k]))
    sets.discard(everyone)
    sets.discard(frozenset())
    return sorted(sets, key=lambda s: (len(s), sorted(s)))


def _least_alpha(topo: TopologyView, edges: list[tuple[int, int]]) -> float:
    return min((topo.edges[uv].alpha for uv in edges), default=0.0)


def cut_capacities(
    topo: TopologyView,
) -> list[tuple[frozenset[int], float, float, float, float, float, float]]:
    """For every candidate set S: (S, cap_in, alpha/beta in, cap_out, alpha/beta out, least alpha in, least
    alpha out); cached per view."""
    key = topo.fingerprint
    if key not in _CAPS:
        out = []
        for s in _candidate_sets(topo):
            ein = [uv for uv in topo.edges if uv[0] not in s and uv[1] in s]
            eout = [uv for uv in topo.edges if uv[0] in s and uv[1] not in s]
            cin, abin = _capacity(topo, ein)
            cout, about = _capacity(topo, eout)
            out.append((s, cin, abin, cout, about, _least_alpha(topo, ein), _least_alpha(topo, eout)))
        _CAPS[key] = out
        _AGG[key] = _capacity(topo, list(topo.edges))
        inter = [uv for uv in topo.edges if topo.nodes[uv[0]] != topo.nodes[uv[1]]]
        _AGGN[key] = _capacity(topo, inter)
    return _CAPS[key]


def _latency(topo: TopologyView, kind: str, root: int) -> float:
    p = topo.size
    inf = float("inf")
    dist = [[inf] * p for _ in range(p)]
    for i in range(p):
        dist[i][i] = 0.0
    for (u, v), e in topo.edges.items():
        dist[u][v] = min(dist[u][v], e.alpha)
    for k in range(p):
        dk = dist[k]
        for i in range(p):
            dik = dist[i][k]
            if dik == inf:
                continue
            di = dist[i]
            for j in range(p):
                if dik + dk[j] < di[j]:
                    di[j] = dik + dk[j]
    if kind == "broadcast":
        return max(dist[root])
    return max(max(row) for row in dist)


def lower_bound(collective: str, topo: TopologyView, nbytes: float, root: int = 0) -> LowerBound:
    """A lower bound on the time of ``collective`` of ``nbytes`` over ``topo`` (see the module docstring)."""
    kind = check_collective(collective)
    p = topo.size
    if p < 2 or nbytes <= 0:
        return LowerBound(0.0, 0.0, 0.0, "-")
    n = float(nbytes)
    best_t, best_cut = 0.0, "-"
    terms: dict[str, tuple[float, float]] = {}
    by_node = topo.ranks_by_node()
    whole_nodes = [frozenset(m) for m in by_node.values()]

    def consider(b: float, cap: float, ab: float, label: str, cls: str, alpha: float) -> None:
        nonlocal best_t, best_cut
        if b <= 0:
            return
        t = (b + ab) / cap if cap > 0 else float("inf")
        if t > best_t:
            best_t, best_cut = t, label
        if t > terms.get(cls, (0.0, 0.0))[0]:
            terms[cls] = (t, alpha)

    def cut_class(s: frozenset[int]) -> str:
        if len(by_node) > 1 and all(x <= s for x in whole_nodes if x & s):
            return "nic"
        return "rank" if len(s) == 1 or len(s) == p - 1 else "subset"

    for s, cin, abin, cout, about, ain, aout in cut_capacities(topo):
        k = len(s)
        if kind == "allgather":
            b_in, b_out = (p - k) / p * n, k / p * n
        elif kind == "reduce_scatter":
            b_in, b_out = k / p * n, (p - k) / p * n
        elif kind == "allreduce":
            b_in = b_out = n
        elif kind == "alltoall":
            b_in = b_out = k * (p - k) / p * n
        else:
            b_in, b_out = (0.0, n) if root in s else (n, 0.0)
        label = "{" + ",".join(str(topo.ranks[r]) for r in sorted(s)) + "}"
        cls = cut_class(s)
        consider(b_in, cin, abin, f"into {label}", cls, ain)
        consider(b_out, cout, about, f"out of {label}", cls, aout)
    total = {"allreduce": 2 * (p - 1) * n}.get(kind, (p - 1) * n)
    cap, ab = _AGG[topo.fingerprint]
    consider(total, cap, ab, "all links", "links", _least_alpha(topo, list(topo.edges)))
    # the same counting with each node as one vertex (combining inside a node is free): G nodes need
    # 2(G-1) crossing messages per byte for allreduce, G-1 for allgather/reduce-scatter/broadcast
    groups = len(by_node)
    if groups > 1:
        if kind == "alltoall":
            crossing = sum(len(m) * (p - len(m)) for m in by_node.values()) / p * n
        else:
            crossing = (2 if kind == "allreduce" else 1) * (groups - 1) * n
        cap, ab = _AGGN[topo.fingerprint]
        inter = [uv for uv in topo.edges if topo.nodes[uv[0]] != topo.nodes[uv[1]]]
        consider(crossing, cap, ab, "all inter-node links", "nic", _least_alpha(topo, inter))
    lat = _latency(topo, kind, root)
    ordered = tuple((c, *terms[c]) for c in TERM_CLASSES if c in terms)
    return LowerBound(max(best_t, lat), best_t, lat, best_cut, ordered)
