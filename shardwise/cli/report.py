"""``shardwise report``: one self-contained HTML file (inline CSS, JS and SVG; no network) about a plan.

Sections: key numbers, the per-rank timeline of one step (compute, communication and bubbles per
micro-batch), memory per rank against capacity, communication by collective, sharding per layer, and the
ranked alternatives. Tables are rendered here; the charts are drawn by the page's script from embedded JSON,
which then marks the page (``<html data-rendered="timeline memory comm">``) so a browser test can tell that
they were drawn (see assets/report.js).
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup

from shardwise.cli.explain import explain_plan
from shardwise.cli.summary import (
    collective_rows,
    collective_totals,
    layer_key,
    memory_rows,
    module_groups,
    overview,
    prediction,
)
from shardwise.cli.timeline import Timeline, build_timeline
from shardwise.ir.plan import ExecutionPlan
from shardwise.ir.text import human_bytes, human_time

__all__ = ["render_report", "write_report", "report_data", "MAX_COLLECTIVE_ROWS"]

MAX_COLLECTIVE_ROWS = 200


def _asset(name: str) -> str:
    return resources.files("shardwise.cli").joinpath("assets", name).read_text(encoding="utf-8")


def _timeline_data(tl: Timeline) -> dict[str, Any]:
    kinds = ["compute", "comm", "bubble"]
    phases = ["forward", "backward", "recompute", "gradients", "optimizer", "offload", "idle"]
    labels: dict[str, int] = {}
    segs = []
    for s in tl.segments:
        idx = labels.setdefault(s.label, len(labels))
        segs.append(
            [s.rank, s.start_s, s.duration_s, kinds.index(s.kind), idx, s.microbatch, phases.index(s.phase)]
        )
    return {
        "ranks": tl.ranks, "makespan_s": tl.makespan_s, "micro_batches": tl.micro_batches, "stages": tl.stages,
        "schedule": tl.schedule, "kinds": kinds, "phases": phases, "labels": list(labels), "segments": segs,
    }  # fmt: skip


def report_data(plan: ExecutionPlan, cluster: Any) -> dict[str, Any]:
    """The JSON the page's script draws from: timeline, memory rows and communication totals."""
    tl = build_timeline(plan, cluster)
    return {
        "timeline": _timeline_data(tl),
        "memory": memory_rows(plan),
        "comm": [
            {
                "collective": c.collective,
                "axis": c.axis,
                "algorithm": c.algorithm,
                "count": c.count,
                "nbytes": c.nbytes,
                "time_s": c.time_s,
            }  # fmt: skip
            for c in collective_totals(plan)
        ],
    }


def _script_json(data: Any) -> Markup:
    """JSON safe inside <script>: no ``</`` or ``<!--`` can end the element early."""
    text = json.dumps(data, separators=(",", ":"), allow_nan=False)
    return Markup(text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026"))


def render_report(plan: ExecutionPlan, cluster: Any) -> str:
    """The report's HTML; ``cluster`` is the plan's ClusterSpec (its times come from the price list)."""
    from shardwise import __version__

    tl = build_timeline(plan, cluster)
    data = report_data(plan, cluster)
    ov = overview(plan)
    pred = prediction(plan)
    cards = [
        ("step time", human_time(pred["step_time_s"])),
        ("compute", human_time(pred["compute_s"])),
        ("communication", human_time(pred["comm_s"])),
        ("bubbles", human_time(pred["bubble_s"])),
        ("peak memory / rank", human_bytes(pred["peak_memory_bytes"])),
    ]
    if pred["tflops_per_device"]:
        cards.append(("TFLOP/s / device", f"{pred['tflops_per_device']:.3f}"))
    totals = tl.totals()
    rank_totals: list[dict[str, Any]] = []
    for r, t in totals.items():  # ranks with the same figures share a row ("0-15")
        row = {
            "compute": human_time(t["compute"]),
            "comm": human_time(t["comm"]),
            "bubble": human_time(t["bubble"]),
        }
        if rank_totals and {k: rank_totals[-1][k] for k in row} == row and rank_totals[-1]["last"] == r - 1:
            rank_totals[-1]["last"] = r
        else:
            rank_totals.append({**row, "first": r, "last": r})
    for row in rank_totals:
        row["rank"] = str(row["first"]) if row["first"] == row["last"] else f"{row['first']}-{row['last']}"
    rows = collective_rows(plan)
    collectives = [
        {
            "module": c.module,
            "value": c.value,
            "collective": c.collective,
            "axis": c.axis,
            "algorithm": c.algorithm,
            "bytes": human_bytes(c.nbytes),
            "time": human_time(c.time_s),
        }  # fmt: skip
        for c in rows[:MAX_COLLECTIVE_ROWS]
    ]
    layers: list[dict[str, Any]] = []
    for g in module_groups(plan, cluster):
        key = layer_key(g.module) if not g.module.startswith("(") else g.module
        if not layers or layers[-1]["name"] != key:
            layers.append({"name": key, "ops": 0, "compute_s": 0.0, "comm_s": 0.0, "modules": []})
        layer = layers[-1]
        layer["ops"] += g.ops
        layer["compute_s"] += g.compute_s
        layer["comm_s"] += g.comm_s
        layer["modules"].append(
            {
                "module": g.module,
                "type": g.module_type,
                "ops": g.ops,
                "splits": " ".join(g.splits),
                "outputs": g.outputs,
                "collectives": ", ".join(g.collectives) or "-",
                "compute": human_time(g.compute_s),
                "comm": human_time(g.comm_s),
                "source": g.source,
            }  # fmt: skip
        )
    for layer in layers:
        layer["compute"], layer["comm"] = human_time(layer["compute_s"]), human_time(layer["comm_s"])
    alternatives = [
        {
            "rank": a["rank"],
            "degrees": ", ".join(f"{k}={v}" for k, v in a["degrees"].items()),
            "time": human_time(a["step_time_s"]),
            "ratio": f"{a['vs_chosen']:.2f}x" if a["vs_chosen"] else "-",
            "memory": human_bytes(a["memory_bytes"]),
            "fits": a["fits"],
            "chosen": a["chosen"],
            "note": a["note"],
        }  # fmt: skip
        for a in explain_plan(plan, cluster)["alternatives"]
    ]
    source = ov["command"]
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    template = env.from_string(_asset("report.html.j2"))
    return template.render(
        ov=ov, mesh=str(plan.mesh), degrees=", ".join(f"{k}={v}" for k, v in ov["degrees"].items()), cards=cards,
        timeline=tl, makespan=human_time(tl.makespan_s), rank_totals=rank_totals, collectives=collectives,
        collectives_more=max(0, len(rows) - MAX_COLLECTIVE_ROWS), layers=layers, alternatives=alternatives,
        source=source, version=__version__, css=Markup(_asset("report.css")), js=Markup(_asset("report.js")),
        data=_script_json(data),
    )  # fmt: skip


def write_report(plan: ExecutionPlan, path: str | os.PathLike[str], cluster: Any) -> Path:
    """Render and write the report (through a temporary file, so a failed render leaves no half file)."""
    target = Path(path)
    text = render_report(plan, cluster)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(target)
    return target
