"""Steady-state (modulo) scheduling of a routing with CP-SAT: one period, repeated for every piece.

In the bandwidth-bound regime a schedule is a pipeline: piece q of every flow crosses the same edges as
piece 0, one period ``T`` later. This model places one *period task* per (flow, route edge): its start
``s = k*T + r`` (k whole periods after piece 0 starts, offset ``r`` in [0, T - d]), with

* data dependencies of one piece: ``s >= s' + d'`` for the task that delivers the data (out-trees, paths)
  or every child's partial sum (in-trees; allreduce's broadcast after the root's last reduction);
* contention: on every resource, the offsets ``[r, r + d)`` of its tasks do not overlap (NoOverlap), so the
  periods tile without conflicts;
* objective: the length of one piece's journey ``max(s + d)`` (pipeline fill), for the smallest ``T``
  found feasible, searched upward from the busiest resource's work per period.

Symmetry: only tasks of representative flows get variables; images share them (same times), which needs
every used symmetry to move every resource (else two images would collide on a fixed resource).

Expanding P pieces gives transfers at ``q*T + s`` (``prio``) with their data deps; the simulator then
times them exactly (never later than planned, since the plan is feasible).
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass

from ortools.sat.python import cp_model

from shardwise.passes.collectives.chunks import CollectiveSpec
from shardwise.passes.collectives.flows import chunk_of, flow_group, orbits
from shardwise.passes.collectives.routing import Routing, solver_params
from shardwise.passes.collectives.schedule import Schedule, Transfer
from shardwise.passes.collectives.sketch import GroupElement, SketchView

__all__ = ["ModuloPlan", "solve_modulo", "expand_modulo", "timing_group"]


@dataclass(frozen=True, eq=False)
class ModuloPlan:
    """Period ``period`` (s) and per task (flow key, src, dst, reduce) its start ``s`` for piece 0."""

    period: float
    span: float
    starts: dict[tuple[tuple[int, ...], int, int, bool], float]
    deps: dict[tuple[tuple[int, ...], int, int, bool], tuple[tuple[tuple[int, ...], int, int, bool], ...]]
    solve_s: float


def timing_group(sv: SketchView, kind: str) -> tuple[GroupElement, ...]:
    """Symmetries usable when timing: usable for routing and moving every resource (or the identity)."""
    group = flow_group(kind, sv.group)
    nres = len(sv.topo.resources)
    keep = [g for g in group if all(g.resources[r] != r for r in range(nres))]
    ident = [g for g in group if g.ranks == tuple(range(len(g.ranks)))]
    chosen = ident + keep
    # must be closed under composition to be a group
    ranks = {g.ranks for g in chosen}
    for a in chosen:
        for b in chosen:
            if a.compose(b).ranks not in ranks:
                return tuple(ident)
    return tuple(chosen)


def _tasks(routing: Routing) -> tuple[list, dict]:
    """Period tasks and their deps (within one piece)."""
    tasks = []
    deps: dict = {}
    for f in routing.flows:
        ie = routing.in_edges.get(f.key, ())
        oe = routing.out_edges.get(f.key, ())
        into: dict[int, list] = defaultdict(list)
        for u, v in ie:
            into[v].append((f.key, u, v, True))
        parent_out = {v: (f.key, u, v, False) for u, v in oe}
        for u, v in ie:
            t = (f.key, u, v, True)
            tasks.append(t)
            deps[t] = tuple(into.get(u, ()))
        for u, v in oe:
            t = (f.key, u, v, False)
            tasks.append(t)
            if u in parent_out:
                deps[t] = (parent_out[u],)
            else:
                deps[t] = tuple(into.get(u, ()))  # the root: after its last reduction (allreduce)
    return tasks, deps


def solve_modulo(
    routing: Routing,
    sv: SketchView,
    piece_bytes: float,
    *,
    time_limit: float = 6.0,
    seed: int = 0,
    workers: int = 2,
    steps: int = 12,
) -> ModuloPlan | None:
    """The steady-state plan for pieces of ``piece_bytes`` (None if no period was found in time)."""
    t0 = time.perf_counter()
    topo = sv.topo
    tasks, deps = _tasks(routing)
    if not tasks:
        return ModuloPlan(0.0, 0.0, {}, {}, 0.0)
    dur_s = {}
    res_of = {}
    for t in tasks:
        e = topo.route(t[1], t[2])
        dur_s[t] = e.time(piece_bytes)
        res_of[t] = e.resources
    load: dict[int, float] = defaultdict(float)
    for t in tasks:
        for r in res_of[t]:
            load[r] += dur_s[t]
    t_lb = max(load.values())
    unit = t_lb / 400.0  # ~0.25% resolution on the period
    dur = {t: max(1, math.ceil(d / unit)) for t, d in dur_s.items()}
    group = timing_group(sv, routing.kind)
    orb = orbits(list(routing.flows), group)

    def canon(t: tuple) -> tuple:
        rep, g = orb[t[0]]
        inv = g.inverse()
        return (rep.key, inv.ranks[t[1]], inv.ranks[t[2]], t[3])

    reps = sorted({canon(t) for t in tasks})
    depths = _depths(tasks, deps)
    if depths is None:
        return None
    depth = 1 + max(depths.values())
    base = max(math.ceil(ld / unit) for ld in load.values())
    budget = time_limit / max(1, steps)
    for i in range(steps):
        period = math.ceil(base * (1 + 0.015 * i))
        m = cp_model.CpModel()
        horizon = period * (depth + 2) + max(dur.values())
        s, r_, iv = {}, {}, {}
        for t in reps:
            d = dur[t]
            if d > period:
                break
            s[t] = m.NewIntVar(0, horizon, f"s{t}")
            r_[t] = m.NewIntVar(0, period - d, f"r{t}")
            k = m.NewIntVar(0, depth + 2, f"k{t}")
            m.Add(s[t] == k * period + r_[t])
            iv[t] = m.NewFixedSizeIntervalVar(r_[t], d, f"i{t}")
        if len(s) != len(reps):
            continue
        for t in reps:
            for dpd in deps[t]:
                c = canon(dpd)
                m.Add(s[t] >= s[c] + dur[c])
        by_res: dict[int, list] = defaultdict(list)
        for t in tasks:
            for r in res_of[t]:
                by_res[r].append(canon(t))
        ok = True
        for lst in by_res.values():
            if len(set(lst)) != len(lst):
                ok = False
                break
            if len(lst) > 1:
                m.AddNoOverlap([iv[t] for t in lst])
        if not ok:
            return None
        span = m.NewIntVar(0, horizon + max(dur.values()), "span")
        for t in reps:
            m.Add(span >= s[t] + dur[t])
        m.Minimize(span)
        solver = cp_model.CpSolver()
        solver_params(solver, budget, seed, workers)
        st = solver.Solve(m)
        if st in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            starts = {}
            for t in tasks:
                starts[t] = solver.Value(s[canon(t)]) * unit
            return ModuloPlan(
                period * unit, solver.Value(span) * unit, starts, dict(deps), time.perf_counter() - t0
            )
    return None


def _depths(tasks: list, deps: dict) -> dict | None:
    """Longest dependency chain ending at each task; None if the deps form a cycle."""
    indeg = {t: len(deps[t]) for t in tasks}
    succ: dict = defaultdict(list)
    for t in tasks:
        for d in deps[t]:
            succ[d].append(t)
    stack = [t for t in tasks if indeg[t] == 0]
    depth = {t: 1 for t in stack}
    seen = 0
    while stack:
        t = stack.pop()
        seen += 1
        for u in succ[t]:
            depth[u] = max(depth.get(u, 1), depth[t] + 1)
            indeg[u] -= 1
            if indeg[u] == 0:
                stack.append(u)
    return depth if seen == len(tasks) else None


def expand_modulo(routing: Routing, plan: ModuloPlan, pieces: int, nranks: int) -> Schedule:
    """The schedule of ``pieces`` pieces per flow following ``plan`` (piece q shifted by q periods)."""
    spec = CollectiveSpec(routing.kind, nranks, routing.parts * pieces, routing.root)
    flows = {f.key: f for f in routing.flows}
    order = sorted(plan.starts, key=lambda t: (plan.starts[t], t))
    index = {(q, t): q * len(order) + i for q in range(pieces) for i, t in enumerate(order)}
    transfers = [
        Transfer(
            t[1],
            t[2],
            (chunk_of(spec, flows[t[0]], q, pieces),),
            t[3],
            tuple(sorted(index[(q, d)] for d in plan.deps[t])),
            q * plan.period + plan.starts[t],
        )
        for q in range(pieces)
        for t in order
    ]
    return Schedule(spec, tuple(transfers), "synth-modulo", f"pieces={pieces},period={plan.period:.3e}")
