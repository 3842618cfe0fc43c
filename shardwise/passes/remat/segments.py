"""Units a rank may recompute: runs of consecutive forward ops cut at module boundaries.

``layer_segments(graph)``: one unit per repeated layer (module paths with a numbered container such as
``transformer.h.3``, ``model.layers.3``, ``encoder.layer.3``, ``blocks.3``): the maximal runs of
consecutive nodes whose module path lies under the same numbered layer. ``depth=1`` cuts each layer at its
direct children as well (``transformer.h.3.attn``, ``transformer.h.3.mlp``, ...), for finer choices.
Guarantees: units are disjoint, in program order, each a non-empty ``[start, stop)`` of node indices;
ops outside every numbered layer (embeddings, head, loss) are in no unit.
"""

from __future__ import annotations

import re

from shardwise.ir.graph import Graph

__all__ = ["layer_segments", "LAYER_PATTERN"]

LAYER_PATTERN = re.compile(r"^(.*?(?:^|\.)(?:h|layers|layer|blocks|block)\.\d+)(?:\.|$)")


def _key(path: str, depth: int) -> str | None:
    m = LAYER_PATTERN.match(path)
    if m is None:
        return None
    if depth <= 0:
        return m.group(1)
    rest = path[len(m.group(1)) :].lstrip(".").split(".") if len(path) > len(m.group(1)) else []
    return ".".join([m.group(1), *rest[:depth]])


def layer_segments(graph: Graph, depth: int = 0) -> list[tuple[str, int, int]]:
    """``(name, start, stop)`` per unit (see the module docstring); names are unique (``#2`` on repeats)."""
    out: list[tuple[str, int, int]] = []
    seen: dict[str, int] = {}
    current: str | None = None
    start = 0
    keys = [_key(n.module_path, depth) for n in graph.nodes]
    for k, key in enumerate([*keys, None]):
        if key == current:
            continue
        if current is not None:
            seen[current] = seen.get(current, 0) + 1
            name = current if seen[current] == 1 else f"{current}#{seen[current]}"
            out.append((name, start, k))
        current, start = key, k
    return out
