"""The unit of a generated program's body: the lines made for one step, with the comment before them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["Statement", "render_statements"]


@dataclass(frozen=True)
class Statement:
    """Lines made for one step of the program (an op, a fused group, a collective, a call) and the comment
    written before them.

    ``nodes`` are the graph nodes the step computes (their module paths place it in a layer). The comment is
    ``comment``, or, when ``paths`` or ``detail`` are given, ``"<paths><note> — <detail>"`` with the module
    paths written as the caller asks (relative inside a block). A statement may wrap others (a recomputed
    function, a ``with`` block): ``lines``, then ``body`` indented by four spaces, then ``after``."""

    comment: str
    lines: tuple[str, ...]
    nodes: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    detail: str = ""
    note: str = ""
    body: tuple[Statement, ...] = ()
    after: tuple[str, ...] = ()

    def describe(self, path: Callable[[str], str] = str) -> str:
        """The comment, module paths written by ``path``."""
        if not self.paths and not self.detail:
            return self.comment
        where = ", ".join(dict.fromkeys(p for p in (path(p) for p in self.paths) if p))
        head = f"{where}{self.note}".strip()
        return f"{head} — {self.detail}" if head and self.detail else head or self.detail

    def code(self) -> list[str]:
        """The statement's code, without comments (nested statements indented)."""
        out = list(self.lines)
        for s in self.body:
            out += [f"    {line}" for line in s.code()]
        return out + list(self.after)

    def render(self, path: Callable[[str], str] = str, previous: str = "") -> list[str]:
        """The statement's lines with comments; no comment when it would repeat ``previous``."""
        comment = self.describe(path)
        out = [f"# {comment}"] if comment and comment != previous else []
        out += list(self.lines)
        last = ""
        for s in self.body:
            out += [f"    {line}" for line in s.render(path, last)]
            last = s.describe(path) or last
        return out + list(self.after)

    def all_nodes(self) -> tuple[str, ...]:
        """The nodes of this statement and of the statements it wraps."""
        out = list(self.nodes)
        for s in self.body:
            out += s.all_nodes()
        return tuple(dict.fromkeys(out))


def render_statements(statements: Sequence[Statement]) -> list[str]:
    """The lines of ``statements`` in order, each block's comment written only where it changes."""
    out: list[str] = []
    previous = ""
    for s in statements:
        out += s.render(previous=previous)
        previous = s.describe() or previous
    return out
