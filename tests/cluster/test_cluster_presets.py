"""Presets build, validate and carry the published topology and figures."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from shardwise.cluster import ClusterSpec, get_cluster, preset_names
from shardwise.cluster.presets import NDV2_DOUBLE_NVLINKS, NDV2_SINGLE_NVLINKS
from shardwise.errors import ClusterSpecError

MiB = 2**20
US = 1e-6
TACCL_DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "taccl-examples"


def us_per_mib(beta: float) -> float:
    return beta * MiB / US


@pytest.mark.parametrize(
    ("name", "kind", "nodes", "per_node"),
    [
        ("dgx-a100", "A100-SXM4-80GB", 1, 8),
        ("dgx-a100x2", "A100-SXM4-80GB", 2, 8),
        ("dgx-h100x3", "H100-SXM5-80GB", 3, 8),
        ("dgx2x2", "V100-SXM3-32GB", 2, 16),
        ("ndv2x4", "V100-SXM2-32GB", 4, 8),
        ("cpu:1", "cpu", 1, 1),
        ("cpu:4", "cpu", 1, 4),
    ],
)
def test_preset_shape(name: str, kind: str, nodes: int, per_node: int) -> None:
    spec = get_cluster(name)
    assert spec.device.kind == kind
    assert (spec.num_nodes, spec.devices_per_node, spec.world_size) == (nodes, per_node, nodes * per_node)
    for node in range(nodes):
        ranks = spec.ranks_of_node(node)
        assert ranks == tuple(range(node * per_node, (node + 1) * per_node))
        assert all(spec.node_of(r) == node for r in ranks)
    assert spec.device_name(3) == "g3"
    # a preset survives the validating dict round trip
    assert ClusterSpec.from_dict(spec.to_dict()) == spec


def test_bare_name_is_one_node_and_names_are_canonical() -> None:
    assert get_cluster("dgx-a100") == get_cluster("dgx-a100x1")
    assert get_cluster("dgx-a100").name == "dgx-a100x1"
    assert get_cluster(" DGX-H100x2 ").name == "dgx-h100x2"


@pytest.mark.parametrize("name", ["dgx-a100x2", "dgx-h100x2"])
def test_dgx_switched_topology(name: str) -> None:
    spec = get_cluster(name)
    assert spec.links == ()
    assert sorted(s.name for s in spec.switches) == ["ib", "n0.nvswitch", "n1.nvswitch"]
    assert spec.switches[0].members == tuple(f"g{r}" for r in range(8))
    assert len(spec.nics) == 16
    assert all(len(nic.devices) == 1 for nic in spec.nics)  # one NIC per GPU
    assert spec.nics_of(9)[0].name == "n1.nic1"
    fabric = next(s for s in spec.switches if s.name == "ib")
    assert set(fabric.members) == {n.name for n in spec.nics}


def test_dgx_a100_figures() -> None:
    spec = get_cluster("dgx-a100x2")
    dev = spec.device
    assert dev.flops("bfloat16") == dev.flops("float16") == 312e12
    assert dev.flops("tfloat32") == 156e12
    assert dev.flops("float32") == 19.5e12
    assert dev.memory_bytes == 80 * 2**30 and dev.memory_bandwidth == 2039e9
    alpha, beta = spec.p2p_alpha_beta(0, 5)
    assert spec.p2p_route(0, 5).hops == ("g0", "n0.nvswitch", "g5")
    assert beta == pytest.approx(1 / 300e9) and alpha == pytest.approx(0.7e-6)
    alpha, beta = spec.p2p_alpha_beta(2, 10)
    assert spec.p2p_route(2, 10).hops == ("g2", "n0.nic2", "ib", "n1.nic2", "g10")
    assert beta == pytest.approx(1 / 25e9) and alpha == pytest.approx(2.6e-6)
    assert spec.p2p_alpha_beta(4, 4) == (0.0, 0.0)


def test_dgx_h100_figures() -> None:
    spec = get_cluster("dgx-h100x2")
    assert spec.device.flops("bfloat16") == 989e12 and spec.device.flops("float32") == 67e12
    assert spec.device.memory_bandwidth == 3.35e12
    assert spec.p2p_alpha_beta(0, 1)[1] == pytest.approx(1 / 450e9)
    assert spec.p2p_alpha_beta(0, 8)[1] == pytest.approx(1 / 50e9)


def test_dgx2_topology_and_taccl_profile() -> None:
    spec = get_cluster("dgx2x2")
    assert len(spec.nics) == 16
    assert [n.devices for n in spec.nics[:8]] == [
        (2 * i, 2 * i + 1) for i in range(8)
    ]  # one NIC per GPU pair
    alpha, beta = spec.p2p_alpha_beta(3, 12)
    assert (alpha, us_per_mib(beta)) == (pytest.approx(0.3e-6), pytest.approx(8.0))
    alpha, beta = spec.p2p_alpha_beta(3, 20)
    assert (alpha, us_per_mib(beta)) == (pytest.approx(2.6e-6), pytest.approx(105.0))
    # TACCL's figure: 512 MB over IB at 105 us/MB = 53.76 ms (MB = 2**20 bytes)
    assert spec.p2p_route(3, 20).time(512 * MiB) == pytest.approx(53.76e-3 + 2.6e-6)
    assert spec.device.flops("float16") == 125e12 and spec.device.flops("bfloat16") == 15.7e12


def test_ndv2_cube_mesh() -> None:
    spec = get_cluster("ndv2x2")
    assert len(spec.links) == 2 * 32  # 16 NVLink pairs per node, both directions
    assert all(link.kind == "nvlink" for link in spec.links)
    out_degree = {r: sum(1 for link in spec.links if link.src == f"g{r}") for r in range(16)}
    assert set(out_degree.values()) == {4}
    assert len(spec.nics) == 2 and spec.nics[0].devices == tuple(range(8))  # ONE NIC shared by 8 GPUs
    assert us_per_mib(spec.p2p_alpha_beta(0, 1)[1]) == pytest.approx(23)  # double link
    assert us_per_mib(spec.p2p_alpha_beta(0, 2)[1]) == pytest.approx(46)  # single link
    # 0 and 5 share no link: best relay is 0 -> 4 -> 5 over two double links
    route = spec.p2p_route(0, 5)
    assert route.hops == ("g0", "g4", "g5")
    assert (route.alpha, us_per_mib(route.beta)) == (pytest.approx(0.6e-6), pytest.approx(23))
    assert us_per_mib(spec.p2p_alpha_beta(1, 9)[1]) == pytest.approx(105)
    assert spec.p2p_route(1, 9).hops == ("g1", "n0.nic0", "ib", "n1.nic0", "g9")


def test_ndv2_matches_taccl_data_file() -> None:
    path = TACCL_DATA / "ndv2-links.json"
    if not path.is_file():
        pytest.skip(f"TACCL NDv2 data file not found at {path}")
    data = json.loads(path.read_text())
    spec = get_cluster("ndv2x1")
    direct = {(int(link.src[1:]), int(link.dst[1:])): link for link in spec.links}
    matrix = data["nvlink_beta_us_per_mb"]
    assert len(matrix) == spec.devices_per_node
    for i, row in enumerate(matrix):
        for j, expected in enumerate(row):
            link = direct.get((i, j))
            if expected == 0:
                assert link is None, f"preset has a link g{i}->g{j} the data file does not"
            else:
                assert link is not None, f"preset lacks the link g{i}->g{j}"
                assert us_per_mib(link.beta) == pytest.approx(expected)
                assert link.latency == pytest.approx(data["alpha_us"] * US)
    assert len(spec.nics) == data["nics_per_node"]
    nic = spec.nics[0]
    assert nic.latency == pytest.approx(data["ib_alpha_us"] * US)
    assert us_per_mib(nic.beta) == pytest.approx(data["ib_beta_us_per_mb"])


def test_ndv2_pair_tables_cover_the_cube_mesh() -> None:
    pairs = NDV2_DOUBLE_NVLINKS + NDV2_SINGLE_NVLINKS
    assert len(set(pairs)) == 16
    quads = [(a, b) for q in (range(4), range(4, 8)) for a in q for b in q if a < b]
    assert set(pairs) == set(quads) | {(i, i + 4) for i in range(4)}
    bricks = {g: sum((2 if p in NDV2_DOUBLE_NVLINKS else 1) for p in pairs if g in p) for g in range(8)}
    assert set(bricks.values()) == {6}  # six NVLink2 bricks per V100


def test_group_alpha_beta_intra_and_nic_sharing() -> None:
    a100 = get_cluster("dgx-a100x2")
    assert a100.group_alpha_beta(range(8)) == pytest.approx((0.7e-6, 1 / 300e9))
    # one rank per node: a single ring over one unshared NIC
    assert a100.group_alpha_beta([3, 11]) == pytest.approx((2.6e-6, 1 / 25e9))
    # the whole world: one ring per NIC (8 channels), each NIC unshared -> 8 x 25 GB/s
    assert a100.group_alpha_beta(range(16)) == pytest.approx((2.6e-6, 1 / 200e9))
    assert a100.group_alpha_beta([5]) == (0.0, 0.0)

    ndv2 = get_cluster("ndv2x2")
    # the double NVLinks form a Hamiltonian ring 0-1-3-2-6-7-5-4
    assert us_per_mib(ndv2.group_alpha_beta(range(8))[1]) == pytest.approx(23)
    assert us_per_mib(ndv2.group_alpha_beta([0, 2])[1]) == pytest.approx(46)
    # one NIC per node shared by 8 GPUs: a 2-rank DP group gets 1/8 of it, the full world all of it
    assert us_per_mib(ndv2.group_alpha_beta([0, 8])[1]) == pytest.approx(8 * 105)
    assert us_per_mib(ndv2.group_alpha_beta(range(16))[1]) == pytest.approx(105)

    dgx2 = get_cluster("dgx2x2")
    assert us_per_mib(dgx2.group_alpha_beta([0, 16])[1]) == pytest.approx(2 * 105)  # NIC shared by a pair
    assert us_per_mib(dgx2.group_alpha_beta([0, 1, 16, 17])[1]) == pytest.approx(105)
    assert us_per_mib(dgx2.group_alpha_beta(range(32))[1]) == pytest.approx(105 / 8)
    with pytest.raises(ValueError, match="repeat"):
        dgx2.group_alpha_beta([0, 0])
    with pytest.raises(ValueError, match="not a rank"):
        dgx2.group_alpha_beta([0, 32])


def test_cpu_preset() -> None:
    spec = get_cluster("cpu:4")
    assert spec.num_nodes == 1 and spec.nics == () and spec.links == ()
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert spec.host_memory_bytes == ram and spec.device.memory_bytes == ram // 4
    assert spec.p2p_alpha_beta(0, 3) == pytest.approx((30e-6, 1 / 2e9))
    assert spec.switches[0].kind == "loopback"
    assert spec.device.flops("bfloat16") == spec.device.flops("float32") == 50e9


def test_device_flops_aliases() -> None:
    dev = get_cluster("dgx-h100").device
    assert dev.flops("torch.bfloat16") == dev.flops("bf16") == dev.flops("bfloat16") == 989e12
    assert dev.flops("fp8") == 1979e12
    assert dev.flops("complex64") == dev.flops("float32")


@pytest.mark.parametrize("bad", ["dgx-a100x0", "dgx-b200x2", "cpu:0", "cpu", "ndv2x", "tpu-v4"])
def test_unknown_preset_lists_forms(bad: str) -> None:
    with pytest.raises(ClusterSpecError) as info:
        get_cluster(bad)
    message = str(info.value)
    assert repr(bad) in message
    if "not allowed" not in message:
        for form in ("dgx-a100xN", "dgx-h100xN", "dgx2xN", "ndv2xN", "cpu:N"):
            assert form in message


def test_preset_names_and_passthrough(tmp_path: Path) -> None:
    assert preset_names()[:5] == ["dgx-a100xN", "dgx-h100xN", "dgx2xN", "ndv2xN", "cpu:N"]
    spec = get_cluster("ndv2x2")
    assert get_cluster(spec) is spec
    path = tmp_path / "mine.yaml"
    spec.to_yaml(path)
    assert get_cluster(str(path)) == spec
    assert get_cluster(path) == spec
    with pytest.raises(ClusterSpecError, match="cannot read cluster file"):
        get_cluster(str(tmp_path / "absent.yaml"))


def test_fingerprint_is_stable_and_distinguishes() -> None:
    a, b = get_cluster("dgx-a100x2"), get_cluster("dgx-a100x2")
    assert a is not b and a.fingerprint() == b.fingerprint()
    assert len(a.fingerprint()) == 64
    assert a.fingerprint() != get_cluster("dgx-a100x3").fingerprint()
    assert hash(a) == hash(b)


def test_large_preset_builds_quickly() -> None:
    spec = get_cluster("dgx-h100x64")
    assert spec.world_size == 512
    alpha, beta = spec.group_alpha_beta(range(0, 512, 8))
    assert math.isfinite(alpha) and beta == pytest.approx(1 / 50e9)


def test_summary_and_numpy_ranks() -> None:
    np = pytest.importorskip("numpy")
    spec = get_cluster("ndv2x2")
    text = spec.summary()
    assert text.startswith("ndv2x2: 2 node(s) x 8 V100-SXM2-32GB")
    assert "intra-node ring 45.59 GB/s" in text and "inter-node" in text
    assert spec.p2p_alpha_beta(np.int64(0), 1) == spec.p2p_alpha_beta(0, 1)
    assert spec.node_of(np.int32(9)) == 1
    assert spec.group_alpha_beta(np.arange(8)) == spec.group_alpha_beta(range(8))
    with pytest.raises(ValueError, match="not a rank"):
        spec.node_of(True)
