"""``shardwise synth``: a table of synthesized collective schedules against the library's, per buffer size.

The work is ``shardwise.passes.collectives.synth_table(cluster, collective, sizes)``; this module parses the
arguments and prints whatever rows it returns (dataclasses, dicts or objects with ``to_dict()``), so the
table follows that function as it grows.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from shardwise.cli.console import Steps, to_jsonable
from shardwise.errors import ShardwiseError, UserInputError

__all__ = ["COLLECTIVES", "parse_sizes", "run_synth", "render_synth"]

COLLECTIVES = ("allreduce", "allgather", "reduce_scatter", "alltoall", "broadcast", "reduce")


def parse_sizes(text: str) -> list[int]:
    from shardwise.cluster.units import parse_bytes

    sizes = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            n = int(parse_bytes(part))
        except UserInputError as exc:
            raise UserInputError(f"--sizes {part!r}: {exc}") from None
        if n <= 0:
            raise UserInputError(f"--sizes {part!r}: a buffer size must be positive")
        sizes.append(n)
    if not sizes:
        raise UserInputError("--sizes is empty: give sizes like 1KiB,1MiB,64MiB")
    return sizes


def _synth_table() -> Any:
    try:
        from shardwise.passes import collectives
    except ImportError as exc:  # pragma: no cover - the package exists; its synthesizer may not yet
        raise ShardwiseError(f"shardwise synth is not available yet ({exc})") from None
    fn = getattr(collectives, "synth_table", None)
    if not callable(fn):
        raise ShardwiseError(
            "shardwise synth is not available yet: this version has no collective synthesizer "
            "(shardwise.passes.collectives.synth_table)"
        )
    return fn


def _row(item: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(item) and not isinstance(item, type):
        return {f.name: getattr(item, f.name) for f in dataclasses.fields(item)}
    if isinstance(item, dict):
        return dict(item)
    if hasattr(item, "to_dict"):
        return dict(item.to_dict())
    if hasattr(item, "_asdict"):
        return dict(item._asdict())
    return {"result": item}


def run_synth(cluster: str, collective: str, sizes: str, *, steps: Steps) -> list[dict[str, Any]]:
    """Rows of ``synth_table`` as dicts (JSON-ready values)."""
    from shardwise.cluster import get_cluster

    if collective not in COLLECTIVES:
        raise UserInputError(f"unknown collective {collective!r}: choose one of {', '.join(COLLECTIVES)}")
    byte_sizes = parse_sizes(sizes)
    fn = _synth_table()
    spec = get_cluster(cluster)
    with steps.step(f"synthesizing {collective} schedules for {spec.name}"):
        table = fn(spec, collective, byte_sizes)
    if hasattr(table, "rows"):
        table = table.rows
    items = table if isinstance(table, list | tuple) else [table]
    return [to_jsonable(_row(i)) for i in items]


def render_synth(console: Console, rows: list[dict[str, Any]], cluster: str, collective: str) -> None:
    if not rows:
        console.print(f"no schedules for {collective} on {cluster}")
        return
    columns: list[str] = []
    for r in rows:
        for k in r:
            if k not in columns:
                columns.append(k)
    t = Table(title=f"{collective} on {cluster}", title_justify="left", header_style="cyan", show_edge=False)
    for c in columns:
        t.add_column(c, justify="right" if all(isinstance(r.get(c), int | float) for r in rows) else "left")
    for r in rows:
        t.add_row(*(escape(_cell(r.get(c))) for c in columns))
    console.print(t)


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
