"""Choosing between making the fastest flat plan fit and a slower plan that fits as it is.

``made_to_fit(plan, fit, fits_as_is)``: ``fit`` is recomputation or host offload applied to the fastest
plan; ``fits_as_is`` plans the fastest layout that fits without them. Recomputing or offloading costs step
time, so a layout the search ranked lower can win once that cost is counted: the faster of the two is kept
and its notes say why. Used by ``shardwise.compile`` for ``recompute="auto"`` / ``offload="auto"``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from shardwise.errors import DoesNotFitError
from shardwise.ir.plan import ExecutionPlan

__all__ = ["made_to_fit"]


def made_to_fit(
    plan: ExecutionPlan, fit: Callable[[ExecutionPlan], ExecutionPlan], fits_as_is: Callable[[], ExecutionPlan] | None
) -> ExecutionPlan:
    """``fit(plan)``: the fastest flat plan made to fit by recomputation or host offload. With ``fits_as_is``
    (the setting is "auto"), the fastest plan that fits without them is planned too when ``fit`` had to change
    anything, and kept when it is predicted faster (recomputing or offloading can cost more than a slower
    layout) or when ``fit`` cannot make the fastest plan fit. Raises DoesNotFitError when neither fits."""
    try:
        fitted = fit(plan)
    except DoesNotFitError as exc:
        if fits_as_is is None:
            raise
        try:
            return fits_as_is()
        except DoesNotFitError:
            raise exc from None  # what recomputation or offload could reach says more
    if fitted is plan or fits_as_is is None:
        return fitted
    try:
        other = fits_as_is()
    except DoesNotFitError:
        return fitted
    if other.predicted.step_time_s >= fitted.predicted.step_time_s:
        return fitted
    why = (
        f"the fastest layout ({_degrees(plan)}) fits only with recomputation or offload, predicted "
        f"{fitted.predicted.step_time_s * 1e3:.4g} ms per step; this layout fits as it is and is faster"
    )
    return dataclasses.replace(other, notes=(*other.notes, why))


def _degrees(plan: ExecutionPlan) -> str:
    return " ".join(f"{axis}={n}" for axis, n in plan.degrees.items() if n > 1) or "one device"
