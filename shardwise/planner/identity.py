"""What every plan records alike: which model (the traced graph's fingerprint), which cluster, mode, precision
and mesh."""

from __future__ import annotations

import hashlib

from shardwise.cluster import ClusterSpec
from shardwise.ir.graph import Graph
from shardwise.ir.placement import DeviceMesh
from shardwise.ir.plan import SCHEMA_VERSION
from shardwise.ir.serialize import graph_to_json

__all__ = ["graph_fingerprint", "plan_identity"]


def graph_fingerprint(graph: Graph) -> str:
    return hashlib.sha256(graph_to_json(graph).encode()).hexdigest()[:16]


def plan_identity(
    graph: Graph, cluster: ClusterSpec, mode: str, precision: str, mesh: DeviceMesh
) -> dict[str, object]:
    """The ExecutionPlan fields every plan fills alike: what was planned (the traced graph, before any rewrite,
    is fingerprinted), for which cluster, mode and precision, on which mesh."""
    return {
        "schema_version": SCHEMA_VERSION, "model_name": graph.model_name,
        "model_fingerprint": graph_fingerprint(graph), "cluster_name": cluster.name,
        "cluster_fingerprint": cluster.fingerprint(), "mode": mode, "precision": precision,
        "world_size": mesh.size, "mesh": mesh,
    }  # fmt: skip
