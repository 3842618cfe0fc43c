"""Independent check of an offset assignment: every buffer placed once, no two live buffers share a byte.

Raises ``PlanError`` naming the first offending buffers, or ``DoesNotFitError`` when the arena exceeds the
capacity. Shares no code with the allocators it checks.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Iterable

import numpy as np

from shardwise.errors import DoesNotFitError, PlanError
from shardwise.passes.memory.buffers import Assignment, Buffer, check_buffers

__all__ = ["verify_assignment"]


def verify_assignment(buffers: Iterable[Buffer], assignment: Assignment, capacity: int | None = None) -> None:
    """Raise unless ``assignment`` maps exactly ``buffers`` to bytes that live-overlapping buffers never share."""
    bufs = check_buffers(buffers)
    ids = [i for i, _ in assignment.offsets]
    if len(set(ids)) != len(ids):
        raise PlanError("the assignment lists a buffer id twice")
    given = dict(assignment.offsets)
    missing = [b.id for b in bufs if b.id not in given]
    if missing:
        raise PlanError(f"the assignment has no offset for {len(missing)} buffer(s), e.g. {missing[0]!r}")
    extra = set(given) - {b.id for b in bufs}
    if extra:
        raise PlanError(f"the assignment names unknown buffer(s), e.g. {sorted(extra)[0]!r}")
    n = len(bufs)
    if n == 0:
        if assignment.arena_bytes != 0:
            raise PlanError(f"an empty assignment must have arena 0, not {assignment.arena_bytes}")
        return
    start = np.array([b.start for b in bufs], dtype=np.int64)
    end = np.array([b.end for b in bufs], dtype=np.int64)
    off = np.array([given[b.id] for b in bufs], dtype=np.int64)
    top = off + np.array([b.size for b in bufs], dtype=np.int64)
    if (off < 0).any():
        i = int(np.flatnonzero(off < 0)[0])
        raise PlanError(f"buffer {bufs[i].id!r} has a negative offset {int(off[i])}")
    arena = int(top.max())
    if arena != assignment.arena_bytes:
        raise PlanError(f"arena_bytes is {assignment.arena_bytes} but the offsets use {arena} bytes")
    # Sweep in start order. The buffers live at a step hold disjoint byte ranges (else an earlier one raised),
    # kept sorted by offset: a new buffer shares bytes with a live one iff it does with its neighbours there.
    order = np.argsort(start, kind="stable").tolist()
    starts, ends, offs, tops = start.tolist(), end.tolist(), off.tolist(), top.tolist()
    live: list[tuple[int, int]] = []  # (offset, buffer index), sorted
    dying: list[tuple[int, int]] = []  # heap of (end, buffer index)
    for i in order:
        while dying and dying[0][0] <= starts[i]:
            _, j = heapq.heappop(dying)
            del live[bisect.bisect_left(live, (offs[j], j))]
        at = bisect.bisect_left(live, (offs[i], -1))
        clash = [j for _, j in live[max(at - 1, 0) : at + 1] if offs[j] < tops[i] and offs[i] < tops[j]]
        if clash:
            j = clash[0]
            raise PlanError(
                f"buffers {bufs[j].id!r} [{offs[j]}, {tops[j]}) and {bufs[i].id!r} "
                f"[{offs[i]}, {tops[i]}) share bytes while both are live at step {bufs[i].start}"
            )
        live.insert(at, (offs[i], i))
        heapq.heappush(dying, (ends[i], i))
    if assignment.lower_bound_bytes > arena:
        raise PlanError(f"lower bound {assignment.lower_bound_bytes} exceeds the arena {arena}: impossible")
    if capacity is not None and arena > capacity:
        raise DoesNotFitError(
            f"the assignment needs {arena} bytes but the capacity is {capacity} bytes "
            f"(lower bound {assignment.lower_bound_bytes}); give more memory or lower the live bytes"
        )
