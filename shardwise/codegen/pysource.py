"""Small tools for the Python source codegen writes: renaming names, finding the names a piece of code
binds and reads, and breaking long lines the way a person would.

They work on the code codegen itself makes (assignments, ``del``, calls, ``with`` blocks and nested
``def``s, single-assignment: each name is bound once at the top level).
"""

from __future__ import annotations

import ast
import builtins
import io
import keyword
import re
import tokenize
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

__all__ = ["Uses", "uses", "rename", "wrap", "wrap_lines", "identifier", "WIDTH"]

WIDTH = 120  # no generated line is longer
_BUILTINS = frozenset(dir(builtins))


def identifier(text: str) -> str:
    """``text`` as a Python identifier: other characters become ``_``, never a keyword or leading digit."""
    name = re.sub(r"_+", "_", re.sub(r"[^0-9a-zA-Z_]", "_", text)).strip("_")
    if not name or name[0].isdigit():
        name = "v_" + name
    if keyword.iskeyword(name):
        name += "_"
    return name


@dataclass(frozen=True)
class Uses:
    """Names a piece of code binds at its own level (``sets``, in order), reads before or without binding
    them there (``reads``, in order, including names only read inside nested functions) and deletes."""

    sets: tuple[str, ...]
    reads: tuple[str, ...]
    frees: tuple[str, ...]


class _Walker(ast.NodeVisitor):
    def __init__(self) -> None:
        self.sets: dict[str, None] = {}
        self.reads: dict[str, None] = {}
        self.frees: dict[str, None] = {}

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, ast.Store):
            self.sets.setdefault(node.id, None)
        elif isinstance(node.ctx, ast.Del):
            self.frees.setdefault(node.id, None)
        elif node.id not in self.sets:
            self.reads.setdefault(node.id, None)

    def visit_Assign(self, node: ast.Assign) -> None:
        self.visit(node.value)  # the value is read before the targets are bound
        for target in node.targets:
            self.visit(target)

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        inner = _Walker()
        for arg in node.args.args + node.args.kwonlyargs:
            inner.sets.setdefault(arg.arg, None)
        for stmt in node.body:
            inner.visit(stmt)
        for name in inner.reads:  # what the nested function reads from outside it
            if name not in self.sets:
                self.reads.setdefault(name, None)
        self.sets.setdefault(node.name, None)


def uses(lines: Sequence[str] | str) -> Uses:
    """The :class:`Uses` of ``lines`` (a statement's lines, or one string)."""
    text = lines if isinstance(lines, str) else "\n".join(lines)
    walker = _Walker()
    walker.visit(ast.parse(text))
    return Uses(tuple(walker.sets), tuple(walker.reads), tuple(walker.frees))


def _tokens(code: str) -> list[tokenize.TokenInfo]:
    return list(tokenize.generate_tokens(io.StringIO(code).readline))


def rename(code: str, names: Mapping[str, str] = {}, attributes: Mapping[str, str] = {}) -> str:
    """``code`` with every variable in ``names`` renamed, and every ``self.<attr>`` with ``attr`` in
    ``attributes`` replaced by that expression. Attribute names after a dot, keyword-argument names,
    strings and comments are left alone."""
    if not names and not attributes:
        return code
    tokens = _tokens(code)
    edits: list[tuple[tuple[int, int], tuple[int, int], str]] = []
    depth = 0
    significant = [t for t in tokens if t.type not in (tokenize.NL, tokenize.COMMENT, tokenize.INDENT)]
    for i, tok in enumerate(significant):
        if tok.type == tokenize.OP and tok.string in "([{":
            depth += 1
        elif tok.type == tokenize.OP and tok.string in ")]}":
            depth -= 1
        if tok.type != tokenize.NAME:
            continue
        before = significant[i - 1] if i else None
        after = significant[i + 1] if i + 1 < len(significant) else None
        if before is not None and before.type == tokenize.OP and before.string == ".":
            continue
        if (
            tok.string == "self"
            and after is not None
            and after.string == "."
            and i + 2 < len(significant)
            and significant[i + 2].string in attributes
        ):
            attr = significant[i + 2]
            edits.append((tok.start, attr.end, attributes[attr.string]))
            continue
        if tok.string not in names:
            continue
        if depth and after is not None and after.string == "=" and before is not None and before.string in "(,":
            continue  # a keyword argument's name
        edits.append((tok.start, tok.end, names[tok.string]))
    if not edits:
        return code
    lines = code.split("\n")
    for (row, col), (end_row, end_col), text in sorted(edits, reverse=True):
        if row != end_row:
            first = lines[row - 1][:col] + text + lines[end_row - 1][end_col:]
            lines[row - 1 : end_row] = [first]
        else:
            line = lines[row - 1]
            lines[row - 1] = line[:col] + text + line[end_col:]
    return "\n".join(lines)


# -- long lines ----------------------------------------------------------------------------------------------


def _brackets(line: str) -> list[tuple[int, int]]:
    """(open, close) column pairs of the brackets of one logical line, outermost first by position."""
    pairs = []
    stack: list[int] = []
    try:
        tokens = _tokens(line + "\n")
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return []
    for tok in tokens:
        if tok.type != tokenize.OP or tok.start[0] != 1:
            continue
        if tok.string in "([{":
            stack.append(tok.start[1])
        elif tok.string in ")]}" and stack:
            pairs.append((stack.pop(), tok.start[1]))
    return pairs


