"""Communication sketches: what a synthesized schedule may use, and its symmetry.

A sketch narrows the search the way TACCL's communication sketches do:

* ``internode``: which rank pairs on different nodes may talk directly: ``"any"`` (every pair, through the
  NICs), ``"rail"`` (only ranks with the same local index, i.e. NIC rails), or an explicit ``relays`` list of
  (local src index, local dst index) pairs. ``"auto"`` is ``"rail"`` when every NIC serves one GPU, else
  ``"any"``.
* ``intranode_nic``: whether two ranks of one node may talk through a NIC (loopback); off by default.
* ``symmetry``: generators ``(offset, block)``: rotating global ranks by ``offset`` inside consecutive blocks
  of ``block`` ranks maps the schedule onto itself (``(8, 16)`` on two 8-GPU nodes swaps the nodes).
  ``None`` detects them: node rotation and the smallest intra-node rotation under which the cluster graph
  (links, ports, NICs, latencies, bandwidths) and the allowed edges are invariant. A generator that does not
  leave them invariant is dropped (and recorded in ``SketchView.dropped``).
* ``chunks``: how many chunks each rank's buffer is split into (TACCL's input chunk-up).
* ``max_bundle``: message slots per edge in the timed model (a message may carry several chunks: one alpha).

Invariant of a ``SketchView``: ``allowed`` connects every rank to every other; every group element maps
``allowed`` onto itself and preserves every edge's (alpha, beta) and its resources' betas.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path

from shardwise.errors import UserInputError
from shardwise.passes.collectives.topology import TopologyView

__all__ = ["Sketch", "SketchView", "GroupElement", "sketch_view", "load_taccl_sketch"]


@dataclass(frozen=True)
class Sketch:
    """See the module docstring. ``name`` only labels results."""

    name: str = "auto"
    internode: str = "auto"
    relays: tuple[tuple[int, int], ...] = ()
    intranode_nic: bool = False
    symmetry: tuple[tuple[int, int], ...] | None = None
    chunks: int = 1
    max_bundle: int = 3

    def __post_init__(self) -> None:
        if self.internode not in ("auto", "any", "rail", "relay"):
            raise UserInputError(
                f"sketch internode {self.internode!r} is not allowed: use 'auto', 'any', 'rail' or 'relay'"
            )
        if self.internode == "relay" and not self.relays:
            raise UserInputError(
                "sketch internode 'relay' needs relays=[(src local index, dst local index), ...]"
            )
        if not isinstance(self.chunks, int) or self.chunks < 1:
            raise UserInputError(f"sketch chunks {self.chunks!r} is not allowed: use an integer >= 1")
        if not isinstance(self.max_bundle, int) or self.max_bundle < 1:
            raise UserInputError(f"sketch max_bundle {self.max_bundle!r} is not allowed: use an integer >= 1")

    def key(self) -> str:
        """A stable text naming every field (used in cache keys)."""
        sym = "auto" if self.symmetry is None else ";".join(f"{o}/{b}" for o, b in self.symmetry)
        rel = ";".join(f"{a}>{b}" for a, b in self.relays)
        return (
            f"{self.internode}|{rel}|nic={int(self.intranode_nic)}|sym={sym}|c={self.chunks}"
            f"|b={self.max_bundle}"
        )

    def replace(self, **kw: object) -> Sketch:
        from dataclasses import replace

        return replace(self, **kw)  # type: ignore[arg-type]


@dataclass(frozen=True)
class GroupElement:
    """A symmetry: ``ranks[i]`` is the image of local rank i, ``resources[r]`` the image of resource r."""

    ranks: tuple[int, ...]
    resources: tuple[int, ...]

    def inverse(self) -> GroupElement:
        inv_r = [0] * len(self.ranks)
        for i, j in enumerate(self.ranks):
            inv_r[j] = i
        inv_s = [0] * len(self.resources)
        for i, j in enumerate(self.resources):
            inv_s[j] = i
        return GroupElement(tuple(inv_r), tuple(inv_s))

    def compose(self, other: GroupElement) -> GroupElement:
        """self after other."""
        return GroupElement(
            tuple(self.ranks[j] for j in other.ranks), tuple(self.resources[j] for j in other.resources)
        )


@dataclass(frozen=True, eq=False)
class SketchView:
    """A sketch applied to a topology view: the allowed direct edges and the symmetry group."""

    sketch: Sketch
    topo: TopologyView
    allowed: tuple[tuple[int, int], ...]
    group: tuple[GroupElement, ...]
    generators: tuple[tuple[int, int], ...]
    dropped: tuple[tuple[int, int], ...] = field(default=())

    @property
    def identity_only(self) -> bool:
        return len(self.group) == 1


def _resolve_internode(sketch: Sketch, topo: TopologyView) -> str:
    if sketch.internode != "auto":
        return sketch.internode
    nics = topo.cluster.nics
    return "rail" if nics and all(len(n.devices) == 1 for n in nics) else "any"


def _allowed_edges(sketch: Sketch, topo: TopologyView) -> tuple[tuple[int, int], ...]:
    mode = _resolve_internode(sketch, topo)
    relays = set(sketch.relays)
    out = []
    for (u, v), e in sorted(topo.edges.items()):
        if not e.internode:
            if e.kind == "nic" and not sketch.intranode_nic:
                continue
            out.append((u, v))
            continue
        lu, lv = topo.local_index[u], topo.local_index[v]
        if mode == "any" or (mode == "rail" and lu == lv) or (mode == "relay" and (lu, lv) in relays):
            out.append((u, v))
    return tuple(out)


def _check_connected(topo: TopologyView, allowed: Sequence[tuple[int, int]], sketch: Sketch) -> None:
    adj: dict[int, list[int]] = {}
    radj: dict[int, list[int]] = {}
    for u, v in allowed:
        adj.setdefault(u, []).append(v)
        radj.setdefault(v, []).append(u)
    for graph in (adj, radj):
        seen = {0}
        stack = [0]
        while stack:
            for w in graph.get(stack.pop(), ()):
                if w not in seen:
                    seen.add(w)
                    stack.append(w)
        if len(seen) != topo.size:
            raise UserInputError(
                f"sketch {sketch.name!r} leaves ranks of {topo.cluster_name} unreachable (internode="
                f"{sketch.internode!r}, relays={list(sketch.relays)}): allow more inter-node pairs"
            )


def _endpoint_map(topo: TopologyView, perm: dict[int, int]) -> dict[str, str] | None:
    """Endpoint permutation induced by a permutation of global ranks; None if NICs/switches do not map."""
    cluster = topo.cluster
    emap: dict[str, str] = {cluster.device_name(r): cluster.device_name(s) for r, s in perm.items()}
    by_devices = {frozenset(n.devices): n.name for n in cluster.nics}
    for nic in cluster.nics:
        image = by_devices.get(frozenset(perm[d] for d in nic.devices))
        if image is None:
            return None
        emap[nic.name] = image
    by_members = {frozenset(s.members): s.name for s in cluster.switches}
    for sw in cluster.switches:
        image = by_members.get(frozenset(emap.get(m, m) for m in sw.members))
        if image is None:
            return None
        emap[sw.name] = image
    return emap


def _element(
    topo: TopologyView, allowed: set[tuple[int, int]], offset: int, block: int
) -> GroupElement | None:
    """The group element rotating global ranks by ``offset`` in blocks of ``block``, if it is a symmetry."""
    world = topo.cluster.world_size
    if block <= 0 or world % block or not 0 < offset < block:
        return None
    perm = {r: (r // block) * block + (r % block + offset) % block for r in range(world)}
    index = {g: i for i, g in enumerate(topo.ranks)}
    if any(perm[g] not in index for g in topo.ranks):
        return None
    emap = _endpoint_map(topo, perm)
    if emap is None:
        return None
    res_perm = []
    by_name = topo.endpoint_edges
    for res in topo.resources:
        a, b = res.name.split("->")
        image = by_name.get((emap.get(a, a), emap.get(b, b)))
        if image is None or not math.isclose(topo.resources[image].beta, res.beta, rel_tol=1e-9):
            return None
        res_perm.append(image)
    rank_perm = tuple(index[perm[g]] for g in topo.ranks)
    for (u, v), e in topo.edges.items():
        f = topo.edges.get((rank_perm[u], rank_perm[v]))
        if f is None or not math.isclose(f.alpha, e.alpha, rel_tol=1e-9, abs_tol=1e-15):
            return None
        if not math.isclose(f.beta, e.beta, rel_tol=1e-9):
            return None
        if tuple(sorted(res_perm[r] for r in e.resources)) != f.resources:
            return None
        if ((u, v) in allowed) != ((rank_perm[u], rank_perm[v]) in allowed):
            return None
    return GroupElement(rank_perm, tuple(res_perm))


def _closure(gens: Sequence[GroupElement], p: int, nres: int) -> tuple[GroupElement, ...]:
    ident = GroupElement(tuple(range(p)), tuple(range(nres)))
    elems = {ident.ranks: ident}
    frontier = [ident]
    while frontier:
        nxt = []
        for e in frontier:
            for g in gens:
                c = g.compose(e)
                if c.ranks not in elems:
                    elems[c.ranks] = c
                    nxt.append(c)
        frontier = nxt
    return tuple(elems[k] for k in sorted(elems))


def _auto_generators(topo: TopologyView) -> list[tuple[int, int]]:
    cluster = topo.cluster
    dpn, world = cluster.devices_per_node, cluster.world_size
    cands: list[tuple[int, int]] = []
    if cluster.num_nodes > 1:
        cands.append((dpn, world))
    cands.extend((d, dpn) for d in range(1, dpn) if dpn % d == 0)
    return cands


def sketch_view(topo: TopologyView, sketch: Sketch | None = None) -> SketchView:
    """Apply ``sketch`` (default: ``Sketch()``) to ``topo``; see the module docstring for the rules."""
    sketch = sketch or Sketch()
    allowed = _allowed_edges(sketch, topo)
    if topo.size > 1:
        _check_connected(topo, allowed, sketch)
    aset = set(allowed)
    gens: list[GroupElement] = []
    used: list[tuple[int, int]] = []
    dropped: list[tuple[int, int]] = []
    if sketch.symmetry is None:
        intra_found = False
        for offset, block in _auto_generators(topo):
            if block == topo.cluster.devices_per_node and intra_found:
                continue
            el = _element(topo, aset, offset, block)
            if el is not None:
                gens.append(el)
                used.append((offset, block))
                intra_found = intra_found or block == topo.cluster.devices_per_node
    else:
        for offset, block in sketch.symmetry:
            el = _element(topo, aset, offset, block)
            if el is None:
                dropped.append((offset, block))
            else:
                gens.append(el)
                used.append((offset, block))
    group = _closure(gens, topo.size, len(topo.resources))
    return SketchView(sketch, topo, allowed, group, tuple(used), tuple(dropped))


def load_taccl_sketch(path: str | PathLike[str]) -> Sketch:
    """Read a TACCL communication-sketch JSON file (its ``internode_sketch``, ``symmetry_offsets`` and
    ``input_chunkup``) into a Sketch. Switch hyperedge strategies have no counterpart and are ignored.
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise UserInputError(f"cannot read sketch {path}: {exc}; give a TACCL sketch JSON file") from exc
    inter = data.get("internode_sketch") or {}
    conn = inter.get("internode_conn")
    internode, relays = "auto", ()
    if conn == "fully-connected":
        internode = "any"
    elif conn == "direct-map":
        internode = "rail"
    elif isinstance(conn, dict):
        internode = "relay"
        relays = tuple(sorted((int(a), int(b)) for a, bs in conn.items() for b in bs))
    sym = tuple((int(o), int(b)) for o, b in data.get("symmetry_offsets", []))
    chunks = int(data.get("hyperparameters", {}).get("input_chunkup", 1))
    return Sketch(name=Path(path).stem, internode=internode, relays=relays, symmetry=sym, chunks=chunks)
