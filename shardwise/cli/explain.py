"""``shardwise explain``: why this plan (the ranked alternatives) and why an op's strategy (its candidates).

An op's candidates are recomputed from the plan with the same strategy builder the planner uses (every valid
split of the op's dimension labels over the mesh axes, given the placements its operands have in the plan),
and priced by the price list (``shardwise.costs``) exactly as the plan's own ops are: a candidate's time per
step is its forward and, in training, its backward, with the collectives of both. The chosen candidate's
time is the op's share of the plan's predicted step. A different output placement also changes what later
ops pay, which the planner weighs and this local view does not.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from shardwise.cli.summary import FREE_COLLECTIVES, describe_spec, describe_split, module_groups
from shardwise.errors import UserInputError
from shardwise.ir.experts import MOE_EXPERTS, expert_count, moe_nodes, weight_operands
from shardwise.ir.graph import Value
from shardwise.ir.plan import ExecutionPlan
from shardwise.ir.tensor import TensorSpec
from shardwise.ir.text import human_bytes, human_time

__all__ = ["Candidate", "OpExplanation", "explain_plan", "explain_ops", "render_explain", "find_ops"]

MAX_OPS = 12


@dataclass
class Candidate:
    split: str
    inputs: list[str]
    outputs: list[str]
    collectives: list[str]
    compute_s: float
    comm_s: float
    time_s: float  # per step: forward and (training) backward, compute and collectives (the price list's)
    output_bytes: int  # per rank
    chosen: bool
    partial_output: bool


@dataclass
class OpExplanation:
    node: str
    op: str
    module: str
    module_type: str
    source: str
    inputs: list[str]
    outputs: list[str]
    chosen_split: str
    chosen_inputs: list[str]
    chosen_outputs: list[str]
    redistributions: list[dict[str, Any]]
    compute_s: float
    comm_s: float
    reason: str
    run_whole: bool
    candidates: list[Candidate] = field(default_factory=list)
    note: str = ""


def explain_plan(plan: ExecutionPlan, cluster: Any | None = None) -> dict[str, Any]:
    """The chosen plan against its ranked alternatives, and the modules that cost the most per step (priced
    by the price list on ``cluster``; without it, the forward times the plan records)."""
    alts = sorted(getattr(plan, "alternatives", ()) or (), key=lambda a: (not a.fits, a.step_time_s))
    chosen = next((a for a in alts if a.chosen), None)
    best = chosen.step_time_s if chosen else plan.predicted.step_time_s
    rows = []
    for rank, a in enumerate(alts, 1):
        rows.append(
            {
                "rank": rank,
                "degrees": dict(a.degrees),
                "step_time_s": a.step_time_s,
                "vs_chosen": a.step_time_s / best if best else None,
                "memory_bytes": a.memory_bytes,
                "fits": a.fits,
                "chosen": a.chosen,
                "note": a.note,
            }  # fmt: skip
        )
    costly = sorted(module_groups(plan, cluster), key=lambda g: -(g.compute_s + g.comm_s))[:10]
    return {
        "chosen": {"degrees": plan.degrees, "step_time_s": plan.predicted.step_time_s},
        "alternatives": rows,
        "experts": _experts(plan, alts, cluster),
        "notes": list(getattr(plan, "notes", ()) or ()),
        "costliest_modules": [
            {
                "module": g.module,
                "ops": g.ops,
                "compute_s": g.compute_s,
                "comm_s": g.comm_s,
                "nodes": g.nodes[:3],
            }
            for g in costly
        ],
    }


def _expert_weights_held(plan: ExecutionPlan) -> tuple[int, int]:
    """The expert weights (the experts ops' weight operands) the busiest rank holds under ``plan``'s placements
    (split over ``ep``, and over ``tp`` where the experts are), and those of the whole model. A pipeline's rank
    holds only the experts of its own device stage's chunks: the stage holding the most is counted."""

    def held_and_whole(p: ExecutionPlan) -> tuple[int, int]:
        held = whole = 0
        for n in p.graph.nodes:
            if n.op != MOE_EXPERTS:
                continue
            tensors = [a for a in n.args if isinstance(a, Value)]
            strategy = p.strategy(n.name)
            for k in weight_operands(len(tensors)):
                spec = p.graph.spec_of(tensors[k].name)
                if not isinstance(spec, TensorSpec):
                    continue
                whole += spec.nbytes
                placement = strategy.inputs[k] if k < len(strategy.inputs) else None
                local = placement.local_shape(spec.shape, p.mesh) if placement is not None else spec.shape
                held += spec.nbytes * math.prod(local) // max(math.prod(spec.shape), 1)
        return held, whole

    pipeline = plan.pipeline
    if pipeline is None:
        return held_and_whole(plan)
    per_stage = [0] * pipeline.pp
    whole = 0
    for stage in pipeline.stages:
        held, chunk_whole = held_and_whole(stage.plan)
        per_stage[stage.device_stage] += held
        whole += chunk_whole
    return max(per_stage), whole


def _experts(plan: ExecutionPlan, alts: list[Any], cluster: Any | None) -> dict[str, Any] | None:
    """Why this ``ep``, for a model with mixture-of-experts layers (None without): the experts it splits, the
    expert weights a rank holds, the all-to-all time per step the split costs (the price list's, with
    ``cluster``), and the fastest scored alternative with another ``ep``, with its step time and memory."""
    graph = plan.graph
    layers = moe_nodes(graph)
    experts = expert_count(graph)
    if not layers or not experts:
        return None
    ep = plan.degrees.get("ep", 1)
    held, whole = _expert_weights_held(plan)
    alltoall_s = None
    if cluster is not None and ep > 1:
        from shardwise.costs.prices import price_list
        from shardwise.costs.step import node_prices

        prices = price_list(cluster, plan.precision)
        spec = plan.pipeline
        if spec is None:
            priced = node_prices(plan, prices)
            alltoall_s = sum(priced[n].comm_s for n in layers if n in priced)
        else:  # each chunk's experts ops, every micro-batch, on the device stage that spends the most on them
            per_stage = [0.0] * spec.pp
            for st in spec.stages:
                chunk = node_prices(st.plan, prices)
                ops = moe_nodes(st.plan.graph)
                per_stage[st.device_stage] += spec.microbatches * sum(chunk[n].comm_s for n in ops if n in chunk)
            alltoall_s = max(per_stage)
    where_held = " of its pipeline stage" if plan.pipeline is not None else ""
    other = [a for a in alts if dict(a.degrees).get("ep", 1) != ep and a.fits]
    rival = min(other, key=lambda a: a.step_time_s) if other else None
    chosen = plan.predicted.step_time_s
    if ep > 1:
        why = (f"ep={ep}: each rank holds {experts // ep} of the {experts} experts of each of {len(layers)} MoE "
               f"layers{where_held} ({human_bytes(held)} of expert weights per rank instead of "
               f"{human_bytes(whole)}); tokens reach their experts by all-to-all")  # fmt: skip
        if alltoall_s is not None:
            where = " on the pipeline stage that spends the most on them" if plan.pipeline is not None else ""
            why += f", {human_time(alltoall_s)} per step (the experts ops' collectives{where})"
    else:
        why = (f"ep=1: every rank holds all {experts} experts of each of {len(layers)} MoE layers{where_held} "
               f"({human_bytes(held)} of expert weights per rank); no all-to-all")  # fmt: skip
    if rival is not None:
        r_ep = dict(rival.degrees).get("ep", 1)
        ratio = rival.step_time_s / chosen if chosen else float("inf")
        how = "estimated" if "estimated" in rival.note else "realized"
        why += (f". The fastest layout with ep={r_ep} ({', '.join(f'{k}={v}' for k, v in rival.degrees)}) "
                f"takes {ratio:.2f}x the step time with {human_bytes(rival.memory_bytes)} per rank ({how})")  # fmt: skip
    elif not other:
        why += ". No layout with another ep fits" if any(dict(a.degrees).get("ep", 1) != ep for a in alts) else (
            ". No layout with another ep was scored (ep was pinned, or no other divides both the expert count and "
            "dp)")
    return {"ep": ep, "experts": experts, "layers": len(layers), "expert_weight_bytes": whole,
            "expert_weight_bytes_per_rank": held,
            "alltoall_s": alltoall_s, "why": why}  # fmt: skip


def find_ops(plan: ExecutionPlan, name: str) -> list[str]:
    """Node names matching ``name``: a node name, a module path (and its submodules), or a substring."""
    nodes = plan.graph.nodes
    if any(n.name == name for n in nodes):
        return [name]
    by_module = [n.name for n in nodes if n.module_path == name or n.module_path.startswith(name + ".")]
    if by_module:
        return by_module
    found = [
        n.name for n in nodes if name in n.name or name in n.op or (n.module_path and name in n.module_path)
    ]
    if not found:
        near = [n.name for n in nodes][:8]
        raise UserInputError(
            f"no op or module matches {name!r}; give an op name (e.g. {', '.join(near)}) or a module path "
            "(shardwise show lists them)"
        )
    return found


def _placements(plan: ExecutionPlan) -> tuple[dict[str, Any], dict[str, Any]]:
    """The placement and the TensorSpec of every tensor value, as the plan leaves them."""
    from shardwise.ir.tensor import TensorSpec

    graph = plan.graph
    placement: dict[str, Any] = {}
    specs: dict[str, Any] = {}
    for i, pl in zip(graph.inputs, plan.input_placements, strict=False):
        if isinstance(i.spec, TensorSpec):
            placement[i.name], specs[i.name] = pl, i.spec
    param_pl = dict(plan.param_placements)
    for p in graph.params:
        placement[p.name], specs[p.name] = param_pl.get(p.key), p.spec
    by_node = {s.node: s for s in plan.strategies}
    for n in graph.nodes:
        s = by_node.get(n.name)
        if s is None or n.tuple_output:
            continue
        if s.outputs and isinstance(n.outputs[0], TensorSpec):
            placement[n.name], specs[n.name] = s.outputs[0], n.outputs[0]
    return placement, specs


def _candidates(
    plan: ExecutionPlan, node: Any, placement: dict[str, Any], specs: dict[str, Any], cost: Any, pricing: Any,
    own: Any = None,
) -> list[Candidate]:
    """The op's candidate splits, priced; ``own`` is the op's price in the plan (the chosen candidate shows it:
    its share of a fused kernel, its recomputation)."""
    from shardwise.costs.step import recomputed_ops
    from shardwise.ir.placement import Shard
    from shardwise.ir.registry import op_dims, tensor_operands
    from shardwise.ir.tensor import TensorSpec
    from shardwise.passes.sharding.strategy import make_strategy, split_is_valid

    mesh = plan.mesh
    train = plan.mode == "train"
    recomputed = recomputed_ops(plan)
    operands = [n for n in tensor_operands(node) if n in specs]
    ins = [specs[n] for n in operands]
    outs = [o for o in node.outputs if isinstance(o, TensorSpec)]
    if not outs:
        return []
    dims = op_dims(node, ins)
    current = [placement.get(n) for n in operands]
    chosen = plan.strategy(node.name)
    chosen_split = {a: lab for a, lab in chosen.split if mesh.axis_size(a) > 1}
    options: list[list[str | None]] = []
    for size, axis in zip(mesh.shape, mesh.axis_names, strict=True):
        opts: list[str | None] = [None]
        if size > 1:
            opts += [
                lab for lab in dims.splittable_labels() if split_is_valid(node, dims, lab, size, ins, outs, axis)
            ]
        options.append(opts)
    out: list[Candidate] = []

    def candidate(s: Any) -> Candidate:
        out_bytes = sum(
            o.nbytes
            // math.prod(mesh.shape[a] for a, p in enumerate(spec.placements) if isinstance(p, Shard))
            for o, spec in zip(outs, s.outputs, strict=False)
        )
        colls = [
            f"{r.collective}@{r.axis} {r.value}"
            for r in s.redistributes
            if r.collective not in FREE_COLLECTIVES
        ]
        mine = {a: lab for a, lab in s.split if mesh.axis_size(a) > 1}
        if own is not None and mine == chosen_split:
            time = own.step_s
        else:
            time = pricing.price(node, s, recomputed=node.name in recomputed).step_s if pricing is not None else 0.0
        return Candidate(
            split=describe_split(s.split),
            inputs=[describe_spec(x, mesh) for x in s.inputs],
            outputs=[describe_spec(x, mesh) for x in s.outputs],
            collectives=colls,
            compute_s=s.compute_s,
            comm_s=s.comm_s,
            time_s=time,
            output_bytes=int(out_bytes),
            chosen=mine == chosen_split,
            partial_output=any("P" in str(x) for x in s.outputs),
        )  # fmt: skip

    for combo in itertools.product(*options):
        labels = [c for c in combo if c is not None]
        if len(labels) != len(set(labels)):
            continue
        split = dict(zip(mesh.axis_names, combo, strict=True))
        made = make_strategy(node, dims, operands, current, ins, outs, split, mesh, cost, train)
        # an attention over the cp split also runs by Ulysses and ring attention (costs.attention)
        out.extend(candidate(s) for s in [made, *_context_ways(node, made, operands, current, ins, mesh, cost)])
    return sorted(out, key=lambda c: (c.time_s, c.output_bytes, not c.chosen))


def _context_ways(node: Any, s: Any, operands: list, current: list, ins: list, mesh: Any, cost: Any) -> list:
    """An attention whose queries the cp axis splits on their sequence also runs by Ulysses (heads allowing)
    and by ring attention: those strategies (``passes.sharding.strategy.context_attention_strategy``)."""
    from shardwise.costs.attention import ulysses_problem, way_label
    from shardwise.ir.placement import Shard
    from shardwise.ir.registry import rule_for
    from shardwise.passes.sharding.strategy import context_attention_strategy

    rule = rule_for(node.op)
    axis = "cp"
    if rule is None or rule.kind != "attention" or mesh.axis_size(axis) < 2 or len(ins) < 3 or ins[0].rank < 3:
        return []
    label = dict(s.split).get(axis)
    a = mesh.axis_names.index(axis)
    p = s.inputs[0].placements[a]
    if label is None or not (isinstance(p, Shard) and p.dim == ins[0].rank - 2):
        return []
    heads, kv = ins[0].shape[-3], ins[1].shape[-3]
    for size, q in zip(mesh.shape, s.inputs[0].placements, strict=True):
        if isinstance(q, Shard) and q.dim == ins[0].rank - 3:
            heads, kv = heads // size, max(kv // size, 1)
    ways = ["ring"] + ([] if ulysses_problem(heads, kv, mesh.axis_size(axis)) else ["ulysses"])
    return [context_attention_strategy(s, operands, current, ins, mesh, axis, way_label(label, w), cost) for w in ways]


def explain_ops(plan: ExecutionPlan, name: str, cluster: Any | None) -> tuple[list[OpExplanation], str]:
    """Explanations for the ops matching ``name`` (at most MAX_OPS), and a note on what was left out."""
    from shardwise.cli.summary import chunk_plans
    from shardwise.costs.prices import mesh_prices, price_list
    from shardwise.costs.step import node_prices, plan_pricing

    chunks = chunk_plans(plan)
    if chunks:  # a pipelined plan: the op lives in one chunk's intra-op plan
        found: list[OpExplanation] = []
        for c, sub in chunks:
            try:
                explained, _ = explain_ops(sub, name, cluster)
            except UserInputError:
                continue
            for e in explained:
                e.note = (e.note + "; " if e.note else "") + f"in pipeline chunk {c}"
            found += explained
        if not found:
            raise UserInputError(
                f"no op or module matches {name!r} in any pipeline chunk (shardwise show lists them)"
            )
        return found[:MAX_OPS], (
            f"{len(found)} ops match: showing the first {MAX_OPS}" if len(found) > MAX_OPS else ""
        )
    names = find_ops(plan, name)
    note = f"{len(names)} ops match {name!r}: showing the first {MAX_OPS}" if len(names) > MAX_OPS else ""
    placement, specs = _placements(plan)
    cost = mesh_prices(cluster, plan.mesh, plan.precision) if cluster is not None else None
    pricing = plan_pricing(plan, price_list(cluster, plan.precision)) if cluster is not None else None
    own = node_prices(plan, price_list(cluster, plan.precision)) if cluster is not None else {}
    mesh = plan.mesh
    run_whole = set(getattr(plan, "replicated_ops", ()) or ())
    out = []
    for n in names[:MAX_OPS]:
        node = plan.graph.node(n)
        s = plan.strategy(n)
        try:
            cands = _candidates(plan, node, placement, specs, cost, pricing, own.get(n))
            cand_note = (
                "" if cost is not None else "the plan's cluster could not be read: candidate times are 0"
            )
        except Exception as exc:  # an op the strategy builder cannot re-evaluate: say so, keep the rest
            cands, cand_note = [], f"candidates could not be recomputed ({type(exc).__name__}: {exc})"
        out.append(
            OpExplanation(
                node=n,
                op=node.op,
                module=node.module_path,
                module_type=node.module_type,
                source=node.source,
                inputs=[str(specs[x]) for x in _operands(node, specs)],
                outputs=[str(o) for o in node.outputs],
                chosen_split=describe_split(s.split),
                chosen_inputs=[describe_spec(x, mesh) for x in s.inputs],
                chosen_outputs=[describe_spec(x, mesh) for x in s.outputs],
                redistributions=[
                    {
                        "value": r.value,
                        "from": describe_spec(r.src, mesh),
                        "to": describe_spec(r.dst, mesh),
                        "collective": r.collective,
                        "axis": r.axis,
                        "bytes": r.nbytes,
                        "time_s": r.time_s,
                        "algorithm": getattr(r, "algorithm", ""),
                    }  # fmt: skip
                    for r in s.redistributes
                ],
                compute_s=s.compute_s,
                comm_s=s.comm_s,
                reason=getattr(s, "reason", "") or "",
                run_whole=n in run_whole,
                candidates=cands,
                note=cand_note,
            )  # fmt: skip
        )
    return out, note


def _operands(node: Any, specs: dict[str, Any]) -> list[str]:
    from shardwise.ir.registry import tensor_operands

    return [n for n in tensor_operands(node) if n in specs]


def _why(e: OpExplanation) -> str:
    if e.reason:
        return e.reason
    if e.run_whole:
        return "no sharding rule covers this op, so it runs whole on every rank"
    chosen = next((c for c in e.candidates if c.chosen), None)
    if chosen is None or not e.candidates:
        return "it keeps the placement its operands already have"
    best = e.candidates[0]
    if best.chosen or best.time_s >= chosen.time_s:
        return "it is the cheapest candidate for this op given its operands' placements"
    return (
        "it keeps the placement its operands already have (the planner follows producers); a cheaper local choice "
        "would change what later ops receive"
    )


def render_explain(
    console: Console, plan: ExecutionPlan, data: dict[str, Any], ops: list[OpExplanation] | None, note: str
) -> None:
    if ops is None:
        degrees = ", ".join(f"{k}={v}" for k, v in data["chosen"]["degrees"].items())
        console.print(
            f"[bold]Why this plan:[/bold] {degrees}, predicted {human_time(data['chosen']['step_time_s'])} per step"
        )
        t = Table(title="Candidates the planner scored (fastest that fits wins)", title_justify="left",
                  header_style="cyan", show_edge=False)  # fmt: skip
        for c in ("#", "degrees", "step time", "vs chosen", "memory/rank", "fits", "why"):
            t.add_column(
                c, justify="right" if c in ("#", "step time", "vs chosen", "memory/rank") else "left"
            )
        for a in data["alternatives"]:
            note_text = escape(a["note"])
            if a["chosen"]:
                note_text = "[bold green]chosen[/bold green]" + (
                    note_text.removeprefix("chosen") if note_text.startswith("chosen") else ": " + note_text
                )
            t.add_row(
                str(a["rank"]), ", ".join(f"{k}={v}" for k, v in a["degrees"].items()), human_time(a["step_time_s"]),
                f"{a['vs_chosen']:.2f}x" if a["vs_chosen"] else "-", human_bytes(a["memory_bytes"]),
                "yes" if a["fits"] else "[red]no[/red]", note_text,
            )  # fmt: skip
        if not data["alternatives"]:
            t.add_row("-", "(the planner recorded no alternatives)", "", "", "", "", "")
        console.print(t)
        if data.get("experts"):
            console.print(f"[bold]Why this expert parallelism:[/bold] {escape(data['experts']['why'])}")
        for n in data["notes"]:
            console.print(f"[yellow]note:[/yellow] {escape(n)}")
        console.print()
        t = Table(title="Where the time goes: the costliest modules, forward pass (explain --op MODULE for its "
                  "candidates)", title_justify="left", header_style="cyan", show_edge=False)  # fmt: skip
        for c in ("module", "ops", "fwd compute", "fwd comm", "first op"):
            t.add_column(c, justify="right" if c in ("ops", "fwd compute", "fwd comm") else "left")
        for g in data["costliest_modules"]:
            t.add_row(
                g["module"], str(g["ops"]), human_time(g["compute_s"]), human_time(g["comm_s"]), g["nodes"][0]
            )
        console.print(t)
        return
    if note:
        console.print(f"[yellow]{escape(note)}[/yellow]")
    for e in ops:
        console.print(f"\n[bold]{e.node}[/bold] = {e.op}  [dim]{e.module} ({e.module_type}) {e.source}[/dim]")
        console.print(f"  inputs: {', '.join(e.inputs) or '-'} -> outputs: {', '.join(e.outputs)}")
        console.print(
            f"  chosen: split {e.chosen_split}; reads {', '.join(e.chosen_inputs) or '-'}; "
            f"writes {', '.join(e.chosen_outputs) or '-'}; compute {human_time(e.compute_s)}, comm {human_time(e.comm_s)}"
        )
        for r in e.redistributions:
            console.print(
                f"  before it: {r['value']} {r['from']} -> {r['to']} by {r['collective']} on {r['axis']} "
                f"({human_bytes(r['bytes'])}, {human_time(r['time_s'])}, {r['algorithm']})"
            )
        console.print(f"  why: {escape(_why(e))}")
        if e.note:
            console.print(f"  [yellow]{escape(e.note)}[/yellow]")
        if e.candidates:
            t = Table(header_style="cyan", show_edge=False, box=None, padding=(0, 1))
            for c in ("", "split", "reads", "writes", "collectives before it", "time/step", "output/rank"):
                t.add_column(c, justify="right" if c in ("time/step", "output/rank") else "left")
            for c in e.candidates:
                t.add_row(
                    "[green]>[/green]" if c.chosen else "", c.split, " ".join(c.inputs), " ".join(c.outputs)
                    + (" [dim](partial sums)[/dim]" if c.partial_output else ""), ", ".join(c.collectives) or "-",
                    human_time(c.time_s), human_bytes(c.output_bytes),
                )  # fmt: skip
            console.print(t)
