"""YAML round trips, human-friendly units, and the message of each kind of bad cluster file."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml

from shardwise.cluster import ClusterSpec, LinkSpec, get_cluster
from shardwise.cluster.units import parse_bandwidth, parse_bytes, parse_flops, parse_seconds
from shardwise.errors import ClusterSpecError


@pytest.mark.parametrize("name", ["dgx-a100x2", "dgx-h100", "dgx2x2", "ndv2x2", "cpu:3"])
def test_yaml_round_trip(name: str, tmp_path: Path) -> None:
    spec = get_cluster(name)
    path = tmp_path / "cluster.yaml"
    spec.to_yaml(path)
    back = ClusterSpec.from_yaml(path)
    assert back == spec
    assert back.fingerprint() == spec.fingerprint()
    assert back.to_dict() == spec.to_dict()


def _two_node_dict() -> dict[str, Any]:
    """A small hand-written 2x2 cluster in human units (the style a user would write)."""
    return {
        "name": "lab",
        "num_nodes": 2,
        "devices_per_node": 2,
        "device": {
            "kind": "A100-SXM4-80GB",
            "peak_flops": {"float32": "19.5TFLOPS", "bf16": "312TFLOP/s"},
            "memory_bytes": "80GiB",
            "memory_bandwidth": "2039GB/s",
        },
        "host_memory_bytes": "1TiB",
        "host_link_bandwidth": "31.5GB/s",
        "links": [
            {"src": "g0", "dst": "g1", "bandwidth": "300GB/s", "latency": "0.7us", "kind": "nvlink"},
            {"src": "g1", "dst": "g0", "bandwidth": "300GB/s", "latency": "0.7us", "kind": "nvlink"},
            {"src": "g2", "dst": "g3", "bandwidth": "300GB/s", "latency": "0.7us", "kind": "nvlink"},
            {"src": "g3", "dst": "g2", "bandwidth": 300e9, "latency": 0.7e-6, "kind": "nvlink"},
        ],
        "switches": [
            {
                "name": "ib",
                "kind": "ib",
                "port_bandwidth": "200Gb/s",
                "latency": 0,
                "members": ["n0.nic0", "n1.nic0"],
            }
        ],
        "nics": [
            {"name": "n0.nic0", "node": 0, "devices": [0], "bandwidth": "200Gb/s", "latency": "2.6us"},
            {"name": "n1.nic0", "node": 1, "devices": [2], "bandwidth": "200Gb/s", "latency": "2.6us"},
        ],
    }


def test_human_units_and_generic_routing(tmp_path: Path) -> None:
    path = tmp_path / "lab.yaml"
    path.write_text(yaml.safe_dump(_two_node_dict()))
    spec = ClusterSpec.from_yaml(path)
    assert spec.device.memory_bytes == 80 * 2**30
    assert spec.device.flops("bfloat16") == 312e12
    assert spec.nics[0].bandwidth == 25e9
    assert spec.links[0] == LinkSpec("g0", "g1", 300e9, 0.7e-6, "nvlink")
    # g1 has no NIC: it relays over NVLink to g0's NIC (the bottleneck is the NIC)
    route = spec.p2p_route(1, 3)
    assert route.hops == ("g1", "g0", "n0.nic0", "ib", "n1.nic0", "g2", "g3")
    assert route.alpha == pytest.approx(0.7e-6 + 2.6e-6 + 0.7e-6)
    assert route.beta == pytest.approx(1 / 25e9)
    # the written form reads back equal
    spec.to_yaml(tmp_path / "again.yaml")
    assert ClusterSpec.from_yaml(tmp_path / "again.yaml") == spec


def test_units_parse_strictly() -> None:
    assert parse_bandwidth("25GB/s") == 25e9
    assert parse_bandwidth("200Gb/s") == 25e9
    assert parse_bandwidth("100Gbps") == 12.5e9
    assert parse_bandwidth("1MiB/s") == 2**20
    assert parse_bytes("80GiB") == 80 * 2**30
    assert parse_bytes("1.5TB") == 1.5e12
    assert parse_seconds("2.6us") == pytest.approx(2.6e-6)
    assert parse_seconds("0.3µs") == pytest.approx(0.3e-6)
    assert parse_seconds("1ms") == pytest.approx(1e-3)
    assert parse_flops("312TFLOPS") == 312e12
    assert parse_flops(5) == 5.0
    for parser, bad in [
        (parse_bandwidth, "25GB"),
        (parse_bandwidth, "25 GB/s/s"),
        (parse_bandwidth, "fast"),
        (parse_bytes, "80 gib"),
        (parse_bytes, True),
        (parse_seconds, "2.6"),
        (parse_seconds, "2.6 hours"),
        (parse_flops, "312TF"),
        (parse_bandwidth, float("inf")),
        (parse_bandwidth, [25]),
    ]:
        with pytest.raises(ValueError):
            parser(bad)


def _set(d: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    node: Any = d
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


_DELETE = object()

BAD_FILES = [
    # (path to change, new value, expected message text)
    ("links.3.bandwidth", -5, "links[3].bandwidth: -5 is not allowed: must be a positive number (bytes/s)"),
    ("links.0.latency", "-1us", "links[0].latency: '-1us' is not allowed"),
    (
        "links.2.bandwidth",
        "25GB",
        "links[2].bandwidth: '25GB' is not allowed: must be a bandwidth in bytes/s",
    ),
    ("links.1.kind", "nvlnk", "links[1].kind: 'nvlnk' is not allowed: must be one of nvlink, nvswitch"),
    ("links.1.dst", "g9", "links[1].dst: 'g9' is not allowed: must name a device (g0..g3) or a NIC (n0.nic0"),
    ("links.0.dst", "g0", "links[0].dst: 'g0' is not allowed: must differ from src"),
    (
        "links.0.bandwdith",
        "1GB/s",
        "links[0].bandwdith: unknown key is not allowed: allowed keys are src, dst",
    ),
    ("links.0.kind", _DELETE, "links[0].kind: missing"),
    ("num_nodes", "two", "num_nodes: 'two' is not allowed: must be a positive integer"),
    ("num_nodes", True, "num_nodes: True is not allowed: must be a positive integer"),
    ("devices_per_node", 0, "devices_per_node: 0 is not allowed: must be a positive integer"),
    ("gpus", 8, "gpus: unknown key is not allowed: allowed keys are name, num_nodes"),
    ("world_size", 8, "world_size: 8 is not allowed: contradicts num_nodes (2) x devices_per_node (2) = 4"),
    (
        "nics.1.devices",
        [1],
        "nics[1].devices[0]: 1 is not allowed: NIC 'n1.nic0' is on node 1, whose devices are",
    ),
    ("nics.1.node", 0, "nics[1].node: 0 is not allowed: contradicts the NIC name 'n1.nic0' (node 1)"),
    ("nics.1.node", 5, "nics[1].node: 5 is not allowed: must be a node index 0..1"),
    ("nics.0.devices", "0", "nics[0].devices: '0' is not allowed: must be a list"),
    ("nics.0.name", "g1", "nics[0].name: 'g1' is not allowed: must be unique and differ from device names"),
    (
        "switches.0.members",
        ["n0.nic0", "n7.nic0"],
        "switches[0].members[1]: 'n7.nic0' is not allowed: must name",
    ),
    (
        "switches.0.kind",
        "token-ring",
        "switches[0].kind: 'token-ring' is not allowed: must be one of nvswitch",
    ),
    (
        "device.peak_flops.fp33",
        1e12,
        "device.peak_flops.fp33: unknown dtype is not allowed: use one of float64",
    ),
    (
        "device.peak_flops.float32",
        _DELETE,
        "device.peak_flops: {'bfloat16': 312000000000000.0} is not allowed: must",
    ),
    (
        "device.memory_bytes",
        "1.5B",
        "device.memory_bytes: '1.5B' is not allowed: must be a whole number of bytes",
    ),
    (
        "device.memory_bandwidth",
        0,
        "device.memory_bandwidth: 0 is not allowed: must be a positive number (bytes/s)",
    ),
    ("device.kind", 7, "device.kind: 7 is not allowed: must be a string"),
    ("host_link_bandwidth", None, "host_link_bandwidth: None is not allowed: must be a bandwidth in bytes/s"),
    ("switches", [], "devices: g0 cannot reach g2: every device must reach every other one"),
]


@pytest.mark.parametrize(("where", "value", "message"), BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_file_message(where: str, value: Any, message: str, tmp_path: Path) -> None:
    data = copy.deepcopy(_two_node_dict())
    if value is _DELETE:
        *parents, last = where.split(".")
        node: Any = data
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        del node[last]
    else:
        _set(data, where, value)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ClusterSpecError) as info:
        ClusterSpec.from_yaml(path)
    text = str(info.value)
    assert text.startswith(f"{path}: ")
    assert message in text


def test_duplicate_link_is_rejected() -> None:
    data = _two_node_dict()
    data["links"].append(dict(data["links"][0]))
    with pytest.raises(ClusterSpecError, match=r"links\[4\]: g0->g1 is not allowed: it repeats links\[0\]"):
        ClusterSpec.from_dict(data)


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ClusterSpecError, match="cannot read cluster file"):
        ClusterSpec.from_yaml(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    with pytest.raises(ClusterSpecError, match="not valid YAML"):
        ClusterSpec.from_yaml(broken)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(
        ClusterSpecError, match="cluster spec: .* is not allowed: must be a mapping with keys name"
    ):
        ClusterSpec.from_yaml(listy)


def test_direct_construction_is_validated_too() -> None:
    with pytest.raises(ClusterSpecError, match=r"bandwidth: -1.0 is not allowed: must be a positive number"):
        LinkSpec("g0", "g1", -1.0, 0.0, "nvlink")
    spec = get_cluster("cpu:2")
    with pytest.raises(ClusterSpecError, match=r"links\[0\].src: 'g7' is not allowed"):
        dataclasses.replace(spec, links=(LinkSpec("g7", "g0", 1e9, 0.0, "pcie"),))


def test_attention_rate_without_a_mask_round_trips_and_is_checked(tmp_path: Path) -> None:
    """``efficiency.attention_forward_full``: read from a cluster file (grand-teton-h100 lists FlashAttention-2's
    rate without a mask), kept through a YAML round trip, 0 (the default) through one too, and a figure above 1
    refused with a message that names the field."""
    teton = get_cluster(str(Path(__file__).resolve().parents[2] / "bench" / "clusters" / "grand-teton-h100.yaml"))
    assert teton.efficiency.attention_forward_full == pytest.approx(370 / 989, rel=1e-4)
    for spec in (teton, get_cluster("dgx-h100")):
        path = tmp_path / "cluster.yaml"
        spec.to_yaml(path)
        back = ClusterSpec.from_yaml(path)
        assert back == spec and back.efficiency.attention_forward_full == spec.efficiency.attention_forward_full
    data = teton.to_dict()
    data["efficiency"]["attention_forward_full"] = 1.2
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ClusterSpecError, match="efficiency.attention_forward_full: 1.2 is not allowed: must be"):
        ClusterSpec.from_yaml(path)
