"""The timed model for latency-bound sizes: CP-SAT chooses routes, message bundling and the time of every
transfer at once, minimising the completion time under the alpha-beta model with contention.

Every edge (of the sketch) has ``K`` message slots per phase (copy; reduce). A slot is an interval of
length ``alpha * present + beta * chunk_bytes * count`` where ``count`` is the number of chunks it carries
(one alpha per message, as TACCL's contiguity stage has it). Per representative flow (see ``flows``):

* ``x[f, e, slot]``: the flow's chunk rides that slot (its routes are trees or paths, as in ``routing``:
  exactly one way into every rank of an out-tree, one way out of every rank of an in-tree, conserved flow on
  a path);
* out-trees and paths: ``x => arrival[f, v] = end(slot)`` and ``start(slot) >= arrival[f, u]``;
* in-trees: ``x => ready[f, v] >= end(slot)`` for each child, and the slot to the parent starts after
  ``ready[f, v]`` (every child's partial sum is in);
* allreduce: each flow picks its root (any rank: not limited to reduce-scatter + allgather's fixed
  owners); the root's broadcast starts after its reduction, other ranks forward what they receive;
* contention: on every resource, the slots of all edges through it do not overlap (``AddNoOverlap``); slots
  are shared by symmetric images (the timing symmetries move every resource, so images never collide);
* objective: the time the last rank holds its final data.

All constraints use enforcement literals (no big-M). Times are integers in units of ``upper / 4000``
(durations rounded up, so the model is pessimistic); the simulator times the result exactly.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass, field

from ortools.sat.python import cp_model

from shardwise.passes.collectives.chunks import CollectiveSpec
from shardwise.passes.collectives.flows import Flow, chunk_of, flows_of, orbits
from shardwise.passes.collectives.modulo import timing_group
from shardwise.passes.collectives.routing import Routing, solver_params
from shardwise.passes.collectives.schedule import Schedule, Transfer
from shardwise.passes.collectives.sketch import SketchView

__all__ = ["TimedResult", "solve_timed"]


@dataclass(frozen=True, eq=False)
class TimedResult:
    """The schedule and the solver's view of it (``chosen`` x keys, slot ``starts`` in seconds)."""

    schedule: Schedule
    objective_s: float
    optimal: bool
    solve_s: float
    status: str
    chosen: frozenset = frozenset()
    starts: dict = field(default_factory=dict)


def _hop_dist(allowed: list[tuple[int, int]], p: int) -> list[list[int]]:
    inf = p + 1
    dist = [[inf] * p for _ in range(p)]
    adj: dict[int, list[int]] = defaultdict(list)
    for u, v in allowed:
        adj[u].append(v)
    for s in range(p):
        dist[s][s] = 0
        frontier = [s]
        while frontier:
            nxt = []
            for u in frontier:
                for v in adj[u]:
                    if dist[s][v] > dist[s][u] + 1:
                        dist[s][v] = dist[s][u] + 1
                        nxt.append(v)
            frontier = nxt
    return dist


