"""Greedy best-fit offsets, in the style of XLA's global decreasing-size best-fit heap.

Buffers are taken in one global order (largest first, or longest-lived first); each goes into the smallest
free gap that holds it among the buffers already placed that are live at a common step, or on top of them
when no gap does. Guarantees: a valid assignment (live-overlapping buffers get disjoint bytes), offsets
multiples of ``alignment``; deterministic (ties broken by id).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Literal

import numpy as np

from shardwise.errors import UserInputError
from shardwise.passes.memory.buffers import Assignment, Buffer, check_buffers, lower_bound

__all__ = ["best_fit", "best_fit_offsets", "greedy_order"]

Order = Literal["size", "lifetime"]

_NONE = np.zeros(0, dtype=np.int64)


def _align_up(x: int, alignment: int) -> int:
    return -(-x // alignment) * alignment


def greedy_order(buffers: list[Buffer], order: Order) -> list[int]:
    """Indices of ``buffers`` in the order best-fit places them."""
    if order == "size":
        return sorted(
            range(len(buffers)),
            key=lambda i: (
                -buffers[i].size,
                -(buffers[i].end - buffers[i].start),
                buffers[i].start,
                buffers[i].id,
            ),
        )
    if order == "lifetime":
        return sorted(
            range(len(buffers)),
            key=lambda i: (
                -(buffers[i].end - buffers[i].start),
                -buffers[i].size,
                buffers[i].start,
                buffers[i].id,
            ),
        )
    raise UserInputError(f"unknown best-fit order {order!r}: use 'size' or 'lifetime'")


def best_fit_offsets(buffers: list[Buffer], order: Order, alignment: int = 1) -> list[int]:
    """Offsets (indexed like ``buffers``) chosen by best-fit in the given order.

    The buffers placed so far are kept sorted by offset, so the ones live with the next buffer come out of
    one vectorized interval test already in offset order; the free gaps between them (each chunk's offset
    minus the highest top below it) and the smallest that holds the buffer are found without a Python loop
    over them. Equal offsets may be kept in any order: a chunk that starts where an earlier one does never
    opens a gap (that one's top is above it), so the gaps are those of a sort by (offset, top)."""
    n = len(buffers)
    # placed buffers, sorted by offset: start, end, offset, top (offset + size)
    p_start = np.zeros(n, dtype=np.int64)
    p_end = np.zeros(n, dtype=np.int64)
    p_off = np.zeros(n, dtype=np.int64)
    p_top = np.zeros(n, dtype=np.int64)
    out = [0] * n
    for m, i in enumerate(greedy_order(buffers, order)):  # m buffers placed so far
        b = buffers[i]
        size = b.size
        if m:
            live = np.flatnonzero((p_start[:m] < b.end) & (p_end[:m] > b.start))
        else:
            live = _NONE
        if len(live):
            lo = p_off[live]
            hi = p_top[live]
            below = np.maximum.accumulate(hi)  # the highest top among the chunks up to each one
            cursor = np.empty_like(below)  # where the free gap before each chunk starts
            cursor[0] = 0
            cursor[1:] = below[:-1]
            start = cursor if alignment == 1 else -(-cursor // alignment) * alignment
            holds = np.flatnonzero(start + size <= lo)  # implies a gap: lo > cursor
            if len(holds):
                gaps = lo[holds] - cursor[holds]
                best_off = int(start[holds[int(np.argmin(gaps))]])  # the smallest gap, the lowest on ties
            else:
                best_off = _align_up(int(below[-1]), alignment)  # on top of everything live with it
        else:
            best_off = 0
        out[i] = best_off
        # insert into the offset-sorted arrays (after equal offsets: any order of those is equivalent)
        j = int(np.searchsorted(p_off[:m], best_off, side="right"))
        if j < m:
            for arr in (p_start, p_end, p_off, p_top):
                arr[j + 1 : m + 1] = arr[j:m]
        p_start[j], p_end[j], p_off[j], p_top[j] = b.start, b.end, best_off, best_off + size
    return out


def best_fit(buffers: Iterable[Buffer], *, order: Order = "size", alignment: int = 1) -> Assignment:
    """Best-fit assignment of ``buffers`` taken largest first (``order="size"``) or longest-lived first."""
    start_t = time.perf_counter()
    bufs = check_buffers(buffers)
    if not isinstance(alignment, int) or alignment < 1:
        raise UserInputError(f"alignment must be a positive int, got {alignment!r}")
    offsets = best_fit_offsets(bufs, order, alignment)
    arena = max((o + b.size for o, b in zip(offsets, bufs)), default=0)
    lb = lower_bound(bufs)
    return Assignment(
        offsets=tuple(sorted((b.id, o) for b, o in zip(bufs, offsets))),
        arena_bytes=arena,
        lower_bound_bytes=lb,
        method=f"best-fit-{order}",
        optimal=arena == lb,
        solve_s=time.perf_counter() - start_t,
    )
