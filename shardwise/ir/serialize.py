"""JSON round trip for IR values and plans: tagged frozen dataclasses, lists read back as tuples.

Plans are data: loading one constructs only the IR classes listed here and never executes code from it.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from shardwise.errors import PlanFileError
from shardwise.ir import fusion as _fusion
from shardwise.ir import graph as _graph
from shardwise.ir import pipeline as _pipeline
from shardwise.ir import placement as _placement
from shardwise.ir import plan as _plan
from shardwise.ir import tensor as _tensor

__all__ = ["to_data", "from_data", "graph_to_json", "graph_from_json", "plan_to_json", "plan_from_json"]

_CLASSES: dict[str, type] = {
    cls.__name__: cls
    for cls in (
        _tensor.TensorSpec,
        _tensor.ScalarSpec,
        _placement.Shard,
        _placement.Replicate,
        _placement.Partial,
        _placement.ShardingSpec,
        _placement.DeviceMesh,
        _graph.Value,
        _graph.Const,
        _graph.Node,
        _graph.GraphInput,
        _graph.DynamicDim,
        _graph.Parameter,
        _graph.Function,
        _graph.Graph,
        _plan.Redistribute,
        _plan.NodeStrategy,
        _plan.RankMemory,
        _plan.Prediction,
        _plan.Alternative,
        _plan.HostTraffic,
        _plan.ExecutionPlan,
        _fusion.FusedGroup,
        _pipeline.Transfer,
        _pipeline.PipelineStage,
        _pipeline.PipelineSpec,
    )
}


def to_data(obj: Any) -> Any:
    """IR value → JSON-compatible data (dataclasses tagged with ``"@"``)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        name = type(obj).__name__
        if name not in _CLASSES:
            raise TypeError(f"{name} is not serializable IR data")
        out: dict[str, Any] = {"@": name}
        for f in dataclasses.fields(obj):
            if f.name.startswith("_"):
                continue
            out[f.name] = to_data(getattr(obj, f.name))
        return out
    if isinstance(obj, tuple | list):
        return [to_data(x) for x in obj]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"cannot serialize {type(obj).__name__}")


def from_data(data: Any) -> Any:
    if isinstance(data, dict):
        name = data.get("@")
        cls = _CLASSES.get(name)  # type: ignore[arg-type]
        if cls is None:
            raise PlanFileError(f"unknown record type {name!r} in plan data: the file is corrupt or not a plan")
        kwargs = {k: from_data(v) for k, v in data.items() if k != "@"}
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise PlanFileError(f"bad {name} record in plan data: {exc}") from None
    if isinstance(data, list):
        return tuple(from_data(x) for x in data)
    return data


def graph_to_json(graph: _graph.Graph, indent: int | None = None) -> str:
    return json.dumps(to_data(graph), indent=indent)


def graph_from_json(text: str) -> _graph.Graph:
    g = from_data(json.loads(text))
    if not isinstance(g, _graph.Graph):
        raise PlanFileError("the JSON does not hold a graph")
    return g


def plan_to_json(plan: _plan.ExecutionPlan, indent: int | None = 1) -> str:
    return json.dumps({"shardwise_plan": plan.schema_version, "plan": to_data(plan)}, indent=indent)


def plan_from_json(text: str) -> _plan.ExecutionPlan:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PlanFileError(f"the plan file is not valid JSON ({exc}); was it truncated?") from None
    if not isinstance(doc, dict) or "shardwise_plan" not in doc:
        raise PlanFileError("this JSON file is not a shardwise plan (no 'shardwise_plan' key)")
    version = doc["shardwise_plan"]
    if version != _plan.SCHEMA_VERSION:
        raise PlanFileError(
            f"the plan file has schema version {version}, this shardwise reads version {_plan.SCHEMA_VERSION}: "
            "make the plan again with this version (shardwise plan ...)"
        )
    plan = from_data(doc["plan"])
    if not isinstance(plan, _plan.ExecutionPlan):
        raise PlanFileError("the plan file does not hold an ExecutionPlan")
    _check_loaded(plan)
    return plan


def _check_loaded(plan: _plan.ExecutionPlan) -> None:
    """A plan read from a file is checked before use: its text cannot become code, its graph is whole."""
    from shardwise.ir.safety import check_plan_text
    from shardwise.ir.verify import GraphInvariantError, verify

    check_plan_text(plan)
    try:
        verify(plan.graph)
    except GraphInvariantError as exc:
        raise PlanFileError(f"the plan's graph is inconsistent ({exc}): the file is corrupt or was edited") from None
    nodes = {n.name for n in plan.graph.nodes}
    unknown = [s.node for s in plan.strategies if s.node not in nodes and not s.node.startswith("<")]
    if unknown:
        raise PlanFileError(f"the plan places ops its graph does not have ({', '.join(unknown[:3])}): the file is corrupt")
