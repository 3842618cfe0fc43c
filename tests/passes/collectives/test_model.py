"""Topology view, sketches, simulator (against closed forms), bounds, baselines and the verifier."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest

from shardwise.cluster import get_cluster
from shardwise.errors import UserInputError
from shardwise.passes.collectives.baselines import baseline_schedules, ring_order
from shardwise.passes.collectives.bounds import lower_bound
from shardwise.passes.collectives.chunks import CollectiveSpec
from shardwise.passes.collectives.lower import lower
from shardwise.passes.collectives.schedule import Schedule, ScheduleError, Transfer, make_schedule
from shardwise.passes.collectives.simulate import simulate
from shardwise.passes.collectives.sketch import Sketch, load_taccl_sketch, sketch_view
from shardwise.passes.collectives.topology import topology_view
from shardwise.passes.collectives.verify import verify, verify_program

MB = 2**20
US = 1e-6
TACCL = Path(__file__).resolve().parents[4] / "shared" / "data" / "taccl-examples"


@pytest.fixture(scope="module")
def ndv2():
    return topology_view(get_cluster("ndv2x2"))


@pytest.fixture(scope="module")
def dgx2():
    return topology_view(get_cluster("dgx2x1"))


def test_ndv2_view_has_cube_mesh_and_one_shared_nic(ndv2):
    links = [e for e in ndv2.edges.values() if e.kind == "link"]
    assert len(links) == 2 * 2 * 16  # 16 NVLink pairs per node, both directions, two nodes
    assert math.isclose(ndv2.edge(0, 1).beta * MB / US, 23, rel_tol=1e-9)
    assert math.isclose(ndv2.edge(0, 2).beta * MB / US, 46, rel_tol=1e-9)
    assert not ndv2.has_edge(0, 5) or ndv2.edge(0, 5).kind == "nic"
    assert ndv2.route(0, 5).kind == "relay" and math.isclose(ndv2.route(0, 5).beta * MB / US, 23)
    inter = [e for e in ndv2.edges.values() if e.internode and ndv2.nodes[e.src] == 0]
    shared = set.intersection(*(set(e.resources) for e in inter))
    assert shared, "every inter-node transfer out of node 0 must hold the node's one NIC"
    e = ndv2.edge(0, 9)
    assert math.isclose(e.alpha, 2.6 * US) and math.isclose(e.beta * MB / US, 105)


def test_switch_edges_hold_both_ports(dgx2):
    e, f = dgx2.edge(0, 1), dgx2.edge(2, 1)
    assert len(e.resources) == 2 and len(set(e.resources) & set(f.resources)) == 1  # g1's ingress port


def test_auto_symmetry_and_sketch_rules(ndv2):
    sv = sketch_view(ndv2)
    assert sorted(sv.generators) == [(4, 8), (8, 16)] and len(sv.group) == 4
    assert len(sketch_view(topology_view(get_cluster("dgx-a100x4"))).group) == 32
    relay = sketch_view(ndv2, Sketch(internode="relay", relays=((0, 1),), symmetry=((4, 8), (8, 16))))
    assert relay.dropped == ((4, 8),) and len(relay.group) == 2  # the relay pair breaks the 4-rotation
    assert all(ndv2.local_index[u] == 0 for u, v in relay.allowed if ndv2.edges[(u, v)].internode)
    with pytest.raises(UserInputError):
        Sketch(internode="sideways")


def test_taccl_sketch_file_loads():
    path = TACCL / "sketch" / "sk1-ndv2-n2.json"
    if not path.exists():
        pytest.skip(f"TACCL examples not found at {TACCL}")
    sk = load_taccl_sketch(path)
    assert sk.internode == "relay" and sk.relays == ((0, 1),) and sk.symmetry == ((8, 16),) and sk.chunks == 1


@pytest.mark.parametrize("cluster", ["cpu:4", "dgx2x1", "dgx-a100x1"])
def test_ring_matches_closed_forms(cluster):
    topo = topology_view(get_cluster(cluster))
    p = topo.size
    alpha, beta = topo.edge(0, 1).alpha, topo.edge(0, 1).beta
    for n in (1024, 3 * MB):
        bs = baseline_schedules("allgather", topo, n)
        assert math.isclose(
            simulate(bs["ring"], topo, n).time, (p - 1) * (alpha + beta * n / p), rel_tol=1e-9
        )
        ar = baseline_schedules("allreduce", topo, n)
        assert math.isclose(
            simulate(ar["ring"], topo, n).time, 2 * (p - 1) * (alpha + beta * n / p), rel_tol=1e-9
        )
        logp = p.bit_length() - 1
        assert math.isclose(
            simulate(ar["recursive_doubling"], topo, n).time, logp * (alpha + beta * n), rel_tol=1e-9
        )


def test_contention_serialises_and_cycles_are_caught(dgx2):
    spec = CollectiveSpec("alltoall", 16, 1)
    n = 16 * MB  # 1 MB per chunk
    one = make_schedule(spec, [Transfer(1, 0, (16 * 1,))], "x")
    two = make_schedule(spec, [Transfer(1, 0, (16 * 1,)), Transfer(2, 0, (16 * 2,))], "x")
    t1, t2 = simulate(one, dgx2, n).time, simulate(two, dgx2, n).time
    assert math.isclose(t2, 2 * t1)  # both need g0's ingress port
    par = make_schedule(spec, [Transfer(1, 0, (16 * 1,)), Transfer(2, 3, (16 * 2 + 3,))], "x")
    assert math.isclose(simulate(par, dgx2, n).time, t1)
    # a dep against the resource order: transfer 0 waits for 1, which is behind 0 on g0's port
    bad = Schedule(spec, (Transfer(1, 0, (16,), deps=(1,), prio=0), Transfer(2, 0, (32,), prio=1)), "bad")
    with pytest.raises(ScheduleError):
        simulate(bad, dgx2, n)


def test_lower_bound_is_the_nic_cut_on_ndv2(ndv2):
    b = lower_bound("allgather", ndv2, 1024 * MB)
    assert math.isclose(b.time, 512 * 105 * US + 2.6 * US, rel_tol=1e-6)
    b1 = lower_bound("allgather", ndv2, MB)
    assert math.isclose(b1.time * 1e6, 0.5 * 105 + 2.6, rel_tol=1e-6)  # TACCL: about 55 us
    assert math.isclose(
        lower_bound("allreduce", ndv2, 1024 * MB).time, 1024 * 105 * US + 2.6 * US, rel_tol=1e-6
    )


@pytest.mark.parametrize("cluster", ["ndv2x2", "dgx-a100x2", "cpu:4"])
@pytest.mark.parametrize("kind", ["allgather", "reduce_scatter", "allreduce", "alltoall", "broadcast"])
def test_every_baseline_verifies_and_respects_the_bound(cluster, kind):
    topo = topology_view(get_cluster(cluster))
    for n in (4096, 64 * MB):
        bound = lower_bound(kind, topo, n).time
        for name, sched in baseline_schedules(kind, topo, n).items():
            sim = simulate(sched, topo, n)
            assert verify(sched, sim.start).ok, name
            assert sim.time >= bound * (1 - 1e-9), (name, sim.time, bound)


def test_verifier_catches_broken_schedules(dgx2):
    topo = dgx2
    ring = baseline_schedules("allreduce", topo, MB)["ring"]
    good = lower(ring, simulate(ring, topo, MB).start)
    assert verify_program(good).ok
    # a lost message
    missing = Schedule(ring.spec, ring.transfers[:-1], "missing")
    with pytest.raises(ScheduleError, match="ends with|never"):
        verify(missing)
    # a contribution counted twice: one reduction repeated
    t0 = ring.transfers[0]
    dup = make_schedule(ring.spec, [*ring.transfers, replace(t0, deps=(), prio=t0.prio)], "dup")
    with pytest.raises(ScheduleError, match="twice|ends with"):
        verify(dup)
    # sending data the sender does not have
    spec = CollectiveSpec("allgather", 16, 1)
    with pytest.raises(ScheduleError, match="before it holds"):
        verify(make_schedule(spec, [Transfer(0, 1, (5,))], "bad"))
    # receive order differs from send order for a pair -> the programs disagree
    prog = lower(ring, simulate(ring, topo, MB).start)
    steps = prog["programs"][1]["steps"]
    recvs = [k for k, s in enumerate(steps) if s[0] != "send" and s[1] == 0]
    if len(recvs) >= 2:
        a, b = recvs[:2]
        steps[a], steps[b] = steps[b], steps[a]
        with pytest.raises(ScheduleError):
            verify_program(prog)
    # a dependency cycle between ranks (each waits for the other's message first)
    spec2 = CollectiveSpec("alltoall", 2, 1)
    cyc = {
        **lower(make_schedule(spec2, [Transfer(0, 1, (1,)), Transfer(1, 0, (2,))], "c")),
    }
    for pr in cyc["programs"]:
        pr["steps"].reverse()  # recv first on both ranks
    with pytest.raises(ScheduleError, match="deadlock"):
        verify_program(cyc)


def test_ring_order_uses_double_nvlinks(ndv2):
    order = ring_order(ndv2)[:8]
    hops = [ndv2.route(order[i], order[(i + 1) % 8]).beta * MB / US for i in range(8)]
    assert max(hops) <= 23 + 1e-9


def test_node_level_counting_bound_on_four_nodes():
    """Each node as one vertex: allreduce over G nodes needs 2(G-1) crossings of every byte (one-way gossip
    bound), allgather G-1; on dgx-a100x4 the inter-node links carry 4 nodes x 8 NICs x 25 GB/s at the
    cluster's achieved inter-node fraction (the price list's figures)."""
    cluster = get_cluster("dgx-a100x4")
    topo = topology_view(cluster)
    n = 1024 * MB
    nic = 25e9 * cluster.efficiency.inter_node
    cap, ab = 4 * 8 * nic, 2.6e-6 * nic
    b = lower_bound("allreduce", topo, n)
    assert b.cut == "all inter-node links"
    assert math.isclose(b.time, (6 * n + ab) / cap, rel_tol=1e-6)
    # 1.5x the one-node cut (n into a node through its 8 NICs): reduce-scatter + allgather over the nodes
    assert math.isclose(b.time / lower_bound("allgather", topo, n).time, 2.0, rel_tol=1e-4)
    for kind in ("allreduce", "allgather"):
        for name, sched in baseline_schedules(kind, topo, 64 * MB).items():
            assert simulate(sched, topo, 64 * MB).time >= lower_bound(kind, topo, 64 * MB).time, name
