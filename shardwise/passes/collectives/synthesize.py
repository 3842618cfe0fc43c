"""Synthesis driver: search schedules for one collective and size, time every one, keep the best, verify it.

Searches (all on the sketch's allowed edges, all timed by ``simulate``: the simulated time, every message
priced by the price list, is the one reported, never a solver objective). When each one runs is decided by
rules on the lower bound's terms (``rules``: which resource bounds the transfer), never by size windows:

* ``pipelined`` — CP-SAT routing (``routing``), then event-driven list scheduling of pieces with adaptive
  message sizes (``pipeline``), for a few piece counts and message policies (halving, and planned
  bottleneck messages with interleaved pieces). The finest count is set by a task budget (a compute
  budget, see ``_MAX_TASKS``) and a 4 KiB floor; an eighth of it and the coarse counts
  (``_COARSE_PIECES``, few alphas where a switch port binds) are tried too, each time; every count gets
  every message plan while its finest schedule is cheap to build (``_CHEAP_TASKS``);
* ``modulo`` — the same routing, timed by the CP-SAT steady-state model (``modulo``), where its
  ``MODULO_PIECES`` messages per flow can land within ``MODULO_SKIP`` of the bound
  (``rules.steady_state_worth``) and the pipelines stay above that;
* ``rail`` (allgather, several equal nodes) — ``railpipe``'s rail-pipelined schedules, where the NICs bound
  the transfer (``rules.nic_bound``) and it is not latency-bound;
* ``timed`` — the CP-SAT timed model with bundling (``timed``), where the transfer is latency-bound
  (``rules.latency_bound``: no pipelined schedule can come within ``TIMED_SKIP`` of the bound) and no
  other search came within ``TIMED_SKIP`` of it; not built above ``TIMED_MAX_RANKS`` ranks (time budget);
* ``shared-nic`` (allgather, nodes whose GPUs share one NIC) — ``nicshare``'s few large NIC messages, the
  first from time zero, with the intra-node gather and spread list-scheduled; built only when its floor
  (``nicshare.nic_floor``: the shared NIC's time with its alphas, plus the spread of its last message) is
  below the best schedule so far;
* ``transpose`` (reduce-scatter) — the best allgather (searched or baseline) run backwards in time with
  every transfer reversed into a reduction (``transpose``); ``compose`` (allreduce) — the best
  reduce-scatter followed by the best allgather, and the transposed best allgather followed by itself.
  These sub-results are memoized per (topology, collective, size, sketch, settings) in this process, so a
  bench that runs allgather, then reduce-scatter, then allreduce searches each allgather once.

The baselines run too. The result is the fastest schedule, lowered to per-rank programs and checked by
``verify_program`` before it is returned (a wrong schedule raises ScheduleError; ``program`` keeps the
lowered form); ``source`` says which search (or baseline, when no search beat it) produced it, and
``search_s`` is the best time of the searches alone.
Routings are cached per (topology, collective, sketch) since they do not depend on the size.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from shardwise.passes.collectives.baselines import baseline_schedules
from shardwise.passes.collectives.bounds import LowerBound, lower_bound
from shardwise.passes.collectives.chunks import CollectiveSpec, check_collective
from shardwise.passes.collectives.lower import lower
from shardwise.passes.collectives.modulo import expand_modulo, solve_modulo
from shardwise.passes.collectives.nicshare import nic_candidates
from shardwise.passes.collectives.pipeline import piece_candidates, pipelined_schedule, routing_tasks
from shardwise.passes.collectives.railpipe import rail_candidates
from shardwise.passes.collectives.routing import Routing, solve_routing
from shardwise.passes.collectives.rules import (
    MODULO_PIECES,
    MODULO_SKIP,
    TIMED_SKIP,
    latency_bound,
    nic_bound,
    steady_state_worth,
)
from shardwise.passes.collectives.schedule import Schedule
from shardwise.passes.collectives.simulate import simulate
from shardwise.passes.collectives.sketch import Sketch, SketchView, sketch_view
from shardwise.passes.collectives.timed import solve_timed
from shardwise.passes.collectives.topology import TopologyView, topology_view
from shardwise.passes.collectives.transpose import compose_allreduce, transpose_allgather
from shardwise.passes.collectives.verify import verify_program

__all__ = ["SynthResult", "synthesize", "TIMED_MAX_RANKS"]

#: the timed model's size grows with ranks (its variables with the edges, about ranks squared); above
#: this many it is not built (the time budget: < 60 s per case on 2 cores)
TIMED_MAX_RANKS = 32
_ROUTINGS: dict[tuple, Routing] = {}
#: sub-results (best allgather / reduce-scatter) reused by reduce-scatter and allreduce searches
_SUBS: dict[tuple, object] = {}
#: coarse piece counts, always tried (cheap: few tasks), each with the default and a planned message policy
_COARSE_PIECES = (2, 3, 4, 6, 8, 16, 32)
#: the smallest piece (lowered programs cut buffers into pieces of whole elements; below, overheads win)
_MIN_PIECE_BYTES = 4096
#: tasks (pieces x hops) of one pipelined schedule: _CHEAP_TASKS, and from _FINE_PIECES_BYTES on in
#: proportion to the size (pieces stop shrinking there), at most _MAX_TASKS (the time budget: < 60 s per
#: case on 2 cores). A compute budget, not a gate: pieces no smaller than the binding cut's alpha-equivalent
#: message, or _MAX_TASKS at every size, were measured worse (ndv2x2 allgather 16 MB 856.8 and 863.1 us
#: against 856.2, 64 MB 3384.7 and 3381.4 against 3379.3; dgx-h100x4 alltoall 64 MB 1043.4 against 1032.5)
_MAX_TASKS = 128_000
_CHEAP_TASKS = 24_000
_FINE_PIECES_BYTES = 64 * 2**20
#: no search when a baseline is already within this multiple of the lower bound (it could gain < 0.5%)
_BASELINE_AT_BOUND = 1.005
# the timed model runs only when the best schedule so far is above rules.TIMED_SKIP x the bound (in the
# bench it won only where it ended >= 1.32 x the bound; ndv2x2 allreduce 1 MiB: 45 s of CP-SAT for 1.48 x,
# the composition had 1.15 x)


@dataclass(frozen=True, eq=False)
class SynthResult:
    """The outcome of ``synthesize`` (times in seconds)."""

    collective: str
    nbytes: int
    topo: TopologyView
    schedule: Schedule
    start_times: tuple[float, ...]
    time_s: float
    source: str
    search_s: float
    baselines: dict[str, float]
    bound: LowerBound
    synthesis_s: float
    candidates: dict[str, float] = field(default_factory=dict)
    program: dict | None = field(default=None, repr=False)


def _routing(sv: SketchView, kind: str, root: int, limit: float, seed: int, workers: int) -> Routing:
    key = (sv.topo.fingerprint, kind, sv.sketch.key(), root, seed, workers, round(limit, 3))
    if key not in _ROUTINGS:
        _ROUTINGS[key] = solve_routing(
            sv, kind, sv.sketch.chunks, root, time_limit=limit, seed=seed, workers=workers
        )
    return _ROUTINGS[key]


def _relay_sketch(topo: TopologyView) -> Sketch | None:
    """For latency-bound sizes: inter-node traffic only between the first GPU behind each NIC and the same
    GPU of the other nodes (so messages to a node can be bundled); None on one node."""
    if topo.num_nodes < 2:
        return None
    cluster = topo.cluster
    first = cluster.ranks_of_node(0)[0]
    locals_ = sorted({min(nic.devices) - first for nic in cluster.nics if nic.node == 0})
    if not locals_:
        return None
    return Sketch(name="relay", internode="relay", relays=tuple((i, i) for i in locals_))


def _sub(topo: TopologyView, kind: str, n: int, settings: tuple) -> SynthResult:
    """The (memoized) synthesis of ``kind`` that a reduce-scatter or allreduce search builds on."""
    sketch, limit, seed, workers = settings
    res = _SUBS.get(_sub_key(topo, kind, n, settings))
    if res is None:  # synthesize memoizes its own result
        res = synthesize(topo, kind, n, sketch=sketch, time_limit_s=limit, seed=seed, workers=workers)
    assert isinstance(res, SynthResult)
    return res


def _sub_key(topo: TopologyView, kind: str, n: int, settings: tuple) -> tuple:
    sketch, limit, seed, workers = settings
    return (topo.fingerprint, kind, n, sketch.key() if sketch else None, round(limit, 3), seed, workers)


def synthesize(
    cluster: object,
    collective: str,
    nbytes: int,
    ranks: Sequence[int] | None = None,
    *,
    sketch: Sketch | None = None,
    time_limit_s: float = 30.0,
    seed: int = 0,
    workers: int = 2,
    root: int = 0,
    search: bool = True,
) -> SynthResult:
    """Best verified schedule for ``collective`` of ``nbytes`` over ``ranks`` of ``cluster``.

    ``time_limit_s`` bounds the solvers' deterministic time (roughly seconds on an idle core); with
    ``search=False`` only the baselines run, as they also do alone when one of them is within 0.5% of the
    lower bound (no schedule could be more than 0.5% faster).
    """
    t0 = time.perf_counter()
    kind = check_collective(collective)
    topo = cluster if isinstance(cluster, TopologyView) else topology_view(cluster, ranks)  # type: ignore[arg-type]
    sv = sketch_view(topo, sketch)
    n = int(nbytes)
    bound = lower_bound(kind, topo, n, root)
    base: dict[str, tuple[float, Schedule, tuple[float, ...]]] = {}
    for name, sched in baseline_schedules(kind, topo, n, root).items():
        sim = simulate(sched, topo, n)
        base[name] = (sim.time, sched, sim.start)
    best: tuple[float, str, Schedule, tuple[float, ...]] | None = None
    cands: dict[str, float] = {}
    if base and min(t for t, _, _ in base.values()) <= _BASELINE_AT_BOUND * bound.time:
        search = False  # e.g. alltoall of 1 GB on ndv2x2: "direct" is 0.04% above the bound

    def offer(label: str, sched: Schedule) -> float:
        nonlocal best
        sim = simulate(sched, topo, n)
        cands[label] = min(sim.time, cands.get(label, float("inf")))
        if best is None or sim.time < best[0]:
            best = (sim.time, label, sched, sim.start)
        return sim.time

    if topo.size >= 2 and search and kind in ("reduce_scatter", "allreduce"):
        settings = (sketch, time_limit_s, seed, workers)
        ag = _sub(topo, "allgather", n, settings)
        ag_sim = simulate(ag.schedule, topo, n)
        rs_t = transpose_allgather(ag.schedule, ag_sim.start, ag_sim.end)
        if kind == "reduce_scatter" and rs_t is not None:
            offer("transpose", rs_t)
        if kind == "allreduce":
            pairs = []
            if rs_t is not None:
                pairs.append((rs_t, simulate(rs_t, topo, n).start))
            rs = _sub(topo, "reduce_scatter", n, settings)
            if rs_t is None or rs.schedule.digest() != rs_t.digest():
                pairs.append((rs.schedule, rs.start_times))
            for rs_sched, rs_start in pairs:
                composed = compose_allreduce(rs_sched, rs_start, ag.schedule, ag_sim.start)
                if composed is not None:
                    offer("compose", composed)
    if topo.size >= 2 and search:
        latency = latency_bound(bound)  # rules: few, bundled messages (the timed model)
        views = [sv]
        if sketch is None:
            relay = _relay_sketch(topo)
            if relay is not None:
                rv = sketch_view(topo, relay)
                if set(rv.allowed) != set(sv.allowed):
                    views.append(rv)
        # routings are cached per (topology, collective, sketch): their budget serves every size
        share = 0.5 * time_limit_s / len(views)
        routings = []
        for view in views:
            tag = "" if view is sv else "+relay"
            routing = _routing(view, kind, root, share, seed, workers)
            routings.append((view, tag, routing))
            # piece counts with the default policy, then the other message-size policies
            tried = []
            tasks = routing_tasks(routing)
            # the task budget of one schedule: large collectives can afford finer pieces (shorter tails)
            budget = int(min(_MAX_TASKS, _CHEAP_TASKS * max(1.0, n / _FINE_PIECES_BYTES)))
            counts = piece_candidates(routing, topo, n, min_piece_bytes=_MIN_PIECE_BYTES, max_tasks=budget)
            for pieces in counts:
                tried.append((offer("pipelined" + tag, pipelined_schedule(routing, topo, n, pieces)), pieces))
            # few, large messages: where a switch port is the bottleneck, its alphas (one per message, ~7
            # peers per piece) cost more than the longer tail of coarse pieces (cheap: few tasks)
            for pieces in _COARSE_PIECES:
                if pieces < counts[0] and pieces not in counts:
                    tried.append(
                        (offer("pipelined" + tag, pipelined_schedule(routing, topo, n, pieces)), pieces)
                    )
                    sched = pipelined_schedule(routing, topo, n, pieces, ratio=0.5, floor=1, interleave=True)
                    offer("pipelined" + tag, sched)
            best_pieces = min(tried)[1]
            for rounds, split in ((64, 0.5), (None, 0.7)):
                sched = pipelined_schedule(routing, topo, n, best_pieces, rounds=rounds, split=split)
                offer("pipelined" + tag, sched)
            # planned messages on the bottleneck (few alphas, a small last message), pieces interleaved:
            # every count with every plan while the finest schedule has at most _CHEAP_TASKS tasks (cheap
            # to build), else the best count
            if counts[0] * tasks <= _CHEAP_TASKS:
                plan_counts = sorted({*counts, max(1, counts[0] // 2), best_pieces})
                plans = ((0.2, 1), (0.16, 2), (0.1, 2))
            else:
                plan_counts, plans = [best_pieces], ((0.2, 1),)
            for pieces in plan_counts:
                for ratio, floor in plans:
                    sched = pipelined_schedule(
                        routing, topo, n, pieces, ratio=ratio, floor=floor, interleave=True
                    )
                    offer("pipelined" + tag, sched)
        if kind == "allgather" and sketch is None and nic_bound(bound) and not latency:
            # rail pipelines (NICs busy from time zero, small last NIC messages, bundled switch forwards):
            # where the NICs are the bottleneck, the routed pipelines' tails are longer (rules.nic_bound)
            for sched in rail_candidates(topo, n):
                offer("rail", sched)
        for view, tag, routing in routings:
            flow_bytes = CollectiveSpec(kind, topo.size, view.sketch.chunks, root).chunk_bytes(n)
            if steady_state_worth(bound):
                # the steady-state model, only where the pipelines are not already near the bound
                if best is not None and best[0] <= MODULO_SKIP * bound.time:
                    continue
                pieces = MODULO_PIECES
                plan = solve_modulo(
                    routing, view, flow_bytes / pieces, time_limit=0.3 * time_limit_s / len(views), seed=seed,
                    workers=workers,
                )  # fmt: skip
                if plan is not None:
                    offer("modulo" + tag, expand_modulo(routing, plan, pieces, topo.size))
            elif latency and topo.size <= TIMED_MAX_RANKS:
                if best is not None and best[0] <= TIMED_SKIP * bound.time:
                    continue
                upper = min([b[0] for b in base.values()] + [best[0] if best else float("inf")])
                res = solve_timed(
                    view, kind, n, 1.5 * upper, parts=view.sketch.chunks, root=root, routes=routing,
                    time_limit=0.5 * time_limit_s / len(views), seed=seed, workers=workers,
                )  # fmt: skip
                if res is not None:
                    offer("timed" + tag, res.schedule)
        if kind == "allgather" and sketch is None:
            # one NIC shared by a node's GPUs: few NIC messages, the first from time zero, a small last one
            # (offered after the timed model: a tighter upper bound there costs it wall time, gains nothing;
            # built only when its floor, the shared NIC's time with its alphas, is below the best so far)
            for sched in nic_candidates(topo, n, best[0] if best is not None else float("inf")):
                offer("shared-nic", sched)
    if topo.size < 2:
        best = (0.0, "trivial", Schedule(CollectiveSpec(kind, topo.size, 1, root), (), "trivial"), ())
    search_s = best[0] if best is not None else float("inf")
    for name, (t, sched, start) in sorted(base.items(), key=lambda kv: (kv[1][0], kv[0])):
        if best is None or t < best[0]:
            best = (t, f"baseline:{name}", sched, start)
        break
    assert best is not None
    # the schedule returned is lowered and verified (raises on a wrong schedule); its program is kept
    program = lower(best[2], best[3])
    verify_program(program)
    result = SynthResult(
        collective=kind,
        nbytes=n,
        topo=topo,
        schedule=best[2],
        start_times=tuple(best[3]),
        time_s=best[0],
        source=best[1],
        search_s=search_s,
        baselines={k: v[0] for k, v in base.items()},
        bound=bound,
        synthesis_s=time.perf_counter() - t0,
        candidates=cands,
        program=program,
    )
    if search and kind in ("allgather", "reduce_scatter"):
        if len(_SUBS) > 64:
            _SUBS.clear()
        _SUBS[_sub_key(topo, kind, n, (sketch, time_limit_s, seed, workers))] = result
    return result
