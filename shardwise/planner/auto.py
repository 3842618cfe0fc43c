"""Flat plans only: the one planner (``planner.plan``) with ``pp = 1``, for callers that want a plan without
pipeline parallelism (benchmarks of the placement ILP, tests of the flat layouts)."""

from __future__ import annotations

from collections.abc import Mapping

from shardwise.cluster import ClusterSpec
from shardwise.errors import PlanError
from shardwise.ir.graph import Graph
from shardwise.ir.plan import ExecutionPlan
from shardwise.passes.sharding.auto import ILPStats
from shardwise.passes.sharding.gradients import param_grad_reduce
from shardwise.planner.flat import input_placements
from shardwise.planner.plan import PlanOptions, plan

__all__ = ["plan_auto", "param_grad_reduce", "input_placements"]


def plan_auto(
    graph: Graph,
    cluster: ClusterSpec,
    *,
    mode: str = "inference",
    precision: str = "fp32",
    constraints: Mapping[str, object] | None = None,
    optimizer: str = "adamw",
    solver: str = "cbc",
    time_limit_s: float = 60.0,
    require_fit: bool = True,
    stats_out: list[ILPStats] | None = None,
    collectives: str = "library",
) -> ExecutionPlan:
    """The fastest flat plan (``pp = 1``) the one planner finds (see ``planner.plan``)."""
    pinned = dict(constraints or {})
    if pinned.get("pp", 1) != 1:
        raise PlanError(f"plan_auto makes flat plans: pp={pinned['pp']} needs shardwise.planner.plan.plan")
    pinned["pp"] = 1
    if collectives != "library":
        pinned.setdefault("collectives", collectives)
    options = PlanOptions(
        mode=mode, precision=precision, optimizer=optimizer, solver=solver, time_limit_s=time_limit_s,
        require_fit=require_fit,
    )  # fmt: skip
    return plan(graph, cluster, pinned, options, stats_out=stats_out)
