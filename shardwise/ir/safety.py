"""Plans are data: the text in a plan must never turn into code when the plan is turned into a program.

Codegen writes some of a plan's strings into Python source: op names and dtypes as code, names of the model
and the cluster inside docstrings and string literals, module paths and source lines as comments. A crafted
plan file could otherwise close a comment with a line break, or a docstring with quotes, and run code when
the generated program is imported. :func:`check_plan_text` refuses such a plan (``PlanFileError``) when it is
read (``plan_from_json``) and again before any code is generated (``write_package``).

Rules: no string anywhere holds a line break or another control character; strings written as code are
identifiers (dtypes, layouts, devices, keyword names, mesh axes, degree names, fused-group names, reduction
ops, names of subgraph functions and their arguments) or dotted identifiers (op names); names written inside literals and docstrings (model, cluster, mode,
precision, passes, module paths, source lines) hold no double quote or backslash; collective algorithm names
(written into string literals) hold letters, digits and ``_:.+-`` only. The point-to-point programs of
synthesized collectives are JSON text written to a data file the program parses (never code).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from typing import Any

from shardwise.errors import PlanFileError

__all__ = ["check_plan_text", "plan_text_problems"]

_CONTROL = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*\Z")
_QUOTED = re.compile(r'["\\]')
# names of collective algorithms, written into string literals of the program ("synth:<digest>", "rhd")
_ALGORITHM = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_:.+-]*\Z")
# (dataclass name, field name) -> rule for the strings directly in that field
_IDENTIFIER_FIELDS = {
    ("Const", "value"), ("Const", "kind"), ("TensorSpec", "dtype"), ("Partial", "op"), ("FusedGroup", "name"),
    ("FusedGroup", "kind"), ("DeviceMesh", "axis_names"), ("ExecutionPlan", "degrees_"), ("ScalarSpec", "kind"),
    ("Function", "name"), ("Function", "params"),
}  # fmt: skip
_DOTTED_FIELDS = {("Node", "op")}
_LITERAL_FIELDS = {
    ("ExecutionPlan", "model_name"), ("ExecutionPlan", "cluster_name"), ("ExecutionPlan", "mode"),
    ("ExecutionPlan", "precision"), ("ExecutionPlan", "passes"), ("Graph", "model_name"), ("Node", "module_path"),
    ("Node", "source"),
}  # fmt: skip
# (Node.source_text is only ever written into a comment: a line break is all it must not hold)


def _strings(obj: Any, owner: str, field: str, path: str) -> Iterator[tuple[str, str, str, str]]:
    """(owner class, field, path, string) for every string inside ``obj``."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        name = type(obj).__name__
        for f in dataclasses.fields(obj):
            yield from _strings(getattr(obj, f.name), name, f.name, f"{path}.{f.name}" if path else f.name)
    elif isinstance(obj, tuple | list):
        for i, item in enumerate(obj):
            yield from _strings(item, owner, field, f"{path}[{i}]")
    elif isinstance(obj, dict):
        for key, item in obj.items():
            yield from _strings(key, owner, field, f"{path} key")
            yield from _strings(item, owner, field, f"{path}[{key!r}]")
    elif isinstance(obj, str):
        yield owner, field, path, obj


def _kwarg_names(obj: Any, path: str) -> Iterator[tuple[str, str]]:
    """Keyword-argument names of every node (written as ``name=`` into calls)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            sub = f"{path}.{f.name}" if path else f.name
            if type(obj).__name__ == "Node" and f.name == "kwargs":
                for i, pair in enumerate(value):
                    if isinstance(pair, tuple) and pair and isinstance(pair[0], str):
                        yield f"{sub}[{i}]", pair[0]
            yield from _kwarg_names(value, sub)
    elif isinstance(obj, tuple | list):
        for i, item in enumerate(obj):
            yield from _kwarg_names(item, f"{path}[{i}]")


def plan_text_problems(plan: Any, limit: int = 5) -> list[str]:
    """What is wrong with the text in ``plan`` (empty when it is safe to generate code from)."""
    problems: list[str] = []
    for owner, field, path, text in _strings(plan, "", "", ""):
        key = (owner, field)
        why = ""
        if _CONTROL.search(text):
            why = "a line break or control character"
        elif key in _IDENTIFIER_FIELDS and not _IDENTIFIER.match(text):
            why = "not an identifier"
        elif key in _DOTTED_FIELDS and not _DOTTED.match(text):
            why = "not a dotted name"
        elif key in _LITERAL_FIELDS and _QUOTED.search(text):
            why = "a double quote or backslash"
        elif key == ("Redistribute", "algorithm") and not _ALGORITHM.match(text):
            why = "not an algorithm name"
        if why:
            problems.append(f"{path} = {text[:60]!r} ({why})")
            if len(problems) >= limit:
                return problems
    for i, entry in enumerate(getattr(plan, "collective_programs", ())):
        if not (isinstance(entry, tuple) and len(entry) == 2 and _ALGORITHM.match(str(entry[0]))):
            problems.append(f"collective_programs[{i}] (not an (algorithm name, program) pair)")
    for path, name in _kwarg_names(plan, ""):
        if not _IDENTIFIER.match(name):
            problems.append(f"{path} keyword {name[:60]!r} (not an identifier)")
            if len(problems) >= limit:
                break
    return problems


def check_plan_text(plan: Any) -> None:
    """Raise ``PlanFileError`` if code generated from ``plan`` could contain anything but the plan's data."""
    problems = plan_text_problems(plan)
    if problems:
        raise PlanFileError(
            "the plan holds text that cannot be written into a program safely: "
            + "; ".join(problems)
            + ". Plan files are data made by shardwise: make the plan again instead of editing it"
        )
