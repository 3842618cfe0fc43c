"""calibrate() measures this machine with two real gloo processes (quick mode): every figure the price list
reads is measured and has its source."""

from __future__ import annotations

import math

import pytest

from shardwise.cluster import ClusterSpec, calibrate
from shardwise.cluster.presets import CPU_GLOO_LATENCY


@pytest.mark.multiproc
def test_calibrate_quick_gives_positive_finite_figures() -> None:
    spec = calibrate(2, quick=True)
    assert spec.name == "cpu:2-calibrated" and spec.world_size == 2 and spec.device.kind == "cpu"
    figures = [
        spec.device.flops("float32"),
        spec.device.memory_bandwidth,
        spec.host_link_bandwidth,
        spec.switches[0].port_bandwidth,
        spec.switches[0].latency,
    ]
    assert all(math.isfinite(x) and x > 0 for x in figures), figures
    alpha, beta = spec.p2p_alpha_beta(0, 1)
    assert alpha == spec.switches[0].latency and beta == 1 / spec.switches[0].port_bandwidth
    assert alpha != CPU_GLOO_LATENCY  # measured, not the default
    assert alpha < 0.1  # a loopback message takes well under 100 ms
    eff = spec.efficiency
    # the host's fixed costs are real: an op, a backward node, a collective call each take time
    for name in ("op_overhead_s", "backward_op_overhead_s", "collective_overhead_s"):
        value = getattr(eff, name)
        assert 0 < value < 0.1, (name, value)
        assert "by shardwise calibrate" in eff.source(name)
    assert 0 <= eff.comm_overlap <= 1 and 0 < eff.intra_node <= 1
    # math ops are priced per element as measured; the optimizer per step, tensor and element
    assert eff.elementwise("tanh") is not None and eff.elementwise("tanh")[0] > 0
    per_step, per_tensor, per_element = eff.optimizer("adamw")
    assert per_tensor > 0 and per_element >= 0
    assert ClusterSpec.from_dict(spec.to_dict()) == spec
