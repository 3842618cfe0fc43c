"""Readable text forms of graphs and plans (for people, not for parsing: JSON is the exchange format)."""

from __future__ import annotations

from shardwise.ir.graph import Arg, Const, Graph, Node, Value
from shardwise.ir.plan import ExecutionPlan

__all__ = ["format_arg", "format_node", "format_graph", "plan_summary", "human_bytes", "human_time"]


def format_arg(a: Arg) -> str:
    if isinstance(a, Value):
        return f"%{a.name}"
    if isinstance(a, Const):
        return str(a)
    if isinstance(a, tuple):
        return "[" + ", ".join(format_arg(x) for x in a) + "]"
    return repr(a)


def format_node(n: Node) -> str:
    args = [format_arg(a) for a in n.args] + [f"{k}={format_arg(v)}" for k, v in n.kwargs]
    outs = ", ".join(str(o) for o in n.outputs)
    where = f"  # {n.module_path}" if n.module_path else ""
    return f"%{n.name}: {outs} = {n.op}({', '.join(args)}){where}"


def format_graph(graph: Graph) -> str:
    lines = [f"graph {graph.model_name or '<model>'}("]
    lines += [f"    %{i.name}: {i.spec}," for i in graph.inputs]
    lines.append(") {")
    lines += [f"  param %{p.name}: {p.spec} = {p.kind} {p.key!r}" for p in graph.params]
    lines += [f"  {format_node(n)}" for n in graph.nodes]
    lines.append(f"  return ({', '.join(format_arg(a) for a in graph.outputs)})")
    lines.append("}")
    return "\n".join(lines)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def human_time(s: float) -> str:
    if s >= 1:
        return f"{s:.3f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3f} ms"
    return f"{s * 1e6:.1f} us"


def plan_summary(plan: ExecutionPlan) -> str:
    degrees = ", ".join(f"{k}={v}" for k, v in plan.degrees.items())
    p = plan.predicted
    collectives = sum(len(s.redistributes) for s in plan.strategies)
    lines = [
        f"plan: {plan.model_name} on {plan.cluster_name} ({plan.mode}, {plan.precision})",
        f"  mesh: {plan.mesh}   degrees: {degrees}   world size: {plan.world_size}",
        f"  ops: {len(plan.graph.nodes)}   parameters: {plan.graph.num_params:,}   collectives: {collectives}",
        f"  predicted step time: {human_time(p.step_time_s)} (compute {human_time(p.compute_s)}, "
        f"communication {human_time(p.comm_s)})",
        f"  predicted peak memory per rank: {human_bytes(max(p.memory_bytes) if p.memory_bytes else 0)}",
    ]
    bound = max((m.lower_bound_bytes for m in plan.memory), default=0)
    if bound:
        arena = max(m.arena_bytes for m in plan.memory)
        lines[-1] += f" (memory map arena; lower bound of live bytes {human_bytes(bound)}, {arena / bound:.3f}x)"
    if plan.tiers:
        host = [name for name, tier in plan.tiers if tier == "host"]
        lines.append(f"  host memory (offloaded): {', '.join(host[:8])}{' ...' if len(host) > 8 else ''}")
    if plan.replicated_ops:
        lines.append(f"  run whole (no rule splits them): {', '.join(plan.replicated_ops[:8])}")
    lines += [f"  note: {n}" for n in plan.notes]
    return "\n".join(lines)
