"""Offset assignment (memory mapping): greedy best-fit first, the exact search when greedy is not enough.

``assign_offsets`` runs best-fit by size and by lifetime and keeps the smaller arena. Without a capacity
it then searches for an arena equal to the lower bound (and, if that is proven impossible, bisects between
the bounds); with a capacity it searches for an assignment within the capacity, only when greedy exceeds
it. The exact search is the canonical-solution search (``search``), then CP-SAT (``cpsat``) on the same
target when the first runs out of budget: each solves instances the other cannot. Guarantees: the result
is valid (``verify_assignment`` passes), never worse than greedy, and deterministic for a given input and
``node_limit`` (the time limit only cuts the search short).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable

from shardwise.errors import UserInputError
from shardwise.passes.memory.buffers import Assignment, Buffer, check_buffers, lower_bound
from shardwise.passes.memory.cpsat import fit_within_cpsat
from shardwise.passes.memory.greedy import best_fit_offsets
from shardwise.passes.memory.search import Problem, fit_within

__all__ = ["assign_offsets", "CANONICAL_SHARE", "CPSAT_DTIME_PER_NODE"]

CANONICAL_SHARE = 0.7  # of the time limit, for the canonical search when CP-SAT may follow
CPSAT_DTIME_PER_NODE = 1e-4  # CP-SAT deterministic seconds per search node of the budget


def _arena(bufs: list[Buffer], offsets: list[int] | tuple[int, ...]) -> int:
    return max((o + b.size for o, b in zip(offsets, bufs)), default=0)


def assign_offsets(
    buffers: Iterable[Buffer],
    *,
    capacity: int | None = None,
    time_limit_s: float = 10.0,
    alignment: int = 1,
    node_limit: int | None = None,
    use_cpsat: bool = True,
) -> Assignment:
    """Byte offsets for ``buffers`` in one arena: as small as the search can prove, or within ``capacity``.

    ``time_limit_s`` bounds the exact search (wall clock), ``node_limit`` bounds it in search nodes (which
    makes the outcome independent of the machine's speed; CP-SAT then gets a deterministic-time budget in
    proportion). When the canonical search runs out of budget on a target, CP-SAT (``use_cpsat``) tries the
    same target with the rest of the time. Offsets are multiples of ``alignment``. When the
    buffers cannot fit in ``capacity`` the smallest arena found is returned: compare ``arena_bytes`` with
    the capacity (``verify_assignment(..., capacity)`` raises).
    """
    t0 = time.perf_counter()
    bufs = check_buffers(buffers)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment < 1:
        raise UserInputError(f"alignment must be a positive int, got {alignment!r}")
    if capacity is not None and (not isinstance(capacity, int) or capacity < 0):
        raise UserInputError(f"capacity must be a non-negative int of bytes, got {capacity!r}")
    if time_limit_s < 0:
        raise UserInputError(f"time_limit_s must be >= 0, got {time_limit_s!r}")
    lb = lower_bound(bufs)

    best_offsets: list[int] | tuple[int, ...] = []
    best_arena, method = math.inf, "best-fit-size"
    for order in ("size", "lifetime"):
        offs = best_fit_offsets(bufs, order, alignment)
        arena = _arena(bufs, offs)
        if arena < best_arena:
            best_offsets, best_arena, method = offs, arena, f"best-fit-{order}"
    proven = best_arena == lb  # no smaller arena exists

    goal = lb if capacity is None else capacity
    if bufs and best_arena > goal and not (capacity is not None and lb > capacity):
        problem = Problem([b.start for b in bufs], [b.end for b in bufs], [b.size for b in bufs], alignment)
        if not problem.too_large():
            deadline = t0 + time_limit_s
            nodes_left = node_limit
            lo, hi = lb, int(best_arena) - 1  # the best arena below best_arena lies in [lo, hi], if any
            target = goal if capacity is not None else lb
            cpsat_left = use_cpsat  # CP-SAT runs at most once: on the first target the other search gives up
            while lo <= hi and target <= hi:
                # the canonical search first (part of the time while CP-SAT may follow), then CP-SAT
                share = t0 + (deadline - t0) * CANONICAL_SHARE if cpsat_left else deadline
                res = fit_within(
                    problem, target, deadline=max(share, time.perf_counter()), node_limit=nodes_left
                )
                if nodes_left is not None:
                    nodes_left -= res.nodes
                solver = "exact"
                if res.status == "limit" and cpsat_left:
                    cpsat_left = False
                    solver = "cp-sat"
                    res = fit_within_cpsat(
                        [b.start for b in bufs], [b.end for b in bufs], [b.size for b in bufs], target,
                        time_limit_s=deadline - time.perf_counter(), alignment=alignment, hint=best_offsets,
                        deterministic_limit=None if node_limit is None else node_limit * CPSAT_DTIME_PER_NODE,
                    )  # fmt: skip
                if res.status == "found":
                    assert res.offsets is not None
                    best_offsets, best_arena, method = res.offsets, _arena(bufs, res.offsets), solver
                    hi = int(best_arena) - 1
                elif res.status == "infeasible":
                    lo = target + 1
                else:
                    break
                if capacity is not None or (nodes_left is not None and nodes_left <= 0):
                    break
                target = (lo + hi) // 2
            proven = proven or lo > hi

    return Assignment(
        offsets=tuple(sorted((b.id, int(o)) for b, o in zip(bufs, best_offsets))),
        arena_bytes=int(best_arena) if bufs else 0,
        lower_bound_bytes=lb,
        method=method,
        optimal=bool(proven or best_arena == lb),
        solve_s=time.perf_counter() - t0,
    )
