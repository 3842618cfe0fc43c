"""Baseline algorithms, as schedules over a topology view.

* ``ring`` — one ring (node by node, each node in its best ring order), the library default;
  ``ring2`` — two rings in opposite directions, each on half the data (two channels).
  ``ring_multi`` — one ring per NIC of a node, crossing nodes through different NICs (NCCL channels).
* ``dbtree`` — double binary tree (two complementary binary trees, each on half the data), pipelined in
  pieces (allreduce, broadcast).
* ``rhd`` — recursive halving (reduce-scatter) / doubling (allgather), Rabenseifner for allreduce;
  ``recursive_doubling`` — butterfly allreduce exchanging whole buffers (powers of two only).
* ``direct`` — every rank sends straight to every other (staggered); allreduce = direct reduce-scatter +
  direct allgather.
* ``hierarchical`` — several nodes: intra-node reduce-scatter, inter-node ring per rail, intra-node
  allgather (and the matching halves for allgather / reduce-scatter).
* ``two_step`` — alltoall through the rail peer: intra-node to the GPU with the destination's local index,
  then one message per remote node over the rail.
* ``chain`` (pipelined) and ``binomial`` — broadcast.

Pipelined baselines try a few piece counts and keep the fastest under the simulator for the given size.
Transfers carry ``prio`` = logical step; deps follow from it (``schedule.order_deps``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from shardwise.cluster.ring import best_ring
from shardwise.passes.collectives.chunks import CollectiveSpec
from shardwise.passes.collectives.schedule import Schedule, Transfer, make_schedule
from shardwise.passes.collectives.simulate import simulate
from shardwise.passes.collectives.topology import TopologyView

__all__ = ["ring_order", "node_orders", "baseline_schedules", "LIBRARY_ALGORITHMS", "BASELINE_NAMES"]

#: algorithms a collective library (NCCL/Gloo) runs natively
LIBRARY_ALGORITHMS = ("ring", "ring2", "ring_multi", "dbtree")
BASELINE_NAMES = (
    "ring", "ring2", "ring_multi", "dbtree", "rhd", "recursive_doubling", "direct", "hierarchical", "two_step", "chain",
    "binomial",
)  # fmt: skip
_PIECES = (1, 2, 4, 8, 16, 32)
_ORDERS: dict[str, list[list[int]]] = {}


def node_orders(topo: TopologyView) -> list[list[int]]:
    """Per node of the view (in node order): its local ranks in the best ring order."""
    cached = _ORDERS.get(topo.fingerprint)
    if cached is not None:
        return [list(o) for o in cached]
    index = {g: i for i, g in enumerate(topo.ranks)}
    out = []
    for _, members in sorted(topo.ranks_by_node().items()):
        order, _, _ = best_ring(topo.cluster, [topo.ranks[m] for m in members])
        out.append([index[g] for g in order])
    _ORDERS[topo.fingerprint] = [list(o) for o in out]
    return out


def ring_order(topo: TopologyView) -> list[int]:
    """A ring over every rank: node after node, each in its best ring order."""
    return [r for order in node_orders(topo) for r in order]


def _is_pow2(p: int) -> bool:
    return p >= 1 and p & (p - 1) == 0


# ----- ring helpers --------------------------------------------------------------------------------------


def _ring_ag(order: Sequence[int], segs: Sequence[Sequence[int]], prio0: float) -> list[Transfer]:
    """Allgather along ``order``: segment i starts at order[i] and reaches everyone in m-1 steps."""
    m = len(order)
    return [
        Transfer(order[(i + t) % m], order[(i + t + 1) % m], tuple(segs[i]), False, (), prio0 + t)
        for t in range(m - 1)
        for i in range(m)
        if segs[i]
    ]


def _ring_rs(order: Sequence[int], segs: Sequence[Sequence[int]], prio0: float) -> list[Transfer]:
    """Reduce-scatter along ``order``: segment i is reduced around the ring and ends at order[i]."""
    m = len(order)
    return [
        Transfer(order[(i + 1 + t) % m], order[(i + 2 + t) % m], tuple(segs[i]), True, (), prio0 + t)
        for t in range(m - 1)
        for i in range(m)
        if segs[i]
    ]


def _ring(kind: str, p: int, order: Sequence[int], channels: int) -> Schedule:
    spec = CollectiveSpec(kind, p, channels)
    transfers: list[Transfer] = []
    for j in range(channels):
        o = list(order) if j % 2 == 0 else list(reversed(order))
        segs = [[o[i] * channels + j] for i in range(p)]
        if kind == "allgather":
            transfers += _ring_ag(o, segs, 0)
        elif kind == "reduce_scatter":
            transfers += _ring_rs(o, segs, 0)
        else:
            transfers += _ring_rs(o, segs, 0) + _ring_ag(o, segs, p - 1)
    name = "ring" if channels == 1 else f"ring{channels}"
    return make_schedule(spec, transfers, name, f"order={list(order)}")


def _ring_multi(kind: str, topo: TopologyView) -> Schedule | None:
    """One ring per NIC of a node (NCCL channels): ring j enters every node at its j-th GPU in ring order,
    so the rings cross between nodes through different NICs. None for one node or one NIC per node."""
    orders = node_orders(topo)
    nics = {
        topo.cluster.nics_of(topo.ranks[r])[0].name for r in orders[0] if topo.cluster.nics_of(topo.ranks[r])
    }
    channels = len(nics)
    if len(orders) < 2 or channels < 2 or len({len(o) for o in orders}) != 1:
        return None
    per = len(orders[0])
    p = topo.size
    spec = CollectiveSpec(kind, p, channels)
    transfers: list[Transfer] = []
    for j in range(channels):
        shift = (j * per) // channels
        o = [r for order in orders for r in order[shift:] + order[:shift]]
        segs = [[o[i] * channels + j] for i in range(p)]
        if kind == "allgather":
            transfers += _ring_ag(o, segs, 0)
        elif kind == "reduce_scatter":
            transfers += _ring_rs(o, segs, 0)
        else:
            transfers += _ring_rs(o, segs, 0) + _ring_ag(o, segs, p - 1)
    return make_schedule(spec, transfers, "ring_multi", f"channels={channels}")


def _ring_broadcast(p: int, root: int, order: Sequence[int], pieces: int) -> Schedule:
    """Pipelined chain from the root along the ring."""
    spec = CollectiveSpec("broadcast", p, pieces, root)
    k = list(order).index(root)
    o = list(order[k:]) + list(order[:k])
    transfers = [
        Transfer(o[h], o[h + 1], (q,), False, (), q + h) for q in range(pieces) for h in range(p - 1)
    ]
    return make_schedule(spec, transfers, "chain", f"pieces={pieces}")


# ----- trees ---------------------------------------------------------------------------------------------


def _heap_tree(order: Sequence[int]) -> tuple[dict[int, int], dict[int, list[int]]]:
    """Binary heap tree over ``order`` (root order[0]): parent map and children lists."""
    parent: dict[int, int] = {}
    children: dict[int, list[int]] = {r: [] for r in order}
    for i in range(1, len(order)):
        parent[order[i]] = order[(i - 1) // 2]
        children[order[(i - 1) // 2]].append(order[i])
    return parent, children


def _heights(root: int, children: dict[int, list[int]]) -> tuple[dict[int, int], dict[int, int]]:
    height: dict[int, int] = {}
    depth: dict[int, int] = {root: 0}
    order = [root]
    for r in order:
        for ch in children[r]:
            depth[ch] = depth[r] + 1
            order.append(ch)
    for r in reversed(order):
        height[r] = 1 + max((height[ch] for ch in children[r]), default=-1)
    return height, depth


def _dbtree(kind: str, p: int, order: Sequence[int], pieces: int, root: int = 0) -> Schedule:
    """Two binary trees, each on half the chunks, pipelined in ``pieces`` pieces per tree."""
    c = 2 * pieces
    spec = CollectiveSpec(kind, p, c if kind == "allreduce" else c, root)
    if kind == "broadcast":
        k = list(order).index(root)
        base = list(order[k:]) + list(order[:k])
        rest = base[1:]
        orders = [base, [root] + rest[len(rest) // 2 :] + rest[: len(rest) // 2]]
    else:
        orders = [list(order), list(order[p // 2 :]) + list(order[: p // 2])]
    transfers: list[Transfer] = []
    for j, o in enumerate(orders):
        parent, children = _heap_tree(o)
        height, depth = _heights(o[0], children)
        top = height[o[0]]
        for q in range(pieces):
            if kind == "broadcast":
                chunks = (2 * q + j,)
            else:
                chunks = tuple(g for g in range(p * c) if g % c == 2 * q + j)
            if kind == "allreduce":
                for r, par in parent.items():
                    transfers.append(Transfer(r, par, chunks, True, (), q + height[r]))
            for r, par in parent.items():
                transfers.append(Transfer(par, r, chunks, False, (), q + top + depth[par]))
    return make_schedule(spec, transfers, "dbtree", f"pieces={pieces}")


def _binomial(p: int, root: int, order: Sequence[int]) -> Schedule:
    spec = CollectiveSpec("broadcast", p, 1, root)
    k = list(order).index(root)
    o = list(order[k:]) + list(order[:k])
    transfers = []
    step, have = 0, 1
    while have < p:
        for i in range(min(have, p - have)):
            transfers.append(Transfer(o[i], o[i + have], (0,), False, (), step))
        have *= 2
        step += 1
    return make_schedule(spec, transfers, "binomial")


# ----- recursive halving / doubling ----------------------------------------------------------------------


def _rhd(kind: str, p: int, order: Sequence[int]) -> Schedule | None:
    if not _is_pow2(p) or p < 2:
        return None
    spec = CollectiveSpec(kind, p, 1)
    o = list(order)
    logp = p.bit_length() - 1
    transfers: list[Transfer] = []
    prio = 0
    if kind in ("reduce_scatter", "allreduce"):
        for s in reversed(range(logp)):
            d = 1 << s
            for i in range(p):
                j = i ^ d
                lo = (j >> s) << s  # partner's half of the current range: positions sharing j's high bits
                transfers.append(Transfer(o[i], o[j], tuple(o[x] for x in range(lo, lo + d)), True, (), prio))
            prio += 1
    if kind in ("allgather", "allreduce"):
        for s in range(logp):
            d = 1 << s
            for i in range(p):
                lo = (i >> s) << s
                transfers.append(
                    Transfer(o[i], o[i ^ d], tuple(o[x] for x in range(lo, lo + d)), False, (), prio)
                )
            prio += 1
    return make_schedule(spec, transfers, "rhd")


def _butterfly(p: int, order: Sequence[int]) -> Schedule | None:
    if not _is_pow2(p) or p < 2:
        return None
    spec = CollectiveSpec("allreduce", p, 1)
    o = list(order)
    every = tuple(range(p))
    transfers = [
        Transfer(o[i], o[i ^ (1 << s)], every, True, (), s)
        for s in range(p.bit_length() - 1)
        for i in range(p)
    ]
    return make_schedule(spec, transfers, "recursive_doubling")


# ----- direct --------------------------------------------------------------------------------------------


def _direct(kind: str, p: int) -> Schedule:
    spec = CollectiveSpec(kind, p, 1)
    t: list[Transfer] = []
    if kind == "alltoall":
        t = [
            Transfer(s, (s + k) % p, (s * p + (s + k) % p,), False, (), k - 1)
            for k in range(1, p)
            for s in range(p)
        ]
    if kind in ("reduce_scatter", "allreduce"):
        t += [
            Transfer(s, (s + k) % p, ((s + k) % p,), True, (), k - 1) for k in range(1, p) for s in range(p)
        ]
    if kind in ("allgather", "allreduce"):
        base = p - 1 if kind == "allreduce" else 0
        t += [Transfer(s, (s + k) % p, (s,), False, (), base + k - 1) for k in range(1, p) for s in range(p)]
    return make_schedule(spec, t, "direct")


# ----- hierarchical --------------------------------------------------------------------------------------


def _hierarchical(kind: str, topo: TopologyView) -> Schedule | None:
    orders = node_orders(topo)
    sizes = {len(o) for o in orders}
    if len(orders) < 2 or len(sizes) != 1:
        return None
    p, nodes, per = topo.size, len(orders), len(orders[0])
    spec = CollectiveSpec(kind, p, 1)
    rails = [[orders[n][i] for n in range(nodes)] for i in range(per)]
    rail_chunks = [[r for r in rail] for rail in rails]  # chunk g = home rank (c = 1)
    transfers: list[Transfer] = []
    if kind == "allgather":
        for rail in rails:
            transfers += _ring_ag(rail, [[r] for r in rail], 0)
        for o in orders:
            transfers += _ring_ag(o, rail_chunks, nodes - 1)
    else:
        for o in orders:
            transfers += _ring_rs(o, rail_chunks, 0)
        for rail in rails:
            transfers += _ring_rs(rail, [[r] for r in rail], per - 1)
        if kind == "allreduce":
            for rail in rails:
                transfers += _ring_ag(rail, [[r] for r in rail], per - 1 + nodes - 1)
            for o in orders:
                transfers += _ring_ag(o, rail_chunks, per - 1 + 2 * (nodes - 1))
    return make_schedule(spec, transfers, "hierarchical")


def _two_step(topo: TopologyView) -> Schedule | None:
    orders = node_orders(topo)
    if len(orders) < 2 or len({len(o) for o in orders}) != 1:
        return None
    p, nodes, per = topo.size, len(orders), len(orders[0])
    spec = CollectiveSpec("alltoall", p, 1)
    transfers: list[Transfer] = []
    for o in orders:
        for i, s in enumerate(o):
            for k in range(1, per):
                j = (i + k) % per
                chunks = tuple(s * p + orders[m][j] for m in range(nodes))
                transfers.append(Transfer(s, o[j], chunks, False, (), k - 1))
    for n, o in enumerate(orders):
        for j, relay in enumerate(o):
            for k in range(1, nodes):
                m = (n + k) % nodes
                d = orders[m][j]
                chunks = tuple(sorted(s * p + d for s in o))
                transfers.append(Transfer(relay, d, chunks, False, (), per - 1 + k - 1))
    return make_schedule(spec, transfers, "two_step")


# ----- entry point ---------------------------------------------------------------------------------------


def _best_pipelined(make: Callable[[int], Schedule], topo: TopologyView, nbytes: float) -> Schedule:
    best: tuple[float, Schedule] | None = None
    for pieces in _PIECES:
        sched = make(pieces)
        t = simulate(sched, topo, nbytes).time
        if best is None or t < best[0]:
            best = (t, sched)
    assert best is not None
    return best[1]


def baseline_schedules(kind: str, topo: TopologyView, nbytes: float, root: int = 0) -> dict[str, Schedule]:
    """Every baseline that applies to ``kind`` on ``topo``: name -> schedule (pipelining tuned to nbytes)."""
    p = topo.size
    if p < 2:
        return {}
    order = ring_order(topo)
    out: dict[str, Schedule | None] = {}
    if kind in ("allgather", "reduce_scatter", "allreduce"):
        out["ring"] = _ring(kind, p, order, 1)
        if p > 2:
            out["ring2"] = _ring(kind, p, order, 2)
        out["ring_multi"] = _ring_multi(kind, topo)
        out["rhd"] = _rhd(kind, p, order)
        out["direct"] = _direct(kind, p)
        out["hierarchical"] = _hierarchical(kind, topo)
    if kind == "allreduce":
        out["dbtree"] = _best_pipelined(lambda k: _dbtree(kind, p, order, k), topo, nbytes)
        out["recursive_doubling"] = _butterfly(p, order)
    if kind == "alltoall":
        out["direct"] = _direct(kind, p)
        out["two_step"] = _two_step(topo)
    if kind == "broadcast":
        out["chain"] = _best_pipelined(lambda k: _ring_broadcast(p, root, order, k), topo, nbytes)
        out["dbtree"] = _best_pipelined(lambda k: _dbtree(kind, p, order, k, root), topo, nbytes)
        out["binomial"] = _binomial(p, root, order)
    return {k: v for k, v in out.items() if v is not None}
