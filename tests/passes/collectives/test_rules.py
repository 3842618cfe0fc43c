"""The synthesizer's rules read which resource bounds a collective from the lower bound's terms, so they fire
by resources, not by sizes: the same rule moves with the link figures and holds on any cluster of the shape."""

from __future__ import annotations

from dataclasses import replace

from shardwise.cluster import get_cluster
from shardwise.cluster.efficiency import Efficiency
from shardwise.passes.collectives.bounds import lower_bound
from shardwise.passes.collectives.rules import (
    LATENCY_RATIO,
    NIC_SHARE,
    latency_bound,
    messages_worth,
    nic_bound,
    steady_state_worth,
)
from shardwise.passes.collectives.synthesize import synthesize
from shardwise.passes.collectives.topology import topology_view

KiB, MiB = 2**10, 2**20
SIZES = [2**k for k in range(10, 31)]


def _first_size(topo, kind, rule) -> int:
    """The smallest power of two from 1 KiB to 1 GiB at which ``rule(bound)`` is false."""
    return next(n for n in SIZES if not rule(lower_bound(kind, topo, n)))


def test_bound_terms_say_which_resource_binds() -> None:
    ndv2 = lower_bound("allgather", topology_view(get_cluster("ndv2x2")), MiB)
    nic_s, nic_alpha = ndv2.term("nic")
    assert nic_s == ndv2.bandwidth and nic_alpha == 2.6e-6  # one NIC per node carries everything
    assert ndv2.term("rank")[0] < nic_s and nic_bound(ndv2)
    # DGX-H100 x4 at 64 MB: a rank's switch port binds, its NIC needs 126 of the 130 us (within NIC_SHARE)
    h100 = lower_bound("allgather", topology_view(get_cluster("dgx-h100x4")), 64 * MiB)
    assert h100.bandwidth == h100.term("rank")[0] > h100.term("nic")[0] >= NIC_SHARE * h100.bandwidth
    assert nic_bound(h100)
    one_node = lower_bound("allgather", topology_view(get_cluster("dgx2x1")), 64 * MiB)
    assert one_node.term("nic") == (0.0, 0.0) and not nic_bound(one_node)


def test_latency_rule_moves_with_the_link_figures() -> None:
    base = get_cluster("ndv2x2")
    slow = replace(
        base, efficiency=Efficiency(intra_node=0.25, inter_node=0.25)
    )  # same shape, 4x slower links
    fast_flip = _first_size(topology_view(base), "allgather", latency_bound)
    slow_flip = _first_size(topology_view(slow), "allgather", latency_bound)
    # the bandwidth term is 4x longer per byte, so 4x fewer bytes are worth LATENCY_RATIO latencies
    assert slow_flip == fast_flip // 4
    bound = lower_bound("allgather", topology_view(base), fast_flip)
    assert (
        messages_worth(bound)
        >= LATENCY_RATIO
        > messages_worth(lower_bound("allgather", topology_view(base), fast_flip // 2))
    )
    # the steady-state model needs many more latencies than the timed model's limit
    assert _first_size(topology_view(base), "allgather", lambda b: not steady_state_worth(b)) > fast_flip


def test_nic_rule_is_off_where_the_nics_are_not_the_bottleneck() -> None:
    base = get_cluster("dgx-a100x4")  # four nodes: each node's NICs must bring in 3/4 of the output
    n = 16 * MiB
    assert nic_bound(lower_bound("allgather", topology_view(base), n))
    # the same machine with NICs as fast as its NVSwitch ports: the ports bind, not the NICs
    nics = tuple(replace(nic, bandwidth=base.switches[0].port_bandwidth) for nic in base.nics)
    fabric = replace(base.switches[-1], port_bandwidth=base.switches[0].port_bandwidth)
    wide = replace(base, nics=nics, switches=(*base.switches[:-1], fabric))
    assert not nic_bound(lower_bound("allgather", topology_view(wide), n))


def test_rail_pipelines_are_offered_wherever_the_nics_bind() -> None:
    # 2 MiB on two NDv2 nodes: bandwidth-bound at the shared NICs (the old rule offered rails from 64 MB only)
    topo = topology_view(get_cluster("ndv2x2"))
    n = 2 * MiB
    bound = lower_bound("allgather", topo, n)
    assert nic_bound(bound) and not latency_bound(bound)
    res = synthesize(topo, "allgather", n, time_limit_s=1.0)
    assert "rail" in res.candidates and res.time_s <= min(res.baselines.values())
    # on two DGX-H100 nodes the switch ports need 1.5x the NICs' time: no rails
    assert not nic_bound(lower_bound("allgather", topology_view(get_cluster("dgx-h100x2")), 64 * MiB))
