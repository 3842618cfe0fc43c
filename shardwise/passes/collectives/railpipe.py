"""Rail-pipelined allgather for switched multi-node clusters (a NIC per GPU or per few GPUs, a switch per node).

Every rank cuts its chunk into ``pieces`` pieces. Inter-node: each rank sends its pieces to the ranks with
the same local position on every other node (its *rail*), in messages of ``nic_groups`` pieces (group after
group, each group to every rail peer before the next one), so the NICs are busy from time zero. These NIC
messages are simulated alone to know when each arrives (a NIC shared by several GPUs carries theirs in
turn). Intra-node, each rank's switch port forwards to every peer of its node the rail pieces that have
arrived, and fills the time while it waits for the NICs with its own pieces (in messages of ``own_group``
pieces). The last NIC messages are the small ones, so the forwarding tail after the NICs are done is short.
Two policies build the switch messages (both are offered; ``simulate`` decides):

* ``rounds`` — each rank, on its own timeline, sends one message to every peer in turn carrying all the
  pieces that had arrived when the round began (few alphas; right when the ranks of a node are in step);
* ``greedy`` — event-driven list scheduling over all ports of the node (below, ``_greedy_forwards``):
  right when they are not, e.g. when GPUs share a NIC and their pieces arrive at different times.

Each transfer's ``prio`` is its (estimated) start time, and deps are completed from it (``make_schedule``):
``simulate`` gives the time and ``verify`` the correctness.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Sequence

from shardwise.passes.collectives.baselines import node_orders
from shardwise.passes.collectives.chunks import CollectiveSpec
from shardwise.passes.collectives.schedule import Schedule, Transfer, make_schedule
from shardwise.passes.collectives.simulate import simulate
from shardwise.passes.collectives.topology import TopologyView

__all__ = ["rail_allgather", "rail_candidates", "POLICIES"]

#: per rank, when each NIC message it receives arrives and the chunks it carries
Arrivals = dict[int, list[tuple[float, tuple[int, ...]]]]


def _groups(pieces: int, sizes: Sequence[int]) -> list[list[int]]:
    out, k = [], 0
    for s in sizes:
        if k >= pieces:
            break
        out.append(list(range(k, min(pieces, k + s))))
        k += s
    if k < pieces:
        out.append(list(range(k, pieces)))
    return out


#: the switch policies (see the module docstring)
POLICIES = ("rounds", "greedy")


def rail_allgather(
    topo: TopologyView,
    nbytes: float,
    pieces: int,
    nic_sizes: Sequence[int],
    own_group: int,
    policy: str = "rounds",
) -> Schedule | None:
    """The rail-pipelined allgather (see the module docstring); None unless the nodes have equal rank
    counts (at least 2 nodes, at least 2 ranks each)."""
    if policy not in POLICIES:
        raise ValueError(f"unknown switch policy {policy!r}; one of {POLICIES}")
    orders = node_orders(topo)
    if len(orders) < 2 or len({len(o) for o in orders}) != 1 or len(orders[0]) < 2:
        return None
    p, nodes = topo.size, len(orders)
    spec = CollectiveSpec("allgather", p, pieces)
    cb = spec.chunk_bytes(nbytes)
    where = {r: (n, i) for n, o in enumerate(orders) for i, r in enumerate(o)}
    groups = _groups(pieces, nic_sizes)
    nic: list[Transfer] = []
    for r, (n, i) in where.items():
        # inter-node: group-major to every rail peer, in the order of r's own timeline
        t = 0.0
        for grp in groups:
            for j in range(1, nodes):
                dst = orders[(n + j) % nodes][i]
                e = topo.route(r, dst)
                nic.append(Transfer(r, dst, tuple(r * pieces + k for k in grp), False, (), t))
                t += e.time(cb * len(grp))
    # when each NIC message arrives, simulated alone (a NIC shared by several ranks carries theirs in turn)
    nic_times = simulate(Schedule(spec, tuple(nic), "rail_nic"), topo, nbytes)
    transfers = [
        Transfer(t.src, t.dst, t.chunks, False, (), start)
        for t, start in zip(nic, nic_times.start, strict=True)
    ]
    arrivals: Arrivals = {r: [] for r in where}
    for t, end in zip(nic, nic_times.end, strict=True):
        arrivals[t.dst].append((end, t.chunks))
    for lst in arrivals.values():
        lst.sort()
    forwards = _greedy_forwards if policy == "greedy" else _round_forwards
    transfers += forwards(topo, orders, cb, pieces, arrivals, own_group)
    return make_schedule(
        spec, transfers, "rail_pipe", f"pieces={pieces} nic={list(nic_sizes)} own={own_group} {policy}"
    )


#: (pieces, NIC message sizes in pieces per round): a large first round, then geometrically smaller
#: ones, so that forwarding the last NIC messages over the switch takes little after the NICs are done
_SETTINGS = (
    (16, (10, 4, 2)),
    (16, (12, 3, 1)),
    (16, (13, 3)),
    (16, (11, 4, 1)),
    (32, (22, 7, 2, 1)),
    (32, (24, 6, 2)),
)


def rail_candidates(topo: TopologyView, nbytes: float) -> list[Schedule]:
    """The settings worth simulating (``_SETTINGS``, own pieces in one message or in four, both switch
    policies)."""
    out = []
    for pieces, nic in _SETTINGS:
        for own in (pieces, pieces // 4):
            for policy in POLICIES:
                s = rail_allgather(topo, nbytes, pieces, nic, own, policy)
                if s is None:
                    return []
                out.append(s)
    return out


def _round_forwards(
    topo: TopologyView,
    orders: Sequence[Sequence[int]],
    chunk_bytes: float,
    pieces: int,
    arrivals: Arrivals,
    own_group: int,
) -> list[Transfer]:
    """The intra-node messages in rounds, each rank on its own timeline (``rounds`` in the module
    docstring): a round carries every piece arrived when it begins, else the next ``own_group`` own
    pieces, to every peer in the rank's rotation order."""
    out: list[Transfer] = []
    for order in orders:
        per = len(order)
        for i, r in enumerate(order):
            arrived = arrivals[r]
            peers = [order[(i + k) % per] for k in range(1, per)]
            own = [r * pieces + k for k in range(pieces)]
            clock, a = 0.0, 0
            pending: list[int] = []
            while a < len(arrived) or pending or own:
                while a < len(arrived) and arrived[a][0] <= clock + 1e-12:
                    pending.extend(arrived[a][1])
                    a += 1
                if pending:
                    bundle, pending = tuple(pending), []
                elif own:
                    bundle, own = tuple(own[:own_group]), own[own_group:]
                else:
                    clock = arrived[a][0]
                    continue
                for dst in peers:
                    e = topo.route(r, dst)
                    # prio just after the estimated arrival time keeps the NIC write before this read
                    out.append(Transfer(r, dst, bundle, False, (), clock + 1e-9))
                    clock += e.time(chunk_bytes * len(bundle))
    return out


