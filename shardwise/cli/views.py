"""``shardwise show``: the plan as tables (mesh, stages, strategies by module, collectives, memory, time)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from shardwise.cli.summary import (
    collective_rows,
    collective_totals,
    describe_spec,
    memory_rows,
    module_groups,
    overview,
    prediction,
    stages,
)
from shardwise.ir.plan import ExecutionPlan
from shardwise.ir.text import human_bytes, human_time

__all__ = ["show_data", "render_show", "percent"]


def percent(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def show_data(plan: ExecutionPlan, *, by_layer: bool = False) -> dict[str, Any]:
    """Everything ``show`` prints, as JSON data."""
    mesh = plan.mesh
    return {
        "overview": overview(plan),
        "predicted": prediction(plan),
        "mesh": [
            {"axis": a, "size": s, "groups": [list(g) for g in mesh.groups(a)]}
            for a, s in zip(mesh.axis_names, mesh.shape, strict=True)
        ],
        "stages": stages(plan),
        "modules": [
            {
                "module": g.module,
                "type": g.module_type,
                "ops": g.ops,
                "splits": g.splits,
                "outputs": g.outputs,
                "collectives": g.collectives,
                "compute_s": g.compute_s,
                "comm_s": g.comm_s,
                "source": g.source,
            }  # fmt: skip
            for g in module_groups(plan, by_layer=by_layer)
        ],
        "collectives": collective_rows(plan),
        "collective_totals": collective_totals(plan),
        "memory": memory_rows(plan),
        "inputs": [
            {"name": i.name, "spec": str(i.spec), "placement": describe_spec(p, mesh)}
            for i, p in zip(plan.graph.inputs, plan.input_placements, strict=False)
        ],
    }


def _table(title: str, *columns: str, right: tuple[str, ...] = ()) -> Table:
    t = Table(title=title, title_justify="left", title_style="bold", header_style="cyan", show_edge=False)
    for c in columns:
        t.add_column(c, justify="right" if c in right else "left", overflow="fold")
    return t


def render_show(
    console: Console, plan: ExecutionPlan, *, by_layer: bool = False, every_collective: bool = False
) -> None:
    data = show_data(plan, by_layer=by_layer)
    ov, pred = data["overview"], data["predicted"]
    degrees = ", ".join(f"{k}={v}" for k, v in ov["degrees"].items())
    console.print(
        f"[bold]{ov['model']}[/bold] on [bold]{ov['cluster']}[/bold] ({ov['mode']}, {ov['precision']})"
    )
    console.print(
        f"  {ov['world_size']} ranks, mesh {plan.mesh}, degrees {degrees}; {ov['ops']} ops, "
        f"{ov['parameters']:,} parameters"
    )
    if ov["command"]:
        console.print(f"  made by: {escape(ov['command'])}")
    console.print(f"  passes: {', '.join(ov['passes']) or '-'}")
    for note in ov["notes"]:
        console.print(f"  [yellow]note:[/yellow] {escape(note)}")
    console.print()

    step = pred["step_time_s"]
    t = _table("Predicted step time", "part", "time", "share", right=("time", "share"))
    for name, key in (
        ("compute", "compute_s"),
        ("communication", "comm_s"),
        ("pipeline bubbles", "bubble_s"),
    ):
        t.add_row(name, human_time(pred[key]), percent(pred[key], step))
    t.add_row("[bold]step[/bold]", f"[bold]{human_time(step)}[/bold]", "")
    if pred["tflops_per_device"]:
        t.add_row("TFLOP/s per device", f"{pred['tflops_per_device']:.3f}", f"MFU {100 * pred['mfu']:.1f}%")
    console.print(t)
    console.print()

    t = _table("Mesh", "axis", "size", "groups of ranks", right=("size",))
    for m in data["mesh"]:
        groups = m["groups"]
        shown = " ".join("{" + ",".join(map(str, g)) + "}" for g in groups[:8])
        t.add_row(
            m["axis"], str(m["size"]), shown + (f" ... ({len(groups)} groups)" if len(groups) > 8 else "")
        )
    console.print(t)
    console.print()

    piped = any("backward_s" in s for s in data["stages"])
    if piped:
        t = _table("Pipeline stages (times per micro-batch)", "chunk", "device stage", "ranks", "layers", "forward",
                   "backward", "memory", right=("forward", "backward", "memory"))  # fmt: skip
    else:
        t = _table("Stages", "stage", "ranks", "layers", "compute (fwd)", right=("compute (fwd)",))
    for s in data["stages"]:
        layers = s["layers"]
        text = ", ".join(layers[:4]) + (
            f" ... {layers[-1]} ({len(layers)} layers)" if len(layers) > 4 else ""
        )
        text += f" [dim]({escape(s['note'])})[/dim]" if s.get("note") else ""
        if piped:
            t.add_row(str(s["stage"]), str(s["device_stage"]), _ranks(s["ranks"]), text, human_time(s["compute_s"]),
                      human_time(s["backward_s"]), human_bytes(s["memory_bytes"]))  # fmt: skip
        else:
            t.add_row(str(s["stage"]), _ranks(s["ranks"]), text, human_time(s["compute_s"]))
    console.print(t)
    pipe = getattr(plan, "pipeline", None)
    if pipe is not None:
        console.print(f"  schedule: {escape(str(pipe))}")
    console.print()

    inputs = _table("Inputs", "input", "shape", "placement")
    for i in data["inputs"]:
        inputs.add_row(i["name"], i["spec"], i["placement"])
    console.print(inputs)
    console.print()

    title = "Strategies by layer" if by_layer else "Strategies by module"
    t = _table(title, "module", "ops", "split", "outputs", "collectives", "compute", "comm",
               right=("ops", "compute", "comm"))  # fmt: skip
    for g in data["modules"]:
        name = g["module"] + (f" [dim]{g['type']}[/dim]" if g["type"] else "")
        t.add_row(name, str(g["ops"]), " ".join(g["splits"]), " ".join(g["outputs"]), _count(g["collectives"]) or "-",
                  human_time(g["compute_s"]), human_time(g["comm_s"]))  # fmt: skip
    console.print(t)
    console.print()

    t = _table("Collectives", "collective", "axis", "algorithm", "count", "bytes", "time/step",
               right=("count", "bytes", "time/step"))  # fmt: skip
    for c in data["collective_totals"]:
        t.add_row(
            c.collective, c.axis, c.algorithm, str(c.count), human_bytes(c.nbytes), human_time(c.time_s)
        )
    if not data["collective_totals"]:
        t.add_row("(none: no rank waits for another)", "", "", "", "", "")
    console.print(t)
    if every_collective and data["collectives"]:
        console.print()
        t = _table("Every collective", "module", "value", "collective", "axis", "algorithm", "bytes", "time",
                   right=("bytes", "time"))  # fmt: skip
        for r in data["collectives"]:
            t.add_row(
                r.module,
                r.value,
                r.collective,
                r.axis,
                r.algorithm,
                human_bytes(r.nbytes),
                human_time(r.time_s),
            )
        console.print(t)
    console.print()

    t = _table("Memory per rank (predicted peak: the arena of the memory map)", "rank", "params", "grads",
               "optimizer", "activations", "arena", "lower bound", "capacity", "used",
               right=("params", "grads", "optimizer", "activations", "arena", "lower bound", "capacity", "used"))  # fmt: skip
    rows = data["memory"]
    for m in _collapse(rows):
        bound = m.get("lower_bound", 0)
        t.add_row(m["ranks"], human_bytes(m["params"]), human_bytes(m["grads"]), human_bytes(m["optimizer"]),
                  human_bytes(m["activations"]), human_bytes(m["total"]),
                  f"{human_bytes(bound)} ({m['total'] / bound:.3f}x)" if bound else "-", human_bytes(m["capacity"]),
                  percent(m["total"], m["capacity"]))  # fmt: skip
    console.print(t)
    if ov["replicated_ops"]:
        ops = ov["replicated_ops"]
        console.print(f"\n[yellow]run whole on every rank (no rule splits them):[/yellow] {escape(', '.join(ops[:10]))}"
                      + (f" ... ({len(ops)} ops)" if len(ops) > 10 else ""))  # fmt: skip


def _ranks(ranks: list[int]) -> str:
    if not ranks:
        return "-"
    if ranks == list(range(ranks[0], ranks[-1] + 1)) and len(ranks) > 2:
        return f"{ranks[0]}-{ranks[-1]}"
    return ",".join(map(str, ranks))


def _count(items: list[str]) -> str:
    counts: dict[str, int] = {}
    for i in items:
        counts[i] = counts.get(i, 0) + 1
    return " ".join(f"{k}" + (f" x{v}" if v > 1 else "") for k, v in counts.items())


def _collapse(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Consecutive ranks with identical memory become one row (``0-7``)."""
    out: list[dict[str, Any]] = []
    for r in rows:
        key = {k: v for k, v in r.items() if k != "rank"}
        if out and out[-1]["_key"] == key:
            out[-1]["_ranks"].append(r["rank"])
        else:
            out.append({**r, "_key": key, "_ranks": [r["rank"]]})
    for o in out:
        o["ranks"] = _ranks(o.pop("_ranks"))
        o.pop("_key")
    return out
