"""A topology view of a ClusterSpec for collective synthesis: ranks, direct edges and shared resources.

The cluster is a directed endpoint graph (devices ``g{rank}``, NICs, switches; see ``shardwise.cluster``).
Every graph edge ``a -> b`` is a *resource* of inverse bandwidth ``beta`` (s/byte): a link, a switch port
(``g3 -> n0.nvswitch`` is GPU 3's egress port, ``n0.nvswitch -> g3`` its ingress port), a NIC's way in or out
(``n0.nic0 -> ib`` is shared by every GPU behind that NIC).

A *direct edge* between two ranks of the view is the cheapest endpoint path between them that passes
through no other device (least beta, then alpha, then hops). An edge's ``alpha`` and ``beta`` are what the
price list charges for a message on that path (``costs.comm.route_alpha_beta``: the link figures, beta over
the cluster's achieved bandwidth fraction inside a node or across nodes); a transfer of ``b`` bytes over it
takes ``costs.comm.message_s(b, alpha, beta)`` seconds and holds every resource on its path for that whole
time (one transfer at a time per resource, which is how link and port contention are modelled). A resource's
own ``beta`` is its link figure. ``route(u, v)`` also serves pairs
without a direct edge: it follows the cluster's cheapest path, relaying through devices, and holds the
resources of every hop (cut-through); baselines use it, synthesis uses direct edges only.

Invariants: ranks of the view are numbered ``0..p-1`` (``ranks[i]`` is the global rank of local rank i);
resources are numbered ``0..R-1``; edges never join a rank to itself.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from shardwise.costs.comm import message_s, route_alpha_beta
from shardwise.errors import UserInputError

if TYPE_CHECKING:
    from shardwise.cluster import ClusterSpec

__all__ = ["Resource", "Edge", "TopologyView", "topology_view"]

#: longest endpoint path searched for a direct edge (device -> nic -> fabric -> nic -> device is 4 hops)
_MAX_DIRECT_HOPS = 6


@dataclass(frozen=True)
class Resource:
    """One directed endpoint-graph edge (link, switch port or NIC direction); ``beta`` in s/byte."""

    id: int
    name: str
    beta: float


@dataclass(frozen=True)
class Edge:
    """A way to move data from local rank ``src`` to local rank ``dst`` (a direct edge or a relayed route).

    ``kind`` is ``"link"``, ``"switch"``, ``"nic"`` (crosses a NIC) or ``"relay"`` (through other devices);
    ``internode`` tells whether the two ranks are on different nodes.
    """

    src: int
    dst: int
    alpha: float
    beta: float
    resources: tuple[int, ...]
    kind: str
    internode: bool
    hops: tuple[str, ...]

    def time(self, nbytes: float) -> float:
        """Seconds of one message of ``nbytes`` on this edge (the price list's ``message_s``)."""
        return message_s(nbytes, self.alpha, self.beta)


@dataclass(frozen=True, eq=False)
class TopologyView:
    """Ranks, resources and edges of (a group of ranks of) a cluster; see the module docstring."""

    cluster_name: str
    cluster_fingerprint: str
    ranks: tuple[int, ...]
    nodes: tuple[int, ...]
    local_index: tuple[int, ...]
    resources: tuple[Resource, ...]
    edges: dict[tuple[int, int], Edge]
    endpoint_edges: dict[tuple[str, str], int]
    _routes: dict[tuple[int, int], Edge] = field(default_factory=dict, repr=False)
    _cluster: object = field(default=None, repr=False)

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def num_nodes(self) -> int:
        return len(set(self.nodes))

    def edge(self, u: int, v: int) -> Edge:
        """The direct edge u -> v; KeyError if none."""
        return self.edges[(u, v)]

    def has_edge(self, u: int, v: int) -> bool:
        return (u, v) in self.edges

    def route(self, u: int, v: int) -> Edge:
        """The cheaper (beta, then alpha) of the direct edge u -> v and the cluster's cheapest route."""
        cached = self._routes.get((u, v))
        if cached is not None:
            return cached
        cluster = self._cluster
        route = cluster.p2p_route(self.ranks[u], self.ranks[v])  # type: ignore[attr-defined]
        res = []
        for a, b in zip(route.hops, route.hops[1:]):
            rid = self.endpoint_edges.get((a, b))
            if rid is None:
                raise KeyError(f"route hop {a}->{b} is not an edge of the cluster graph")
            res.append(rid)
        internode = self.nodes[u] != self.nodes[v]
        alpha, beta = route_alpha_beta(cluster, route.alpha, route.beta, internode)  # type: ignore[arg-type]
        made = Edge(
            src=u,
            dst=v,
            alpha=alpha,
            beta=beta,
            resources=tuple(sorted(set(res))),
            kind="relay",
            internode=internode,
            hops=tuple(route.hops),
        )
        e = self.edges.get((u, v))
        if e is not None and (e.beta, e.alpha) <= (made.beta, made.alpha):
            made = e
        elif e is not None and not any(h[:1] == "g" and h[1:].isdigit() for h in made.hops[1:-1]):
            made = e  # the cluster's route transits no device: it is the direct edge
        self._routes[(u, v)] = made
        return made

    def out_edges(self, u: int) -> list[Edge]:
        return [e for (a, _), e in self.edges.items() if a == u]

    def ranks_by_node(self) -> dict[int, list[int]]:
        """node -> local ranks of the view on it (in local order)."""
        out: dict[int, list[int]] = {}
        for i, n in enumerate(self.nodes):
            out.setdefault(n, []).append(i)
        return out

    @property
    def fingerprint(self) -> str:
        """Identifies (cluster, ranks): equal fingerprints, equal topology views."""
        text = f"{self.cluster_fingerprint}|{','.join(map(str, self.ranks))}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def cluster(self) -> ClusterSpec:
        return self._cluster  # type: ignore[return-value]


def _graph_edges(cluster: ClusterSpec) -> dict[tuple[str, str], tuple[float, float]]:
    """(a, b) -> (alpha, beta) of the cheapest parallel graph edge a -> b."""
    out: dict[tuple[str, str], tuple[float, float]] = {}
    for a, nbrs in cluster.graph().items():
        for b, alpha, beta in nbrs:
            old = out.get((a, b))
            if old is None or (beta, alpha) < (old[1], old[0]):
                out[(a, b)] = (alpha, beta)
    return out


def _direct_paths(
    adj: dict[str, list[tuple[str, float, float]]], src: str, devices: set[str]
) -> dict[str, tuple[float, float, tuple[str, ...]]]:
    """Cheapest path from device ``src`` to every other device that transits no device: (beta, alpha, hops)."""
    best: dict[str, tuple[float, float, tuple[str, ...]]] = {}
    stack: list[tuple[str, float, float, tuple[str, ...]]] = [(src, 0.0, 0.0, (src,))]
    while stack:
        node, beta, alpha, path = stack.pop()
        for nxt, a, b in adj.get(node, ()):
            if nxt in path:
                continue
            nb, na, npath = max(beta, b), alpha + a, (*path, nxt)
            if nxt in devices:
                old = best.get(nxt)
                if old is None or (nb, na, len(npath)) < (old[0], old[1], len(old[2])):
                    best[nxt] = (nb, na, npath)
                continue
            if len(npath) <= _MAX_DIRECT_HOPS:
                stack.append((nxt, nb, na, npath))
    return best


def topology_view(cluster: ClusterSpec, ranks: Sequence[int] | None = None) -> TopologyView:
    """The topology view of ``ranks`` (default: every rank) of ``cluster``.

    Raises UserInputError for an empty, repeated or out-of-range rank list.
    """
    world = cluster.world_size
    group = tuple(range(world)) if ranks is None else tuple(int(r) for r in ranks)
    if not group or len(set(group)) != len(group) or any(not 0 <= r < world for r in group):
        raise UserInputError(
            f"ranks {list(group)} are not a valid group of cluster {cluster.name!r}: give distinct ranks in "
            f"0..{world - 1}"
        )
    gedges = _graph_edges(cluster)
    names = sorted(gedges)
    endpoint_edges = {ab: i for i, ab in enumerate(names)}
    resources = tuple(Resource(i, f"{a}->{b}", gedges[(a, b)][1]) for i, (a, b) in enumerate(names))
    adj: dict[str, list[tuple[str, float, float]]] = {}
    for (a, b), (alpha, beta) in sorted(gedges.items()):
        adj.setdefault(a, []).append((b, alpha, beta))
    nic_names = {n.name for n in cluster.nics}
    dev_names = {cluster.device_name(r): i for i, r in enumerate(group)}
    all_devices = {cluster.device_name(r) for r in range(world)}
    nodes = tuple(cluster.node_of(r) for r in group)
    local_index = tuple(r - cluster.ranks_of_node(cluster.node_of(r))[0] for r in group)
    edges: dict[tuple[int, int], Edge] = {}
    for u, r in enumerate(group):
        paths = _direct_paths(adj, cluster.device_name(r), all_devices)
        for dname, (beta, alpha, hops) in paths.items():
            v = dev_names.get(dname)
            if v is None or v == u:
                continue
            res = tuple(sorted({endpoint_edges[(a, b)] for a, b in zip(hops, hops[1:])}))
            if len(hops) == 2:
                kind = "link"
            elif any(h in nic_names for h in hops):
                kind = "nic"
            else:
                kind = "switch"
            internode = nodes[u] != nodes[v]
            alpha, beta = route_alpha_beta(cluster, alpha, beta, internode)
            edges[(u, v)] = Edge(u, v, alpha, beta, res, kind, internode, hops)
    return TopologyView(
        cluster_name=cluster.name,
        cluster_fingerprint=cluster.fingerprint(),
        ranks=group,
        nodes=nodes,
        local_index=local_index,
        resources=resources,
        edges=edges,
        endpoint_edges=endpoint_edges,
        _cluster=cluster,
    )
