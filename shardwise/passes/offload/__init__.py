"""Memory-tier mapping (host offload, issue 6 item 4): which tensors of a flat training plan live in host
memory, chosen jointly with recomputation by predicted cost, within the device's and the host's memory.

``choose_offload(plan, cluster, budget)`` tries {recompute choice} x {optimizer state, parameters,
activations on the host} on the rank's buffers and returns the cheapest pair that fits;
``apply_offload(plan, choice, cluster)`` records it (``ExecutionPlan.tiers``, ``recompute``, memory map,
predicted step time). See docs/memory.md, "Host offload".
"""

from __future__ import annotations

from shardwise.cluster.host import host_bytes_per_rank, host_memory_bandwidth
from shardwise.passes.offload.choose import apply_offload, choose_offload, offload_candidates, tier_record
from shardwise.passes.offload.cost import host_traffic, offload_seconds
from shardwise.passes.offload.rewrite import Offloaded, layer_params, offload_buffers
from shardwise.passes.offload.tiers import TIER_COMBINATIONS, OffloadChoice, Tiers

__all__ = [
    "OffloadChoice", "Offloaded", "TIER_COMBINATIONS", "Tiers", "apply_offload", "choose_offload",
    "host_bytes_per_rank", "host_memory_bandwidth", "host_traffic", "offload_seconds",
    "layer_params", "offload_buffers", "offload_candidates", "tier_record",
]  # fmt: skip
