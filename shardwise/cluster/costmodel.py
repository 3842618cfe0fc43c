"""Closed-form times of library (NCCL/Gloo-like ring) collectives under the alpha-beta model.

``n`` is the full buffer in bytes (for allgather/reduce_scatter the gathered size), ``p`` the group size and
(alpha, beta) the group's figures from ``ring.group_alpha_beta``:

* allreduce:                    2 (p-1) (alpha + beta n/p)
* allgather, reduce_scatter:      (p-1) (alpha + beta n/p)
* alltoall:                       (p-1) (alpha + beta n/p)
* broadcast, reduce (pipelined ring, k chunks): (p-2+k) (alpha + beta n/k), k >= 1 the best integer
  (about sqrt((p-2) beta n / alpha)); for p = 2 that is alpha + beta n.

A group of one rank costs 0.
"""

from __future__ import annotations

import math

__all__ = ["COLLECTIVES", "ring_collective_time", "pipelined_ring_time"]

COLLECTIVES = ("allreduce", "allgather", "reduce_scatter", "alltoall", "broadcast", "reduce")


def pipelined_ring_time(p: int, nbytes: float, alpha: float, beta: float) -> float:
    """Least (p-2+k)(alpha + beta n/k) over integers 1 <= k <= max(1, n)."""
    if p < 2:
        return 0.0
    if nbytes <= 0:
        return (p - 1) * alpha

    def t(k: int) -> float:
        return (p - 2 + k) * (alpha + beta * nbytes / k)

    if alpha <= 0:
        return t(max(1, int(nbytes)))
    k_star = math.sqrt((p - 2) * beta * nbytes / alpha)
    hi = max(1, int(nbytes))
    candidates = {1, hi, min(hi, max(1, math.floor(k_star))), min(hi, max(1, math.ceil(k_star)))}
    return min(t(k) for k in candidates)


def ring_collective_time(collective: str, nbytes: float, p: int, alpha: float, beta: float) -> float:
    """Seconds for ``collective`` of ``nbytes`` over ``p`` ranks at (alpha, beta)."""
    if collective not in COLLECTIVES:
        raise ValueError(f"unknown collective {collective!r}: use one of {', '.join(COLLECTIVES)}")
    if nbytes < 0:
        raise ValueError(f"collective size {nbytes} bytes is negative; sizes are >= 0 bytes")
    if p < 2:
        return 0.0
    step = alpha + beta * nbytes / p
    if collective == "allreduce":
        return 2 * (p - 1) * step
    if collective in ("allgather", "reduce_scatter", "alltoall"):
        return (p - 1) * step
    return pipelined_ring_time(p, nbytes, alpha, beta)
