"""Reduce-scatter as the time-reverse of an allgather, and allreduce as reduce-scatter then allgather.

Transpose: in an allgather whose every rank receives each chunk exactly once (a broadcast tree per chunk,
rooted at the chunk's home), run every transfer backwards in time with its direction reversed and make it
a reduction: a rank sends its partial sum of chunk ``g`` to its tree parent once every child's partial sum
of ``g`` has arrived, so the home ends with every contribution exactly once. Times: a transfer that ran
over ``[s, e]`` in the allgather runs over ``[T - e, T - s]``; its deps are the transfers that depended on
it (``j`` in ``deps(i)`` becomes ``i'`` in ``deps(j')``) and each resource carries its transfers in the
reverse order (``prio = T - e``). Under the alpha-beta model with symmetric routes (``route(v, u)`` holds
the mirror resources of ``route(u, v)`` at the same alpha and beta) the reverse takes exactly ``T``; the
simulator times it anyway. The chunk numbering is shared: ``g = home * c + k`` in both collectives, and a
collective's ``nbytes`` is the same total (allgather output = reduce-scatter input).

Compose: an allreduce runs a reduce-scatter schedule and then an allgather schedule on the same chunks
(both refined to a common chunk count when they differ). An allgather transfer that sends chunk ``g`` from
its home waits for every reduce-scatter transfer that writes ``g`` there, so each chunk starts its
allgather as soon as it is reduced; on a shared resource the reduce-scatter's transfers go first.
"""

from __future__ import annotations

import math
from collections import defaultdict

from shardwise.passes.collectives.chunks import CollectiveSpec
from shardwise.passes.collectives.schedule import Schedule, Transfer

__all__ = ["transpose_allgather", "refine_chunks", "compose_allreduce", "is_gather_forest"]

#: refining two schedules to a common chunk count: at most this many chunks per rank
MAX_COMMON_CHUNKS = 4096


def is_gather_forest(ag: Schedule) -> bool:
    """Whether every rank receives each chunk of allgather ``ag`` at most once and never its own chunk."""
    spec = ag.spec
    seen: set[tuple[int, int]] = set()
    for t in ag.transfers:
        for g in t.chunks:
            if spec.home(g) == t.dst or (t.dst, g) in seen:
                return False
            seen.add((t.dst, g))
    return True


def transpose_allgather(
    ag: Schedule, start: tuple[float, ...] | list[float], end: tuple[float, ...] | list[float]
) -> Schedule | None:
    """The reduce-scatter that runs ``ag`` (simulated over ``start``/``end``) backwards; None if ``ag`` is
    not an allgather or some rank receives a chunk twice (its reverse would count a contribution twice)."""
    spec = ag.spec
    if spec.kind != "allgather" or not is_gather_forest(ag):
        return None
    n = len(ag.transfers)
    total = max(end, default=0.0)
    # reversed index order, so equal-prio ties on a resource also break in reverse
    new = {i: n - 1 - i for i in range(n)}
    rdeps: list[set[int]] = [set() for _ in range(n)]
    for j, t in enumerate(ag.transfers):
        for i in t.deps:
            rdeps[new[i]].add(new[j])
    out: list[Transfer | None] = [None] * n
    for i, t in enumerate(ag.transfers):
        k = new[i]
        out[k] = Transfer(t.dst, t.src, t.chunks, True, tuple(sorted(rdeps[k])), total - end[i])
    rs = CollectiveSpec("reduce_scatter", spec.nranks, spec.chunks)
    return Schedule(rs, tuple(x for x in out if x is not None), f"transpose:{ag.algorithm}", ag.params)


def refine_chunks(sched: Schedule, m: int) -> Schedule:
    """``sched`` with every chunk cut into ``m`` (chunk ``g`` becomes ``g*m .. g*m+m-1``; same transfers)."""
    if m == 1:
        return sched
    spec = sched.spec
    if spec.kind not in ("allgather", "reduce_scatter", "allreduce"):
        raise ValueError(f"refine_chunks: {spec.kind} chunks are not numbered home * c + k")
    new_spec = CollectiveSpec(spec.kind, spec.nranks, spec.chunks * m, spec.root)
    trs = tuple(
        Transfer(t.src, t.dst, tuple(g * m + j for g in t.chunks for j in range(m)), t.reduce, t.deps, t.prio)
        for t in sched.transfers
    )
    return Schedule(new_spec, trs, sched.algorithm, sched.params)


def compose_allreduce(
    rs: Schedule,
    rs_start: tuple[float, ...] | list[float],
    ag: Schedule,
    ag_start: tuple[float, ...] | list[float],
) -> Schedule | None:
    """Allreduce = ``rs`` then ``ag`` (see the module docstring); None when their chunk counts have no
    common refinement of at most ``MAX_COMMON_CHUNKS`` chunks per rank or the ranks differ."""
    if rs.spec.kind != "reduce_scatter" or ag.spec.kind != "allgather" or rs.spec.nranks != ag.spec.nranks:
        return None
    c = math.lcm(rs.spec.chunks, ag.spec.chunks)
    if c > MAX_COMMON_CHUNKS:
        return None
    rs = refine_chunks(rs, c // rs.spec.chunks)
    ag = refine_chunks(ag, c // ag.spec.chunks)
    spec = CollectiveSpec("allreduce", rs.spec.nranks, c)
    t_rs = max(
        (s for s in rs_start), default=0.0
    )  # prios of the allgather part come after every reduce-scatter start
    writes: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, t in enumerate(rs.transfers):
        for g in t.chunks:
            writes[(t.dst, g)].append(i)
    base = len(rs.transfers)
    out = [
        Transfer(t.src, t.dst, t.chunks, True, t.deps, float(rs_start[i])) for i, t in enumerate(rs.transfers)
    ]
    for i, t in enumerate(ag.transfers):
        deps = {d + base for d in t.deps}
        for g in t.chunks:
            if spec.home(g) == t.src:
                deps.update(writes.get((t.src, g), ()))
        out.append(
            Transfer(t.src, t.dst, t.chunks, False, tuple(sorted(deps)), t_rs + 1.0 + float(ag_start[i]))
        )
    return Schedule(spec, tuple(out), f"compose:{rs.algorithm}+{ag.algorithm}")
