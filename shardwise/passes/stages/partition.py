"""Balancing layer units into pipeline chunks: the contiguous split that minimises the slowest chunk.

``balance(times, chunks, fits)`` returns ``chunks`` non-empty ranges ``[a, b)`` covering ``0..len(times)``
whose largest total time is least, subject to ``fits(chunk, a, b)`` (the chunk's memory within its device;
monotone: a sub-range of a fitting range fits). Method: bisection on the bottleneck time ``T`` with a
greedy feasibility test (each chunk takes as many units as fit under ``T``, leaving one per remaining
chunk). For a fixed ``T`` greedy is exact, because a longer prefix only leaves an easier suffix; the
bisection stops when ``T`` is within ``rel_tol`` of the optimum. ``balance_dp`` is the textbook dynamic
program over (chunk, prefix) in ``O(chunks * units^2)``, kept as the reference the tests compare against.

In a 1F1B pipeline every device runs every micro-batch through its chunk, so the step is about
``m * max_chunk + (pp - 1) * ...``: minimising the largest chunk time minimises the step (Alpa's objective
``sum t + (B - 1) max t`` has the same minimiser once the sum is fixed).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import accumulate

__all__ = ["balance", "balance_dp", "chunk_times"]

Fits = Callable[[int, int, int], bool]


def chunk_times(times: Sequence[float], bounds: Sequence[tuple[int, int]]) -> list[float]:
    prefix = [0.0, *accumulate(times)]
    return [prefix[b] - prefix[a] for a, b in bounds]


def _greedy(
    prefix: list[float], chunks: int, limit: float, fits: Fits | None
) -> list[tuple[int, int]] | None:
    n = len(prefix) - 1
    bounds = []
    a = 0
    for k in range(chunks):
        left = chunks - k - 1
        if a >= n:
            return None
        b = a + 1
        if prefix[b] - prefix[a] > limit or (fits is not None and not fits(k, a, b)):
            return None
        while b < n - left and prefix[b + 1] - prefix[a] <= limit and (fits is None or fits(k, a, b + 1)):
            b += 1
        bounds.append((a, b))
        a = b
    return bounds if a == n else None


def balance(
    times: Sequence[float], chunks: int, fits: Fits | None = None, *, rel_tol: float = 1e-6
) -> list[tuple[int, int]] | None:
    """The min-max contiguous split (see the module docstring); ``None`` when no split fits."""
    n = len(times)
    if chunks < 1 or n < chunks:
        return None
    prefix = [0.0, *accumulate(times)]
    hi = prefix[-1]
    best = _greedy(prefix, chunks, hi * (1 + 1e-12) + 1e-30, fits)
    if best is None:
        return None
    lo = max(times) if times else 0.0
    tight = _greedy(prefix, chunks, lo * (1 + 1e-12) + 1e-30, fits)
    if tight is not None:
        return tight
    while hi - lo > rel_tol * max(hi, 1e-30):
        mid = (lo + hi) / 2
        got = _greedy(prefix, chunks, mid, fits)
        if got is None:
            lo = mid
        else:
            hi, best = mid, got
    return best


def balance_dp(times: Sequence[float], chunks: int) -> tuple[float, list[tuple[int, int]]]:
    """Exact min-max split by dynamic programming (no memory constraint): (bottleneck, bounds)."""
    n = len(times)
    prefix = [0.0, *accumulate(times)]
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(chunks + 1)]
    cut = [[0] * (n + 1) for _ in range(chunks + 1)]
    best[0][0] = 0.0
    for k in range(1, chunks + 1):
        for j in range(k, n + 1):
            for i in range(k - 1, j):
                v = max(best[k - 1][i], prefix[j] - prefix[i])
                if v < best[k][j]:
                    best[k][j], cut[k][j] = v, i
    bounds = []
    j = n
    for k in range(chunks, 0, -1):
        i = cut[k][j]
        bounds.append((i, j))
        j = i
    return best[chunks][n], bounds[::-1]
