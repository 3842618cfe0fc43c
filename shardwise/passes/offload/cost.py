"""What host offload costs a step: the offload pass's traffic, priced by the price list.

``host_traffic(offloaded, units)`` records the rewritten step's host-link traffic as plan data
(``ir.plan.HostTraffic``: the layers' node ranges, bytes per (phase, segment, direction), the host optimizer's
DRAM traffic); ``offload_seconds`` prices it with ``costs.step.offload_s`` against the plan's op prices with
the chosen layers recomputed (a transfer overlaps the compute of the segment it is scheduled in: its
forward, or its backward with any recomputation; ``passes.offload.rewrite`` says which). The device's own
optimizer step leaves the plan's price when the optimizer moves to the host.
"""

from __future__ import annotations

from collections.abc import Sequence

from shardwise.cluster.spec import ClusterSpec
from shardwise.costs.prices import price_list
from shardwise.costs.step import offload_s, op_prices
from shardwise.ir.plan import ExecutionPlan, HostTraffic
from shardwise.passes.offload.rewrite import Offloaded
from shardwise.passes.sharding.gradients import param_grad_reduce

__all__ = ["host_traffic", "offload_seconds"]


def host_traffic(offloaded: Offloaded, units: Sequence[tuple[str, int, int]]) -> HostTraffic:
    """The plan-data record of ``offloaded``'s traffic over the layers ``units`` (``(name, start, stop)``)."""
    return HostTraffic(
        segments=tuple((s, e) for _, s, e in units),
        moves=tuple((phase, seg, direction, n) for (phase, seg, direction), n in sorted(offloaded.traffic.items())),
        host_optimizer_bytes=offloaded.host_optimizer_bytes,
    )


def offload_seconds(
    plan: ExecutionPlan, ranges: Sequence[tuple[int, int]], traffic: HostTraffic, cluster: ClusterSpec
) -> tuple[float, float]:
    """(exposed transfer seconds, host optimizer seconds) of ``traffic`` on ``plan`` with the node ranges
    ``ranges`` recomputed."""
    prices = price_list(cluster, plan.precision)
    names = [n.name for n in plan.graph.nodes]
    recomputed = {names[k] for s, e in ranges for k in range(s, e)}
    keys = set(param_grad_reduce(plan.graph, plan.strategies)) if plan.mode == "train" else set()
    ops = op_prices(
        plan.graph, plan.mesh, plan.strategies, prices, train=plan.mode == "train",
        bucketed={p.name for p in plan.graph.params if p.key in keys}, recomputed=recomputed,
    )  # fmt: skip
    return offload_s(traffic, ops, prices)
