"""library_collective_time follows the ring closed forms at the group's (alpha, beta)."""

from __future__ import annotations

import pytest

from shardwise.cluster import get_cluster
from shardwise.cluster.costmodel import pipelined_ring_time

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
    alpha, beta = spec.group_alpha_beta(ranks)
    p = len(ranks)
    step = alpha + beta * nbytes / p
    t = spec.library_collective_time
    assert t("allreduce", nbytes, ranks) == pytest.approx(2 * (p - 1) * step)
    assert t("allgather", nbytes, ranks) == pytest.approx((p - 1) * step)
    assert t("reduce_scatter", nbytes, ranks) == pytest.approx((p - 1) * step)
    assert t("alltoall", nbytes, ranks) == pytest.approx((p - 1) * step)
    # pipelined ring broadcast: the best chunk count k of (p - 2 + k)(alpha + beta n / k)
    brute = min((p - 2 + k) * (alpha + beta * nbytes / k) for k in range(1, 4097))
    assert t("broadcast", nbytes, ranks) == pytest.approx(brute, rel=1e-9)


def test_broadcast_limits() -> None:
    alpha, beta = 2e-6, 1e-10
    assert pipelined_ring_time(2, 1e6, alpha, beta) == pytest.approx(alpha + beta * 1e6)
    assert pipelined_ring_time(8, 0, alpha, beta) == pytest.approx(7 * alpha)
    big = pipelined_ring_time(8, 1e10, alpha, beta)
    assert beta * 1e10 < big < beta * 1e10 * 1.01  # large messages: bandwidth-bound, latency amortised
    assert pipelined_ring_time(1, 1e6, alpha, beta) == 0.0


def test_allreduce_figure_by_hand() -> None:
    # dgx-a100x2, one GPU per node: 2 ranks over one HDR NIC: 2 * 1 * (2.6us + 1 GiB / 2 / 25 GB/s)
    spec = get_cluster("dgx-a100x2")
    expected = 2 * (2.6e-6 + 2**30 / 2 / 25e9)
    assert spec.library_collective_time("allreduce", 2**30, [0, 8]) == pytest.approx(expected)


def test_single_rank_and_bad_input() -> None:
    spec = get_cluster("dgx-h100")
    assert spec.library_collective_time("allreduce", 2**20, [3]) == 0.0
    with pytest.raises(ValueError, match="unknown collective 'all_reduce': use one of allreduce"):
        spec.library_collective_time("all_reduce", 10, [0, 1])
    with pytest.raises(ValueError, match="negative"):
        spec.library_collective_time("allgather", -1, [0, 1])
    with pytest.raises(ValueError, match="not a rank"):
        spec.library_collective_time("allgather", 1, [0, 8])


def test_more_bandwidth_is_faster() -> None:
    n = 256 * 2**20
    a100, h100 = get_cluster("dgx-a100x2"), get_cluster("dgx-h100x2")
    for ranks in (range(8), (0, 8), range(16)):
        assert h100.library_collective_time("allreduce", n, ranks) < a100.library_collective_time(
            "allreduce", n, ranks
        )
    ndv2 = get_cluster("ndv2x2")
    # a DP group of one GPU per node shares the single NIC 8 ways on NDv2: 2 ranks at 8x the IB beta take
    # 2 * 8 n / 2 = 8n of transfer time, the 16-rank world ring 2 * 15 * n / 16 < 2n
    assert ndv2.library_collective_time("allreduce", n, (0, 8)) > 4 * ndv2.library_collective_time(
        "allreduce", n, range(16)
    )
