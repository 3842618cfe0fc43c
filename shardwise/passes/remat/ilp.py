"""Checkmate-style integer program for the recompute choice (PuLP with CBC, under a time limit).

One binary ``r_i`` per unit (1: its activations are dropped after the forward and recomputed in the
backward), the objective the recompute time ``sum_i r_i t_i``, and one memory constraint per stage of the
step, as Checkmate bounds the memory of each stage of its schedule: for the phase of unit ``i``

    sum_{j<i} (kept_j(0) - r_j (kept_j(0) - kept_j(1))) + phase_i(0) + r_i (phase_i(1) - phase_i(0)) <= budget

and the same for the tail with every unit's kept bytes. Units need not form a single-tensor chain (any run
of ops in program order, several tensors crossing the cuts); the model is ``problem.model_peak``'s, so on
chains it agrees with the dynamic program (``dp.solve_chain``). Checkmate also chooses the order of
recomputation per op; here each unit is recomputed as a whole, right before its backward.

Up to ``max_units`` units (the stage constraints grow as n^2 coefficients); beyond: SolverError.
"""

from __future__ import annotations

import warnings

import pulp

from shardwise.errors import DoesNotFitError, SolverError
from shardwise.passes.remat.problem import RematProblem, model_peak

__all__ = ["solve_ilp", "MAX_UNITS"]

MAX_UNITS = 2000


def solve_ilp(problem: RematProblem, budget_bytes: int, *, time_limit_s: float = 30.0,
              max_units: int = MAX_UNITS) -> tuple[int, ...]:  # fmt: skip
    """The choice (one 0/1 per unit) of least recompute time with ``model_peak <= budget_bytes``.
    Raises DoesNotFitError (no choice fits: names the lowest peak) or SolverError (no solution in time)."""
    units = problem.units
    if len(units) > max_units:
        raise SolverError(
            f"{len(units)} units is more than the recompute ILP takes ({max_units}): cut the program into "
            "fewer units (layer segments) or use the chain dynamic program (method='dp')"
        )
    lowest_choice, exact = _lowest_choice(problem)
    lowest = model_peak(problem, lowest_choice)
    if problem.fixed_bytes > budget_bytes or (exact and lowest > budget_bytes):
        raise DoesNotFitError(
            f"no recomputation fits {budget_bytes / 2**20:.2f} MiB: the lowest peak recomputation reaches is "
            f"{lowest / 2**20:.2f} MiB ({lowest} bytes); raise the budget to at least that, or shard the "
            "model further (more tensor or pipeline parallelism)"
        )
    scale = max(1.0, max((u.recompute_s for u in units), default=1.0))
    prob = pulp.LpProblem("recompute", pulp.LpMinimize)
    # PuLP >= 3.3 wants variables made by their problem
    make = prob.add_variable if hasattr(prob, "add_variable") else pulp.LpVariable
    r = [make(f"r{i}", 0, 1, cat="Binary") for i in range(len(units))]
    # a tiny pull towards fewer recomputed bytes breaks ties between equal times the same way as the DP
    prob += pulp.lpSum((u.recompute_s / scale) * x for u, x in zip(units, r, strict=True))
    kept = [u.kept_bytes[0] - x * (u.kept_bytes[0] - u.kept_bytes[1]) for u, x in zip(units, r, strict=True)]
    norm = float(max(budget_bytes, 1))  # bytes scaled to ~1 keep CBC's tolerances meaningful
    prefix: list = []
    for i, u in enumerate(units):
        phase = u.phase_bytes[0] + r[i] * (u.phase_bytes[1] - u.phase_bytes[0])
        prob += (pulp.lpSum(prefix) + phase) * (1 / norm) <= budget_bytes / norm, f"phase{i}"
        prefix.append(kept[i])
    prob += (pulp.lpSum(prefix) + problem.tail_bytes) * (1 / norm) <= budget_bytes / norm, "tail"
    with warnings.catch_warnings():  # PuLP 3.x announces PULP_CBC_CMD's renaming in 4.0
        warnings.simplefilter("ignore", DeprecationWarning)
        solver = pulp.PULP_CBC_CMD(msg=False, timeLimit=max(1, int(time_limit_s)), threads=1)
    prob.solve(solver)
    status = pulp.LpStatus[prob.status]
    if status == "Infeasible":
        raise DoesNotFitError(
            f"no recomputation fits {budget_bytes / 2**20:.2f} MiB (the recompute ILP is infeasible); the lowest "
            f"peak recomputation reaches is at most {lowest / 2**20:.2f} MiB ({lowest} bytes)"
        )
    if status != "Optimal" and not all(x.value() is not None for x in r):
        raise SolverError(f"the recompute ILP ended {status} within {time_limit_s:.0f} s with no solution")
    choice = tuple(int(round(x.value() or 0)) for x in r)
    if model_peak(problem, choice) > budget_bytes:  # rounding at the budget's edge: never return a misfit
        raise SolverError("the recompute ILP returned a choice above the budget (solver tolerance)")
    return choice


def _lowest_choice(problem: RematProblem) -> tuple[tuple[int, ...], bool]:
    """The choice of lowest model peak (the DP front's last point); when the front is too large, the lower
    of nothing and everything recomputed, not exact (then the ILP itself decides feasibility)."""
    from shardwise.passes.remat.dp import pareto_front

    try:
        return pareto_front(problem)[-1][2], True
    except SolverError:
        n = len(problem.units)
        return min(((0,) * n, (1,) * n), key=lambda c: model_peak(problem, c)), False
