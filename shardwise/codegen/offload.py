"""Host offload in a generated program (``ExecutionPlan.tiers``, chosen by ``shardwise.passes.offload``).

* ``optimizer:<key>`` in host memory: the program's trainer runs ``C.HostOptimizer`` (or
  ``C.ShardedOptimizer(..., host=True)`` under ZeRO; ``OFFLOAD_OPTIMIZER`` in the program): fp32 master
  weights and the optimizer's state on the host, gradients copied there after the gradient reduction,
  updated values copied back.
* ``activations:<layer>:<first node>..<last node>`` in host memory: the statements of those ops run under
  ``torch.autograd.graph.save_on_cpu`` (what autograd saves for backward is copied to the host and back when
  the backward needs it). A statement belongs to the range when it sets a variable of one of its ops, and so
  does every statement between the range's first and last. Numerics are unchanged (copies only).
"""

from __future__ import annotations

import re

from shardwise.codegen.pysource import uses
from shardwise.codegen.statement import Statement
from shardwise.ir.plan import ExecutionPlan

__all__ = ["offloads_optimizer", "host_activation_ranges", "save_activations_on_host"]


def offloads_optimizer(plan: ExecutionPlan) -> bool:
    """True when the plan keeps optimizer state in host memory."""
    return any(name.startswith("optimizer:") and tier == "host" for name, tier in plan.tiers)


def host_activation_ranges(plan: ExecutionPlan) -> list[tuple[str, str, str]]:
    """(layer, first node, last node) of each range whose saved activations live in host memory."""
    out = []
    for name, tier in plan.tiers:
        if tier != "host" or not name.startswith("activations:"):
            continue
        layer, _, span = name[len("activations:") :].rpartition(":")
        first, _, last = span.partition("..")
        # the layer's name only reaches a comment; a plan read from a file must not smuggle code in with it
        out.append((re.sub(r"[^\w.\[\]#-]", "_", layer), first, last))
    return out


def save_activations_on_host(plan: ExecutionPlan, body: list[Statement], var: dict[str, str]) -> list[Statement]:
    """``body`` with each host-activation range's statements under ``torch.autograd.graph.save_on_cpu``
    (see the module docstring)."""
    ranges = host_activation_ranges(plan)
    if not ranges:
        return body
    index = {n.name: k for k, n in enumerate(plan.graph.nodes)}
    sets = [set(uses(s.code()).sets) for s in body]
    spans = []
    for layer, first, last in ranges:
        if first not in index or last not in index or index[last] < index[first]:
            raise ValueError(f"plan.tiers names a range {first!r}..{last!r} that is not in the graph")
        mine = {var[n.name] for n in plan.graph.nodes[index[first] : index[last] + 1] if n.name in var}
        members = [i for i, s in enumerate(sets) if s & mine]
        if members:
            spans.append((members[0], members[-1] + 1, layer))
    spans.sort()
    out = list(body)
    done = 0
    for a, b, layer in reversed(spans):
        if done and b > done:  # overlapping spans (a fused kernel across a cut): the earlier one stops short
            b = done
        if a >= b:
            continue
        wrapped = out[a:b]
        out[a:b] = [
            Statement(
                "", ("with torch.autograd.graph.save_on_cpu(pin_memory=self.device.type == 'cuda'):",),
                nodes=tuple(n for s in wrapped for n in s.all_nodes()), paths=(layer,),
                detail="what autograd saves for the backward lives in host memory until then", body=tuple(wrapped),
            )
        ]  # fmt: skip
        done = a
    return out
