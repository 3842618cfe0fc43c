"""Looking for the smallest preset a model fits on is bounded by wall time. shardwise.fit"""

from __future__ import annotations

import multiprocessing as mp
import time

import torch
from torch import nn

from shardwise.cluster import ClusterSpec
from shardwise.fit import smallest_fitting_preset
from shardwise.frontend.trace import trace
from shardwise.ir.graph import Graph
from shardwise.ir.plan import ExecutionPlan
from shardwise.planner.auto import plan_auto


def _graph() -> Graph:
    return trace(nn.Linear(8, 8), (torch.randn(4, 8),))[0]


def test_a_plan_longer_than_the_budget_is_stopped_and_named() -> None:
    def slow(graph: Graph, spec: ClusterSpec) -> ExecutionPlan:  # a planning run of ten minutes
        time.sleep(600)
        raise AssertionError("not reached")

    graph, before = _graph(), {p.pid for p in mp.active_children()}
    t0 = time.monotonic()
    found = smallest_fitting_preset(graph, "inference", slow, budget_s=5.0)
    waited = time.monotonic() - t0
    assert found.fit is None and found.out_of_time and len(found.tried) == 1, found
    assert waited < 300, waited  # far less than the attempt: it was not waited for
    assert {p.pid for p in mp.active_children()} <= before  # the process planning it was ended


def test_the_first_preset_that_fits_is_returned_with_its_plan() -> None:
    def plan(graph: Graph, spec: ClusterSpec) -> ExecutionPlan:
        return plan_auto(graph, spec, mode="inference")

    found = smallest_fitting_preset(_graph(), "inference", plan)
    assert found.fit is not None and not found.out_of_time
    assert found.tried == (found.fit.cluster,) and found.fit.plan.world_size == found.fit.world_size
