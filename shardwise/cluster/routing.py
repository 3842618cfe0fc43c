"""Cheapest paths between endpoints of a cluster under the alpha-beta model.

The cluster is a directed graph over endpoint names (devices ``g{rank}``, NICs, switches):

* a LinkSpec is an edge ``src -> dst`` with (alpha = latency, beta = 1/bandwidth);
* a switch (hyperedge) is a star: ``member -> switch`` costs (switch latency, 1/port_bandwidth) and
  ``switch -> member`` costs (0, 1/port_bandwidth), so crossing a switch pays its latency once;
* a NIC joins the devices it serves the same way: ``device -> nic`` (nic latency, 1/nic bandwidth),
  ``nic -> device`` (0, 1/nic bandwidth). A NIC's latency is therefore the end-to-end alpha of a message
  leaving through it; the fabric switch adds its own latency (0 in the presets).

A path's cost is (alpha, beta) = (sum of latencies, max of per-hop betas): a message is pipelined in chunks
through relays, so the slowest hop sets the rate and every hop adds its latency. "Cheapest" follows what a
library's send/recv does: two devices with a direct connection (a link, or a switch they both belong to) use
the best such connection, as NCCL's P2P transport does over NVLink/NVSwitch even when a relay would be
faster; otherwise the route is the least beta, then least alpha, then fewest hops over the whole graph
(relaying through other GPUs where the topology needs it, as TACCL routes; across nodes through NICs).
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shardwise.cluster.spec import ClusterSpec, LinkSpec, SwitchSpec

__all__ = ["Route", "Graph", "build_graph", "routes_from", "direct_route", "reachable"]

#: adjacency: endpoint -> list of (neighbour, alpha seconds, beta seconds/byte)
Graph = Mapping[str, tuple[tuple[str, float, float], ...]]


@dataclass(frozen=True)
class Route:
    """The cheapest path from ``hops[0]`` to ``hops[-1]``: alpha seconds + beta seconds per byte."""

    alpha: float
    beta: float
    hops: tuple[str, ...]

    def time(self, nbytes: float) -> float:
        return self.alpha + self.beta * nbytes


def build_graph(spec: ClusterSpec) -> dict[str, tuple[tuple[str, float, float], ...]]:
    """The directed endpoint graph of ``spec`` (see the module docstring for the edge costs)."""
    adj: dict[str, list[tuple[str, float, float]]] = {spec.device_name(r): [] for r in range(spec.world_size)}
    for nic in spec.nics:
        adj.setdefault(nic.name, [])
    for sw in spec.switches:
        adj.setdefault(sw.name, [])
    for link in spec.links:
        adj.setdefault(link.src, []).append((link.dst, link.latency, 1.0 / link.bandwidth))
    for sw in spec.switches:
        beta = 1.0 / sw.port_bandwidth
        for member in sw.members:
            adj.setdefault(member, []).append((sw.name, sw.latency, beta))
            adj[sw.name].append((member, 0.0, beta))
    for nic in spec.nics:
        beta = 1.0 / nic.bandwidth
        for rank in nic.devices:
            dev = spec.device_name(rank)
            adj.setdefault(dev, []).append((nic.name, nic.latency, beta))
            adj[nic.name].append((dev, 0.0, beta))
    return {k: tuple(v) for k, v in adj.items()}


def _dijkstra(graph: Graph, src: str, max_beta: float) -> dict[str, tuple[float, int, str | None, float]]:
    """Least (alpha, hops) from src over edges with beta <= max_beta: node -> (alpha, hops, prev, edge beta)."""
    best: dict[str, tuple[float, int, str | None, float]] = {src: (0.0, 0, None, 0.0)}
    heap: list[tuple[float, int, str]] = [(0.0, 0, src)]
    done: set[str] = set()
    while heap:
        alpha, hops, node = heapq.heappop(heap)
        if node in done:
            continue
        done.add(node)
        for nxt, a, b in graph.get(node, ()):
            if b > max_beta or nxt in done:
                continue
            cand = (alpha + a, hops + 1)
            old = best.get(nxt)
            if old is None or cand < old[:2]:
                best[nxt] = (cand[0], cand[1], node, b)
                heapq.heappush(heap, (cand[0], cand[1], nxt))
    return best


def routes_from(graph: Graph, src: str) -> dict[str, Route]:
    """Least-(beta, alpha, hops) route from ``src`` to every endpoint it can reach, relays allowed.

    Exact: for each beta threshold in ascending order, a Dijkstra on (alpha, hops) over the edges within
    it; an endpoint first reached at threshold t has bottleneck t and the least alpha among such paths.
    """
    thresholds = sorted({b for edges in graph.values() for _, _, b in edges})
    routes: dict[str, Route] = {src: Route(0.0, 0.0, (src,))}
    for threshold in thresholds:
        tree = _dijkstra(graph, src, threshold)
        for node, (alpha, _, _, _) in tree.items():
            if node in routes:
                continue
            hops = [node]
            beta = 0.0
            cur: str | None = node
            while cur is not None and cur != src:
                _, _, prev, edge_beta = tree[cur]
                beta = max(beta, edge_beta)
                cur = prev
                if cur is not None:
                    hops.append(cur)
            routes[node] = Route(alpha, beta, tuple(reversed(hops)))
        if len(routes) == len(graph):
            break
    return routes


def direct_route(a: str, b: str, links: Sequence[LinkSpec], switches: Sequence[SwitchSpec]) -> Route | None:
    """The best direct connection a -> b among ``links`` (a -> b) and ``switches`` (holding both a and b),
    least (beta, alpha); None if there is none."""
    options = [Route(x.latency, 1.0 / x.bandwidth, (a, b)) for x in links if (x.src, x.dst) == (a, b)]
    options += [
        Route(sw.latency, 1.0 / sw.port_bandwidth, (a, sw.name, b))
        for sw in switches
        if a in sw.members and b in sw.members
    ]
    return min(options, key=lambda r: (r.beta, r.alpha), default=None)


def reachable(graph: Graph, src: str, *, reverse: bool = False) -> set[str]:
    """Endpoints reachable from ``src`` (or, with ``reverse``, that can reach ``src``)."""
    if reverse:
        rev: dict[str, list[str]] = {}
        for node, edges in graph.items():
            for nxt, _, _ in edges:
                rev.setdefault(nxt, []).append(node)
        neighbours = {k: tuple(v) for k, v in rev.items()}
    else:
        neighbours = {k: tuple(n for n, _, _ in v) for k, v in graph.items()}
    seen = {src}
    stack = [src]
    while stack:
        for nxt in neighbours.get(stack.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen
