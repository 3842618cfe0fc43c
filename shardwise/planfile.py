"""Running a saved plan file with a model: ``shardwise.from_plan("plan.json", model, example_inputs=...)``.

A plan is made for one model and one cluster, and says so by hash (``model_fingerprint``,
``cluster_fingerprint``). Before a plan file runs, the model is traced again and both hashes are checked, so a
plan never runs on a model or a cluster it was not made for; a file of another schema version, a truncated
file or a file that is not a plan is refused when read. Reading is JSON only and executes nothing.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from shardwise.cluster import ClusterSpec, get_cluster
from shardwise.errors import PlanFileError, UserInputError
from shardwise.ir.graph import Graph
from shardwise.ir.plan import ExecutionPlan

__all__ = ["read_plan", "check_model", "check_cluster", "from_plan", "shape_fingerprint"]


def read_plan(path: str | os.PathLike[str]) -> ExecutionPlan:
    """The plan in ``path`` (a plan file, or a generated package directory holding plan.json)."""
    p = Path(path)
    if p.is_dir():
        p = p / "plan.json"
    if not p.is_file():
        raise PlanFileError(f"plan file {p} not found: make one with `shardwise plan` or cm.plan.to_json()")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PlanFileError(f"cannot read {p}: {exc}") from None
    return ExecutionPlan.from_json(text)


def shape_fingerprint(graph: Graph) -> str:
    """The graph's fingerprint without source locations (moving the model's file does not change it)."""
    from shardwise.planner.identity import graph_fingerprint

    return graph_fingerprint(graph.replace(nodes=tuple(n.replace(source="") for n in graph.nodes)))


def check_model(plan: ExecutionPlan, graph: Graph) -> None:
    """Raise ``PlanFileError`` unless ``graph`` (the model traced now) is the model the plan was made for."""
    from shardwise.planner.identity import graph_fingerprint

    if graph_fingerprint(graph) == plan.model_fingerprint:
        return
    if shape_fingerprint(graph) == shape_fingerprint(plan.graph):
        return  # only source locations differ
    raise PlanFileError(
        f"the plan was made for a model {plan.model_name} with fingerprint {plan.model_fingerprint}, but the model "
        f"given ({graph.model_name}) traces to {graph_fingerprint(graph)}: it is another model, or its code, "
        "inputs or mode changed. Make the plan again for this model (shardwise.compile or `shardwise plan`)"
    )


def check_cluster(plan: ExecutionPlan, cluster: ClusterSpec) -> None:
    """Raise ``PlanFileError`` unless ``cluster`` is the cluster the plan was made for."""
    if cluster.fingerprint() == plan.cluster_fingerprint:
        return
    same_name = (
        "a different description under the same name" if cluster.name == plan.cluster_name else cluster.name
    )
    raise PlanFileError(
        f"the plan was made for cluster {plan.cluster_name} (fingerprint {plan.cluster_fingerprint[:16]}), not "
        f"for {same_name} (fingerprint {cluster.fingerprint()[:16]}): make the plan again for this cluster"
    )


def from_plan(
    plan: str | os.PathLike[str] | ExecutionPlan,
    model: torch.nn.Module,
    *,
    example_inputs: Sequence[Any],
    cluster: str | ClusterSpec | None = None,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    optimizer: Callable[..., torch.optim.Optimizer] | None = None,
    workers: Any = None,
) -> Any:
    """A CompiledModel that runs a saved plan (a file or an ExecutionPlan) on ``model`` without planning again.

    The model is traced with ``example_inputs`` (and ``loss_fn`` for a training plan) and must have the
    plan's fingerprint; ``cluster`` (default: the plan's own cluster name) must have the plan's cluster
    fingerprint. Either mismatch is a ``PlanFileError`` that says which.
    """
    from shardwise.api import CompiledModel, _check_optimizer
    from shardwise.frontend.trace import trace

    p = plan if isinstance(plan, ExecutionPlan) else read_plan(plan)
    if p.mode == "train" and loss_fn is None:
        raise UserInputError("this is a training plan: give loss_fn, the function its loss was traced with")
    _check_optimizer(optimizer)
    spec = get_cluster(cluster if cluster is not None else p.cluster_name)
    check_cluster(p, spec)
    if p.mode == "train":
        model.train()
        for m in model.modules():  # as shardwise.compile traces training models
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    graph, out_spec = trace(model, tuple(example_inputs), loss_fn=loss_fn if p.mode == "train" else None)
    check_model(p, graph)
    return CompiledModel(
        p, model=model, out_spec=out_spec, cluster=spec, optimizer=optimizer, workers=workers
    )
