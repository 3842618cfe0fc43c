"""One op with its arguments already written as Python → the expression a person would write for it.

The op registry says how each op is spelled (``OpRule.spelling``, see ``shardwise.ir.registry.SPELLINGS``):
``torch.*`` / ``F.*`` functions, tensor methods, operators and templates. A few ops need their arguments
looked at (slicing and indexing become subscripts, ``to`` keeps only the keywords ``Tensor.to`` takes,
cross entropy takes its reduction by name); they are written here. Any other op is written the aten way,
``aten.<name>.<overload>(...)`` (the program binds ``aten = torch.ops.aten``).

Requires: ``args``/``kwargs`` are the op's arguments in aten's order, each already Python source.
Guarantees: the expression computes what the aten op computes (a spelling applies only to argument lists
it is exact for; otherwise the next alternative, finally the aten call, is used).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from shardwise.ir.graph import Node
from shardwise.ir.registry import spelling_of

__all__ = ["spell", "uses_aten"]

_ATOM = re.compile(r"(?:[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*|\d[\w.]*)\Z")
_CALL = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*\(.*\)\Z")
_PLACEHOLDER = re.compile(r"\{(~?)(\d+)\}")
_LONGEST = 2**62  # an end this large is "to the end" (torch.export writes sys.maxsize)
_REDUCTIONS = {"0": '"none"', "1": '"mean"', "2": '"sum"'}
_DEFAULTS = {("pin_memory", "False"), ("pin_memory", "None"), ("layout", "torch.strided"), ("layout", "None")}


def uses_aten(expression: str) -> bool:
    """True when ``expression`` calls an op the aten way (the module must bind ``aten``)."""
    return re.search(r"(?<![\w.])aten\.", expression) is not None


def _atom(text: str) -> str:
    """``text`` as an operand of an operator or a method call (parenthesized unless it binds tightest)."""
    if _ATOM.match(text) or (_CALL.match(text) and _balanced_call(text)):
        return text
    return f"({text})"


def _balanced_call(text: str) -> bool:
    """True for ``f(...)`` whose first parenthesis closes at the end (not ``f(a) + g(b)``)."""
    depth = 0
    start = text.index("(")
    for i, c in enumerate(text[start:], start):
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
            if depth == 0:
                return i == len(text) - 1
    return False


def _spread(text: str) -> str:
    """A list argument spread into a call: ``[8, -1]`` -> ``8, -1``, a name -> ``*name``."""
    if text == "[]":  # a 0-d shape stays a list (``x.reshape()`` is an error)
        return text
    if text.startswith("[") and text.endswith("]"):
        return text[1:-1]
    return f"*{text}"


def _template(template: str, args: Sequence[str], kwargs: Sequence[tuple[str, str]]) -> str | None:
    used = [int(m.group(2)) for m in _PLACEHOLDER.finditer(template)]
    if kwargs or sorted(set(used)) != list(range(len(args))):
        return None
    infix = not re.match(r"[A-Za-z_.]", template) or re.search(r"\}\s*[^\s,)(]", template) is not None

    def fill(m: re.Match[str]) -> str:
        if m.group(1):
            return ""
        text = args[int(m.group(2))]
        return _atom(text) if infix else text

    return _PLACEHOLDER.sub(fill, template)


def _alternative(form: str, args: Sequence[str], kwargs: Sequence[tuple[str, str]]) -> str | None:
    kw = [f"{k}={v}" for k, v in kwargs]
    if "{" in form:
        return _template(form, args, kwargs)
    if form.startswith("."):
        if not args:
            return None
        if form.endswith("(*)"):
            if len(args) < 2:
                return None
            return f"{_atom(args[0])}{form[:-3]}({', '.join([_spread(args[1]), *args[2:], *kw])})"
        return f"{_atom(args[0])}{form}({', '.join([*args[1:], *kw])})"
    return f"{form}({', '.join([*args, *kw])})"


def _subscript(node: Node, args: Sequence[str], kwargs: Sequence[tuple[str, str]]) -> str | None:
    """``aten.slice.Tensor`` and ``aten.index.Tensor`` as Python subscripts."""
    if kwargs:
        return None
    if node.op == "aten.index.Tensor" and len(args) == 2 and args[1].startswith("["):
        inner = [":" if a.strip() == "None" else a.strip() for a in _split_top(args[1][1:-1])]
        if not inner or all(a == ":" for a in inner):
            return None
        return f"{_atom(args[0])}[{', '.join(inner)}]"
    if node.op != "aten.slice.Tensor" or not node.outputs or not 1 <= len(args) <= 5:
        return None
    rank = getattr(node.outputs[0], "rank", None)
    values = list(args) + [None] * (5 - len(args))  # type: ignore[list-item]
    dim, start, end, step = (values[1] or "0"), values[2], values[3], values[4]
    if rank is None or not re.fullmatch(r"-?\d+", dim):
        return None
    d = int(dim)
    if not -rank <= d < rank:
        return None
    start = "" if start in (None, "None", "0") else start
    if end in (None, "None") or (re.fullmatch(r"\d+", end) and int(end) >= _LONGEST):
        end = ""
    piece = f"{start}:{end}" + ("" if step in (None, "1") else f":{step}")
    parts = [":"] * d + [piece] if d >= 0 else ["..."] + [piece] + [":"] * (-d - 1)
    return f"{_atom(args[0])}[{', '.join(parts)}]"


def _split_top(text: str) -> list[str]:
    """``text`` split at its top-level commas."""
    out, depth, current = [], 0, ""
    for c in text:
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        if c == "," and depth == 0:
            out.append(current)
            current = ""
        else:
            current += c
    if current.strip():
        out.append(current)
    return out


def _to(node: Node, args: Sequence[str], kwargs: Sequence[tuple[str, str]]) -> str | None:
    """``aten.to.dtype_layout`` / ``aten._to_copy`` as ``Tensor.to`` (which takes no layout/pin_memory)."""
    if node.op not in ("aten.to.dtype_layout", "aten._to_copy.default") or len(args) != 1:
        return None
    kw = dict(kwargs)
    if kw.pop("layout", "None") not in ("None", "torch.strided") or kw.pop("pin_memory", "None") not in (
        "None",
        "False",
    ):
        return None
    if node.op == "aten._to_copy.default":
        kw["copy"] = "True"
    order = ("device", "dtype", "non_blocking", "copy", "memory_format")
    if set(kw) - set(order):
        return None
    kept = [f"{k}={kw[k]}" for k in order if k in kw and kw[k] not in ("None", "False")]
    return f"{_atom(args[0])}.to({', '.join(kept)})"


def _cross_entropy(node: Node, args: Sequence[str], kwargs: Sequence[tuple[str, str]]) -> str | None:
    if node.op != "aten.cross_entropy_loss.default" or len(args) < 2:
        return None
    names = ("weight", "reduction", "ignore_index", "label_smoothing")
    kw = dict(zip(names, args[2:])) | dict(kwargs)
    if set(kw) - set(names) or kw.get("reduction", "1") not in _REDUCTIONS:
        return None
    defaults = {"weight": "None", "reduction": "1", "ignore_index": "-100", "label_smoothing": "0.0"}
    parts = [args[0], args[1]]
    for k in names:
        v = kw.get(k)
        if v is None or v == defaults[k] or (k == "label_smoothing" and v == "0"):
            continue
        parts.append(f"{k}={_REDUCTIONS[v] if k == 'reduction' else v}")
    return f"F.cross_entropy({', '.join(parts)})"


def _softmax(node: Node, args: Sequence[str], kwargs: Sequence[tuple[str, str]]) -> str | None:
    """``aten._softmax(x, dim, False)`` is ``torch.softmax(x, dim)`` (likewise ``_log_softmax``)."""
    name = {"aten._softmax.default": "softmax", "aten._log_softmax.default": "log_softmax"}.get(node.op)
    if name is None or kwargs or len(args) != 3 or args[2] != "False":
        return None
    return f"torch.{name}({args[0]}, {args[1]})"


def spell(node: Node, args: Sequence[str], kwargs: Sequence[tuple[str, str]]) -> str:
    """The Python expression for ``node`` applied to ``args``/``kwargs`` (already Python source)."""
    special = (
        _subscript(node, args, kwargs) or _to(node, args, kwargs) or _cross_entropy(node, args, kwargs)
        or _softmax(node, args, kwargs)
    )  # fmt: skip
    if special is not None:
        return special
    # keywords that only restate the default (factory functions take them, a person leaves them out)
    plain = [(k, v) for k, v in kwargs if (k, v) not in _DEFAULTS]
    for form in filter(None, spelling_of(node.op).split(";")):
        out = _alternative(form, args, plain)
        if out is not None:
            return out
    kw = [f"{k}={v}" for k, v in kwargs]
    ns, name, overload = node.op.split(".", 2) if node.op.count(".") >= 2 else ("aten", node.op, "default")
    prefix = "aten" if ns == "aten" else f"torch.ops.{ns}"
    return f"{prefix}.{name}.{overload}({', '.join([*args, *kw])})"
