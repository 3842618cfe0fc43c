"""The (alpha, beta) a collective library's ring achieves over a group of ranks.

Model (what NCCL/Gloo rings do, reduced to one alpha and one beta per group):

* Ranks are visited node by node. Inside a node the ring takes the best order of the group's ranks there
  (brute force up to 8 ranks, so NDv2's cube-mesh rides its double NVLinks); the node's (alpha, beta) is the
  slowest hop of that closed ring, each hop being the cheapest p2p route (see ``routing``).
* A group spanning nodes also crosses the network once per node and ring. A library runs one ring per NIC
  the group can use (NCCL channels), so with ``c`` distinct NICs per node (the least over the group's nodes)
  the crossing rate is ``c`` times the rate of one crossing.
* NIC sharing: plans are SPMD, so every GPU of a node takes part in some group of the same mesh dimension at
  the same time. A NIC serving ``s`` GPUs, ``m`` of them in this group, is shared by ``s/m`` such groups, and
  one crossing gets ``m/s`` of the NIC's bandwidth. (NDv2: 8 GPUs on one NIC, so a group holding one GPU per
  node gets 1/8 of it; DGX-A100: one NIC per GPU, no sharing.)
* The group's alpha and beta are the largest over its intra-node rings and its network crossings.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shardwise.cluster.spec import ClusterSpec

__all__ = ["check_ranks", "group_alpha_beta", "best_ring", "BRUTE_FORCE_RING_MAX"]

#: rings over up to this many ranks of one node are searched exhaustively ((k-1)! orders)
BRUTE_FORCE_RING_MAX = 8


def check_ranks(spec: ClusterSpec, ranks: Iterable[int]) -> tuple[int, ...]:
    """The ranks as a tuple of ints (numpy integers accepted); ValueError if out of range or repeated."""
    out = []
    for r in ranks:
        try:
            rank = operator.index(r) if not isinstance(r, bool) else None
        except TypeError:
            rank = None
        if rank is None or not 0 <= rank < spec.world_size:
            raise ValueError(f"rank {r!r} is not a rank of cluster {spec.name!r} (0..{spec.world_size - 1})")
        out.append(rank)
    if len(set(out)) != len(out):
        raise ValueError(f"ranks {out} repeat a rank; a group holds each rank once")
    return tuple(out)


def _ring_cost(spec: ClusterSpec, order: Sequence[int]) -> tuple[float, float]:
    """(max beta, max alpha) over the hops of the closed ring ``order``."""
    alpha = beta = 0.0
    for i, a in enumerate(order):
        b = order[(i + 1) % len(order)]
        ha, hb = spec.p2p_alpha_beta(a, b)
        alpha = max(alpha, ha)
        beta = max(beta, hb)
    return beta, alpha


def best_ring(spec: ClusterSpec, ranks: Sequence[int]) -> tuple[tuple[int, ...], float, float]:
    """The best closed ring over ``ranks`` (one node's): (order, alpha, beta), least beta then alpha."""
    ranks = tuple(sorted(ranks))
    if len(ranks) < 2:
        return ranks, 0.0, 0.0
    pairs = {spec.p2p_alpha_beta(a, b) for a in ranks for b in ranks if a != b}
    if len(pairs) == 1 or len(ranks) > BRUTE_FORCE_RING_MAX:
        # Uniform (switch) or too many to search: any order is as good as the sorted one we take.
        beta, alpha = _ring_cost(spec, ranks)
        return ranks, alpha, beta
    first, rest = ranks[0], ranks[1:]
    best: tuple[tuple[float, float], tuple[int, ...]] | None = None
    for perm in itertools.permutations(rest):
        order = (first, *perm)
        cost = _ring_cost(spec, order)
        if best is None or cost < best[0]:
            best = (cost, order)
    assert best is not None
    (beta, alpha), order = best
    return order, alpha, beta


def _first_nic(spec: ClusterSpec, hops: Sequence[str]) -> str | None:
    names = spec.nic_names
    return next((h for h in hops if h in names), None)


def group_alpha_beta(spec: ClusterSpec, ranks: Sequence[int]) -> tuple[float, float]:
    """(alpha s, beta s/byte) of a library ring over ``ranks``; (0, 0) for fewer than two ranks."""
    group = check_ranks(spec, ranks)
    if len(group) < 2:
        return 0.0, 0.0
    by_node: dict[int, list[int]] = {}
    for r in sorted(group):
        by_node.setdefault(spec.node_of(r), []).append(r)
    alpha = beta = 0.0
    for members in by_node.values():
        _, a, b = best_ring(spec, members)
        alpha, beta = max(alpha, a), max(beta, b)
    if len(by_node) < 2:
        return alpha, beta

    nodes = list(by_node)
    nic_by_name = {nic.name: nic for nic in spec.nics}
    rings = None
    crossing_rate = float("inf")
    for i, node in enumerate(nodes):
        target = by_node[nodes[(i + 1) % len(nodes)]][0]
        users: dict[str, list[float]] = {}
        for r in by_node[node]:
            route = spec.p2p_route(r, target)
            alpha = max(alpha, route.alpha)
            nic = _first_nic(spec, route.hops) or f"<direct from g{r}>"
            users.setdefault(nic, []).append(1.0 / route.beta)
        for nic_name, rates in users.items():
            m = len(rates)
            nic = nic_by_name.get(nic_name)
            s = max(len(nic.devices), m) if nic is not None else m
            crossing_rate = min(crossing_rate, min(rates) * m / s)
        rings = len(users) if rings is None else min(rings, len(users))
    assert rings is not None
    beta = max(beta, 1.0 / (rings * crossing_rate))
    return alpha, beta
