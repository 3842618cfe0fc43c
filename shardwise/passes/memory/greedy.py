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
    """Offsets (indexed like ``buffers``) chosen by best-fit in the given order."""
    n = len(buffers)
    starts = np.array([b.start for b in buffers], dtype=np.int64)
    ends = np.array([b.end for b in buffers], dtype=np.int64)
    placed = np.zeros(n, dtype=bool)
    offs = np.zeros(n, dtype=np.int64)
    tops = np.zeros(n, dtype=np.int64)
    out = [0] * n
    for i in greedy_order(buffers, order):
        b = buffers[i]
        near = np.flatnonzero(placed & (starts < b.end) & (ends > b.start))
        lo_list = offs[near].tolist()
        hi_list = tops[near].tolist()
        chunks = sorted(zip(lo_list, hi_list))
        best_off = -1
        best_gap = -1
        cursor = 0  # start of the current free gap
        for lo, hi in chunks:
            if lo > cursor:
                start = _align_up(cursor, alignment)
                gap = lo - cursor
                if start + b.size <= lo and (best_off < 0 or gap < best_gap):
                    best_off, best_gap = start, gap
            cursor = max(cursor, hi)
        if best_off < 0:
            best_off = _align_up(cursor, alignment)  # on top of everything live with it
        out[i] = best_off
        offs[i] = best_off
        tops[i] = best_off + b.size
        placed[i] = True
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
