"""Reading a generated ``program.py`` in tests: which layers run a piece of code.

Repeated layers are written once (a function per distinct layer, its docstring naming the layers that call
it, ``"... (layers 0-3, 5); ..."``), so a wrapper such as ``torch.utils.checkpoint.checkpoint(`` appears once
for all the layers that run it. :func:`layers_running` counts those layers: for every top-level function whose
code holds the text, the layers its docstring names, plus the text's occurrences in ``Program.compute``.
"""

from __future__ import annotations

import ast
import re

__all__ = ["layers_running", "layer_functions"]


def _layers(doc: str) -> list[int]:
    m = re.search(r"\(layers ([0-9, -]+)\)", doc)
    if m is None:
        return []
    out: list[int] = []
    for part in m.group(1).split(","):
        first, _, last = part.strip().partition("-")
        out += list(range(int(first), int(last or first) + 1))
    return out


def layer_functions(source: str) -> dict[str, list[int]]:
    """Top-level function name -> the layers that call it (from its docstring), for the layer functions."""
    out = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef):
            layers = _layers(ast.get_docstring(node) or "")
            if layers:
                out[node.name] = layers
    return out


def layers_running(source: str, text: str) -> int:
    """How many layers' code (or statements of ``Program.compute``) contains ``text``."""
    tree = ast.parse(source)
    count = 0
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and text in ast.get_source_segment(source, node):  # type: ignore[operator]
            count += len(_layers(ast.get_docstring(node) or ""))
        if isinstance(node, ast.ClassDef) and node.name == "Program":
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == "compute":
                    count += (ast.get_source_segment(source, item) or "").count(text)
    return count