def solve_timed(
    sv: SketchView,
    kind: str,
    nbytes: float,
    upper_s: float,
    *,
    parts: int = 1,
    root: int = 0,
    slots: int | None = None,
    time_limit: float = 10.0,
    seed: int = 0,
    workers: int = 2,
    routes: Routing | None = None,
    hint: TimedResult | None = None,
) -> TimedResult | None:
    """Solve the timed model; None if CP-SAT finds nothing within ``upper_s`` seconds in time.

    With ``routes``, every flow keeps its routing's tree or path (and allreduce its home as root): CP-SAT
    then only bundles and times, a much smaller model (TACCL's route-then-schedule split). ``hint`` seeds
    the search with an earlier result (e.g. of the routed model).
    """
    t0 = time.perf_counter()
    topo = sv.topo
    p = topo.size
    K = slots or sv.sketch.max_bundle
    spec = CollectiveSpec(kind, p, parts, root)
    cb = spec.chunk_bytes(nbytes)
    flows = flows_of(kind, p, parts, root)
    group = timing_group(sv, kind)
    orb = orbits(flows, group)
    reps: list[Flow] = sorted({id(f): f for f, _ in orb.values()}.values(), key=lambda f: f.key)
    allowed = list(sv.allowed)
    aset = set(allowed)
    dist = _hop_dist(allowed, p)
    unit = upper_s / 4000.0
    H = 4000
    # edge orbits under the timing group
    edge_rep: dict[tuple[int, int], tuple[int, int]] = {}
    for e in allowed:
        if e in edge_rep:
            continue
        for g in group:
            img = (g.ranks[e[0]], g.ranks[e[1]])
            edge_rep.setdefault(img, e)
    phases = {"out": ("c",), "in": ("r",), "inout": ("r", "c"), "path": ("c",)}[flows[0].shape]
    m = cp_model.CpModel()
    S: dict = {}
    E: dict = {}
    P: dict = {}
    CNT: dict = {}
    IV: dict = {}
    rep_edges = sorted(set(edge_rep.values()))
    max_cnt = len(flows)
    for e in rep_edges:
        ed = topo.edges[e]
        a_u = max(1, math.ceil(ed.alpha / unit))
        b_u = ed.beta * cb / unit
        if a_u + b_u > H:
            continue
        for ph in phases:
            prev = None
            for k in range(K):
                key = (e, ph, k)
                s = m.NewIntVar(0, H, f"S{key}")
                c = m.NewIntVar(0, max_cnt, f"C{key}")
                pr = m.NewBoolVar(f"P{key}")
                m.Add(c >= 1).OnlyEnforceIf(pr)
                m.Add(c == 0).OnlyEnforceIf(pr.Not())
                dmax = a_u + math.ceil(b_u * max_cnt)
                d = m.NewIntVar(0, dmax, f"D{key}")
                # duration >= alpha if present + beta * bytes carried (rounded up once per slot)
                m.Add(d * 1000 >= a_u * 1000 * pr + math.ceil(b_u * 1000) * c)
                en = m.NewIntVar(0, H, f"E{key}")
                IV[key] = m.NewIntervalVar(s, d, en, f"I{key}")
                S[key], E[key], P[key], CNT[key] = s, en, pr, c
                if prev is not None:
                    m.AddImplication(pr, P[prev])
                    m.Add(s >= E[prev])
                prev = key

    def slot_of(e: tuple[int, int], ph: str, k: int) -> tuple | None:
        rep = edge_rep.get(e)
        key = (rep, ph, k)
        return key if key in S else None

    X: dict = {}  # (flow key, edge, phase, slot) -> var, rep flows only
    count_terms: dict = defaultdict(list)
    arrive: dict = {}
    ready: dict = {}
    roots: dict = {}

    def edges_for(f: Flow, ph: str) -> list[tuple[int, int]]:
        if routes is not None:
            return list((routes.in_edges if ph == "r" else routes.out_edges).get(f.key, ()))
        if f.shape != "path":
            return allowed
        s, d = f.src, f.dst
        hops = dist[s][d] + 1
        return [(u, v) for u, v in allowed if dist[s][u] + 1 + dist[v][d] <= hops and v != s and u != d]

    for f in reps:
        for ph in phases:
            for e in edges_for(f, ph):
                if ph == "c" and f.shape in ("out", "path") and e[1] == f.src:
                    continue
                if ph == "r" and f.shape == "in" and e[0] == f.src:
                    continue
                for k in range(K):
                    sk = slot_of(e, ph, k)
                    if sk is None:
                        continue
                    X[(f.key, e, ph, k)] = m.NewBoolVar(f"x{f.key}{e}{ph}{k}")
    # slot counts: every image of every representative's choice lands on some slot
    for (_fk, e, ph, k), var in X.items():
        for g in group:
            img = (g.ranks[e[0]], g.ranks[e[1]])
            if img in aset and edge_rep.get(img) == img:
                count_terms[(img, ph, k)].append(var)
    for key, c in CNT.items():
        terms = count_terms.get(key, [])
        m.Add(c == sum(terms))
    horizon = H
    for f in reps:
        fx = {(e, ph, k): v for (fk, e, ph, k), v in X.items() if fk == f.key}
        into: dict = defaultdict(list)
        outof: dict = defaultdict(list)
        for (e, ph, k), v in fx.items():
            into[(e[1], ph)].append(((e, ph, k), v))
            outof[(e[0], ph)].append(((e, ph, k), v))
        if f.shape == "inout":
            y = [m.NewBoolVar(f"y{f.key}{v}") for v in range(p)]
            m.AddExactlyOne(y)
            if routes is not None:
                m.Add(y[f.src] == 1)
            roots[f.key] = y
        else:
            y = None
        if "r" in phases:
            R = [m.NewIntVar(0, horizon, f"R{f.key}{v}") for v in range(p)]
            ready[f.key] = R
            for v in range(p):
                outs = [var for _, var in outof[(v, "r")]]
                if f.shape == "in":
                    if v != f.src:
                        m.AddExactlyOne(outs)
                else:
                    m.Add(sum(outs) == 1 - y[v])
                for (e, ph, k), var in into[(v, "r")]:
                    m.Add(R[v] >= E[slot_of(e, ph, k)]).OnlyEnforceIf(var)
                for (e, ph, k), var in outof[(v, "r")]:
                    m.Add(S[slot_of(e, ph, k)] >= R[v]).OnlyEnforceIf(var)
        if "c" in phases:
            A = [m.NewIntVar(0, horizon, f"A{f.key}{v}") for v in range(p)]
            arrive[f.key] = A
            for v in range(p):
                ins = [var for _, var in into[(v, "c")]]
                outs = [var for _, var in outof[(v, "c")]]
                if f.shape == "path":
                    if v == f.src:
                        m.AddExactlyOne(outs)
                        m.Add(A[v] == 0)
                    elif v == f.dst:
                        m.AddExactlyOne(ins)
                    else:
                        m.Add(sum(ins) == sum(outs))
                        m.Add(sum(ins) <= 1)
                elif f.shape == "out":
                    if v == f.src:
                        m.Add(A[v] == 0)
                    else:
                        m.AddExactlyOne(ins)
                else:
                    m.Add(sum(ins) == 1 - y[v])
                    m.Add(A[v] >= ready[f.key][v]).OnlyEnforceIf(y[v])
                for (e, ph, k), var in into[(v, "c")]:
                    m.Add(A[v] == E[slot_of(e, ph, k)]).OnlyEnforceIf(var)
                for (e, ph, k), var in outof[(v, "c")]:
                    m.Add(S[slot_of(e, ph, k)] >= A[v]).OnlyEnforceIf(var)
    # contention on every resource (representatives suffice: images are symmetric)
    by_res: dict[int, list] = defaultdict(list)
    for e in allowed:
        for r in topo.edges[e].resources:
            by_res[r].append(e)
    rrep = set()
    for r in range(len(topo.resources)):
        if not any(g.resources[r] in rrep for g in group):
            rrep.add(r)
    for r in sorted(rrep):
        ivs = []
        seen = set()
        for e in by_res.get(r, ()):
            for ph in phases:
                for k in range(K):
                    key = slot_of(e, ph, k)
                    if key is None:
                        continue
                    if key in seen:
                        m.Add(P[key] == 0)  # two images of one slot on one resource cannot coexist
                        continue
                    seen.add(key)
                    ivs.append(IV[key])
        if len(ivs) > 1:
            m.AddNoOverlap(ivs)
    z = m.NewIntVar(0, horizon, "z")
    for f in reps:
        if f.shape in ("out", "inout"):
            for v in range(p):
                m.Add(z >= arrive[f.key][v])
        elif f.shape == "path":
            m.Add(z >= arrive[f.key][f.dst])
        else:
            m.Add(z >= ready[f.key][f.src])
    m.Minimize(z)
    if hint is not None:
        for key, var in X.items():
            m.AddHint(var, 1 if key in hint.chosen else 0)
        for key, val in hint.starts.items():
            if key in S:
                m.AddHint(S[key], min(H, round(val / unit)))
    solver = cp_model.CpSolver()
    solver_params(solver, time_limit, seed, workers)
    st = solver.Solve(m)
    if st not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return None
    sched = _extract(solver, spec, flows, orb, X, S, slot_of)
    return TimedResult(
        schedule=sched,
        objective_s=solver.Value(z) * unit,
        optimal=st == cp_model.OPTIMAL,
        solve_s=time.perf_counter() - t0,
        status=solver.StatusName(st),
        chosen=frozenset(k for k, var in X.items() if solver.Value(var)),
        starts={k: solver.Value(v) * unit for k, v in S.items() if solver.Value(P[k])},
    )


