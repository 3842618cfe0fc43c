"""The price list's collectives: the library's algorithms in closed form at the group's achieved (alpha, beta)."""

from __future__ import annotations

import math

import pytest

from shardwise.cluster import get_cluster
from shardwise.costs.comm import CommPrices, pipelined_ring_s
from shardwise.costs.prices import price_list

GROUPS = [
    ("dgx-a100x2", tuple(range(8))),
    ("dgx-a100x2", (0, 8)),
    ("dgx-a100x2", tuple(range(16))),
    ("ndv2x2", tuple(range(8))),
    ("ndv2x2", (1, 9)),
    ("dgx2x2", (0, 1, 16, 17)),
    ("cpu:4", (0, 1, 2, 3)),
]


@pytest.mark.parametrize(("cluster", "ranks"), GROUPS)
@pytest.mark.parametrize("nbytes", [0, 4096, 64 * 2**20])
def test_closed_forms(cluster: str, ranks: tuple[int, ...], nbytes: int) -> None:
    spec = get_cluster(cluster)
    comm = CommPrices(spec)
    alpha, beta, nodes = comm.alpha_beta(ranks)
    # the achieved bus bandwidth: the link's beta over the measured fraction of it the library reaches
    raw_alpha, raw_beta = spec.group_alpha_beta(ranks)
    eff = spec.efficiency.inter_node if nodes > 1 else spec.efficiency.intra_node
    assert (alpha, beta) == pytest.approx((raw_alpha, raw_beta / eff))
    p = len(ranks)
    step = alpha + beta * nbytes / p
    over = spec.efficiency.collective_overhead_s
    ring = comm.algorithms("allreduce", nbytes, ranks)["ring"]
    assert ring == pytest.approx(2 * (p - 1) * step + over)
    assert comm.algorithms("allgather", nbytes, ranks)["ring"] == pytest.approx((p - 1) * step + over)
    # gloo (CPU clusters) has no reduce-scatter: the runtime library all-reduces the buffer and keeps its slice
    scatter = ring if spec.device.kind == "cpu" else (p - 1) * step + over
    assert comm.algorithms("reduce_scatter", nbytes, ranks)["ring"] == pytest.approx(scatter)
    if nodes == 1:  # all-to-all inside a node: pairwise exchange at the node's figures, as a ring's steps
        assert comm.algorithms("alltoall", nbytes, ranks)["pairwise"] == pytest.approx((p - 1) * step + over)
    # pipelined ring broadcast: the best chunk count k of (p - 2 + k)(alpha + beta n / k)
    brute = min((p - 2 + k) * (alpha + beta * nbytes / k) for k in range(1, 4097))
    assert comm.algorithms("broadcast", nbytes, ranks)["ring"] == pytest.approx(brute + over, rel=1e-9)
    # the library takes its fastest algorithm; nothing moves for an empty buffer
    options = comm.algorithms("allreduce", nbytes, ranks)
    assert comm.collective_s("allreduce", nbytes, ranks) == (min(options.values()) if nbytes else 0.0)


def test_tree_and_pat_are_offered_across_nodes_only() -> None:
    comm = CommPrices(get_cluster("dgx-a100x4"))
    inside = comm.algorithms("allreduce", 2**20, tuple(range(8)))
    assert set(inside) == {"ring"}
    across = comm.algorithms("allreduce", 2**10, (0, 8, 16, 24))
    assert set(across) == {"ring", "tree"}
    alpha, beta, _ = comm.alpha_beta((0, 8, 16, 24))
    assert across["tree"] == pytest.approx(2 * math.ceil(math.log2(4)) * alpha + 2 * beta * 2**10)
    # small messages across nodes: the tree's log-depth latency wins, so the library picks it
    assert comm.choose("allreduce", 2**10, (0, 8, 16, 24))[1] == "tree"
    gather = comm.algorithms("allgather", 2**20, (0, 8, 16, 24))
    assert gather["pat"] == pytest.approx(2 * alpha + 3 / 4 * beta * 2**20)
    assert "pat" not in comm.algorithms("allgather", 2**20, tuple(range(16)))  # two ranks per node: no PAT
    assert "tree" not in CommPrices(get_cluster("cpu:4")).algorithms("allreduce", 2**10, (0, 1, 2, 3))


