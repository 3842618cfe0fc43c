"""Rail-pipelined allgather: correct (verified), and near the bound where NIC tails dominated."""

from __future__ import annotations

from shardwise.cluster.presets import get_cluster
from shardwise.passes.collectives.bounds import lower_bound
from shardwise.passes.collectives.lower import lower
from shardwise.passes.collectives.railpipe import rail_allgather, rail_candidates
from shardwise.passes.collectives.simulate import simulate
from shardwise.passes.collectives.topology import topology_view
from shardwise.passes.collectives.verify import verify_program

MB = 2**20


def test_rail_allgather_verifies_and_is_within_15pct_on_dgx_a100x4() -> None:
    topo = topology_view(get_cluster("dgx-a100x4"), None)
    n = 64 * MB
    sched = rail_allgather(topo, n, 16, (10, 4, 2), 4)
    assert sched is not None and sched.spec.kind == "allgather"
    sim = simulate(sched, topo, n)
    verify_program(lower(sched, sim.start))  # raises on a wrong schedule
    assert sim.time <= 1.15 * lower_bound("allgather", topo, n, 0).time


def test_rail_candidates_need_several_nodes() -> None:
    assert rail_candidates(topology_view(get_cluster("dgx2x1"), None), 64 * MB) == []
    assert len(rail_candidates(topology_view(get_cluster("dgx-h100x2"), None), 64 * MB)) >= 2
