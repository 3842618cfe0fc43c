"""Routing for the pipelined (bandwidth-bound) regime: CP-SAT chooses every flow's tree or path so that the
most loaded resource carries as little as possible.

For large messages a good schedule keeps the bottleneck resources busy all the time, so its length is
``max_r load_r`` plus a pipeline fill; this model minimises that load, then (load fixed) the largest load
of the second tier — resources of no inter-node edge, which spread what crossed the NICs — and then (both
fixed) the total traffic plus the depth of every rank in its trees (fewer, cheaper hops, shallow trees).
Variables exist for one representative flow per symmetry orbit; a resource's load sums the
representative's edges mapped by every symmetry onto it.

Model, per representative flow f (edges restricted to the sketch's allowed edges):

* out-tree rooted at s: every other rank has exactly one incoming edge; ``x[f,(u,v)] => lvl[v] >= lvl[u]+1``
  (enforcement literals), which rules out cycles, so the edges form an arborescence;
* in-tree into d: the same on reversed edges (one outgoing edge per rank but d);
* path s->d: one edge out of s and into d, none into s or out of d, in = out <= 1 elsewhere, levels
  increasing along it; edges are pruned to paths of at most (shortest + 1) hops;
* ``load_r = sum_{f, e} count(e, r) * w_e * x[f, e]``, with ``w_e`` proportional to ``beta_e`` and
  ``count(e, r)`` the number of (symmetry, resource of e) pairs mapped onto r; ``Z >= load_r``.

Deterministic: fixed seed, fixed worker count, interleaved search, deterministic time limit.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass

from ortools.sat.python import cp_model

from shardwise.passes.collectives.flows import Flow, flow_group, flows_of, orbits
from shardwise.passes.collectives.sketch import GroupElement, SketchView

__all__ = ["Routing", "solve_routing", "solver_params"]


@dataclass(frozen=True, eq=False)
class Routing:
    """Routes of every flow: ``out_edges`` (out-tree or path) and ``in_edges`` (in-tree, child -> parent).

    ``load`` is the bottleneck's busy time in seconds per byte of one flow; ``optimal`` tells whether
    CP-SAT proved the load minimal.
    """

    kind: str
    parts: int
    root: int
    flows: tuple[Flow, ...]
    out_edges: dict[tuple[int, ...], tuple[tuple[int, int], ...]]
    in_edges: dict[tuple[int, ...], tuple[tuple[int, int], ...]]
    load: float
    optimal: bool
    solve_s: float
    status: str


def solver_params(solver: cp_model.CpSolver, time_limit: float, seed: int, workers: int) -> None:
    """Deterministic CP-SAT settings: fixed seed and workers, interleaved search, deterministic time."""
    prm = solver.parameters
    prm.random_seed = seed
    prm.num_workers = max(1, workers)
    prm.interleave_search = workers > 1
    prm.max_deterministic_time = max(0.1, time_limit)
    # safety net only (presolve is not counted in the deterministic time): generous, so that the
    # deterministic limit binds even on a busy shared machine and the output depends on the seed alone
    prm.max_time_in_seconds = max(60.0, 30 * time_limit)
    prm.log_search_progress = False


def _bfs(adj: dict[int, list[int]], src: int, p: int) -> list[int]:
    dist = [p + 1] * p
    dist[src] = 0
    frontier = [src]
    while frontier:
        nxt = []
        for u in frontier:
            for v in adj.get(u, ()):
                if dist[v] > dist[u] + 1:
                    dist[v] = dist[u] + 1
                    nxt.append(v)
        frontier = nxt
    return dist


def _resource_coefs(
    sv: SketchView, group: tuple[GroupElement, ...]
) -> tuple[list[int], dict[tuple[int, int], dict[int, int]]]:
    rep_of: dict[int, int] = {}
    for r in range(len(sv.topo.resources)):
        if r in rep_of:
            continue
        for g in group:
            rep_of.setdefault(g.resources[r], r)
    reps = sorted(set(rep_of.values()))
    repset = set(reps)
    coefs: dict[tuple[int, int], dict[int, int]] = {}
    for uv in sv.allowed:
        c: dict[int, int] = defaultdict(int)
        for g in group:
            for r in sv.topo.edges[uv].resources:
                img = g.resources[r]
                if img in repset:
                    c[img] += 1
        coefs[uv] = dict(c)
    return reps, coefs


def solve_routing(
    sv: SketchView,
    kind: str,
    parts: int,
    root: int = 0,
    *,
    time_limit: float = 10.0,
    seed: int = 0,
    workers: int = 2,
    depth_weight: int = 1,
) -> Routing:
    """Route every flow of ``kind`` (``parts`` per rank) over ``sv`` minimising the bottleneck load."""
    t0 = time.perf_counter()
    topo = sv.topo
    p = topo.size
    flows = flows_of(kind, p, parts, root)
    group = flow_group(kind, sv.group)
    orb = orbits(flows, group)
    reps = sorted({id(f): f for f, _ in orb.values()}.values(), key=lambda f: f.key)
    allowed = list(sv.allowed)
    out_adj: dict[int, list[tuple[int, int]]] = defaultdict(list)
    in_adj: dict[int, list[tuple[int, int]]] = defaultdict(list)
    nbr: dict[int, list[int]] = defaultdict(list)
    rnbr: dict[int, list[int]] = defaultdict(list)
    for u, v in allowed:
        out_adj[u].append((u, v))
        in_adj[v].append((u, v))
        nbr[u].append(v)
        rnbr[v].append(u)
    dist_from = {s: _bfs(nbr, s, p) for s in range(p)}
    dist_to = {d: _bfs(rnbr, d, p) for d in range(p)}
    diameter = max(max(d) for d in dist_from.values())
    dmax = min(p - 1, diameter + 2)
    bmin = min(topo.edges[uv].beta for uv in allowed)
    w = {uv: max(1, round(100 * topo.edges[uv].beta / bmin)) for uv in allowed}
    rreps, coefs = _resource_coefs(sv, group)

    m = cp_model.CpModel()
    xs: dict[tuple[tuple[int, ...], str], dict[tuple[int, int], cp_model.IntVar]] = {}
    levels: list[cp_model.IntVar] = []
    hinted: dict[
        tuple[tuple[int, ...], str], list[tuple[int, int]]
    ] = {}  # the fallback if CP-SAT finds nothing
    load_terms: dict[int, list[tuple[int, cp_model.IntVar]]] = defaultdict(list)
    traffic: list[tuple[int, cp_model.IntVar]] = []

    def add_tree(f: Flow, tag: str, rootv: int, inward: bool) -> None:
        # in-trees: no edge leaves the root; out-trees: no edge enters it
        x = {
            uv: m.NewBoolVar(f"x{f.key}{tag}{uv}") for uv in allowed if (uv[0] if inward else uv[1]) != rootv
        }
        lvl = [m.NewIntVar(0, dmax, f"l{f.key}{tag}{v}") for v in range(p)]
        levels.extend(lvl)
        m.Add(lvl[rootv] == 0)
        # hint: a shortest-hop tree (always feasible), so CP-SAT starts from a solution
        dist = dist_to[rootv] if inward else dist_from[rootv]
        pick: dict[int, tuple[int, int]] = {}
        for uv in sorted(x, key=lambda uv: (w[uv], uv)):
            near, far = (uv[1], uv[0]) if inward else uv
            if dist[far] == dist[near] + 1 and far not in pick:
                pick[far] = uv
        hinted[(f.key, tag)] = sorted(pick.values())
        for uv, var in x.items():
            m.AddHint(var, 1 if pick.get(uv[0] if inward else uv[1]) == uv else 0)
        for v in range(p):
            m.AddHint(lvl[v], min(dist[v], dmax))
        for v in range(p):
            if v == rootv:
                continue
            ways = [x[uv] for uv in (out_adj[v] if inward else in_adj[v]) if uv in x]
            m.AddExactlyOne(ways)
        for (u, v), var in x.items():
            if inward:
                m.Add(lvl[u] >= lvl[v] + 1).OnlyEnforceIf(var)
            else:
                m.Add(lvl[v] >= lvl[u] + 1).OnlyEnforceIf(var)
        xs[(f.key, tag)] = x

    def add_path(f: Flow) -> None:
        s, d = f.src, f.dst
        hops = dist_from[s][d] + 1
        x = {
            (u, v): m.NewBoolVar(f"x{f.key}{(u, v)}")
            for u, v in allowed
            if dist_from[s][u] + 1 + dist_to[d][v] <= hops and v != s and u != d
        }
        lvl = [m.NewIntVar(0, hops, f"l{f.key}{v}") for v in range(p)]
        m.Add(lvl[s] == 0)
        path, cur = [], s
        while cur != d:
            nxt = min(
                (
                    uv
                    for uv in x
                    if uv[0] == cur
                    and dist_from[s][uv[1]] == dist_from[s][cur] + 1
                    and dist_from[s][uv[1]] + dist_to[d][uv[1]] == dist_from[s][d]
                ),
                key=lambda uv: (w[uv], uv),
            )
            path.append(nxt)
            cur = nxt[1]
        hinted[(f.key, "out")] = sorted(path)
        for uv, var in x.items():
            m.AddHint(var, 1 if uv in path else 0)
        for v in range(p):
            m.AddHint(lvl[v], dist_from[s][v] if dist_from[s][v] + dist_to[d][v] == dist_from[s][d] else 0)
        for v in range(p):
            ins = [x[uv] for uv in in_adj[v] if uv in x]
            outs = [x[uv] for uv in out_adj[v] if uv in x]
            if v == s:
                m.AddExactlyOne(outs)
            elif v == d:
                m.AddExactlyOne(ins)
            else:
                m.Add(sum(ins) == sum(outs))
                m.Add(sum(ins) <= 1)
        for (u, v), var in x.items():
            m.Add(lvl[v] >= lvl[u] + 1).OnlyEnforceIf(var)
        xs[(f.key, "out")] = x

    for f in reps:
        if f.shape == "path":
            add_path(f)
        if f.shape in ("out", "inout"):
            add_tree(f, "out", f.src, inward=False)
        if f.shape in ("in", "inout"):
            add_tree(f, "in", f.src, inward=True)
    for x in xs.values():
        for uv, var in x.items():
            traffic.append((w[uv], var))
            for r, cnt in coefs[uv].items():
                load_terms[r].append((cnt * w[uv], var))
    ub = sum(c for terms in load_terms.values() for c, _ in terms) + 1
    z = m.NewIntVar(0, ub, "z")
    for terms in load_terms.values():
        m.Add(z >= sum(c * v for c, v in terms))
    m.Minimize(z)
    solver = cp_model.CpSolver()
    solver_params(solver, 0.6 * time_limit, seed, workers)
    st = solver.Solve(m)
    if st not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        # no solution in time (a loaded machine, a huge model): keep the shortest-hop routes of the hint
        chosen = hinted
        load = _load_of(hinted, coefs, w) * bmin / 100.0
        optimal, status = False, "HINT"
    else:
        zbest = int(solver.Value(z))
        optimal, status = st == cp_model.OPTIMAL, solver.StatusName(st)
        m.ClearHints()
        for x in xs.values():
            for var in x.values():
                m.AddHint(var, solver.Value(var))
        m.Add(z <= zbest)
        # phase 1b: keep the load, balance the second tier (resources of no inter-node edge: the links
        # that spread what crossed the NICs), so data leaves a receiving GPU over all its links at once
        tier2 = sorted(set(load_terms) - {r for uv in allowed if topo.edges[uv].internode for r in coefs[uv]})
        if tier2 and len(tier2) < len(load_terms):
            z2 = m.NewIntVar(0, ub, "z2")
            for r in tier2:
                m.Add(z2 >= sum(c * v for c, v in load_terms[r]))
            m.Minimize(z2)
            solver1b = cp_model.CpSolver()
            solver_params(solver1b, 0.2 * time_limit, seed, workers)
            st1b = solver1b.Solve(m)
            if st1b in (cp_model.OPTIMAL, cp_model.FEASIBLE):
                m.Add(z2 <= int(solver1b.Value(z2)))
                m.ClearHints()
                for x in xs.values():
                    for var in x.values():
                        m.AddHint(var, solver1b.Value(var))
        # phase 2: keep the loads, use the fewest and cheapest hops
        # shallow trees fill the pipeline faster: a level costs half the cheapest hop
        m.Minimize(sum(2 * c * v for c, v in traffic) + 100 * depth_weight * sum(levels))
        solver2 = cp_model.CpSolver()
        solver_params(solver2, 0.2 * time_limit, seed, workers)
        st2 = solver2.Solve(m)
        final = solver2 if st2 in (cp_model.OPTIMAL, cp_model.FEASIBLE) else solver
        chosen = {k: sorted(uv for uv, var in x.items() if final.Value(var)) for k, x in xs.items()}
        load = zbest * bmin / 100.0
    out_edges: dict[tuple[int, ...], tuple[tuple[int, int], ...]] = {}
    in_edges: dict[tuple[int, ...], tuple[tuple[int, int], ...]] = {}
    for key, (rep, g) in orb.items():
        for tag, dest in (("out", out_edges), ("in", in_edges)):
            es = chosen.get((rep.key, tag))
            if es is not None:
                dest[key] = tuple(sorted((g.ranks[u], g.ranks[v]) for u, v in es))
    return Routing(
        kind=kind,
        parts=parts,
        root=root,
        flows=tuple(flows),
        out_edges=out_edges,
        in_edges=in_edges,
        load=load,
        optimal=optimal,
        solve_s=time.perf_counter() - t0,
        status=status,
    )


def _load_of(chosen: dict, coefs: dict, w: dict) -> int:
    loads: dict[int, int] = defaultdict(int)
    for es in chosen.values():
        for uv in es:
            for r, cnt in coefs[uv].items():
                loads[r] += cnt * w[uv]
    return max(loads.values(), default=0)
