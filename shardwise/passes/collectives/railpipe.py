"""Rail-pipelined allgather for switched multi-node clusters (one NIC per GPU, an NVSwitch per node).

Every rank cuts its chunk into ``pieces`` pieces. Inter-node: each rank sends its pieces to the ranks with
the same local position on every other node (its *rail*), in messages of ``nic_groups`` pieces (group after
group, each group to every rail peer before the next one), so the NICs are busy from time zero. Intra-node:
each rank's switch port forwards, to every peer of its node, the rail pieces that have arrived (bundled into
one message per peer: few alphas), and fills the time while it waits for the NICs with its own pieces (in
messages of ``own_group`` pieces). The last NIC messages are the small ones, so the forwarding tail after
the NICs are done is short.

Each transfer's ``prio`` is its start time estimated by a per-rank greedy timeline (the node's ranks are
symmetric), and deps are completed from it (``make_schedule``): the order is only a heuristic, ``simulate``
gives the time and ``verify`` the correctness.
"""

from __future__ import annotations

from collections.abc import Sequence

from shardwise.passes.collectives.baselines import node_orders
from shardwise.passes.collectives.chunks import CollectiveSpec
from shardwise.passes.collectives.schedule import Schedule, Transfer, make_schedule
from shardwise.passes.collectives.topology import TopologyView

__all__ = ["rail_allgather", "rail_candidates"]


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


def rail_allgather(
    topo: TopologyView, nbytes: float, pieces: int, nic_sizes: Sequence[int], own_group: int
) -> Schedule | None:
    """The rail-pipelined allgather (see the module docstring); None unless the nodes have equal rank
    counts (at least 2 nodes, at least 2 ranks each)."""
    orders = node_orders(topo)
    if len(orders) < 2 or len({len(o) for o in orders}) != 1 or len(orders[0]) < 2:
        return None
    p, nodes, per = topo.size, len(orders), len(orders[0])
    spec = CollectiveSpec("allgather", p, pieces)
    cb = spec.chunk_bytes(nbytes)
    where = {r: (n, i) for n, o in enumerate(orders) for i, r in enumerate(o)}
    groups = _groups(pieces, nic_sizes)
    transfers: list[Transfer] = []
    for r, (n, i) in where.items():
        # inter-node: group-major to every rail peer, timeline of r's NIC
        t = 0.0
        for grp in groups:
            for j in range(1, nodes):
                dst = orders[(n + j) % nodes][i]
                e = topo.route(r, dst)
                transfers.append(Transfer(r, dst, tuple(r * pieces + k for k in grp), False, (), t))
                t += e.alpha + e.beta * cb * len(grp)
    # arrivals at a rank (symmetric: what r sends to node n+j at time t, r receives from node n-j at t)
    for r, (n, i) in where.items():
        arrivals: list[tuple[float, tuple[int, ...]]] = []
        t = 0.0
        for grp in groups:
            for j in range(1, nodes):
                src = orders[(n - j) % nodes][i]
                e = topo.route(src, r)
                t += e.alpha + e.beta * cb * len(grp)
                arrivals.append((t, tuple(src * pieces + k for k in grp)))
        peers = [orders[n][(i + k) % per] for k in range(1, per)]
        own = [r * pieces + k for k in range(pieces)]
        clock, a = 0.0, 0
        pending: list[int] = []
        while a < len(arrivals) or pending or own:
            while a < len(arrivals) and arrivals[a][0] <= clock + 1e-12:
                pending.extend(arrivals[a][1])
                a += 1
            if pending:
                bundle, pending = tuple(pending), []
            elif own:
                bundle, own = tuple(own[:own_group]), own[own_group:]
            else:
                clock = arrivals[a][0]
                continue
            for dst in peers:
                e = topo.route(r, dst)
                # prio just after the estimated arrival time keeps the NIC write before this read
                transfers.append(Transfer(r, dst, bundle, False, (), clock + 1e-9))
                clock += e.alpha + e.beta * cb * len(bundle)
    return make_schedule(
        spec, transfers, "rail_pipe", f"pieces={pieces} nic={list(nic_sizes)} own={own_group}"
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
    """The settings worth simulating (``_SETTINGS``, own pieces in one message or in four)."""
    out = []
    for pieces, nic in _SETTINGS:
        for own in (pieces, pieces // 4):
            s = rail_allgather(topo, nbytes, pieces, nic, own)
            if s is None:
                return []
            out.append(s)
    return out
