"""Turn a routing into a pipelined schedule: list scheduling of pieces with adaptive message sizes.

Every flow is cut into ``pieces`` equal pieces; a piece crosses each edge of its flow's route once (a
*task*). Tasks become ready when their data is there: for an out-tree or path edge, when the piece reached
the edge's source (at once at the root); for an in-tree edge, when every child's partial sum of that piece
has arrived (reduction); allreduce's out-tree starts when the root holds the full sum.

The scheduler is event driven and never leaves an edge idle while it has ready tasks and free resources
(non-delay): repeatedly, the edge that can start earliest sends one message carrying its ready tasks (piece
order). On edges that hold a critical resource (load within ``critical`` of the largest), a message's
size is capped at half the remaining work of its busiest resource, so messages are large while much
remains (few alphas on the bottleneck) and shrink geometrically at the end (short pipeline tail). Other
edges have slack: they forward small messages (alpha about ``alpha_share`` of a message) so that data
flows on without store-and-forward delays. Each message becomes one Transfer whose deps are the messages that delivered its data and whose
``prio`` is its start time, so ``simulate`` reproduces the scheduler's timing exactly.
"""

from __future__ import annotations

import heapq
import math
from collections import defaultdict
from dataclasses import dataclass

from shardwise.passes.collectives.chunks import CollectiveSpec
from shardwise.passes.collectives.flows import Flow, chunk_of
from shardwise.passes.collectives.routing import Routing
from shardwise.passes.collectives.schedule import Schedule, Transfer
from shardwise.passes.collectives.topology import TopologyView

__all__ = ["pipelined_schedule", "piece_candidates", "routing_tasks"]


@dataclass
class _Task:
    flow: int
    piece: int
    src: int
    dst: int
    reduce: bool
    ready: float = -1.0
    waiting: int = 0
    deps: list[int] | None = None  # message ids that delivered the data


def routing_tasks(routing: Routing) -> int:
    """Tasks of one piece of every flow: the hops of every route (a schedule has pieces x this many)."""
    return sum(len(v) for v in routing.out_edges.values()) + sum(len(v) for v in routing.in_edges.values())