def _greedy_forwards(
    topo: TopologyView,
    orders: Sequence[Sequence[int]],
    chunk_bytes: float,
    pieces: int,
    arrivals: Arrivals,
    own_group: int,
) -> list[Transfer]:
    """The intra-node messages, by event-driven list scheduling on the switch ports.

    Every rank must send to every peer of its node its own pieces (there from time zero) and the pieces
    its NIC received (there from their arrival). Repeatedly, the (rank, peer) message that can start
    earliest is placed (its route's resources free, its data there); it carries every received piece that
    rank has for that peer by then, or else its next ``own_group`` own pieces. Ties go to received pieces
    (they hold up the tail), then to the rank's rotation order of peers. ``prio`` is the start time, so
    ``simulate`` reproduces this timing.
    """
    free: dict[int, float] = {}
    # per (rank, peer): index of the next arrival to forward, and own pieces still to send
    next_arrival: dict[tuple[int, int], int] = {}
    own_left: dict[tuple[int, int], list[int]] = {}
    peers: dict[int, list[int]] = {}
    for order in orders:
        per = len(order)
        for i, r in enumerate(order):
            peers[r] = [order[(i + k) % per] for k in range(1, per)]
            for dst in peers[r]:
                next_arrival[(r, dst)] = 0
                own_left[(r, dst)] = [r * pieces + k for k in range(pieces)]
    routes = {(r, d): topo.route(r, d) for r in peers for d in peers[r]}
    rotation = {(r, d): k for r in peers for k, d in enumerate(peers[r])}
    users: dict[int, list[tuple[int, int]]] = defaultdict(list)  # resource -> keys whose route holds it
    for key, e in routes.items():
        for x in e.resources:
            users[x].append(key)

    def candidate(key: tuple[int, int]) -> tuple | None:
        arr, a, own = arrivals[key[0]], next_arrival[key], own_left[key]
        if a >= len(arr) and not own:
            return None
        ready = max((free.get(x, 0.0) for x in routes[key].resources), default=0.0)
        forward = a < len(arr) and (arr[a][0] <= ready + 1e-12 or not own)
        start = max(ready, arr[a][0]) if forward else ready
        return (start, not forward, rotation[key], key)

    heap = [c for c in map(candidate, routes) if c is not None]
    heapq.heapify(heap)
    current = {c[3]: c for c in heap}
    out: list[Transfer] = []
    while heap:
        best = heapq.heappop(heap)
        key = best[3]
        if current.get(key) != best:
            continue  # stale: the key was re-evaluated since
        start, own_only = best[0], best[1]
        r, dst = key
        if own_only:
            bundle = tuple(own_left[key][:own_group])
            own_left[key] = own_left[key][own_group:]
        else:
            arr, a = arrivals[r], next_arrival[key]
            chunks: list[int] = []
            while a < len(arr) and arr[a][0] <= start + 1e-12:
                chunks.extend(arr[a][1])
                a += 1
            next_arrival[key] = a
            bundle = tuple(chunks)
        e = routes[key]
        # prio just after the start keeps the NIC write (earlier prio) before this read
        out.append(Transfer(r, dst, bundle, False, (), start + 1e-9))
        changed = {key}
        for x in e.resources:
            free[x] = start + e.time(chunk_bytes * len(bundle))
            changed.update(users[x])
        for k in changed:
            c = candidate(k)
            if c is None:
                current.pop(k, None)
            else:
                current[k] = c
                heapq.heappush(heap, c)
    return out
