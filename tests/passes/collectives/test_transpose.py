"""Reduce-scatter as the transposed allgather, allreduce as reduce-scatter + allgather: verified, timed."""

from __future__ import annotations

import math

import pytest

from shardwise.cluster import get_cluster
from shardwise.passes.collectives.baselines import baseline_schedules
from shardwise.passes.collectives.chunks import CollectiveSpec
from shardwise.passes.collectives.pipeline import pipelined_schedule
from shardwise.passes.collectives.routing import solve_routing
from shardwise.passes.collectives.schedule import Transfer, make_schedule
from shardwise.passes.collectives.simulate import simulate
from shardwise.passes.collectives.sketch import sketch_view
from shardwise.passes.collectives.synthesize import synthesize
from shardwise.passes.collectives.topology import topology_view
from shardwise.passes.collectives.transpose import compose_allreduce, refine_chunks, transpose_allgather
from shardwise.passes.collectives.verify import verify

MB = 2**20


@pytest.fixture(scope="module")
def ndv2():
    return topology_view(get_cluster("ndv2x2"))


def _allgathers(topo, n):
    out = dict(baseline_schedules("allgather", topo, n))
    routing = solve_routing(sketch_view(topo), "allgather", 1, time_limit=0.3)
    out["pipelined"] = pipelined_schedule(routing, topo, n, 4)
    return out


@pytest.mark.parametrize("cluster", ["ndv2x2", "dgx-a100x2"])
def test_transposed_allgather_is_a_verified_reduce_scatter_in_the_same_time(cluster):
    topo = topology_view(get_cluster(cluster))
    n = 16 * MB
    for name, ag in _allgathers(topo, n).items():
        sim = simulate(ag, topo, n)
        rs = transpose_allgather(ag, sim.start, sim.end)
        assert rs is not None, name
        assert rs.spec.kind == "reduce_scatter" and all(t.reduce for t in rs.transfers)
        rsim = simulate(rs, topo, n)
        assert verify(rs, rsim.start).ok  # every contribution exactly once, at its home
        # symmetric routes: the reverse takes exactly the allgather's time
        assert math.isclose(rsim.time, sim.time, rel_tol=1e-12), name


def test_an_allgather_that_delivers_a_chunk_twice_has_no_transpose():
    spec = CollectiveSpec("allgather", 3)
    ag = make_schedule(
        spec,
        [Transfer(0, 1, (0,), prio=0), Transfer(0, 2, (0,), prio=0), Transfer(1, 2, (0,), prio=1)]
        + [Transfer(s, d, (s,), prio=0) for s in (1, 2) for d in range(3) if d != s],
        "twice",
    )
    assert verify(ag).ok  # a correct allgather: rank 2 gets chunk 0 from 0 and again from 1
    sim = simulate(ag, topology_view(get_cluster("cpu:4"), [0, 1, 2]), 3 * 1024)
    assert transpose_allgather(ag, sim.start, sim.end) is None


def test_composed_allreduce_verifies_and_costs_at_most_both_halves(ndv2):
    n = 16 * MB
    ags = _allgathers(ndv2, n)
    rss = baseline_schedules("reduce_scatter", ndv2, n)
    for ag_name in ("pipelined", "hierarchical"):
        ag = ags[ag_name]
        sim = simulate(ag, ndv2, n)
        rs_t = transpose_allgather(ag, sim.start, sim.end)
        for rs in (rs_t, rss["ring"], rss["rhd"]):
            rsim = simulate(rs, ndv2, n)
            ar = compose_allreduce(rs, rsim.start, ag, sim.start)
            assert ar is not None and ar.spec.kind == "allreduce"
            asim = simulate(ar, ndv2, n)
            assert verify(ar, asim.start).ok
            assert max(rsim.time, sim.time) <= asim.time <= rsim.time + sim.time + 1e-12


def test_refined_chunks_keep_the_schedule_and_its_time(ndv2):
    ag = baseline_schedules("allgather", ndv2, MB)["ring2"]
    fine = refine_chunks(ag, 3)
    assert fine.spec.chunks == 3 * ag.spec.chunks
    assert math.isclose(simulate(fine, ndv2, MB).time, simulate(ag, ndv2, MB).time, rel_tol=1e-12)
    assert verify(fine, simulate(fine, ndv2, MB).start).ok


def test_synthesized_reduce_scatter_and_allreduce_match_the_allgather():
    topo = topology_view(get_cluster("dgx-a100x2"))
    n = 64 * MB
    ag = synthesize(topo, "allgather", n, time_limit_s=0.3)
    rs = synthesize(topo, "reduce_scatter", n, time_limit_s=0.3)
    ar = synthesize(topo, "allreduce", n, time_limit_s=0.3)
    assert rs.time_s <= ag.time_s * (1 + 1e-12)  # the transposed allgather is a candidate
    assert ar.time_s <= 2 * ag.time_s * (1 + 1e-12)  # ... and it followed by the allgather
    assert rs.time_s <= min(rs.baselines.values()) and ar.time_s <= min(ar.baselines.values())
    for res in (rs, ar):
        assert verify(res.schedule, res.start_times).ok and res.time_s >= res.bound.time
