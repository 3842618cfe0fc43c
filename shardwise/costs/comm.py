"""Collective and point-to-point times: the only place a message becomes seconds.

A library collective over a group of ranks is priced in closed form from the group's (alpha, beta)
(``ClusterSpec.group_alpha_beta``: the slowest hop of the library's ring, NIC sharing included), with the
achieved bus-bandwidth fraction of the cluster's ``efficiency`` (``intra_node`` inside one node, ``inter_node``
across nodes) dividing the bandwidth, plus the library's fixed cost per call (``collective_overhead_s``).
``n`` is the full buffer in bytes (for allgather/reduce_scatter the gathered size), ``p`` the group size:

* ring allreduce:                 2 (p-1) (alpha + beta n/p)
* ring allgather, reduce_scatter:   (p-1) (alpha + beta n/p)
* alltoall (pairwise exchange, each rank sends n/p to every other rank): inside a node
  (l-1) (alpha + beta n/p) at the node's (alpha, beta); a group spanning nodes also sends (p-l) n/p per
  rank through its NIC, shared by the m ranks of the group that NIC serves, while the node's own peers
  are served over the node's links at the same time: max(inside, (p-l) (alpha_x + m beta_x n/p)) with
  (alpha_x, beta_x) the route to another node (see :meth:`CommPrices.alltoall_s`);
* broadcast, reduce (pipelined ring of k chunks): (p-2+k) (alpha + beta n/k), k >= 1 the best integer
  (about sqrt((p-2) beta n / alpha)); for p = 2 that is alpha + beta n;
* tree allreduce (NCCL's double binary tree, used across nodes): 2 ceil(log2 p) alpha + 2 beta n (each rank
  sends and receives the buffer once up the tree and once down, spread over two trees);
* PAT allgather / reduce_scatter (NCCL >= 2.23, one rank per node): ceil(log2 p) alpha + (p-1)/p beta n.

The library picks the fastest algorithm it offers for the group (``algorithms``): rings everywhere (all-to-all is
pairwise exchange, not a ring); the tree
for allreduce and PAT for allgather/reduce_scatter only across nodes, where NCCL offers them. Gloo (CPU
clusters) has no reduce-scatter: the runtime library all-reduces the whole buffer and keeps its slice, so a
reduce-scatter there costs an allreduce. Sources: the
ring step counts are NCCL's performance notes (nccl-tests doc/PERFORMANCE.md: algbw = busbw n / nsteps,
nsteps 2(n-1) for allreduce, n-1 for allgather); the tree and PAT forms follow NVIDIA's descriptions of those
algorithms (NCCL 2.4 double binary trees; NCCL 2.23 PAT, logarithmic steps). A group of one rank costs 0.

A point-to-point message costs alpha + beta n on its route (``ClusterSpec.p2p_alpha_beta``), beta divided by
the same bandwidth fraction (:func:`route_alpha_beta`).

Synthesized schedules (the hook for ``passes.collectives``): a schedule's time is an absolute time from the
synthesizer's simulator, which prices each of its messages with :func:`message_s` at the figures
:func:`route_alpha_beta` gives its route (so one message alone costs what :meth:`CommPrices.p2p_s` says), plus
contention (a resource carries one message at a time). :meth:`CommPrices.schedule_s` turns that simulated
time into the price of one call: the schedule runs as one call of the runtime's schedule executor, so it pays
the library's fixed per-call cost once, like a library collective.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from shardwise.cluster import ClusterSpec

__all__ = [
    "COLLECTIVES", "FREE_STEPS", "ring_s", "pipelined_ring_s", "tree_allreduce_s", "pat_s", "message_s",
    "route_alpha_beta", "CommPrices",
]  # fmt: skip

COLLECTIVES = ("allreduce", "allgather", "reduce_scatter", "alltoall", "broadcast", "reduce")
#: redistribution steps that move no data between ranks (a local slice, a partial-sum marker)
FREE_STEPS = ("slice", "to_partial", "none", "")


def message_s(nbytes: float, alpha: float, beta: float) -> float:
    """One message of ``nbytes`` over a link or route of latency ``alpha`` and inverse bandwidth ``beta``."""
    return alpha + beta * nbytes


def route_alpha_beta(cluster: ClusterSpec, alpha: float, beta: float, internode: bool) -> tuple[float, float]:
    """(alpha, beta) the price list charges per message on a route whose link figures are (``alpha``,
    ``beta``): the beta divided by the achieved bandwidth fraction of the cluster (``inter_node`` for a route
    between nodes, ``intra_node`` inside one). Point-to-point messages and the synthesizer's edges use it."""
    eff = cluster.efficiency.inter_node if internode else cluster.efficiency.intra_node
    return alpha, beta / eff


def pipelined_ring_s(p: int, nbytes: float, alpha: float, beta: float) -> float:
    """Least (p-2+k)(alpha + beta n/k) over integers 1 <= k <= max(1, n)."""
    if p < 2:
        return 0.0
    if nbytes <= 0:
        return (p - 1) * alpha

    def t(k: int) -> float:
        return (p - 2 + k) * (alpha + beta * nbytes / k)

    if alpha <= 0:
        return t(max(1, int(nbytes)))
    k_star = math.sqrt((p - 2) * beta * nbytes / alpha)
    hi = max(1, int(nbytes))
    candidates = {1, hi, min(hi, max(1, math.floor(k_star))), min(hi, max(1, math.ceil(k_star)))}
    return min(t(k) for k in candidates)


