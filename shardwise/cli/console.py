"""Where the CLI writes: results on stdout (tables, or JSON with ``--json``), progress and errors on stderr.

The progress display is a rich spinner with the elapsed time of the current step; each finished step leaves
one line (``✓ tracing ... 1.4 s``). With ``--json`` or ``--quiet`` nothing but the result reaches stdout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

__all__ = ["out", "err", "Steps", "print_json", "to_jsonable"]

# Piped output keeps wide tables unwrapped (rich would use 80 columns); COLUMNS still wins when set.
_PIPE_WIDTH = None if sys.stdout.isatty() or "COLUMNS" in os.environ else 140
out = Console(highlight=False, soft_wrap=True, width=_PIPE_WIDTH)
err = Console(stderr=True, highlight=False, soft_wrap=True)


class Steps:
    """A sequence of named steps shown with a spinner while they run (silent when ``quiet``)."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.timings: list[tuple[str, float]] = []

    @contextlib.contextmanager
    def step(self, description: str) -> Iterator[None]:
        start = time.perf_counter()
        if self.quiet or not err.is_terminal:
            yield
            elapsed = time.perf_counter() - start
            self.timings.append((description, elapsed))
            if not self.quiet:
                err.print(f"[green]✓[/green] {escape(description)} [dim]{elapsed:.1f} s[/dim]")
            return
        progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            console=err,
            transient=True,
        )
        with progress:
            progress.add_task(escape(description), total=None)
            yield
        elapsed = time.perf_counter() - start
        self.timings.append((description, elapsed))
        err.print(f"[green]✓[/green] {escape(description)} [dim]{elapsed:.1f} s[/dim]")

    def info(self, text: str) -> None:
        """A line on stderr (rich markup allowed), unless quiet."""
        if not self.quiet:
            err.print(text)


def to_jsonable(value: Any) -> Any:
    """Dataclasses, tuples, dicts and numbers → JSON data (non-finite floats become null)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [to_jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, bool | int | str):
        return value
    return str(value)


def print_json(value: Any) -> None:
    """One JSON document on stdout (plain print: no rich markup or wrapping)."""
    print(json.dumps(to_jsonable(value), indent=1))
