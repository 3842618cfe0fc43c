"""The synthesizer prices messages with the price list: a schedule of one message takes what
``CommPrices.p2p_s`` charges for it (achieved bandwidth fractions included), and a schedule's price per call
adds the library's fixed cost once."""

from __future__ import annotations

from dataclasses import replace

import pytest

from shardwise.cluster import get_cluster
from shardwise.cluster.efficiency import Efficiency
from shardwise.costs.comm import CommPrices
from shardwise.passes.collectives.bounds import lower_bound
from shardwise.passes.collectives.chunks import CollectiveSpec
from shardwise.passes.collectives.schedule import Schedule, Transfer
from shardwise.passes.collectives.simulate import simulate
from shardwise.passes.collectives.synthesize import synthesize
from shardwise.passes.collectives.topology import topology_view

MiB = 2**20


def _one_message(p: int, src: int, dst: int) -> Schedule:
    return Schedule(CollectiveSpec("allgather", p, 1), (Transfer(src, dst, (src,)),), "one")


@pytest.mark.parametrize(
    "cluster, src, dst",
    [("dgx-a100x2", 0, 1), ("dgx-a100x2", 3, 11), ("ndv2x2", 0, 1), ("ndv2x2", 0, 7), ("ndv2x2", 2, 13)],
)
def test_one_message_costs_what_the_price_list_charges(cluster: str, src: int, dst: int) -> None:
    spec = get_cluster(cluster)
    if spec.efficiency.intra_node == spec.efficiency.inter_node == 1.0:
        # a preset without measured fractions: give it some, so that the test sees them applied
        spec = replace(spec, efficiency=Efficiency(intra_node=0.8, inter_node=0.7))
    topo = topology_view(spec)
    n = 16 * MiB  # allgather output: each rank's chunk is n / p
    sim = simulate(_one_message(topo.size, src, dst), topo, n)
    expected = CommPrices(spec).p2p_s(n / topo.size, src, dst)
    assert sim.time == pytest.approx(expected, rel=1e-12)
    # and the fraction is really applied: the raw link figures give a shorter time
    raw = spec.p2p_alpha_beta(src, dst)
    assert sim.time > raw[0] + raw[1] * n / topo.size


def test_achieved_fractions_slow_schedules_and_bounds_alike() -> None:
    base = get_cluster("ndv2x2")
    slow = replace(base, efficiency=Efficiency(intra_node=0.5, inter_node=0.5))
    n = 64 * MiB
    fast_res = synthesize(topology_view(base), "allgather", n, search=False)
    slow_res = synthesize(topology_view(slow), "allgather", n, search=False)
    # bandwidth-bound: every beta doubled, so times and bounds nearly double (alphas unchanged)
    assert 1.9 < slow_res.time_s / fast_res.time_s <= 2.0
    assert 1.9 < slow_res.bound.time / fast_res.bound.time <= 2.0
    assert lower_bound("allgather", topology_view(slow), n).time == slow_res.bound.time


def test_schedule_price_adds_the_library_call_cost_once() -> None:
    spec = replace(get_cluster("ndv2x2"), efficiency=Efficiency(collective_overhead_s=5e-6))
    prices = CommPrices(spec)
    assert prices.schedule_s(40e-6) == pytest.approx(45e-6)
    assert prices.schedule_s(0.0) == 0.0
