"""The planner's use of host offload: a user's ``offload=`` setting applied to a flat training plan.

``with_offload(plan, offload, cluster, recompute)``:

* ``"auto"``: a plan that fits the device (and asks for no recomputation) is returned unchanged; otherwise
  the cheapest (recompute choice, tiers) pair that fits (``passes.offload.choose_offload``) over the tiers
  generated programs apply (``GENERATED_TIERS``: optimizer state and layers' activations, alone or both),
  jointly with recomputation unless ``recompute="none"``;
* ``"optimizer"``, ``"activations"``, ``"optimizer+activations"``: those tiers always, with the cheapest
  recomputation that makes the plan fit when ``recompute="auto"`` (none otherwise).

Streaming parameters from the host (``Tiers(parameters=True)``) is planned and costed by the pass but not
generated, so no setting here picks it. Raises DoesNotFitError (naming the smallest device memory any
choice reaches) when nothing fits, UserInputError for settings that contradict each other.
"""

from __future__ import annotations

from shardwise.cluster.spec import ClusterSpec
from shardwise.errors import UserInputError
from shardwise.ir.plan import ExecutionPlan
from shardwise.passes.offload import Tiers, apply_offload, choose_offload

__all__ = ["OFFLOAD_SETTINGS", "GENERATED_TIERS", "with_offload", "check_offload"]

OFFLOAD_SETTINGS = ("none", "auto", "optimizer", "activations", "optimizer+activations")
GENERATED_TIERS = (Tiers(), Tiers(optimizer=True), Tiers(activations=True), Tiers(optimizer=True, activations=True))
_FIXED = {
    "optimizer": Tiers(optimizer=True),
    "activations": Tiers(activations=True),
    "optimizer+activations": Tiers(optimizer=True, activations=True),
}


def check_offload(offload: str | None, recompute: object, mode: str) -> None:
    """Raise UserInputError for an unknown setting or one that contradicts ``recompute``/``mode``."""
    if offload is None or offload == "none":
        return
    if offload not in OFFLOAD_SETTINGS:
        raise UserInputError(f"offload={offload!r} is not allowed: choose one of {', '.join(OFFLOAD_SETTINGS)}")
    if mode != "train":
        raise UserInputError(f"offload={offload!r} applies to training: compile with mode='train'")
    if recompute not in (None, "none", "auto"):
        raise UserInputError(
            f"offload={offload!r} chooses recomputation jointly with the memory tiers: pass recompute='auto' "
            f"(or 'none' to forbid it) instead of recompute={recompute!r}, or offload='none'"
        )


def with_offload(
    plan: ExecutionPlan, offload: str | None, cluster: ClusterSpec, recompute: str | None = None
) -> ExecutionPlan:
    """``plan`` with the user's offload setting applied (see the module docstring)."""
    check_offload(offload, recompute, plan.mode)
    if offload is None or offload == "none":
        return plan
    budget = cluster.device.memory_bytes
    if offload == "auto":
        if max(plan.predicted.memory_bytes) <= budget:
            return plan
        choice = choose_offload(plan, cluster, budget, tiers=GENERATED_TIERS, recompute=recompute != "none")
    else:
        choice = choose_offload(plan, cluster, budget, tiers=(_FIXED[offload],), recompute=recompute == "auto")
    return apply_offload(plan, choice, cluster)