def test_alltoall_by_topology() -> None:
    # dgx-h100x2: 8 GPUs per node on NVSwitch, one 50 GB/s NIC per GPU. Across both nodes each rank sends n/16
    # to its 7 node peers over NVSwitch and n/16 to each of the 8 ranks of the other node through its own NIC
    spec = get_cluster("dgx-h100x2")
    comm = CommPrices(spec)
    n = 2**30
    over = spec.efficiency.collective_overhead_s
    a_in, b_in, _ = comm.alpha_beta(tuple(range(8)))
    inside = 7 * (a_in + b_in * n / 8)
    assert comm.alltoall_s(n, tuple(range(8))) == pytest.approx(inside + over)
    a_x, b_x = spec.p2p_alpha_beta(0, 8)
    b_x /= spec.efficiency.inter_node
    across = 8 * (a_x + b_x * n / 16)
    assert comm.alltoall_s(n, tuple(range(16))) == pytest.approx(max(7 * (a_in + b_in * n / 16), across) + over)
    # one rank per node: the whole exchange crosses the NICs, far slower than inside a node
    assert comm.alltoall_s(n, (0, 8)) == pytest.approx(a_x + b_x * n / 2 + over)
    assert comm.alltoall_s(n, (0, 8)) > 5 * comm.alltoall_s(n, (0, 1))
    assert comm.alltoall_s(0, tuple(range(8))) == 0.0
    # ndv2x2: one NIC per node serves its 8 GPUs. Two ranks per node share it, so each crosses at half its rate
    ndv2 = CommPrices(get_cluster("ndv2x2"))
    a_n, b_n = get_cluster("ndv2x2").p2p_alpha_beta(0, 8)
    b_n /= get_cluster("ndv2x2").efficiency.inter_node
    over = get_cluster("ndv2x2").efficiency.collective_overhead_s
    assert ndv2.alltoall_s(n, (0, 8)) == pytest.approx(a_n + b_n * n / 2 + over)
    assert ndv2.alltoall_s(n, (0, 1, 8, 9)) == pytest.approx(2 * (a_n + 2 * b_n * n / 4) + over)


def test_broadcast_limits() -> None:
    alpha, beta = 2e-6, 1e-10
    assert pipelined_ring_s(2, 1e6, alpha, beta) == pytest.approx(alpha + beta * 1e6)
    assert pipelined_ring_s(8, 0, alpha, beta) == pytest.approx(7 * alpha)
    big = pipelined_ring_s(8, 1e10, alpha, beta)
    assert beta * 1e10 < big < beta * 1e10 * 1.01  # large messages: bandwidth-bound, latency amortised
    assert pipelined_ring_s(1, 1e6, alpha, beta) == 0.0


def test_allreduce_figure_by_hand() -> None:
    # dgx-a100x2, one GPU per node: 2 ranks over one HDR NIC (25 GB/s) reaching 86% of it (nccl-tests):
    # ring 2 * 1 * (2.6us + 1 GiB / 2 / (0.86 * 25 GB/s)); the tree is slower at this size
    spec = get_cluster("dgx-a100x2")
    expected = 2 * (2.6e-6 + 2**30 / 2 / (0.86 * 25e9))
    assert price_list(spec).collective_s("allreduce", 2**30, [0, 8]) == pytest.approx(expected)


def test_single_rank_and_bad_input() -> None:
    comm = CommPrices(get_cluster("dgx-h100"))
    assert comm.collective_s("allreduce", 2**20, [3]) == 0.0
    with pytest.raises(ValueError, match="unknown collective 'all_reduce': use one of allreduce"):
        comm.collective_s("all_reduce", 10, [0, 1])
    with pytest.raises(ValueError, match="negative"):
        comm.collective_s("allgather", -1, [0, 1])
    with pytest.raises(ValueError, match="not a rank"):
        comm.collective_s("allgather", 1, [0, 8])


def test_more_bandwidth_is_faster() -> None:
    n = 256 * 2**20
    a100, h100 = CommPrices(get_cluster("dgx-a100x2")), CommPrices(get_cluster("dgx-h100x2"))
    for ranks in (tuple(range(8)), (0, 8), tuple(range(16))):
        assert h100.collective_s("allreduce", n, ranks) < a100.collective_s("allreduce", n, ranks)
    ndv2 = CommPrices(get_cluster("ndv2x2"))
    # a DP group of one GPU per node shares the single NIC 8 ways on NDv2: 2 ranks at 8x the IB beta take
    # 2 * 8 n / 2 = 8n of transfer time, the 16-rank world ring 2 * 15 * n / 16 < 2n
    assert ndv2.collective_s("allreduce", n, (0, 8)) > 4 * ndv2.collective_s("allreduce", n, tuple(range(16)))