def piece_candidates(
    routing: Routing, topo: TopologyView, nbytes: float, *, min_piece_bytes: float, max_tasks: int
) -> list[int]:
    """The finest piece count worth trying for ``nbytes`` and an eighth of it: pieces of at least
    ``min_piece_bytes`` and at most ``max_tasks`` tasks (pieces x hops), at most 512 pieces per flow."""
    spec = CollectiveSpec(routing.kind, topo.size, routing.parts, routing.root)
    flow_bytes = spec.chunk_bytes(nbytes)
    hops = max(1, routing_tasks(routing))
    hi = max(1, min(512, max_tasks // hops, int(flow_bytes // max(1.0, min_piece_bytes))))
    return sorted({hi, max(1, hi // 8)}, reverse=True)


def _upstream_flags(
    routing: Routing,
    flows: list[Flow],
    tasks: list[_Task],
    critical_of_chan: list[set[int]],
    chan_of: dict[tuple[int, int, bool], int],
) -> list[int]:
    """Per task, its class: 0 — a reduction whose way to the root crosses a critical resource; 1 — a
    transfer with a critical resource on it or after it (for a reduction: in the broadcast that follows);
    2 — the rest (it can only wait for the bottleneck)."""
    flag_of: dict[tuple[int, int, int, bool], int] = {}
    for fi, f in enumerate(flows):
        oe = routing.out_edges.get(f.key, ())
        ie = routing.in_edges.get(f.key, ())
        crit_o = {uv: bool(critical_of_chan[chan_of[(*uv, False)]]) for uv in oe if (*uv, False) in chan_of}
        crit_i = {uv: bool(critical_of_chan[chan_of[(*uv, True)]]) for uv in ie if (*uv, True) in chan_of}
        kids: dict[int, list[tuple[int, int]]] = defaultdict(list)
        for u, v in oe:
            kids[u].append((u, v))
        memo: dict[tuple[int, int], bool] = {}

        def below(uv: tuple[int, int], kids=kids, memo=memo, crit_o=crit_o) -> bool:
            if uv not in memo:
                memo[uv] = crit_o.get(uv, False) or any(below(w) for w in kids.get(uv[1], ()))
            return memo[uv]

        out_any = any(crit_o.values())
        for uv in oe:
            flag_of[(fi, *uv, False)] = 1 if below(uv) else 2
        parent = dict(ie)
        for u, v in ie:
            hit, x = crit_i[(u, v)], v
            while not hit and x in parent:
                hit = crit_i[(x, parent[x])]
                x = parent[x]
            flag_of[(fi, u, v, True)] = 0 if hit else 1 if out_any else 2
    return [flag_of[(t.flow, t.src, t.dst, t.reduce)] for t in tasks]


def pipelined_schedule(
    routing: Routing,
    topo: TopologyView,
    nbytes: float,
    pieces: int,
    *,
    split: float = 0.5,
    alpha_share: float = 0.02,
    critical: float = 0.9,
    rounds: int | None = None,
    ratio: float | None = None,
    floor: int = 1,
    interleave: bool = False,
) -> Schedule:
    """The pipelined schedule of ``routing`` with ``pieces`` pieces per flow (see the module docstring).

    ``ratio`` (with ``floor``) plans the messages of every critical edge instead of ``split``: after its
    first message (sent as soon as anything is ready), each message carries all but ``ratio`` of the
    edge's remaining pieces (at least ``floor``; the rest at once when fewer than ``floor`` would remain)
    and waits until that many are ready, so few alphas are paid where the bottleneck is and the last
    message is small (a short tail behind it). ``interleave`` sends ready pieces piece-major (every flow's
    first piece, then every flow's second...) instead of flow-major, so that a large message holds pieces
    of many flows and what crossed the bottleneck spreads over many links at once.
    """
    kind, p = routing.kind, topo.size
    spec = CollectiveSpec(kind, p, routing.parts * pieces, routing.root)
    piece_bytes = spec.chunk_bytes(nbytes)
    flows: list[Flow] = list(routing.flows)
    tasks: list[_Task] = []
    out_children: list[
        dict[int, list[int]]
    ] = []  # per flow: rank -> out task ids leaving it (per piece base)
    # task index layout: per (flow, piece) a block; we build explicit lists instead
    out_from: dict[tuple[int, int, int], list[int]] = defaultdict(list)  # (flow, piece, rank) -> out tasks
    in_into: dict[tuple[int, int, int], list[int]] = defaultdict(
        list
    )  # (flow, piece, rank) -> in tasks arriving
    in_from: dict[tuple[int, int, int], int] = {}  # (flow, piece, rank) -> its in task (to parent)
    del out_children
    for fi, f in enumerate(flows):
        oe = routing.out_edges.get(f.key, ())
        ie = routing.in_edges.get(f.key, ())
        for q in range(pieces):
            for u, v in oe:
                tid = len(tasks)
                tasks.append(_Task(fi, q, u, v, False))
                out_from[(fi, q, u)].append(tid)
            for u, v in ie:
                tid = len(tasks)
                tasks.append(_Task(fi, q, u, v, True))
                in_into[(fi, q, v)].append(tid)
                in_from[(fi, q, u)] = tid
    # channels: (src, dst, reduce)
    chan_of: dict[tuple[int, int, bool], int] = {}
    chan_list: list[tuple[int, int, bool]] = []
    for t in tasks:
        key = (t.src, t.dst, t.reduce)
        if key not in chan_of:
            chan_of[key] = len(chan_list)
            chan_list.append(key)
    edge = [topo.route(s, d) for s, d, _ in chan_list]
    work = [e.beta * piece_bytes for e in edge]  # seconds per task on the channel
    rem: dict[int, float] = defaultdict(float)
    for t in tasks:
        c = chan_of[(t.src, t.dst, t.reduce)]
        for r in edge[c].resources:
            rem[r] += work[c]
    top = max(rem.values(), default=0.0)
    crit = {r for r, v in rem.items() if v >= critical * top}
    # edges off the critical resources forward in small messages (alpha at most alpha_share of a message)
    small = [
        None if crit & set(e.resources) else max(1, math.ceil(e.alpha / (alpha_share * w))) if w > 0 else None
        for e, w in zip(edge, work)
    ]
    # priority: tasks that feed a critical resource first (see _upstream_flags), then flow-major
    upstream = _upstream_flags(routing, flows, tasks, [set(e.resources) & crit for e in edge], chan_of)
    if rounds is not None:
        # critical edges also cap messages at 1/rounds of their busiest resource's total work: equal-sized
        # messages pack better when many edges share ports (switches)
        for c, e in enumerate(edge):
            if small[c] is None and work[c] > 0:
                small[c] = max(1, math.ceil(max(rem[r] for r in e.resources) / (rounds * work[c])))
    free: dict[int, float] = defaultdict(float)
    pend: list[list[tuple[float, int]]] = [[] for _ in chan_list]  # (ready time, task), not yet available
    avail: list[list[tuple[int, int, int, int]]] = [[] for _ in chan_list]  # (class, flow, piece, task)
    heap: list[tuple[float, int, int, int, float, int]] = []
    planned = [ratio is not None and small[c] is None and work[c] > 0 for c in range(len(chan_list))]
    left = [0] * len(chan_list)  # tasks of the channel not sent yet
    for t in tasks:
        left[chan_of[(t.src, t.dst, t.reduce)]] += 1
    sent_msgs = [0] * len(chan_list)
    hold = [True]  # cleared if every channel waits on another (a planned channel never starves the run)

    def key(t: _Task) -> tuple[int, int]:
        return (t.piece, t.flow) if interleave else (t.flow, t.piece)

    def target(c: int) -> int:
        keep = 1.0 - (ratio or 0.0)
        k = max(floor, math.ceil(left[c] * keep - 1e-9))
        return left[c] if left[c] - k < floor else min(k, left[c])

    def est(c: int) -> float:
        need = target(c) - len(avail[c]) if planned[c] and sent_msgs[c] and hold[0] else 0
        if need > 0:
            if len(pend[c]) < need:
                return math.inf
            first = heapq.nsmallest(need, pend[c])[-1][0]
        elif avail[c]:
            first = 0.0
        elif pend[c]:
            first = pend[c][0][0]
        else:
            return math.inf
        return max(first, max((free[r] for r in edge[c].resources), default=0.0))

    qest = [math.inf] * len(chan_list)  # a planned channel's latest queued start

    def push_chan(c: int) -> None:
        e = est(c)
        qest[c] = e
        if e < math.inf:
            if avail[c]:
                head = avail[c][0][:3]
            else:
                t = tasks[pend[c][0][1]]
                head = (upstream[pend[c][0][1]], *key(t))
            heapq.heappush(heap, (e, *head, -max(rem[r] for r in edge[c].resources), c))

    def make_ready(tid: int, at: float, deps: list[int]) -> None:
        t = tasks[tid]
        t.ready = at
        t.deps = deps
        c = chan_of[(t.src, t.dst, t.reduce)]
        heapq.heappush(pend[c], (at, tid))
        if not avail[c] and pend[c][0][1] == tid:
            push_chan(c)
        elif planned[c] and sent_msgs[c] and at < qest[c] and len(avail[c]) + len(pend[c]) >= target(c):
            push_chan(c)  # a holding channel may start earlier now

    # initial readiness
    for fi, f in enumerate(flows):
        ie = routing.in_edges.get(f.key, ())
        children: dict[int, int] = defaultdict(int)
        for _, v in ie:
            children[v] += 1
        for q in range(pieces):
            for u, _ in ie:
                tid = in_from[(fi, q, u)]
                tasks[tid].waiting = children.get(u, 0)
                tasks[tid].deps = []
                if tasks[tid].waiting == 0:
                    make_ready(tid, 0.0, [])
            if not ie:
                for tid in out_from.get((fi, q, f.src), ()):
                    make_ready(tid, 0.0, [])
    root_wait: dict[tuple[int, int], list] = {}
    for fi, f in enumerate(flows):
        if routing.in_edges.get(f.key) and routing.out_edges.get(f.key):
            n_in = sum(1 for _, v in routing.in_edges[f.key] if v == f.src)
            for q in range(pieces):
                root_wait[(fi, q)] = [n_in, 0.0, []]
    transfers: list[Transfer] = []
    while True:
        if not heap:
            if not hold[0] or not any(left):
                break
            hold[0] = False  # planned channels wait on each other: from now on send what is ready
            for c2 in range(len(chan_list)):
                push_chan(c2)
            continue
        e0, *_, c = heapq.heappop(heap)
        now = est(c)
        if now == math.inf:
            qest[c] = math.inf
            continue
        if now > e0 + 1e-18:
            push_chan(c)
            continue
        busiest = max(rem[r] for r in edge[c].resources)
        while pend[c] and pend[c][0][0] <= now:
            tid = heapq.heappop(pend[c])[1]
            t = tasks[tid]
            heapq.heappush(avail[c], (upstream[tid], *key(t), tid))
        cap = max(1, math.ceil(busiest * split / work[c] - 1e-9)) if work[c] > 0 else len(avail[c])
        if small[c] is not None:
            cap = min(cap, small[c])
        if planned[c]:
            cap = target(c)
        sent_msgs[c] += 1
        taken: list[int] = []
        while avail[c] and len(taken) < cap:
            taken.append(heapq.heappop(avail[c])[3])
        src, dst, red = chan_list[c]
        dur = edge[c].time(piece_bytes * len(taken))
        end = now + dur
        for r in edge[c].resources:
            free[r] = end
            rem[r] -= work[c] * len(taken)
        left[c] -= len(taken)
        mid = len(transfers)
        deps: set[int] = set()
        chunks = []
        for tid in taken:
            t = tasks[tid]
            deps.update(t.deps or ())
            chunks.append(chunk_of(spec, flows[t.flow], t.piece, pieces))
        transfers.append(Transfer(src, dst, tuple(chunks), red, tuple(sorted(deps)), now))
        for tid in taken:
            t = tasks[tid]
            fi, q = t.flow, t.piece
            if not t.reduce:
                for nxt in out_from.get((fi, q, t.dst), ()):
                    make_ready(nxt, end, [mid])
                continue
            up = in_from.get((fi, q, t.dst))
            if up is not None:
                ut = tasks[up]
                ut.waiting -= 1
                ut.deps = [*(ut.deps or []), mid]
                ut.ready = max(ut.ready, end)
                if ut.waiting == 0:
                    make_ready(up, ut.ready, ut.deps)
                continue
            rw = root_wait.get((fi, q))
            if rw is not None:
                rw[0] -= 1
                rw[1] = max(rw[1], end)
                rw[2].append(mid)
                if rw[0] == 0:
                    for nxt in out_from.get((fi, q, t.dst), ()):
                        make_ready(nxt, rw[1], list(rw[2]))
        push_chan(c)
    if len(transfers) == 0 and tasks:
        raise RuntimeError("pipeline scheduler sent nothing")
    sent = sum(len(t.chunks) for t in transfers)
    if sent != len(tasks):
        raise RuntimeError(f"pipeline scheduler sent {sent} of {len(tasks)} tasks (a routing is not a tree?)")
    return Schedule(spec, tuple(transfers), "synth-pipelined", f"pieces={pieces}")