def ring_s(collective: str, nbytes: float, p: int, alpha: float, beta: float) -> float:
    """Seconds for a ring ``collective`` of ``nbytes`` over ``p`` ranks at (alpha, beta)."""
    if collective not in COLLECTIVES:
        raise ValueError(f"unknown collective {collective!r}: use one of {', '.join(COLLECTIVES)}")
    if nbytes < 0:
        raise ValueError(f"collective size {nbytes} bytes is negative; sizes are >= 0 bytes")
    if p < 2:
        return 0.0
    step = alpha + beta * nbytes / p
    if collective == "allreduce":
        return 2 * (p - 1) * step
    if collective in ("allgather", "reduce_scatter", "alltoall"):
        return (p - 1) * step
    return pipelined_ring_s(p, nbytes, alpha, beta)


def tree_allreduce_s(nbytes: float, p: int, alpha: float, beta: float) -> float:
    """NCCL's double-binary-tree allreduce (see the module docstring)."""
    if p < 2:
        return 0.0
    return 2 * math.ceil(math.log2(p)) * alpha + 2 * beta * nbytes


def pat_s(nbytes: float, p: int, alpha: float, beta: float) -> float:
    """NCCL's PAT allgather / reduce_scatter (see the module docstring)."""
    if p < 2:
        return 0.0
    return math.ceil(math.log2(p)) * alpha + (p - 1) / p * beta * nbytes


def _nic_layout(cluster: ClusterSpec) -> bool:
    """True when every node has the same NICs serving the same local devices and there are no direct links:
    then a group's figures depend only on which local ranks it holds per node and how many nodes."""
    per = cluster.devices_per_node
    by_node: dict[int, list] = {n: [] for n in range(cluster.num_nodes)}
    for nic in cluster.nics:
        by_node.setdefault(nic.node, []).append(nic)
    layouts = {
        tuple(sorted((nic.bandwidth, nic.latency, tuple(d - nic.node * per for d in nic.devices)) for nic in nics))
        for nics in by_node.values()
    }
    return len(layouts) <= 1 and not cluster.links


