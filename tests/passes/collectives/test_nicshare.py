"""Shared-NIC allgather: correct (verified), and at or below TACCL's published ndv2x2 figure at 1 MiB."""

from __future__ import annotations

from shardwise.cluster.presets import get_cluster
from shardwise.passes.collectives.lower import lower
from shardwise.passes.collectives.nicshare import nic_candidates, shared_nic, shared_nic_allgather
from shardwise.passes.collectives.simulate import simulate
from shardwise.passes.collectives.synthesize import synthesize
from shardwise.passes.collectives.topology import topology_view
from shardwise.passes.collectives.verify import verify_program

MiB = 2**20
#: TACCL's published allgather time for a 1 MB output on 2 x NDv2 (8 V100 each, one IB NIC per node)
TACCL_NDV2X2_1MB_US = 62.2


def test_shared_nic_allgather_verifies_on_ndv2x2() -> None:
    topo = topology_view(get_cluster("ndv2x2"), None)
    sched = shared_nic_allgather(topo, MiB, 8, (8, 51, 5), (0, 5, 5), cap_us=0.4, tail_cap=1)
    assert sched is not None and sched.spec.kind == "allgather"
    sim = simulate(sched, topo, MiB)
    verify_program(lower(sched, sim.start))  # raises on a wrong schedule
    # the NIC carries 512 KiB each way in three messages (52.5 + 3 x 2.6 us); the rest is head and tail
    assert 60.3e-6 <= sim.time <= 63e-6


def test_synthesized_allgather_on_ndv2x2_1mib_reaches_taccl() -> None:
    topo = topology_view(get_cluster("ndv2x2"), None)
    res = synthesize(topo, "allgather", MiB, time_limit_s=1.0)
    assert res.time_s * 1e6 <= TACCL_NDV2X2_1MB_US
    assert res.time_s <= min(res.baselines.values())
    assert res.time_s >= res.bound.time


def test_candidates_only_on_two_shared_nic_nodes_and_in_the_size_range() -> None:
    a100 = topology_view(get_cluster("dgx-a100x2"), None)
    assert not shared_nic(a100) and nic_candidates(a100, MiB) == []
    ndv2 = topology_view(get_cluster("ndv2x2"), None)
    assert nic_candidates(ndv2, 64 * MiB) == [] and nic_candidates(ndv2, 64 * 2**10) == []
    ndv2x4 = topology_view(get_cluster("ndv2x4"), None)
    assert shared_nic(ndv2x4) and nic_candidates(ndv2x4, MiB) == []  # offered on two nodes only
