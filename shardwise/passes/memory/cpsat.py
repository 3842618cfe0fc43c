"""Offsets within a capacity by constraint programming (OR-Tools CP-SAT): the other exact search.

The model: one offset variable per buffer in ``[0, capacity - size]`` (a multiple of the alignment), its
byte interval, its fixed step interval, and no two (step x byte) rectangles overlapping
(``AddNoOverlap2D``), with the cumulative of live bytes under the capacity as a redundant constraint.
CP-SAT and the canonical-solution search (``search``) are strong on different instances (tight sections
with many interchangeable pieces favour CP-SAT); ``assign_offsets`` runs this one when the other hits
its budget.

Guarantees: a "found" result satisfies the capacity and never overlaps live buffers; "infeasible" is a
proof; "limit" means the budget ran out. One worker and a deterministic-time budget make the outcome the
same on every run (the wall-clock limit is a safety net only).
"""

from __future__ import annotations

from collections.abc import Sequence

from shardwise.passes.memory.search import SearchResult

__all__ = ["fit_within_cpsat"]


def fit_within_cpsat(
    starts: Sequence[int],
    ends: Sequence[int],
    sizes: Sequence[int],
    capacity: int,
    *,
    time_limit_s: float,
    deterministic_limit: float | None = None,
    alignment: int = 1,
    hint: Sequence[int] | None = None,
) -> SearchResult:
    """Offsets (indexed like the input) of buffers live over ``[starts[i], ends[i])`` within ``capacity``."""
    from ortools.sat.python import cp_model

    n = len(sizes)
    if n == 0:
        return SearchResult("found", (), 0)
    if time_limit_s <= 0:
        return SearchResult("limit", None, 0)
    if max(sizes) > capacity:
        return SearchResult("infeasible", None, 0)
    model = cp_model.CpModel()
    steps, spans, offsets = [], [], []
    for i in range(n):
        top = (capacity - sizes[i]) // alignment
        slot = model.new_int_var(0, top, f"s{i}")
        off = slot if alignment == 1 else model.new_int_var(0, top * alignment, f"o{i}")
        if alignment != 1:
            model.add(off == alignment * slot)
        offsets.append(off)
        steps.append(model.new_fixed_size_interval_var(starts[i], ends[i] - starts[i], f"t{i}"))
        spans.append(model.new_fixed_size_interval_var(off, sizes[i], f"b{i}"))
        if hint is not None and 0 <= hint[i] <= capacity - sizes[i] and hint[i] % alignment == 0:
            model.add_hint(off, int(hint[i]))
    model.add_no_overlap_2d(steps, spans)
    model.add_cumulative(steps, list(sizes), capacity)
    solver = cp_model.CpSolver()
    solver.parameters.num_workers = 1
    solver.parameters.max_time_in_seconds = time_limit_s
    if deterministic_limit is not None:
        solver.parameters.max_deterministic_time = deterministic_limit
    status = solver.solve(model)
    if status in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return SearchResult("found", tuple(int(solver.value(o)) for o in offsets), 0)
    if status == cp_model.INFEASIBLE:
        return SearchResult("infeasible", None, 0)
    return SearchResult("limit", None, 0)
