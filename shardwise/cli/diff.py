"""``shardwise diff a.json b.json``: what changed between two plans, by module.

Header fields (cluster, mesh, degrees, predicted time and memory) are compared first; then every module
path present in either plan, by its splits, output placements and collectives (see
``ModuleGroup.signature``). Plans of different models are compared by module path all the same, with a note.
"""

from __future__ import annotations

import re
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from shardwise.cli.summary import collective_totals, module_groups, natural_sorted, overview, prediction
from shardwise.ir.plan import ExecutionPlan
from shardwise.ir.text import human_bytes, human_time

__all__ = ["diff_plans", "render_diff", "collapse_repeats"]

_FIELDS = ("model", "cluster", "mode", "precision", "world_size", "mesh", "degrees", "optimizer")


def _ratio(a: float, b: float) -> float | None:
    return b / a if a else None


def diff_plans(a: ExecutionPlan, b: ExecutionPlan, *, by_layer: bool = False) -> dict[str, Any]:
    """The differences as data: ``fields`` (name → [a, b]), ``predicted`` (a, b, ratio), ``modules``
    (changed, only_a, only_b) and ``collectives`` (per collective/axis: a and b totals)."""
    oa, ob = overview(a), overview(b)
    fields = {k: [oa[k], ob[k]] for k in _FIELDS if oa[k] != ob[k]}
    pa, pb = prediction(a), prediction(b)
    predicted = {
        k: {"a": pa[k], "b": pb[k], "ratio": _ratio(pa[k], pb[k])}
        for k in ("step_time_s", "compute_s", "comm_s", "bubble_s", "peak_memory_bytes")
    }
    ga = {g.module: g for g in module_groups(a, by_layer=by_layer)}
    gb = {g.module: g for g in module_groups(b, by_layer=by_layer)}
    changed = []
    for m in natural_sorted(set(ga) & set(gb)):
        x, y = ga[m], gb[m]
        if x.signature != y.signature:
            changed.append(
                {
                    "module": m,
                    "splits": [x.splits, y.splits] if x.splits != y.splits else None,
                    "outputs": [x.outputs, y.outputs] if x.outputs != y.outputs else None,
                    "collectives": [x.collectives, y.collectives] if x.collectives != y.collectives else None,
                    "time_s": [x.compute_s + x.comm_s, y.compute_s + y.comm_s],
                }
            )
    ta = {(t.collective, t.axis): t for t in collective_totals(a)}
    tb = {(t.collective, t.axis): t for t in collective_totals(b)}
    colls = []
    for key in sorted(set(ta) | set(tb)):
        x, y = ta.get(key), tb.get(key)
        row = {
            "collective": key[0], "axis": key[1],
            "a": {"count": x.count, "bytes": x.nbytes, "time_s": x.time_s} if x else None,
            "b": {"count": y.count, "bytes": y.nbytes, "time_s": y.time_s} if y else None,
        }  # fmt: skip
        if row["a"] != row["b"]:
            colls.append(row)
    notes = []
    if a.model_fingerprint != b.model_fingerprint:
        notes.append("the plans are for different models (fingerprints differ): modules are matched by path")
    if a.cluster_fingerprint != b.cluster_fingerprint and a.cluster_name == b.cluster_name:
        notes.append("same cluster name, different cluster description (fingerprints differ)")
    return {
        "same": not (fields or changed or colls or set(ga) ^ set(gb)) and pa == pb,
        "fields": fields,
        "predicted": predicted,
        "modules": {
            "changed": changed,
            "only_a": natural_sorted(set(ga) - set(gb)),
            "only_b": natural_sorted(set(gb) - set(ga)),
            "unchanged": len(set(ga) & set(gb)) - len(changed),
        },
        "collectives": colls,
        "notes": notes,
    }


def _layer_pattern(module: str) -> tuple[str, str]:
    """``transformer.h.3.attn`` → (``transformer.h.*.attn``, ``3``): the path with its first number hidden."""
    m = re.search(r"\.(\d+)(?=\.|$)", module)
    if m is None:
        return module, ""
    return module[: m.start(1)] + "*" + module[m.end(1) :], m.group(1)


