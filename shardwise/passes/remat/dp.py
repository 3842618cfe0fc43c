"""Exact dynamic programming over a chain of units: the least recompute time whose peak (the model of
``problem.model_peak``) is within a budget.

Going from the last unit to the first, a suffix ``i..n`` is summarised by ``(time, need)``: its recompute
time and the headroom it needs above what units before ``i`` keep,
``need_i = max(phase_i(c_i), kept_i(c_i) + need_{i+1})`` with ``need_{n+1} = tail_bytes``. A suffix with
both more time and more need than another is never better whatever comes before it, so each step keeps
only the Pareto front (no discretisation of bytes: the result is exact for the model). With ``n`` equal
units the front has at most ``n + 1`` points; in general it is bounded by ``max_front`` (an error beyond).
"""

from __future__ import annotations

from shardwise.errors import DoesNotFitError, SolverError
from shardwise.passes.remat.problem import RematProblem, model_peak

__all__ = ["solve_chain", "pareto_front"]

_MAX_FRONT = 100_000


def _prune(points: list[tuple[float, int, tuple[int, ...]]]) -> list[tuple[float, int, tuple[int, ...]]]:
    """Points not dominated in (time, need), sorted by time (need strictly falling)."""
    points.sort(key=lambda p: (p[0], p[1]))
    out: list[tuple[float, int, tuple[int, ...]]] = []
    for p in points:
        if not out or p[1] < out[-1][1]:
            out.append(p)
    return out


def pareto_front(problem: RematProblem, max_front: int = _MAX_FRONT) -> list[tuple[float, int, tuple[int, ...]]]:
    """Every non-dominated (recompute seconds, peak bytes, choice) of the whole chain, by time."""
    front: list[tuple[float, int, tuple[int, ...]]] = [(0.0, problem.tail_bytes, ())]
    for u in reversed(problem.units):
        nxt = []
        for t, need, rest in front:
            for c in (0, 1):
                nxt.append((t + c * u.recompute_s, max(u.phase_bytes[c], u.kept_bytes[c] + need), (c, *rest)))
        front = _prune(nxt)
        if len(front) > max_front:
            raise SolverError(f"the chain's Pareto front passed {max_front} points: use the ILP (method='ilp')")
    return _prune([(t, max(problem.fixed_bytes, need), c) for t, need, c in front])


def solve_chain(problem: RematProblem, budget_bytes: int) -> tuple[int, ...]:
    """The choice (one 0/1 per unit) of least recompute time with ``model_peak <= budget_bytes``; among
    equal times the lowest peak. Raises DoesNotFitError naming the lowest reachable peak."""
    front = pareto_front(problem)
    for _t, peak, choice in front:
        if peak <= budget_bytes:
            assert model_peak(problem, choice) == peak
            return choice
    lowest = front[-1][1]
    raise DoesNotFitError(
        f"no recomputation fits {budget_bytes / 2**20:.2f} MiB: the lowest peak recomputation reaches is "
        f"{lowest / 2**20:.2f} MiB ({lowest} bytes); raise the budget to at least that, or shard the model "
        "further (more tensor or pipeline parallelism)"
    )
