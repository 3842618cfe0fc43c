"""The recompute solvers on random chains: the DP is optimal (against brute force over every choice), the
ILP reaches the same recompute time, budgets are respected, and an impossible budget is a clear error."""

from __future__ import annotations

import itertools
import random

import pytest

from shardwise.errors import DoesNotFitError
from shardwise.passes.remat import RematProblem, RematUnit, model_peak, pareto_front, solve_chain, solve_ilp


def _chain(rng: random.Random, n: int) -> RematProblem:
    units = []
    for i in range(n):
        kept = rng.randint(10, 100)
        phase = rng.randint(50, 300)
        units.append(
            RematUnit(
                f"u{i}", 3 * i, 3 * i + 3, recompute_s=rng.choice([1.0, 2.0, 3.0, rng.random() * 4]),
                kept_bytes=(kept, rng.randint(0, kept // 3)), phase_bytes=(phase, phase + rng.randint(0, 40)),
            )
        )  # fmt: skip
    return RematProblem(tuple(units), fixed_bytes=rng.randint(0, 400), tail_bytes=rng.randint(0, 300))


def _brute(problem: RematProblem, budget: int) -> float | None:
    best = None
    for choice in itertools.product((0, 1), repeat=len(problem.units)):
        if model_peak(problem, choice) <= budget:
            t = sum(u.recompute_s for u, c in zip(problem.units, choice, strict=True) if c)
            best = t if best is None else min(best, t)
    return best


def _time(problem: RematProblem, choice: tuple[int, ...]) -> float:
    return sum(u.recompute_s for u, c in zip(problem.units, choice, strict=True) if c)


@pytest.mark.parametrize("seed", range(40))
def test_dp_is_optimal_against_brute_force(seed):
    rng = random.Random(seed)
    problem = _chain(rng, rng.randint(1, 9))
    lowest = pareto_front(problem)[-1][1]
    for budget in sorted({lowest, problem.baseline_bytes, (lowest + problem.baseline_bytes) // 2, lowest - 1}):
        want = _brute(problem, budget)
        if want is None:
            with pytest.raises(DoesNotFitError, match=f"lowest peak recomputation reaches is .*{lowest} bytes"):
                solve_chain(problem, budget)
            continue
        choice = solve_chain(problem, budget)
        assert model_peak(problem, choice) <= budget
        assert _time(problem, choice) == pytest.approx(want, abs=1e-9)


@pytest.mark.parametrize("seed", range(8))
def test_ilp_agrees_with_dp_on_chains(seed):
    rng = random.Random(100 + seed)
    problem = _chain(rng, rng.randint(3, 12))
    lowest = pareto_front(problem)[-1][1]
    for budget in (lowest, (lowest + problem.baseline_bytes) // 2, problem.baseline_bytes):
        dp = solve_chain(problem, budget)
        ilp = solve_ilp(problem, budget, time_limit_s=10)
        assert model_peak(problem, ilp) <= budget
        assert _time(problem, ilp) == pytest.approx(_time(problem, dp), rel=1e-6, abs=1e-9)
    with pytest.raises(DoesNotFitError, match="lowest peak"):
        solve_ilp(problem, lowest - 1)


def test_nothing_recomputed_when_the_budget_allows():
    problem = _chain(random.Random(7), 6)
    assert solve_chain(problem, problem.baseline_bytes) == (0,) * 6


def test_equal_layers_keep_a_small_front():
    unit = RematUnit("l", 0, 1, 1.0, (100, 10), (500, 520))
    units = tuple(RematUnit(f"l{i}", i, i + 1, 1.0, unit.kept_bytes, unit.phase_bytes) for i in range(48))
    problem = RematProblem(units, fixed_bytes=0, tail_bytes=200)
    front = pareto_front(problem)
    assert len(front) <= 49
    choice = solve_chain(problem, 3000)
    assert model_peak(problem, choice) <= 3000 and sum(choice) >= 23  # the tail: 200 + 4800 - 90 k <= 3000
