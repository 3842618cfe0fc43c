"""shardwise's intermediate representation: frozen values, the op registry, plans, JSON and text forms."""

from __future__ import annotations

from shardwise.ir.dimops import Dim, OpDims, parse_dimops
from shardwise.ir.graph import Arg, Const, DynamicDim, Graph, GraphInput, Node, Parameter, Value
from shardwise.ir.placement import DeviceMesh, Partial, Placement, Replicate, Shard, ShardingSpec
from shardwise.ir.plan import (
    SCHEMA_VERSION,
    ExecutionPlan,
    NodeStrategy,
    Prediction,
    RankMemory,
    Redistribute,
)
from shardwise.ir.serialize import graph_from_json, graph_to_json
from shardwise.ir.tensor import ScalarSpec, TensorSpec
from shardwise.ir.text import format_graph
from shardwise.ir.verify import GraphInvariantError, verify

__all__ = [
    "Arg", "Const", "DeviceMesh", "Dim", "DynamicDim", "ExecutionPlan", "Graph", "GraphInput",
    "GraphInvariantError", "Node", "NodeStrategy", "OpDims", "Parameter", "Partial", "Placement", "Prediction",
    "RankMemory", "Redistribute", "Replicate", "SCHEMA_VERSION", "ScalarSpec", "Shard", "ShardingSpec",
    "TensorSpec", "Value", "format_graph", "graph_from_json", "graph_to_json", "parse_dimops", "verify",
]  # fmt: skip