def _top_level(text: str, op: str) -> list[int] | None:
    """The columns of ``op`` outside brackets on the first line of ``text`` (strings respected), None when
    ``text`` does not tokenize."""
    try:
        tokens = _tokens(text + "\n")
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return None
    columns = []
    depth = 0
    for tok in tokens:
        if tok.type != tokenize.OP:
            continue
        if tok.string in "([{":
            depth += 1
        elif tok.string in ")]}":
            depth -= 1
        elif tok.string == op and depth == 0 and tok.start[0] == 1:
            columns.append(tok.start[1])
    return columns


def _top_level_commas(text: str) -> list[str]:
    """``text`` (the inside of a bracket) split at its top-level commas (strings respected)."""
    cuts = _top_level(text, ",")
    if cuts is None:
        return [text]
    parts, start = [], 0
    for cut in cuts:
        parts.append(text[start:cut].strip())
        start = cut + 1
    if text[start:].strip():
        parts.append(text[start:].strip())
    return parts


def _assignment(code: str) -> int | None:
    """The column of the ``=`` of ``target = value`` (outside brackets), None when ``code`` is no such line."""
    columns = _top_level(code, "=")
    return columns[0] if columns else None


def _split_comment(line: str) -> tuple[str, str]:
    """(code, trailing comment) of one line."""
    try:
        tokens = _tokens(line + "\n")
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return line, ""
    for tok in tokens:
        if tok.type == tokenize.COMMENT:
            return line[: tok.start[1]].rstrip(), tok.string
    return line, ""


def _comment_lines(indent: str, comment: str, width: int) -> list[str]:
    """A long ``# ...`` comment, shortened to fit (the end is cut, marked ``...``)."""
    room = width - len(indent)
    return [indent + (comment if len(comment) <= room else comment[: room - 3].rstrip() + "...")]


def wrap(line: str, width: int = WIDTH) -> list[str]:
    """``line`` (one logical line with its indentation) as lines no longer than ``width``: calls, lists and
    tuples are broken inside their brackets (the arguments on one line, else one per line), ``del`` lists
    into several ``del`` statements, comments are shortened. A line that cannot be broken is kept."""
    if len(line) <= width:
        return [line]
    indent = line[: len(line) - len(line.lstrip())]
    body = line.strip()
    if body.startswith("#"):
        return _comment_lines(indent, body, width)
    code, comment = _split_comment(body)
    if comment:
        out = wrap(indent + code, width)
        if len(out) == 1 and len(out[0]) + 2 + len(comment) <= width:
            return [f"{out[0]}  {comment}"]
        return out  # a trailing comment that does not fit is dropped (a note, never code)
    if code.startswith("del "):
        names = [n.strip() for n in code[4:].split(",")]
        out, current = [], []
        for name in names:
            if current and len(indent) + 4 + len(", ".join([*current, name])) > width:
                out.append(f"{indent}del {', '.join(current)}")
                current = []
            current.append(name)
        out.append(f"{indent}del {', '.join(current)}")
        return out
    pairs = _brackets(code)
    # the longest outermost bracket: ``x = f(...)``, ``TABLE = {...}``
    outer = [(o, c) for o, c in pairs if c - o > 1 and not any(a < o and c < b for a, b in pairs)]
    assignment = _assignment(code)
    if assignment is not None and (not outer or max(c - o for o, c in outer) < len(code) // 2):
        head, value = code[: assignment + 1], code[assignment + 1 :].strip()
        return [f"{indent}{head} (", *wrap(f"{indent}    {value}", width), f"{indent})"]
    if not outer:
        return [line]
    opening, closing = max(outer, key=lambda pair: (pair[1] - pair[0], -pair[0]))
    head, inner, tail = code[: opening + 1], code[opening + 1 : closing], code[closing:]
    inner_indent = indent + "    "
    if len(inner_indent) + len(inner.strip()) <= width and len(indent) + len(head) <= width:
        return [indent + head, inner_indent + inner.strip(), indent + tail]
    parts = _top_level_commas(inner)
    if len(parts) <= 1 and len(inner_indent) + len(inner.strip()) > width:
        return [indent + head, *wrap(inner_indent + inner.strip(), width), indent + tail]
    out = [indent + head]
    if code[opening] != "{":  # arguments and list items: as many on a line as fit
        current = ""
        for part in parts:
            joined = f"{current} {part}," if current else f"{part},"
            if current and len(inner_indent) + len(joined) > width:
                out.extend(wrap(inner_indent + current, width))
                joined = f"{part},"
            current = joined
        out.extend(wrap(inner_indent + current, width))
        if len(parts) > 1:
            out[-1] = out[-1].rstrip(",") if not out[-1].rstrip().endswith(("(", "[")) else out[-1]
    else:  # a table: one entry a line
        for part in parts:
            out.extend(wrap(f"{inner_indent}{part},", width))
    out.append(indent + tail)
    return out


def wrap_lines(lines: Iterable[str], width: int = WIDTH) -> list[str]:
    """Every line of ``lines`` wrapped (see :func:`wrap`)."""
    out: list[str] = []
    for line in lines:
        out.extend(wrap(line, width))
    return out


def free_names(lines: Sequence[str] | str, known: Iterable[str] = ()) -> list[str]:
    """Names ``lines`` read without binding them, leaving out builtins and ``known`` ones."""
    skip = set(known) | _BUILTINS
    return [n for n in uses(lines).reads if n not in skip]
