"""Where a model that fits nowhere on the given cluster would fit: the smallest preset cluster it plans on.

Used by ``shardwise.compile`` to complete a ``DoesNotFitError`` with a suggestion. Candidates are the
multi-node presets (DGX-A100, DGX-H100, DGX-2, NDv2 with 1..128 nodes) in order of total device memory;
those below a lower bound (the parameters, and in training their gradients and optimizer state, spread over
every device) are skipped without planning, the rest are planned in order until one fits, within a small
time and attempt budget.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from shardwise.cluster import ClusterSpec, get_cluster
from shardwise.errors import DoesNotFitError, PlanError
from shardwise.ir.graph import Graph
from shardwise.ir.plan import ExecutionPlan

__all__ = ["Fit", "smallest_fitting_preset", "FAMILIES", "NODES"]

FAMILIES = ("dgx-a100", "dgx-h100", "dgx2", "ndv2")
NODES = (1, 2, 4, 8, 16, 32, 64, 128)
_STATE_FACTOR = {"train": 4, "inference": 1}  # params (+ grads + two optimizer moments) in training


@dataclass(frozen=True)
class Fit:
    cluster: str  # the preset name
    world_size: int
    device_memory_bytes: int
    plan: ExecutionPlan


def _candidates() -> list[tuple[int, str, ClusterSpec]]:
    out = []
    for family in FAMILIES:
        for nodes in NODES:
            name = f"{family}x{nodes}"
            spec = get_cluster(name)
            out.append((spec.world_size * spec.device.memory_bytes, name, spec))
    return sorted(out, key=lambda c: (c[0], c[2].world_size, c[1]))


def smallest_fitting_preset(
    graph: Graph,
    mode: str,
    plan: Callable[[Graph, ClusterSpec], ExecutionPlan],
    *,
    budget_s: float = 60.0,
    max_attempts: int = 6,
) -> Fit | None:
    """The first preset, by total memory, that ``plan(graph, spec)`` fits; None if none within the budget."""
    need = graph.param_bytes * _STATE_FACTOR.get(mode, 1)
    deadline = time.monotonic() + budget_s
    attempts = 0
    for total, name, spec in _candidates():
        if total < need:
            continue
        if attempts >= max_attempts or time.monotonic() > deadline:
            return None
        attempts += 1
        try:
            made = plan(graph, spec)
        except (DoesNotFitError, PlanError):
            continue
        return Fit(name, spec.world_size, spec.device.memory_bytes, made)
    return None