def _extract(
    solver: cp_model.CpSolver,
    spec: CollectiveSpec,
    flows: list[Flow],
    orb: dict,
    X: dict,
    S: dict,
    slot_of,
) -> Schedule:
    """Messages (edge, phase, slot) with the chunks of every flow image riding them, and their deps."""
    msgs: dict[tuple, list[int]] = defaultdict(list)  # (edge, phase, slot) -> chunk ids
    rides: dict[tuple, tuple] = {}  # (flow key, chunk-carrying edge, phase) -> message key
    chosen = {key for key, var in X.items() if solver.Value(var)}
    for fkey, (rep, g) in orb.items():
        chunk = chunk_of(spec, _flow_by_key(flows, fkey), 0, 1)
        for rk, e, ph, k in chosen:
            if rk != rep.key:
                continue
            img = (g.ranks[e[0]], g.ranks[e[1]])
            mk = (img, ph, k)
            msgs[mk].append(chunk)
            rides[(fkey, img, ph)] = mk
    keys = sorted(msgs, key=lambda mk: (solver.Value(S[slot_of(*mk)]), mk))
    index = {mk: i for i, mk in enumerate(keys)}
    # deps: the messages that delivered each chunk's data to the sender
    into: dict[tuple, list[tuple]] = defaultdict(list)  # (flow key, rank, phase) -> incoming message keys
    for (fkey, img, ph), mk in rides.items():
        into[(fkey, img[1], ph)].append(mk)
    by_msg_flows: dict[tuple, list] = defaultdict(list)
    for (fkey, _img, _ph), mk in rides.items():
        by_msg_flows[mk].append(fkey)
    transfers = []
    for mk in keys:
        (u, v), ph, _ = mk
        deps: set[int] = set()
        for fkey in by_msg_flows[mk]:
            deps.update(index[d] for d in into.get((fkey, u, "r"), ()))  # reduce: children's partials
            if ph == "c":
                deps.update(index[d] for d in into.get((fkey, u, "c"), ()))
        deps.discard(index[mk])
        transfers.append(
            Transfer(
                u,
                v,
                tuple(sorted(msgs[mk])),
                ph == "r",
                tuple(sorted(deps)),
                float(solver.Value(S[slot_of(*mk)])),
            )
        )
    return Schedule(spec, tuple(transfers), "synth-timed")


def _flow_by_key(flows: list[Flow], key: tuple[int, ...]) -> Flow:
    for f in flows:
        if f.key == key:
            return f
    raise KeyError(key)
