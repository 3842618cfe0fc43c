"""Cluster YAML's per-node template: one node described, ``num_nodes`` the only figure to change."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from shardwise.cluster import get_cluster
from shardwise.cluster.spec import ClusterSpec
from shardwise.errors import ClusterSpecError

GRAND_TETON = Path(__file__).resolve().parents[2] / "bench" / "clusters" / "grand-teton-h100.yaml"


def _load(**changes: object) -> ClusterSpec:
    data = yaml.safe_load(GRAND_TETON.read_text())
    data.update(changes)
    return ClusterSpec.from_dict(data)


@pytest.mark.parametrize("nodes", [1, 3])
def test_template_expands_like_the_switched_presets(nodes: int) -> None:
    spec = _load(num_nodes=nodes)
    preset = get_cluster(f"dgx-h100x{nodes}")  # the same NVLink and NIC layout, built in code
    assert spec.world_size == 8 * nodes
    assert [s.name for s in spec.switches] == [s.name for s in preset.switches]
    assert [s.members for s in spec.switches] == [s.members for s in preset.switches]
    assert [(n.name, n.node, n.devices, n.bandwidth) for n in spec.nics] == [
        (n.name, n.node, n.devices, n.bandwidth) for n in preset.nics
    ]
    for ranks in ((0, 1, 2, 3, 4, 5, 6, 7), (0, 8 * nodes - 1)):
        assert spec.group_alpha_beta(ranks) == preset.group_alpha_beta(ranks)


def test_file_loads_and_round_trips() -> None:
    spec = get_cluster(str(GRAND_TETON))
    assert spec.device.memory_bytes == 96 * 2**30 and spec.device.memory_bandwidth == 2.4e12
    assert spec.efficiency.gemm == pytest.approx(0.78, abs=1e-4)  # torchao roofline_utils: Meta's H100 variant
    assert all(spec.efficiency.source(f) != "not measured: neutral value" for f in ("gemm", "memory"))
    assert ClusterSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"switches": [{"name": "nv", "kind": "nvswitch", "port_bandwidth": 1, "latency": 0, "members": ["g8"]}]},
         "per_node.switches[0].members[0]: 'g8' is not allowed: must name one of the node's devices g0..g7"),
        ({"nics": [{"name": "nic", "devices": [8], "bandwidth": 1, "latency": 0}]},
         "per_node.nics[0].devices[0]"),
        ({"nics": [{"name": "nic", "node": 0, "devices": [0], "bandwidth": 1, "latency": 0}]},
         "per_node.nics[0].node: unknown key"),
    ],
)  # fmt: skip
def test_template_errors_name_the_field(change: dict, message: str) -> None:
    data = yaml.safe_load(GRAND_TETON.read_text())
    data["per_node"] = {**data["per_node"], **change}
    with pytest.raises(ClusterSpecError, match=message.replace("[", r"\[").replace("]", r"\]")):
        ClusterSpec.from_dict(data)


def test_fabric_needs_nics() -> None:
    data = yaml.safe_load(GRAND_TETON.read_text())
    del data["per_node"]["nics"]
    with pytest.raises(ClusterSpecError, match="fabric.*joins the NICs of per_node.nics"):
        ClusterSpec.from_dict(data)
