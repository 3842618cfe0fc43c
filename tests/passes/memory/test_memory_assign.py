"""Offset assignment: validity on random instances, optimality where it is known, errors, MiniMalloc data."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardwise.errors import DoesNotFitError, PlanError, UserInputError
from shardwise.passes.memory import (
    Assignment,
    Buffer,
    assign_offsets,
    best_fit,
    lower_bound,
    verify_assignment,
)

# public data sets live outside the repository, in the directory $SHARDWISE_DATA names (CONTRIBUTING.md)
DATA = Path(os.environ.get("SHARDWISE_DATA") or "/nonexistent") / "minimalloc-challenging"
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def buffer_sets(draw, max_n: int = 10, max_t: int = 12, max_size: int = 16) -> list[Buffer]:
    n = draw(st.integers(1, max_n))
    out = []
    for i in range(n):
        start = draw(st.integers(0, max_t - 1))
        end = draw(st.integers(start + 1, max_t))
        out.append(Buffer(f"b{i}", start, end, draw(st.integers(1, max_size))))
    return out


@st.composite
def packed_sets(draw, height: int = 16, width: int = 10) -> list[Buffer]:
    """Buffers cut out of a full (time x bytes) rectangle: they fit in ``height`` bytes with no gap."""
    pieces = [(0, width, 0, height)]  # (start, end, low byte, high byte)
    for _ in range(draw(st.integers(0, 7))):
        k = draw(st.integers(0, len(pieces) - 1))
        t0, t1, y0, y1 = pieces[k]
        if draw(st.booleans()) and t1 - t0 > 1:
            cut = draw(st.integers(t0 + 1, t1 - 1))
            pieces[k : k + 1] = [(t0, cut, y0, y1), (cut, t1, y0, y1)]
        elif y1 - y0 > 1:
            cut = draw(st.integers(y0 + 1, y1 - 1))
            pieces[k : k + 1] = [(t0, t1, y0, cut), (t0, t1, cut, y1)]
    return [Buffer(f"p{i}", t0, t1, y1 - y0) for i, (t0, t1, y0, y1) in enumerate(pieces)]


def _brute_force_arena(bufs: list[Buffer]) -> int:
    """The smallest arena, by trying every offset of every buffer (tiny instances only)."""
    best = sum(b.size for b in bufs)
    order = sorted(range(len(bufs)), key=lambda i: -bufs[i].size)
    offs: dict[int, int] = {}

    def go(k: int, arena: int) -> None:
        nonlocal best
        if arena >= best:
            return
        if k == len(order):
            best = arena
            return
        i = order[k]
        b = bufs[i]
        for o in range(0, best - b.size):
            if all(
                not b.overlaps(bufs[j]) or o + b.size <= offs[j] or offs[j] + bufs[j].size <= o for j in offs
            ):
                offs[i] = o
                go(k + 1, max(arena, o + b.size))
                del offs[i]

    go(0, 0)
    return best


# --- values and errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [dict(start=0, end=2, size=0), dict(start=0, end=2, size=-4), dict(start=3, end=3, size=4),
     dict(start=5, end=2, size=4), dict(start=0, end=2, size=1.5)],
)  # fmt: skip
def test_bad_buffers_are_refused(kwargs):
    with pytest.raises(UserInputError):
        Buffer("x", **kwargs)


def test_duplicate_ids_and_bad_arguments_are_refused():
    bufs = [Buffer("a", 0, 2, 4), Buffer("a", 1, 3, 4)]
    with pytest.raises(UserInputError, match="twice"):
        assign_offsets(bufs)
    with pytest.raises(UserInputError, match="alignment"):
        assign_offsets([Buffer("a", 0, 2, 4)], alignment=0)
    with pytest.raises(UserInputError, match="order"):
        best_fit([Buffer("a", 0, 2, 4)], order="area")  # type: ignore[arg-type]


def test_lower_bound_treats_end_as_exclusive():
    assert lower_bound([Buffer("a", 0, 2, 4), Buffer("b", 2, 4, 8)]) == 8
    assert lower_bound([Buffer("a", 0, 3, 4), Buffer("b", 2, 4, 8)]) == 12
    assert lower_bound([]) == 0
    a = assign_offsets([])
    assert a.arena_bytes == 0 and a.optimal and a.offsets == ()


def test_verify_catches_overlap_missing_and_capacity():
    bufs = [Buffer("a", 0, 2, 4), Buffer("b", 1, 3, 4)]
    good = Assignment((("a", 0), ("b", 4)), 8, 8, "test", True, 0.0)
    verify_assignment(bufs, good)
    verify_assignment(bufs, good, capacity=8)
    with pytest.raises(DoesNotFitError):
        verify_assignment(bufs, good, capacity=7)
    with pytest.raises(PlanError, match="share bytes"):
        verify_assignment(bufs, Assignment((("a", 0), ("b", 2)), 6, 8, "test", False, 0.0))
    with pytest.raises(PlanError, match="no offset"):
        verify_assignment(bufs, Assignment((("a", 0),), 4, 8, "test", False, 0.0))
    with pytest.raises(PlanError, match="arena_bytes"):
        verify_assignment(bufs, Assignment((("a", 0), ("b", 4)), 9, 8, "test", False, 0.0))
    # not live together: the same bytes are fine
    verify_assignment([Buffer("a", 0, 2, 4), Buffer("b", 2, 3, 4)],
                      Assignment((("a", 0), ("b", 0)), 4, 4, "test", True, 0.0))  # fmt: skip


# --- known answers ------------------------------------------------------------------------------------

# Best-fit needs 6 bytes by size, 7 by lifetime; 5 (the lower bound) is possible: b3 at 0, b2 and b0
# on top of it, b1 below b0 once b3 is dead.
SMALL = [Buffer("b0", 4, 8, 1), Buffer("b1", 5, 8, 4), Buffer("b2", 3, 4, 3), Buffer("b3", 1, 5, 2)]


def test_exact_search_beats_best_fit_on_a_small_instance():
    assert best_fit(SMALL, order="size").arena_bytes == 6
    assert best_fit(SMALL, order="lifetime").arena_bytes == 7
    a = assign_offsets(SMALL)
    verify_assignment(SMALL, a)
    assert (a.arena_bytes, a.lower_bound_bytes, a.method, a.optimal) == (5, 5, "exact", True)
    assert a.offset("b1") + 4 <= a.offset("b0") or a.offset("b0") + 1 <= a.offset("b1")
    with pytest.raises(KeyError, match="nope"):
        a.offset("nope")


def test_capacity_goal_and_time_limit():
    # within a capacity greedy already meets, greedy is kept; below the lower bound nothing fits
    assert assign_offsets(SMALL, capacity=6).method.startswith("best-fit")
    assert assign_offsets(SMALL, capacity=5).arena_bytes == 5
    assert assign_offsets(SMALL, capacity=4).arena_bytes == 6  # best effort, does not fit
    # no time for the search: greedy, not claimed optimal
    a = assign_offsets(SMALL, time_limit_s=0.0)
    assert a.arena_bytes == 6 and not a.optimal


def test_proven_optimum_above_the_lower_bound():
    # three buffers pairwise live together in a cycle of two-step overlaps plus a long one
    bufs = [Buffer("a", 0, 2, 2), Buffer("b", 1, 3, 2), Buffer("c", 2, 4, 2), Buffer("d", 0, 4, 1),
            Buffer("e", 3, 5, 2), Buffer("f", 1, 2, 1)]  # fmt: skip
    a = assign_offsets(bufs)
    verify_assignment(bufs, a)
    assert a.optimal
    assert a.arena_bytes == _brute_force_arena(bufs)


def test_alignment():
    bufs = [Buffer("a", 0, 4, 3), Buffer("b", 1, 3, 5), Buffer("c", 2, 6, 7)]
    a = assign_offsets(bufs, alignment=8)
    verify_assignment(bufs, a)
    assert all(o % 8 == 0 for _, o in a.offsets)


def test_deterministic():
    bufs = [Buffer(f"x{i}", i % 5, i % 5 + 1 + i % 3, 1 + (7 * i) % 5) for i in range(14)]
    assert assign_offsets(bufs).offsets == assign_offsets(list(reversed(bufs))).offsets


# --- properties ---------------------------------------------------------------------------------------


@FAST
@given(buffer_sets())
def test_any_assignment_is_valid_and_bounded(bufs):
    a = assign_offsets(bufs, time_limit_s=5.0)
    verify_assignment(bufs, a)
    assert a.arena_bytes >= a.lower_bound_bytes == lower_bound(bufs)
    greedy = min(best_fit(bufs, order=o).arena_bytes for o in ("size", "lifetime"))
    assert a.arena_bytes <= greedy
    for order in ("size", "lifetime"):
        verify_assignment(bufs, best_fit(bufs, order=order))


@FAST
@given(buffer_sets(max_n=8), st.sampled_from([2, 4, 8]))
def test_aligned_assignments_are_valid(bufs, alignment):
    a = assign_offsets(bufs, alignment=alignment, time_limit_s=5.0)
    verify_assignment(bufs, a)
    assert all(o % alignment == 0 for _, o in a.offsets)


@FAST
@given(packed_sets())
def test_exact_search_reaches_the_lower_bound_of_packings(bufs):
    a = assign_offsets(bufs, time_limit_s=10.0)
    verify_assignment(bufs, a)
    assert a.arena_bytes == a.lower_bound_bytes == 16
    assert a.optimal


@settings(max_examples=40, deadline=None)
@given(buffer_sets(max_n=5, max_t=6, max_size=3))
def test_optimal_flag_matches_brute_force(bufs):
    a = assign_offsets(bufs, time_limit_s=10.0)
    verify_assignment(bufs, a)
    opt = _brute_force_arena(bufs)
    assert a.arena_bytes >= opt
    if a.optimal:
        assert a.arena_bytes == opt
    assert a.optimal  # tiny: the search always finishes


# --- MiniMalloc's challenging instances ---------------------------------------------------------------


def _instance(name: str) -> tuple[list[Buffer], int]:
    path = next(iter(DATA.glob(f"{name}.*.csv")), None)
    if path is None:
        pytest.skip(f"MiniMalloc data absent: no {name}.*.csv in {DATA} (set SHARDWISE_DATA, see CONTRIBUTING.md)")
    with path.open() as f:
        bufs = [Buffer(r["id"], int(r["lower"]), int(r["upper"]), int(r["size"])) for r in csv.DictReader(f)]
    return bufs, int(path.stem.split(".")[1])


@pytest.mark.parametrize("name", ["G", "J"])
def test_challenging_instance_fits(name):
    bufs, capacity = _instance(name)
    greedy = min(best_fit(bufs, order=o).arena_bytes for o in ("size", "lifetime"))
    assert greedy > capacity  # greedy does not fit
    a = assign_offsets(bufs, capacity=capacity, time_limit_s=120.0)
    verify_assignment(bufs, a, capacity=capacity)
    assert a.method == "exact"


def test_brute_force_helper_is_right():
    # the helper the optimality test trusts: two buffers live together stack, apart they share
    assert _brute_force_arena([Buffer("a", 0, 2, 3), Buffer("b", 1, 3, 2)]) == 5
    assert _brute_force_arena([Buffer("a", 0, 1, 3), Buffer("b", 1, 3, 2)]) == 3


# --- CP-SAT, the second exact search ----------------------------------------------------------------------


def test_cpsat_fits_exact_packings_and_proves_infeasibility():
    from shardwise.passes.memory.cpsat import fit_within_cpsat

    bufs = [Buffer(f"p{i}", t0, t1, y1 - y0) for i, (t0, t1, y0, y1) in enumerate(
        [(0, 4, 0, 3), (4, 10, 0, 2), (4, 7, 2, 5), (7, 10, 2, 4), (0, 2, 3, 5), (2, 4, 3, 5), (7, 10, 4, 5)]
    )]  # fmt: skip
    args = ([b.start for b in bufs], [b.end for b in bufs], [b.size for b in bufs])
    res = fit_within_cpsat(*args, 5, time_limit_s=10.0, deterministic_limit=5.0)
    assert res.status == "found" and res.offsets is not None
    a = Assignment(
        offsets=tuple(sorted((b.id, o) for b, o in zip(bufs, res.offsets))),
        arena_bytes=max(o + b.size for b, o in zip(bufs, res.offsets)), lower_bound_bytes=lower_bound(bufs),
        method="cp-sat", optimal=True, solve_s=0.0,
    )  # fmt: skip
    verify_assignment(bufs, a, capacity=5)
    assert fit_within_cpsat(*args, 4, time_limit_s=10.0).status == "infeasible"  # below the lower bound
    aligned = fit_within_cpsat(*args, 8, time_limit_s=10.0, alignment=2)
    assert aligned.status == "found" and all(o % 2 == 0 for o in aligned.offsets or ())


def test_cpsat_takes_over_when_the_canonical_search_runs_out():
    assert best_fit(SMALL).arena_bytes == 6
    a = assign_offsets(SMALL, capacity=5, node_limit=1)  # one node: the canonical search gives up
    verify_assignment(SMALL, a, capacity=5)
    assert a.method == "cp-sat"
    b = assign_offsets(SMALL, node_limit=1)  # no capacity: CP-SAT reaches the lower bound too
    assert (b.arena_bytes, b.method, b.optimal) == (5, "cp-sat", True)
    assert assign_offsets(SMALL, capacity=5, node_limit=1, use_cpsat=False).arena_bytes == 6
