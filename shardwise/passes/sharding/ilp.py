"""The placement ILP (Alpa's intra-op formulation, with shared resharding) and its two solver back ends.

Variables and constraints, for classes ``c`` (a group of ops deciding together, see ``shrink``) with
candidates ``a``:

- ``x[c,a]`` binary, ``sum_a x[c,a] = 1``; cost ``sum cost[c,a] x[c,a]``; memory ``sum mem[c,a] x[c,a]``;
- for two classes ``P != Q`` that an edge joins (both with several candidates) a pair variable
  ``e[P,Q,a,b]`` in [0, 1] with ``sum_b e = x[P,a]`` and ``sum_a e = x[Q,b]`` (it is integral whenever x
  is); a single-consumer edge costs ``sum r[a,b] e[a,b]``;
- a value read by several consumers is redistributed once per target: ``y[v,a,t] >= sum_{b: t_j(b) = t}
  e[P,Q_j,a,b]`` for every consumer ``j``, cost ``sum c[a,t] y[v,a,t]`` (codegen shares the collective).

- a fixed charge (``Charge``) is paid once when any of its trigger candidates is chosen: ``z >= x[c,a]`` for
  each trigger, cost ``cost z`` (the latency of a gradient bucket, paid once whichever parameters fill it).

Edges within one class are linear (``e[a,b] = x[a]`` if ``a == b``) and so are edges to a class with one
candidate. Solvers: PuLP + CBC (default) or OR-Tools CP-SAT, both single-threaded (deterministic) with a
time limit; the best solution found when the limit hits is used, and the status says so.

Memory is in the objective, second: after the least time ``T*`` is found, a second solve keeps the time within
``(1 + time_tolerance) T*`` and minimizes the memory (``sum mem[c,a] x[c,a]``): of the placements predicted as
fast as the fastest, the one whose weights and optimizer state take the least memory per device (a weight
read split over the tensor-parallel axis costs the same time stored whole or split in inference, and a fraction
of the bytes split; ``ClassVar.state``). The default tolerance only breaks ties (``TIME_TOLERANCE``): trading time for memory between whole layouts is the
planner's choice (``planner.search.MEMORY_TOLERANCE``), not many small trades inside one placement.
``time_tolerance=None`` solves for time alone.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

from shardwise.errors import DoesNotFitError, SolverError

__all__ = [
    "ClassVar", "Consumer", "SharedValue", "Charge", "Problem", "Solution", "solve", "SOLVERS", "TIME_TOLERANCE",
]  # fmt: skip

SOLVERS = ("cbc", "cpsat")
#: placements predicted within this fraction of the fastest are compared by memory (see the module docstring)
TIME_TOLERANCE = 1e-6
_US = 1e6


@dataclass
class ClassVar:
    name: str
    cost: list[float]  # seconds per candidate (already multiplied by the class's count)
    memory: list[float]  # bytes per candidate (idem)
    state: list[float] | None = None  # of which parameters, gradients and optimizer state (the tie-break's)


@dataclass
class Consumer:
    """One consumer of a shared value: its class and, per candidate of it, the target key (None: free)."""

    cls: int
    target: list[Hashable | None]


@dataclass
class SharedValue:
    """A value class read by several consumers: ``cost[(a, key)]`` for producer candidate ``a``."""

    producer: int
    consumers: list[Consumer]
    cost: dict[tuple[int, Hashable], float]


@dataclass
class Charge:
    """Seconds paid once if any ``(class, candidate)`` of ``triggers`` is chosen."""

    cost: float
    triggers: list[tuple[int, int]]


@dataclass
class Problem:
    classes: list[ClassVar]
    pair_cost: dict[tuple[int, int], list[list[float]]] = field(default_factory=dict)  # (P, Q) -> r[a][b]
    shared: list[SharedValue] = field(default_factory=list)
    charges: list[Charge] = field(default_factory=list)
    memory_budget: float | None = None
    constant_time: float = 0.0
    constant_memory: float = 0.0

    def add_pair(self, p: int, q: int, matrix: list[list[float]]) -> None:
        """Add an edge cost r[a][b] between classes p and q (folded into linear costs where possible)."""
        np_, nq = len(self.classes[p].cost), len(self.classes[q].cost)
        if p == q:
            for a in range(np_):
                self.classes[p].cost[a] += matrix[a][a]
            return
        if np_ == 1:
            for b in range(nq):
                self.classes[q].cost[b] += matrix[0][b]
            return
        if nq == 1:
            for a in range(np_):
                self.classes[p].cost[a] += matrix[a][0]
            return
        if not any(v for row in matrix for v in row):
            return
        key, m = ((p, q), matrix) if p < q else ((q, p), [list(col) for col in zip(*matrix, strict=True)])
        have = self.pair_cost.get(key)
        if have is None:
            self.pair_cost[key] = [list(row) for row in m]
        else:
            for a, row in enumerate(m):
                for b, v in enumerate(row):
                    have[a][b] += v


@dataclass(frozen=True)
class Solution:
    choice: tuple[int, ...]  # candidate index per class
    objective_s: float
    memory_bytes: float
    status: str  # "optimal" | "feasible (time limit)" | "trivial"
    solve_s: float
    variables: int
    constraints: int


def _pairs_needed(problem: Problem) -> set[tuple[int, int]]:
    need = set(problem.pair_cost)
    for sv in problem.shared:
        for c in sv.consumers:
            p, q = sv.producer, c.cls
            if p != q and len(problem.classes[p].cost) > 1 and len(problem.classes[q].cost) > 1:
                need.add((min(p, q), max(p, q)))
    return need


def solve(
    problem: Problem, *, solver: str = "cbc", time_limit_s: float = 60.0, threads: int = 1,
    time_tolerance: float | None = TIME_TOLERANCE,
) -> Solution:  # fmt: skip
    """Minimize time subject to memory, then memory within ``time_tolerance`` of the least time (see the
    module docstring); raises DoesNotFitError when no assignment fits the budget."""
    if solver not in SOLVERS:
        raise SolverError(f"unknown solver {solver!r}: choose one of {', '.join(SOLVERS)}")
    if all(len(c.cost) == 1 for c in problem.classes):
        choice = tuple(0 for _ in problem.classes)
        return _evaluate(problem, choice, "trivial", 0.0, 0, 0)
    run = _solve_cpsat if solver == "cpsat" else _solve_cbc
    fastest = run(problem, time_limit_s, threads, None)
    if time_tolerance is None or not any(c.state and len(set(c.state)) > 1 for c in problem.classes):
        return fastest
    try:
        leaner = run(problem, time_limit_s, threads, fastest.objective_s * (1 + time_tolerance))
    except (DoesNotFitError, SolverError):  # the solver could not place again within the cap: keep the fastest
        return fastest
    if leaner.objective_s <= fastest.objective_s * (1 + time_tolerance) * (1 + 1e-9) and (
        _state(problem, leaner.choice) < _state(problem, fastest.choice)
    ):
        return Solution(
            leaner.choice, leaner.objective_s, leaner.memory_bytes, leaner.status,
            fastest.solve_s + leaner.solve_s, leaner.variables, leaner.constraints,
        )  # fmt: skip
    return fastest


def _fixed_cost(problem: Problem) -> float:
    """The time of the classes with one candidate and of the charges they trigger (no variable carries it)."""
    return sum(c.cost[0] for c in problem.classes if len(c.cost) == 1) + sum(
        ch.cost for ch in problem.charges if _charged_anyway(problem, ch)
    )


def _charged_anyway(problem: Problem, charge: Charge) -> bool:
    """Whether a class with one candidate triggers ``charge`` (whatever the solver chooses)."""
    return any(len(problem.classes[c].cost) == 1 and a == 0 for c, a in charge.triggers)


def _charge_triggers(problem: Problem, charge: Charge) -> list[tuple[int, int]]:
    """The triggers of a charge that depend on a choice (classes with several candidates)."""
    return [(c, a) for c, a in charge.triggers if len(problem.classes[c].cost) > 1]


def _state(problem: Problem, choice: Sequence[int]) -> float:
    return sum((c.state or [0.0] * len(c.cost))[a] for c, a in zip(problem.classes, choice, strict=True))


def _evaluate(
    problem: Problem, choice: Sequence[int], status: str, solve_s: float, nvars: int, ncons: int
) -> Solution:
    """The exact objective and memory of an assignment (independent of the solver's arithmetic)."""
    t = problem.constant_time + sum(c.cost[a] for c, a in zip(problem.classes, choice, strict=True))
    mem = problem.constant_memory + sum(c.memory[a] for c, a in zip(problem.classes, choice, strict=True))
    for (p, q), m in problem.pair_cost.items():
        t += m[choice[p]][choice[q]]
    for sv in problem.shared:
        a = choice[sv.producer]
        keys = {c.target[choice[c.cls]] for c in sv.consumers} - {None}
        t += sum(sv.cost.get((a, k), 0.0) for k in keys)
    for ch in problem.charges:
        if any(choice[c] == a for c, a in ch.triggers):
            t += ch.cost
    return Solution(tuple(choice), t, mem, status, solve_s, nvars, ncons)


def _terms_for(problem: Problem, sv: SharedValue, consumer: Consumer, a: int, key: Hashable, x, e):  # noqa: ANN001, ANN202
    """The expression sum_{b: target(b) = key} e[P,Q,a,b] as (coef, var) terms plus a constant."""
    p, q = sv.producer, consumer.cls
    np_, nq = len(problem.classes[p].cost), len(problem.classes[q].cost)
    terms: list[tuple[float, object]] = []
    const = 0.0
    bs = [b for b in range(nq) if consumer.target[b] == key]
    if p == q:
        if a in bs:
            if np_ == 1:
                const += 1.0
            else:
                terms.append((1.0, x[p][a]))
        return terms, const
    for b in bs:
        if np_ == 1 and nq == 1:
            const += 1.0
        elif np_ == 1:
            terms.append((1.0, x[q][b]))
        elif nq == 1:
            terms.append((1.0, x[p][a]))
        else:
            terms.append((1.0, e[(p, q)][a][b] if p < q else e[(q, p)][b][a]))
    return terms, const


def _var(lp, name: str, low: float | None, high: float | None, cat: str = "Continuous"):  # noqa: ANN001, ANN202
    """A PuLP variable attached to ``lp`` (PuLP >= 3.3 wants variables made by their problem)."""
    if hasattr(lp, "add_variable"):
        return lp.add_variable(name, low, high, cat=cat)
    import pulp

    return pulp.LpVariable(name, low, high, cat=cat)


def _solve_cbc(problem: Problem, time_limit_s: float, threads: int, time_cap: float | None) -> Solution:
    """Least time (``time_cap`` None), or least memory with the time at most ``time_cap``."""
    import pulp

    start = time.perf_counter()
    lp = pulp.LpProblem("placement", pulp.LpMinimize)
    x: dict[int, list[object]] = {}
    objective: list[tuple[float, object]] = []
    nvars = ncons = 0
    for ci, c in enumerate(problem.classes):
        if len(c.cost) == 1:
            continue
        x[ci] = [_var(lp, f"x_{ci}_{a}", 0, 1, "Binary") for a in range(len(c.cost))]
        nvars += len(c.cost)
        lp += pulp.lpSum(x[ci]) == 1
        ncons += 1
        objective += [(v, var) for v, var in zip(c.cost, x[ci], strict=True) if v]
    e: dict[tuple[int, int], list[list[object]]] = {}
    for p, q in sorted(_pairs_needed(problem)):
        np_, nq = len(problem.classes[p].cost), len(problem.classes[q].cost)
        e[(p, q)] = [[_var(lp, f"e_{p}_{q}_{a}_{b}", 0, 1) for b in range(nq)] for a in range(np_)]
        nvars += np_ * nq
        for a in range(np_):
            lp += pulp.lpSum(e[(p, q)][a]) == x[p][a]
        for b in range(nq):
            lp += pulp.lpSum(e[(p, q)][a][b] for a in range(np_)) == x[q][b]
        ncons += np_ + nq
        m = problem.pair_cost.get((p, q))
        if m is not None:
            objective += [(m[a][b], e[(p, q)][a][b]) for a in range(np_) for b in range(nq) if m[a][b]]
    const = problem.constant_time
    ny = 0
    for sv in problem.shared:
        for (a, key), cost in sorted(sv.cost.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
            if not cost:
                continue
            rows = [_terms_for(problem, sv, consumer, a, key, x, e) for consumer in sv.consumers]
            rows = [(terms, c0) for terms, c0 in rows if terms or c0]
            if not rows:
                continue
            y = _var(lp, f"y_{ny}", 0, None)
            ny += 1
            nvars += 1
            for terms, c0 in rows:
                lp += y >= pulp.lpSum(coef * var for coef, var in terms) + c0
                ncons += 1
            objective.append((cost, y))
    for k, ch in enumerate(problem.charges):
        triggers = _charge_triggers(problem, ch)
        if not ch.cost or _charged_anyway(problem, ch) or not triggers:
            continue
        z = _var(lp, f"z_{k}", 0, 1)
        nvars += 1
        for c, a in triggers:
            lp += z >= x[c][a]
            ncons += 1
        objective.append((ch.cost, z))
    # in microseconds: CBC's absolute tolerances would swallow differences of a few seconds' millionths; the
    # classes with one candidate add their fixed cost (it matters when the time is capped)
    const += _fixed_cost(problem)
    time_expr = pulp.lpSum(coef * _US * var for coef, var in objective) + const * _US
    mem_terms = []
    fixed = problem.constant_memory
    for ci, c in enumerate(problem.classes):
        if len(c.memory) == 1:
            fixed += c.memory[0]
        else:
            mem_terms += [(v, var) for v, var in zip(c.memory, x[ci], strict=True) if v]
    if time_cap is None:
        lp += time_expr
    else:  # the parameters' memory, in MiB (keeps CBC's tolerances meaningful)
        state_terms = [
            (v, var) for ci, c in enumerate(problem.classes) if len(c.cost) > 1 and c.state
            for v, var in zip(c.state, x[ci], strict=True) if v
        ]  # fmt: skip
        lp += pulp.lpSum(coef / 2**20 * var for coef, var in state_terms)
        lp += time_expr <= time_cap * _US
        ncons += 1
    if problem.memory_budget is not None:
        lp += pulp.lpSum(coef * var for coef, var in mem_terms) <= problem.memory_budget - fixed
        ncons += 1
    with warnings.catch_warnings():  # PuLP 3 flags its bundled CBC as deprecated; it is the one installed
        warnings.simplefilter("ignore", DeprecationWarning)
        cmd = pulp.PULP_CBC_CMD(msg=False, timeLimit=max(1, int(time_limit_s)), threads=threads)
        lp.solve(cmd)
    status = pulp.LpStatus[lp.status]
    elapsed = time.perf_counter() - start
    if status == "Infeasible":
        raise DoesNotFitError("no placement fits the per-device memory budget")
    choice = []
    for ci, c in enumerate(problem.classes):
        if len(c.cost) == 1:
            choice.append(0)
            continue
        values = [pulp.value(v) or 0.0 for v in x[ci]]
        if max(values) < 0.5:
            raise SolverError(f"CBC returned no solution (status {status}) within {time_limit_s:.0f} s")
        choice.append(max(range(len(values)), key=lambda i: values[i]))
    sol_status = "optimal" if status == "Optimal" and elapsed < time_limit_s else "feasible (time limit)"
    return _evaluate(problem, choice, sol_status, elapsed, nvars, ncons)


def _solve_cpsat(problem: Problem, time_limit_s: float, threads: int, time_cap: float | None) -> Solution:
    """Least time (``time_cap`` None), or least memory with the time at most ``time_cap``."""
    from ortools.sat.python import cp_model

    start = time.perf_counter()
    scale = 1e9  # nanoseconds
    budget = problem.memory_budget or 1.0
    mem_scale = min(1.0, 1e9 / max(budget, 1.0))  # whole bytes, or ~1e9 units of the budget
    model = cp_model.CpModel()
    x: dict[int, list[object]] = {}
    objective = []
    nvars = ncons = 0
    for ci, c in enumerate(problem.classes):
        if len(c.cost) == 1:
            continue
        x[ci] = [model.NewBoolVar(f"x_{ci}_{a}") for a in range(len(c.cost))]
        nvars += len(c.cost)
        model.AddExactlyOne(x[ci])
        ncons += 1
        objective += [
            (round(v * scale), var) for v, var in zip(c.cost, x[ci], strict=True) if round(v * scale)
        ]
    e: dict[tuple[int, int], list[list[object]]] = {}
    for p, q in sorted(_pairs_needed(problem)):
        np_, nq = len(problem.classes[p].cost), len(problem.classes[q].cost)
        e[(p, q)] = [[model.NewBoolVar(f"e_{p}_{q}_{a}_{b}") for b in range(nq)] for a in range(np_)]
        nvars += np_ * nq
        for a in range(np_):
            model.Add(sum(e[(p, q)][a]) == x[p][a])
        for b in range(nq):
            model.Add(sum(e[(p, q)][a][b] for a in range(np_)) == x[q][b])
        ncons += np_ + nq
        m = problem.pair_cost.get((p, q))
        if m is not None:
            objective += [
                (round(m[a][b] * scale), e[(p, q)][a][b])
                for a in range(np_)
                for b in range(nq)
                if round(m[a][b] * scale)
            ]
    ny = 0
    for sv in problem.shared:
        for (a, key), cost in sorted(sv.cost.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
            icost = round(cost * scale)
            if not icost:
                continue
            rows = [_terms_for(problem, sv, consumer, a, key, x, e) for consumer in sv.consumers]
            rows = [(terms, c0) for terms, c0 in rows if terms or c0]
            if not rows:
                continue
            y = model.NewBoolVar(f"y_{ny}")
            ny += 1
            nvars += 1
            for terms, c0 in rows:
                model.Add(y >= sum(var for _, var in terms) + int(c0))
                ncons += 1
            objective.append((icost, y))
    for k, ch in enumerate(problem.charges):
        triggers = _charge_triggers(problem, ch)
        if not round(ch.cost * scale) or _charged_anyway(problem, ch) or not triggers:
            continue
        z = model.NewBoolVar(f"z_{k}")
        nvars += 1
        for c, a in triggers:
            model.AddImplication(x[c][a], z)
            ncons += 1
        objective.append((round(ch.cost * scale), z))
    fixed = problem.constant_memory
    terms = []
    for ci, c in enumerate(problem.classes):
        if len(c.memory) == 1:
            fixed += c.memory[0]
        else:
            terms += [(math.ceil(v * mem_scale), var) for v, var in zip(c.memory, x[ci], strict=True)]
    if time_cap is None:
        model.Minimize(sum(c * v for c, v in objective))
    else:
        room = time_cap - problem.constant_time - _fixed_cost(problem)
        # each coefficient was rounded to a nanosecond: the fastest assignment may sum up to half a unit per term
        # above the true time
        model.Add(sum(c * v for c, v in objective) <= math.floor(room * scale) + len(objective))
        ncons += 1
        model.Minimize(sum(
            math.ceil(v * mem_scale) * var for ci, c in enumerate(problem.classes) if len(c.cost) > 1 and c.state
            for v, var in zip(c.state, x[ci], strict=True)
        ))  # fmt: skip
    if problem.memory_budget is not None:
        model.Add(sum(c * v for c, v in terms) <= math.floor((problem.memory_budget - fixed) * mem_scale))
        ncons += 1
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = float(time_limit_s)
    solver.parameters.num_search_workers = max(1, threads)
    solver.parameters.random_seed = 0
    status = solver.Solve(model)
    elapsed = time.perf_counter() - start
    if status == cp_model.INFEASIBLE:
        raise DoesNotFitError("no placement fits the per-device memory budget")
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        raise SolverError(
            f"CP-SAT found no solution within {time_limit_s:.0f} s (status {solver.StatusName(status)})"
        )
    choice = []
    for ci, c in enumerate(problem.classes):
        if len(c.cost) == 1:
            choice.append(0)
            continue
        choice.append(next(i for i, v in enumerate(x[ci]) if solver.Value(v)))
    sol_status = "optimal" if status == cp_model.OPTIMAL else "feasible (time limit)"
    return _evaluate(problem, choice, sol_status, elapsed, nvars, ncons)
