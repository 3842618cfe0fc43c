"""Allgather for clusters whose nodes reach each other through one NIC shared by all their GPUs.

Where every inter-node route of a node crosses one shared resource (its NIC), that resource must carry the
node's whole share of the output to each other node, so the collective takes at least that NIC time; the
schedule's job is to add little to it. Here each node sends its data to each peer node in a few large NIC
messages (``nic_sizes``, in pieces, the last one taking the rest), all from one *sender* GPU:

* the first message carries the sender's own pieces, so the NIC is busy from time zero while the other GPUs
  of the node gather their pieces onto the sender over the intra-node links (the gather is the *head*);
* the last message is small, so spreading it over the receiving node after the NIC is done (the *tail*)
  is short, and the larger message before it goes to another GPU (``receivers``, by local position) whose
  spread overlaps the last NIC message;
* everything else (the node's own allgather, the gather onto the sender, the spread of what arrives) is
  list-scheduled over the intra-node links: at each step the (link, bundle) that can start first is
  committed (ties: the faster link); a bundle carries pieces its source holds and its destination neither
  holds nor awaits, rarest first, at most ``cap_us`` of beta on that link (so a big arrival is cut over
  several links and relayed), or ``tail_cap`` pieces when the rarest is from a last NIC message (the
  tail: one piece per message reaches the second hop soonest).

Every transfer holds the resources of ``topo.route`` (as ``simulate`` does) and starts when its resources
are free and its data has arrived; its ``prio`` is that start time, and deps are completed from prio
(``make_schedule``), so ``simulate`` reproduces the estimate and ``verify`` checks correctness. Each rank
receives each piece exactly once (a piece enters a node only through the one NIC message carrying it
there). ``nic_candidates`` lists the few settings worth timing, on any number of nodes, and only when
``nic_floor`` (the shared NIC's time for its messages and their alphas, plus the spread of the last one)
is below the best schedule found so far; ``synthesize`` keeps one only if fastest.
Measured (ndv2x2, 1 MiB): 62.10 us against 60.3 of NIC time for three messages and a 55.1 bound.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from shardwise.costs.comm import message_s
from shardwise.passes.collectives.baselines import node_orders
from shardwise.passes.collectives.chunks import CollectiveSpec
from shardwise.passes.collectives.schedule import Schedule, Transfer, make_schedule
from shardwise.passes.collectives.topology import TopologyView

__all__ = ["shared_nic_allgather", "nic_candidates", "shared_nic", "nic_floor", "MESSAGES"]

_INF = math.inf


def shared_nic(topo: TopologyView) -> bool:
    """True when there are at least 2 nodes with equal rank counts (at least 2 each) and, on each node,
    every route to another node crosses one same resource (the node's NIC)."""
    orders = node_orders(topo)
    if len(orders) < 2 or len({len(o) for o in orders}) != 1 or len(orders[0]) < 2:
        return False
    for n, order in enumerate(orders):
        common: set[int] | None = None
        for u in order:
            for m, other in enumerate(orders):
                if m != n:
                    for v in other:
                        rs = set(topo.route(u, v).resources)
                        common = rs if common is None else common & rs
        if not common:
            return False
    return True


def _bits(mask: int) -> list[int]:
    """The set bits of ``mask``, lowest first."""
    return [i for i, c in enumerate(bin(mask)[:1:-1]) if c == "1"]


def shared_nic_allgather(
    topo: TopologyView,
    nbytes: float,
    pieces: int,
    nic_sizes: Sequence[int],
    receivers: Sequence[int],
    cap_us: float = _INF,
    tail_cap: int = 1,
    sender: int = 0,
) -> Schedule | None:
    """The allgather described in the module docstring; None unless ``shared_nic(topo)``."""
    if not shared_nic(topo):
        return None
    orders = node_orders(topo)
    p, nodes, local = topo.size, len(orders), len(orders[0])
    spec = CollectiveSpec("allgather", p, pieces)
    cb = spec.chunk_bytes(nbytes)
    total = p * pieces
    node_of = {r: n for n, o in enumerate(orders) for r in o}
    links = [
        (e.src, e.dst, e.alpha, e.beta, e.resources)
        for order in orders
        for u in order
        for v in order
        if u != v and topo.route(u, v).kind == "link"
        for e in (topo.route(u, v),)
    ]
    # NIC messages per node: sender's own pieces first, then the others by the speed of their way there
    queues: list[list[tuple[int, int, int]]] = []  # per node: (src, dst, mask) in NIC order
    for n, order in enumerate(orders):
        s = order[sender % local]

        def speed(r: int, s: int = s) -> float:
            return topo.edge(r, s).beta if topo.has_edge(r, s) else _INF

        ranked = [s] + sorted((r for r in order if r != s), key=lambda r: (speed(r), order.index(r)))
        seq = [r * pieces + k for r in ranked for k in range(pieces)]
        sizes, left = [], len(seq)
        for size in nic_sizes:
            if left <= 0:
                break
            sizes.append(min(size, left))
            left -= sizes[-1]
        if left > 0:
            sizes.append(left)
        msgs: list[tuple[int, int, int]] = []
        at = 0
        for i, size in enumerate(sizes):
            mask = sum(1 << g for g in seq[at : at + size])
            at += size
            for j in range(1, nodes):
                dst = orders[(n + j) % nodes][receivers[i % len(receivers)] % local]
                msgs.append((s, dst, mask))
        queues.append(msgs)
    # per rank, the pieces its node receives in the last NIC messages (spread ``tail_cap`` per message)
    tail = [0] * p
    for msgs in queues:
        for _, dst, mask in msgs[-(nodes - 1) :]:
            for r in orders[node_of[dst]]:
                tail[r] |= mask
    have = [0] * p  # pieces held or promised
    when = [[_INF] * total for _ in range(p)]  # arrival time of each piece at each rank
    for r in range(p):
        for k in range(pieces):
            g = r * pieces + k
            have[r] |= 1 << g
            when[r][g] = 0.0
    copies = [1] * total
    free: dict[int, float] = {}
    transfers: list[Transfer] = []
    full = (1 << total) - 1
    heads = [0] * nodes
    # (node, NIC message) -> when all its pieces are at its sender
    ready_at: dict[tuple[int, int], float] = {}

    def commit(u: int, v: int, mask: int, start: float, dur: float, res: tuple[int, ...]) -> None:
        end = start + dur
        for r in res:
            free[r] = end
        have[v] |= mask
        for g in _bits(mask):
            when[v][g] = end
            copies[g] += 1
        transfers.append(Transfer(u, v, tuple(_bits(mask)), False, (), start))

    while any(h != full for h in have) or any(heads[n] < len(queues[n]) for n in range(nodes)):
        best: tuple[float, float, int, int, int, float, tuple[int, ...], int] | None = None
        for n in range(nodes):
            if heads[n] < len(queues[n]):
                u, v, mask = queues[n][heads[n]]
                if have[u] & mask != mask:
                    continue  # a piece of it is not even promised to its sender yet
                key_n = (n, heads[n])
                if key_n not in ready_at:  # every piece is promised: its arrival times are final
                    ready_at[key_n] = max((when[u][g] for g in _bits(mask)), default=0.0)
                e = topo.route(u, v)
                start = max(ready_at[key_n], *(free.get(r, 0.0) for r in e.resources))
                if start < _INF and (best is None or start < best[0]):
                    dur = e.time(cb * mask.bit_count())
                    best = (start, 0.0, u, v, mask, dur, e.resources, n)
        for u, v, alpha, beta, res in links:
            t_free = max(free.get(r, 0.0) for r in res)
            if best is not None and (t_free, beta) >= best[:2]:
                continue  # it starts at t_free or later: it cannot come first
            cand = have[u] & ~have[v]
            if not cand:
                continue
            gs = _bits(cand)
            start = max(t_free, min(when[u][g] for g in gs))
            if best is not None and start > best[0]:
                continue
            ok = sorted((g for g in gs if when[u][g] <= start), key=lambda g: (copies[g], when[u][g], g))
            cap = max(1, int(cap_us * 1e-6 / (beta * cb))) if cap_us < _INF else len(ok)
            if ok and tail[u] >> ok[0] & 1:
                cap = tail_cap
            ok = ok[:cap]
            mask = sum(1 << g for g in ok)
            dur = message_s(cb * len(ok), alpha, beta)
            key = (start, beta)
            if best is None or key < best[:2]:
                best = (start, beta, u, v, mask, dur, res, -1)
        if best is None:
            return None
        start, _, u, v, mask, dur, res, n = best
        if n >= 0:
            heads[n] += 1
        commit(u, v, mask, start, dur, res)
    return make_schedule(
        spec,
        transfers,
        "shared_nic",
        f"pieces={pieces} nic={list(nic_sizes)} recv={list(receivers)} cap={cap_us} sender={sender}",
    )


#: pieces per rank
_PIECES = 8
#: pieces in the last NIC message
_LAST = (4, 5, 6)
#: (first, second, last) receiving local positions
_RECEIVERS = ((0, 5, 5), (0, 1, 1), (0, 3, 5), (0, 1, 5))
#: NIC messages per peer node (the sender's own pieces, the bulk, the last ``_LAST`` pieces)
MESSAGES = 3


def nic_floor(topo: TopologyView, nbytes: float, messages: int = MESSAGES, pieces: int = _PIECES) -> float:
    """A floor on the time of any ``shared_nic_allgather`` of ``nbytes`` with ``messages`` NIC messages per
    peer node (inf unless ``shared_nic``): the sender's NIC carries its node's share of the output to every
    other node, ``(N-1) (n/N beta + messages alpha)`` at the price list's figures of that route, and after
    the last NIC message the other GPUs of the receiving node still need at least one piece of it over
    their fastest link (``alpha + beta n / (p pieces)``)."""
    if not shared_nic(topo):
        return _INF
    orders = node_orders(topo)
    nodes, local = len(orders), len(orders[0])
    nic = max((topo.route(orders[0][0], orders[m][0]) for m in range(1, nodes)), key=lambda e: e.time(nbytes))
    piece = nbytes / (topo.size * pieces)
    recv = orders[1][0]
    tail = min((topo.route(recv, v).time(piece) for v in orders[1] if v != recv), default=0.0)
    return (nodes - 1) * (message_s(nbytes / nodes, 0.0, nic.beta) + messages * nic.alpha) + (
        tail if local > 1 else 0.0
    )


def nic_candidates(topo: TopologyView, nbytes: float, best_s: float = _INF) -> list[Schedule]:
    """The settings worth simulating for an allgather of ``nbytes`` when the best schedule so far takes
    ``best_s``: none unless ``shared_nic`` and ``nic_floor`` is below ``best_s`` (which resource bounds this
    schedule: the shared NIC, with its alphas, plus the spread of its last message); else ``MESSAGES`` NIC
    messages (the sender's own pieces, the bulk, ``_LAST`` pieces) for each of ``_RECEIVERS``."""
    if not nic_floor(topo, nbytes) < best_s:
        return []
    local = len(node_orders(topo)[0])
    out = []
    for last in _LAST:
        sizes = (_PIECES, local * _PIECES - _PIECES - last, last)
        for recv in _RECEIVERS:
            sched = shared_nic_allgather(topo, nbytes, _PIECES, sizes, recv, cap_us=0.4, tail_cap=1)
            if sched is not None:
                out.append(sched)
    return out
