"""calibrate() measures this machine with two real gloo processes (quick mode)."""

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
    assert ClusterSpec.from_dict(spec.to_dict()) == spec
