"""The planner's use of rematerialization: make a flat training plan fit by recomputing layers.

``fit_by_recomputation(plan, capacity_bytes)``: a plan whose predicted peak is within the capacity is
returned unchanged; otherwise the least recompute time that brings every rank's peak within the capacity
(``passes.remat.cheapest_recomputation``: whole layers or their children, whichever recomputes less) is
applied (``apply_recomputation``: plan.recompute, memory map,
predicted step time and a note) and the plan returned. When no recomputation fits, DoesNotFitError says the
lowest peak recomputation reaches. ``with_recomputation(plan, recompute)`` applies a user's setting
(``"all"``: every layer; an int: a byte budget per rank; ``"auto"``: only when the plan does not fit).

Meant to be called by ``planner.auto.plan_auto`` on a candidate that does not fit (see docs/memory.md).
"""

from __future__ import annotations

from shardwise.errors import UserInputError
from shardwise.ir.plan import ExecutionPlan
from shardwise.passes.remat import apply_recomputation, cheapest_recomputation, recompute_all_layers

__all__ = ["fit_by_recomputation", "with_recomputation", "RECOMPUTE_SETTINGS"]

RECOMPUTE_SETTINGS = ("none", "auto", "all", "<bytes per rank>")


def fit_by_recomputation(plan: ExecutionPlan, capacity_bytes: int | None = None, *, method: str = "dp") -> ExecutionPlan:
    """``plan`` if it fits ``capacity_bytes`` (default: the device capacity the plan records), else the plan
    with the cheapest recomputation that fits (see the module docstring)."""
    capacity = capacity_bytes if capacity_bytes is not None else min(m.capacity_bytes for m in plan.memory)
    if max(plan.predicted.memory_bytes) <= capacity:
        return plan
    choice = cheapest_recomputation(plan, capacity, method=method)
    return apply_recomputation(plan, choice)


def with_recomputation(plan: ExecutionPlan, recompute: str | int | None) -> ExecutionPlan:
    """``plan`` with a user's recompute setting applied (see the module docstring)."""
    if recompute is None or recompute == "none":
        return plan
    if recompute == "all":
        return apply_recomputation(plan, recompute_all_layers(plan))
    if recompute == "auto":
        return fit_by_recomputation(plan)
    if isinstance(recompute, int) and not isinstance(recompute, bool) and recompute > 0:
        return apply_recomputation(plan, cheapest_recomputation(plan, recompute))
    raise UserInputError(
        f"recompute={recompute!r}: use 'none', 'auto' (only when the plan does not fit), 'all' (every layer) "
        "or a memory budget in bytes per rank"
    )
