"""``shardwise synth``: a table of synthesized collective schedules against the library's, per buffer size.

The work is ``shardwise.passes.collectives.synth_table(cluster, collective, sizes)``; this module parses the
arguments and prints whatever rows it returns (dataclasses, dicts or objects with ``to_dict()``), so the
table follows that function as it grows.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from shardwise.cli.console import Steps, to_jsonable
from shardwise.errors import ShardwiseError, UserInputError

__all__ = ["COLLECTIVES", "parse_sizes", "pick", "run_synth", "render_synth"]

COLLECTIVES = ("allgather", "reduce_scatter", "allreduce", "alltoall", "broadcast")


_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)
_POWER = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}


def parse_sizes(text: str) -> list[int]:
    """Comma-separated buffer sizes in bytes. ``KB``/``MB``/``GB`` (and ``KiB``...) are powers of 1024, as in
    TACCL and nccl-tests, so ``1GB`` is 2**30 bytes; a plain number is bytes."""
    sizes = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        match = _SIZE.match(part)
        if match is None:
            raise UserInputError(f"--sizes {part!r}: give sizes like 1KB,1MB,1GB (powers of 1024) or bytes")
        n = int(float(match.group(1)) * 1024 ** _POWER[match.group(2).upper()])
        if n <= 0:
            raise UserInputError(f"--sizes {part!r}: a buffer size must be positive")
        sizes.append(n)
    if not sizes:
        raise UserInputError("--sizes is empty: give sizes like 1KB,1MB,1GB")
    return sizes


def pick(what: str, positional: str | None, option: str | None) -> str:
    """The value given either as a positional argument or as ``--<what>`` (not both, not neither)."""
    if positional is not None and option is not None and positional != option:
        raise UserInputError(f"two {what}s given ({positional!r} and --{what} {option!r}): give one")
    value = option if option is not None else positional
    if value is None:
        raise UserInputError(
            f"no {what} given: use --{what} (e.g. shardwise synth --cluster ndv2x2 "
            "--collective allgather --sizes 1KB,1MB,1GB)"
        )
    return value


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
    from shardwise.passes.collectives.chunks import check_collective

    collective = check_collective(collective)  # UserInputError naming the accepted ones
    byte_sizes = parse_sizes(sizes)
    fn = _synth_table()
    spec = get_cluster(cluster)
    with steps.step(f"synthesizing {collective} schedules for {spec.name}"):
        table = fn(spec, collective, byte_sizes)
    if hasattr(table, "rows"):
        table = table.rows
    items = table if isinstance(table, list | tuple) else [table]
    return [to_jsonable(_row(i)) for i in items]


def _size(n: int) -> str:
    for unit, f in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n >= f and n % f == 0:
            return f"{n // f}{unit}"
    return f"{n}B"


def _us(v: Any) -> str:
    if not isinstance(v, int | float):
        return "-"
    return f"{v / 1000:.2f} ms" if v >= 10_000 else f"{v:.1f} us"


def render_synth(console: Console, rows: list[dict[str, Any]], cluster: str, collective: str) -> None:
    """Per size: the synthesized time and algorithm bandwidth, every baseline, the bound, synthesis time."""
    if not rows:
        console.print(f"no schedules for {collective} on {cluster}")
        return
    if not all("synthesized_us" in r and "size_bytes" in r for r in rows):
        return _render_generic(console, rows, cluster, collective)
    names: list[str] = []
    for r in rows:
        for k in r.get("baselines") or {}:
            if k not in names:
                names.append(k)
    t = Table(title=f"{collective} on {cluster}", title_justify="left", header_style="cyan", show_edge=False)
    for c in ("size", "synthesized", "GB/s", *names, "lower bound", "/bound", "synthesis", "algorithm"):
        t.add_column(c, justify="left" if c == "algorithm" else "right")
    for r in rows:
        base = r.get("baselines") or {}
        best = min(base.values(), default=None)
        cells = [_size(int(r["size_bytes"])), _us(r["synthesized_us"]), _cell(r.get("algbw_GBps"))]
        for k in names:
            v = base.get(k)
            cells.append(f"[bold]{_us(v)}[/bold]" if v is not None and v == best else escape(_us(v)))
        src = str(r.get("source", ""))
        cells += [
            _us(r.get("lower_bound_us")),
            _cell(r.get("bound_ratio")),
            f"{r.get('synthesis_s', 0.0):.1f} s",
            escape(src if src.startswith("baseline") else f"{r.get('algorithm', '')} ({src})"),
        ]
        t.add_row(*[c if c.startswith("[bold]") else escape(c) for c in cells])
    console.print(t)
    console.print("bold: the best baseline; times are simulated under the alpha-beta model with contention")


def _render_generic(console: Console, rows: list[dict[str, Any]], cluster: str, collective: str) -> None:
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
