"""The time host offload adds to a step: exposed transfers and the host's optimizer step.

Overlap model: a transfer overlaps the compute of the segment it is scheduled in (``rewrite``: the layer
before its use, one layer of prefetch); the forward of a segment takes its ops' predicted forward time
(compute and collectives, ``RankStep.op_seconds``), its backward twice that (the cost model's backward ~
2x forward). Per (phase, segment, direction) the exposed time is ``max(0, bytes / host_link_bandwidth -
window)``; the two directions are independent (full-duplex PCIe), transfers of one direction in one
window queue behind each other; transfers outside the layers are exposed whole. The optimizer step on the
host is memory-bound: its DRAM traffic (``Offloaded.host_optimizer_bytes``: AdamW reads parameter,
gradient and both moments and writes parameter and moments, 28 bytes per fp32 element) over the host's
memory bandwidth (``hardware.host_memory_bandwidth``), not overlapped (no delayed parameter update). The
device's own optimizer step is not in the plan's predicted step time, so nothing is subtracted for it.
"""

from __future__ import annotations

from collections.abc import Sequence

from shardwise.passes.offload.rewrite import Offloaded

__all__ = ["segment_seconds", "exposed_seconds", "host_optimizer_seconds"]


def segment_seconds(op_seconds: Sequence[float], units: Sequence[tuple[str, int, int]]) -> dict[int, float]:
    """Forward seconds of each segment: ``-1`` the ops before the first layer, ``0..n-1`` the layers,
    ``n`` the ops after the last."""
    if not units:
        return {-1: sum(op_seconds)}
    out = {-1: sum(op_seconds[: units[0][1]]), len(units): sum(op_seconds[units[-1][2] :])}
    for i, (_, s, e) in enumerate(units):
        out[i] = sum(op_seconds[s:e])
    return out


def exposed_seconds(offloaded: Offloaded, forward_s: dict[int, float], link_bandwidth: float) -> float:
    """Transfer time no compute hides (see the module docstring)."""
    total = 0.0
    for (phase, segment, _direction), nbytes in offloaded.traffic.items():
        window = forward_s.get(segment, 0.0) * (2.0 if phase == "bwd" else 1.0) if phase != "step" else 0.0
        total += max(0.0, nbytes / link_bandwidth - window)
    return total


def host_optimizer_seconds(offloaded: Offloaded, host_bandwidth: float) -> float:
    """The host's optimizer step: its DRAM traffic over the host's memory bandwidth."""
    return offloaded.host_optimizer_bytes / host_bandwidth
