"""Units a rank may recompute: runs of consecutive forward ops cut at module boundaries.

``layer_segments(graph)``: one unit per repeated layer (module paths with a numbered container such as
``transformer.h.3``, ``model.layers.3``, ``encoder.layer.3``, ``blocks.3``): the maximal runs of
consecutive nodes whose module path lies under the same numbered layer. ``depth=1`` cuts each layer at its
direct children as well (``transformer.h.3.attn``, ``transformer.h.3.mlp``, ...), for finer choices.
Guarantees: units are disjoint, in program order, each a non-empty ``[start, stop)`` of node indices;
ops outside every numbered layer (embeddings, head, loss) are in no unit.

``tensor_cut_segments(graph)``, for models without numbered layers (a ``Sequential`` of convolutions):
the op sequence cut where exactly one tensor that carries a gradient crosses (made before the cut, read
after it; masks, indices and other tensors without gradients may cross too), the pieces joined into at
most ``max_units`` units of similar op counts (default: about the square root of the op count). The last piece (the loss) is in no unit.
"""

from __future__ import annotations

import math
import re

from shardwise.ir.graph import Graph
from shardwise.ir.registry import tensor_operands
from shardwise.ir.tensor import TensorSpec

__all__ = ["layer_segments", "tensor_cut_segments", "LAYER_PATTERN"]

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


def tensor_cut_segments(graph: Graph, max_units: int | None = None) -> list[tuple[str, int, int]]:
    """``(name, start, stop)`` per unit (see the module docstring); names are ``ops[a:b]``. By default
    about the square root of the op count (Chen et al.'s sqrt(n) segments)."""
    trainable = {p.name for p in graph.params if p.requires_grad}
    grad: set[str] = set()
    producer: dict[str, int] = {}
    last: dict[str, int] = {}
    for k, n in enumerate(graph.nodes):
        operands = tensor_operands(n)
        for v in operands:
            last[v] = k
        out = n.outputs[0] if n.outputs else None
        floating = isinstance(out, TensorSpec) and out.dtype.startswith(("float", "bfloat"))
        if (n.tuple_output or floating) and any(v in trainable or v in grad for v in operands):
            grad.add(n.name)
        producer[n.name] = k
    crossing = [0] * (len(graph.nodes) + 1)
    for v in grad:
        a, b = producer[v] + 1, last.get(v, producer[v])
        for cut in range(a, b + 1):  # cuts a..b lie between the producer and the last reader
            crossing[cut] += 1
    cuts = [c for c in range(1, len(graph.nodes)) if crossing[c] == 1]
    bounds = [0, *cuts]
    pieces = [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]  # the tail after the last cut: no unit
    if not pieces:
        return []
    total = sum(b - a for a, b in pieces)
    units = max_units if max_units is not None else max(1, round(math.sqrt(total)))
    target = max(1, -(-total // units))
    out: list[tuple[str, int, int]] = []
    start = pieces[0][0]
    for a, b in pieces:
        if b - start >= target or (a, b) == pieces[-1]:
            out.append((f"ops[{start}:{b}]", start, b))
            start = b
    return out
