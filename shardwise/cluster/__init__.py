"""Cluster descriptions: devices, links, switches and NICs (presets, YAML files, calibration)."""

from __future__ import annotations

from shardwise.cluster.calibrate import calibrate
from shardwise.cluster.presets import get_cluster, preset_names
from shardwise.cluster.routing import Route
from shardwise.cluster.spec import ClusterSpec, DeviceSpec, LinkSpec, NicSpec, SwitchSpec

__all__ = [
    "ClusterSpec",
    "DeviceSpec",
    "LinkSpec",
    "NicSpec",
    "Route",
    "SwitchSpec",
    "calibrate",
    "get_cluster",
    "preset_names",
]
