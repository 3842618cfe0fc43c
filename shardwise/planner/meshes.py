"""The one mesh enumerator: which ``pp x dp x tp`` device meshes a plan may use on a cluster.

``meshes(cluster, constraints, positions)``: tensor parallelism stays inside a node (``tp`` divides the devices
per node and the device count), pipeline stages are at most the model's layer units (``positions``), and every
device is used (``pp * dp * tp`` equals the device count) unless pinned degrees leave no such mesh — then meshes on fewer devices are offered. The batch must split over ``dp``; that is checked by the search, which says why a mesh
was left out. A pinned ``cp`` (context parallelism) takes its devices first: ``dp`` is what remains; an unpinned
``cp`` is carved out of ``dp`` by the search (``planner.search``), where the batch does not split over it.
"""

from __future__ import annotations

import math

from shardwise.cluster import ClusterSpec
from shardwise.planner.constraints import Constraints

__all__ = ["meshes", "divisors"]


def divisors(n: int) -> list[int]:
    """The divisors of ``n`` in increasing order."""
    small = [d for d in range(1, int(math.isqrt(n)) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def meshes(cluster: ClusterSpec, constraints: Constraints, positions: int) -> list[tuple[int, int, int]]:
    """(pp, dp, tp) triples to consider (see the module docstring)."""
    world = cluster.world_size
    pinned = any(v is not None for v in (constraints.pp, constraints.dp, constraints.tp))
    cp = constraints.cp or 1
    pinned = pinned or world % cp != 0
    world //= cp
    if constraints.tp is not None:
        tps = [constraints.tp]
    else:
        tps = [t for t in divisors(cluster.devices_per_node) if world % t == 0]
    out = []
    for tp in tps:
        if constraints.pp is not None:
            pps = [constraints.pp]
        else:
            pps = [p for p in divisors(max(world // tp, 1)) if p <= positions]
        for pp in pps:
            if pp > positions:
                continue
            if constraints.dp is not None:
                dp = constraints.dp
            else:
                dp = max(1, world // (tp * pp))
            if tp * pp * dp > world or (tp * pp * dp != world and not pinned):
                continue
            out.append((pp, dp, tp))
    whole = [m for m in out if m[0] * m[1] * m[2] == world]
    return whole or out