class CommPrices:
    """Library collectives and point-to-point messages on one cluster, priced (see the module docstring).

    On clusters of identical nodes a group spanning many nodes costs what the same local ranks on two nodes
    cost (one node's ring and one node-to-node crossing), so figures are computed on nodes 0 and 1 and cached:
    planning for thousands of devices needs no route search over all of them. A group holding different
    local ranks on different nodes is priced with its largest node's pattern (exact for the evenly spread
    groups of pp x dp x tp meshes).
    """

    def __init__(self, cluster: ClusterSpec) -> None:
        self.cluster = cluster
        self.efficiency = cluster.efficiency
        self.homogeneous = _nic_layout(cluster)
        self._ab: dict[tuple[int, ...], tuple[float, float, int]] = {}
        self._p2p: dict[tuple[int, int], tuple[float, float]] = {}
        self._cache: dict[tuple[str, int, tuple[int, ...]], tuple[float, str]] = {}

    # -- groups -------------------------------------------------------------------------------------------

    def _canonical(self, ranks: Sequence[int]) -> tuple[tuple[int, ...], int]:
        """(ranks to ask the cluster about, how many nodes the group spans)."""
        per = self.cluster.devices_per_node
        by_node: dict[int, list[int]] = {}
        for r in ranks:
            by_node.setdefault(r // per, []).append(r % per)
        nodes = len(by_node)
        if not self.homogeneous:
            return tuple(ranks), nodes
        local = max((tuple(sorted(v)) for v in by_node.values()), key=len)
        return tuple(n * per + x for n in range(min(nodes, 2)) for x in local), nodes

    def alpha_beta(self, ranks: Sequence[int]) -> tuple[float, float, int]:
        """(alpha, achieved beta, nodes spanned) of a library ring over ``ranks``."""
        canon, nodes = self._canonical(ranks)
        key = (*canon, -nodes)
        if key not in self._ab:
            alpha, beta = self.cluster.group_alpha_beta(canon)
            eff = self.efficiency.inter_node if nodes > 1 else self.efficiency.intra_node
            self._ab[key] = (alpha, beta / eff, nodes)
        return self._ab[key]

    def algorithms(self, collective: str, nbytes: float, ranks: Sequence[int]) -> dict[str, float]:
        """Seconds of every algorithm the library offers for this collective on this group (overhead
        included); empty for a free step or a group of one rank."""
        if collective in FREE_STEPS or len(ranks) < 2:
            return {}
        if collective not in COLLECTIVES:
            raise ValueError(f"unknown collective {collective!r}: use one of {', '.join(COLLECTIVES)}")
        if nbytes < 0:
            raise ValueError(f"collective size {nbytes} bytes is negative; sizes are >= 0 bytes")
        alpha, beta, nodes = self.alpha_beta(ranks)
        p = len(ranks)
        gpu_library = self.cluster.device.kind != "cpu"
        if not gpu_library and collective == "reduce_scatter":
            # gloo has no reduce-scatter: the runtime library all-reduces the whole buffer and keeps its slice
            collective = "allreduce"
        if collective == "alltoall":
            return {"pairwise": self._alltoall(nbytes, ranks) + self.efficiency.collective_overhead_s}
        out = {"ring": ring_s(collective, nbytes, p, alpha, beta)}
        if gpu_library and nodes > 1 and collective == "allreduce":
            out["tree"] = tree_allreduce_s(nbytes, p, alpha, beta)
        if gpu_library and nodes > 1 and nodes == p and collective in ("allgather", "reduce_scatter"):
            out["pat"] = pat_s(nbytes, p, alpha, beta)
        overhead = self.efficiency.collective_overhead_s
        return {name: t + overhead for name, t in out.items()}

    def choose(self, collective: str, nbytes: float, ranks: Sequence[int]) -> tuple[float, str]:
        """(seconds, algorithm) of the library's fastest algorithm; (0, "") when nothing moves."""
        key = (collective, int(nbytes), tuple(ranks))
        if key not in self._cache:
            options = self.algorithms(collective, nbytes, ranks)
            if not options or nbytes <= 0:
                self._cache[key] = (0.0, "")
            else:
                name = min(options, key=lambda a: (options[a], a))
                self._cache[key] = (options[name], name)
        return self._cache[key]

    def collective_s(self, collective: str, nbytes: float, ranks: Sequence[int]) -> float:
        """Seconds of a library collective (``"allgather+to_partial"``: each real step in turn)."""
        return sum(self.choose(kind, nbytes, ranks)[0] for kind in collective.split("+") if kind not in FREE_STEPS)

    def alltoall_s(self, nbytes: float, ranks: Sequence[int]) -> float:
        """Seconds of an all-to-all in which each rank of ``ranks`` holds ``nbytes`` and sends ``nbytes / p``
        to every rank (itself included): the library's call, its fixed cost included (0 when nothing moves)."""
        return self.collective_s("alltoall", nbytes, ranks)

    def _alltoall(self, nbytes: float, ranks: Sequence[int]) -> float:
        """Pairwise exchange by topology (see the module docstring): the node's peers over its links, the other
        nodes' ranks through the NICs, both at once; the slowest rank sets the time."""
        p = len(ranks)
        piece = nbytes / p
        per = self.cluster.devices_per_node
        by_node: dict[int, list[int]] = {}
        for r in ranks:
            by_node.setdefault(r // per, []).append(r)
        worst = 0.0
        patterns: set[tuple[int, ...]] = set()
        for members in by_node.values():
            pattern = tuple(sorted(r % per for r in members))
            if self.homogeneous and pattern in patterns:
                continue  # identical nodes: the same local ranks cost the same
            patterns.add(pattern)
            local = len(members)
            inside = 0.0
            if local > 1:
                alpha, beta, _ = self.alpha_beta(members)
                inside = (local - 1) * (alpha + beta * piece)
            across = 0.0
            if len(by_node) > 1:
                r = members[0]
                peer = next(q for q in ranks if q // per != r // per)
                alpha_x, beta_x = self._route(r, peer)
                nics = self.cluster.nics_of(r)
                # the NIC(s) serving r carry the off-node traffic of every rank of the group they serve
                sharing = max(1.0, sum(any(q in n.devices for n in nics) for q in members) / max(len(nics), 1))
                across = (p - local) * (alpha_x + sharing * beta_x * piece)
            worst = max(worst, inside, across)
        return worst

    # -- point to point -----------------------------------------------------------------------------------

    def p2p_s(self, nbytes: float, src: int, dst: int) -> float:
        """One message of ``nbytes`` from rank ``src`` to rank ``dst`` (0 on the same rank)."""
        if src == dst or nbytes <= 0:
            return 0.0
        alpha, beta = self._route(src, dst)
        return message_s(nbytes, alpha, beta)

    def _route(self, src: int, dst: int) -> tuple[float, float]:
        """(alpha, achieved beta) of the route from ``src`` to ``dst`` (cached by node pattern)."""
        per = self.cluster.devices_per_node
        multi = src // per != dst // per
        if self.homogeneous:
            src, dst = src % per, (per if multi else 0) + dst % per
        key = (src, dst)
        if key not in self._p2p:
            alpha, beta = self.cluster.p2p_alpha_beta(src, dst)
            self._p2p[key] = route_alpha_beta(self.cluster, alpha, beta, multi)
        return self._p2p[key]

    # -- synthesized schedules ----------------------------------------------------------------------------

    def schedule_s(self, simulated_s: float) -> float:
        """Seconds of one call of a synthesized schedule whose simulated time (messages priced with
        :func:`message_s` at :func:`route_alpha_beta`'s figures) is ``simulated_s``: that time plus the
        library's fixed cost per call; 0 for an empty schedule."""
        if simulated_s <= 0:
            return 0.0
        return simulated_s + self.efficiency.collective_overhead_s