def _number_set(numbers: list[str]) -> str:
    values = sorted(int(n) for n in numbers)
    if values == list(range(values[0], values[-1] + 1)) and len(values) > 2:
        return f"{values[0]}-{values[-1]}"
    return ",".join(map(str, values))


def collapse_repeats(changed: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Changed modules that differ only in their layer number, with the same change, become one row
    (``transformer.h.[0-11].mlp.c_fc``); times are summed."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    order: list[tuple[Any, ...]] = []
    for m in changed:
        pattern, _ = _layer_pattern(m["module"])
        key = (pattern, repr(m["splits"]), repr(m["outputs"]), repr(m["collectives"]))
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append(m)
    out = []
    for key in order:
        members = groups[key]
        if len(members) == 1:
            out.append(members[0])
            continue
        numbers = [_layer_pattern(m["module"])[1] for m in members]
        name = key[0].replace("*", f"[{_number_set(numbers)}]", 1)
        times = [sum(m["time_s"][i] for m in members) for i in (0, 1)]
        out.append({**members[0], "module": name, "time_s": times})
    return out


def _value(v: Any) -> str:
    if isinstance(v, dict) and set(v) == {"axes", "shape"}:
        return " x ".join(f"{a}={n}" for a, n in zip(v["axes"], v["shape"], strict=False))
    if isinstance(v, dict):
        return ", ".join(f"{k}={x}" for k, x in v.items())
    return str(v)


def _fmt(key: str, v: float) -> str:
    return human_bytes(v) if key.endswith("bytes") else human_time(v)


def render_diff(console: Console, d: dict[str, Any], names: tuple[str, str]) -> None:
    a, b = names
    console.print(f"[bold]--- {escape(a)}[/bold]\n[bold]+++ {escape(b)}[/bold]")
    for n in d["notes"]:
        console.print(f"[yellow]note:[/yellow] {escape(n)}")
    if d["same"]:
        console.print("the plans make the same decisions and predictions")
        return
    for k, (x, y) in d["fields"].items():
        console.print(f"{k}: [red]{escape(_value(x))}[/red] -> [green]{escape(_value(y))}[/green]")
    t = Table(title="Predicted", title_justify="left", header_style="cyan", show_edge=False)
    for c in ("", "a", "b", "b/a"):
        t.add_column(c, justify="left" if not c else "right")
    for k, v in d["predicted"].items():
        t.add_row(k.removesuffix("_s").removesuffix("_bytes").replace("_", " "), _fmt(k, v["a"]), _fmt(k, v["b"]),
                  f"{v['ratio']:.2f}x" if v["ratio"] is not None else "-")  # fmt: skip
    console.print(t)
    mods = d["modules"]
    console.print(
        f"\nmodules: {len(mods['changed'])} changed, {mods['unchanged']} unchanged, "
        f"{len(mods['only_a'])} only in a, {len(mods['only_b'])} only in b"
    )
    if mods["changed"]:
        t = Table(header_style="cyan", show_edge=False)
        for c in ("module", "what", "a", "b", "time a -> b"):
            t.add_column(c, overflow="fold")
        for m in collapse_repeats(mods["changed"]):
            first = True
            for what in ("splits", "outputs", "collectives"):
                if m[what] is None:
                    continue
                x, y = m[what]
                t.add_row(
                    escape(m["module"]) if first else "", what, " ".join(x) or "-", " ".join(y) or "-",
                    f"{human_time(m['time_s'][0])} -> {human_time(m['time_s'][1])}" if first else "",
                )  # fmt: skip
                first = False
        console.print(t)
    for side, key in (("a", "only_a"), ("b", "only_b")):
        if mods[key]:
            shown = ", ".join(mods[key][:12]) + (f" ... ({len(mods[key])})" if len(mods[key]) > 12 else "")
            console.print(f"only in {side}: {shown}")
    if d["collectives"]:
        t = Table(title="Collectives", title_justify="left", header_style="cyan", show_edge=False)
        for c in ("collective", "axis", "a", "b"):
            t.add_column(c)

        def cell(v: dict[str, Any] | None) -> str:
            return (
                "-" if v is None else f"{v['count']} x, {human_bytes(v['bytes'])}, {human_time(v['time_s'])}"
            )

        for r in d["collectives"]:
            t.add_row(r["collective"], r["axis"], cell(r["a"]), cell(r["b"]))
        console.print(t)
