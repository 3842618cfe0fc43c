"""Flows: the units that synthesis routes, and how the sketch's symmetry acts on them.

Each collective is a set of flows, one per (rank, part) — ``parts`` is the sketch's chunk count:

* allgather ``(src, k)``: an out-tree from src reaching every rank;
* broadcast ``(root, k)``: an out-tree from the root;
* reduce_scatter ``(dst, k)``: an in-tree reducing every rank's contribution into dst;
* allreduce ``(home, k)``: an in-tree into a root, then an out-tree from it (the root is the home in the
  pipelined model; the timed model may choose it);
* alltoall ``(src, dst, k)``: a path from src to dst.

A symmetry maps flow ``(a, k)`` to ``(g(a), k)`` and ``(s, d, k)`` to ``(g(s), g(d), k)``; flows are
routed for one representative per orbit and the others are images. ``flow_group`` keeps only the
symmetries under which every orbit is as large as the group (a free action), so an image's route is
well defined; broadcast has none (its root is fixed).
"""

from __future__ import annotations

from dataclasses import dataclass

from shardwise.passes.collectives.chunks import CollectiveSpec
from shardwise.passes.collectives.sketch import GroupElement

__all__ = ["Flow", "flows_of", "flow_group", "orbits", "chunk_of"]


@dataclass(frozen=True)
class Flow:
    """``src``/``dst``: tree root or path ends; ``shape``: "out", "in", "inout" (allreduce) or "path"."""

    key: tuple[int, ...]
    shape: str
    src: int
    dst: int
    part: int


def flows_of(kind: str, p: int, parts: int, root: int = 0) -> list[Flow]:
    out: list[Flow] = []
    for k in range(parts):
        if kind == "broadcast":
            out.append(Flow((root, k), "out", root, root, k))
            continue
        for a in range(p):
            if kind == "alltoall":
                out.extend(Flow((a, b, k), "path", a, b, k) for b in range(p) if b != a)
            elif kind == "allgather":
                out.append(Flow((a, k), "out", a, a, k))
            elif kind == "reduce_scatter":
                out.append(Flow((a, k), "in", a, a, k))
            else:
                out.append(Flow((a, k), "inout", a, a, k))
    return out


def image(flow: Flow, g: GroupElement) -> tuple[int, ...]:
    if flow.shape == "path":
        return (g.ranks[flow.src], g.ranks[flow.dst], flow.part)
    if flow.src != flow.dst:
        raise ValueError("unknown flow shape")
    return (g.ranks[flow.src], flow.part)


def flow_group(kind: str, group: tuple[GroupElement, ...]) -> tuple[GroupElement, ...]:
    """The symmetries usable for ``kind`` (see the module docstring)."""
    if kind == "broadcast":
        return group[:1] if group else group
    p = len(group[0].ranks)
    ident = tuple(range(p))
    for g in group:
        if g.ranks != ident and any(g.ranks[i] == i for i in range(p)):
            return tuple(x for x in group if x.ranks == ident)
    return group


def orbits(
    flows: list[Flow], group: tuple[GroupElement, ...]
) -> dict[tuple[int, ...], tuple[Flow, GroupElement]]:
    """flow key -> (representative flow, group element mapping the representative onto it)."""
    by_key = {f.key: f for f in flows}
    out: dict[tuple[int, ...], tuple[Flow, GroupElement]] = {}
    for f in flows:
        if f.key in out:
            continue
        for g in group:
            k = image(f, g)
            if k in by_key and k not in out:
                out[k] = (f, g)
    return out


def chunk_of(spec: CollectiveSpec, flow: Flow, piece: int, pieces: int) -> int:
    """Global chunk id of piece ``piece`` (of ``pieces``) of ``flow`` in a spec with chunks = parts*pieces."""
    c = spec.chunks
    local = flow.part * pieces + piece
    if flow.shape == "path":
        return (flow.src * spec.nranks + flow.dst) * c + local
    if spec.kind == "broadcast":
        return local
    return flow.src * c + local
