"""Layer units: the granularity at which a model is cut into pipeline stages.

A transformer's repeated blocks (module paths ``prefix.N...``, e.g. ``transformer.h.3.attn``) are the natural
cut points. :func:`layer_units` finds the largest such family and assigns every node to a unit:

- unit 0, ``"pre"``: the nodes before the first block (embeddings, masks, position tables);
- units 1..L: the blocks in index order; a node of no block that runs between two blocks joins the block
  before it;
- unit L+1, ``"post"``: the nodes after the last block (final norm, head, loss).

A node never lands in an earlier unit than any of its producers (so every cut between units is a valid
pipeline cut: values only flow forward). Units whose ops, arguments and shapes match position by position
share a ``signature`` class: they cost the same, so a planner prices one and scales.

Requires: a verified graph. Guarantees: every node is in exactly one unit; unit indices are monotone along
every edge; ``"pre"`` and ``"post"`` may be empty. A graph without repeated blocks gets one unit per
top-level module in execution order (or a single unit when there is no module structure).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from shardwise.ir.graph import Arg, Const, Graph, Node, Value

__all__ = ["LayerUnits", "layer_units"]

_LAYER = re.compile(r"^(.+?)\.(\d+)(?=\.|$)")


@dataclass(frozen=True)
class LayerUnits:
    """Nodes per unit (graph order inside each unit), labels, and the repeated-block class of each unit."""

    labels: tuple[str, ...]
    nodes: tuple[tuple[str, ...], ...]
    signature: tuple[int, ...]  # units with equal numbers cost the same (same ops, arguments, shapes)
    family: str  # the repeated block family, e.g. "transformer.h" ("" when none)

    def __len__(self) -> int:
        return len(self.labels)

    def unit_of(self) -> dict[str, int]:
        return {n: u for u, names in enumerate(self.nodes) for n in names}

    @property
    def blocks(self) -> int:
        """How many units are repeated blocks (all but "pre" and "post" when a family was found)."""
        return len(self.labels) - 2 if self.family else len(self.labels)


def _families(graph: Graph) -> dict[str, set[int]]:
    out: dict[str, set[int]] = {}
    for n in graph.nodes:
        m = _LAYER.match(n.module_path)
        if m is not None:
            out.setdefault(m.group(1), set()).add(int(m.group(2)))
    return out


def _block_index(path: str, family: str) -> int | None:
    if path == family or not path.startswith(family + "."):
        return None
    head = path[len(family) + 1 :].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def _arg_sig(a: Arg, specs: Mapping[str, str]) -> object:
    if isinstance(a, Value):
        return ("v", specs.get(a.name, "?"))
    if isinstance(a, tuple):
        return tuple(_arg_sig(x, specs) for x in a)
    if isinstance(a, Const):
        return ("c", a.kind, a.value)
    return a


def _unit_signature(nodes: list[Node], specs: Mapping[str, str], family: str, index: int | None) -> object:
    def norm(path: str) -> str:
        if index is None:
            return path
        head = f"{family}.{index}"
        return f"{family}.#" + path[len(head) :] if path == head or path.startswith(head + ".") else path

    return tuple(
        (
            n.op,
            norm(n.module_path),
            tuple(str(o) for o in n.outputs),
            tuple(_arg_sig(a, specs) for a in n.args),
            tuple((k, _arg_sig(v, specs)) for k, v in n.kwargs),
        )
        for n in nodes
    )


def layer_units(graph: Graph) -> LayerUnits:
    """Split ``graph`` into layer units (see the module docstring)."""
    families = {f: idx for f, idx in _families(graph).items() if len(idx) >= 2}
    family = max(families, key=lambda f: (len(families[f]), -len(f)), default="")
    producer_unit: dict[str, int] = {}
    assignment: list[int] = []
    if family:
        order = sorted(families[family])
        rank = {k: r + 1 for r, k in enumerate(order)}
        post = len(order) + 1
        last_block_node = max(
            i for i, n in enumerate(graph.nodes) if _block_index(n.module_path, family) is not None
        )
        labels = ("pre", *(f"{family}.{k}" for k in order), "post")
        current = 0
        for i, n in enumerate(graph.nodes):
            k = _block_index(n.module_path, family)
            if k is not None:
                own = rank[k]
                current = max(current, own)
            else:
                own = post if i > last_block_node else current
            unit = max([own, *(producer_unit.get(v, 0) for v in n.inputs)])
            producer_unit[n.name] = unit
            assignment.append(unit)
    else:
        # no repeated blocks: one unit per top-level module, in order of first appearance
        tops: dict[str, int] = {}
        current = 0
        for n in graph.nodes:
            top = n.module_path.split(".", 1)[0] if n.module_path else ""
            if top and top not in tops:
                tops[top] = len(tops)
            own = tops[top] if top else current
            current = max(current, own)
            unit = max([own, *(producer_unit.get(v, 0) for v in n.inputs)])
            producer_unit[n.name] = unit
            assignment.append(unit)
        labels = tuple(tops) or ("model",)
    buckets: list[list[Node]] = [[] for _ in labels]
    for n, u in zip(graph.nodes, assignment, strict=True):
        buckets[u].append(n)
    specs: dict[str, str] = {i.name: str(i.spec) for i in graph.inputs}
    specs.update({p.name: str(p.spec) for p in graph.params})
    for n in graph.nodes:
        specs[n.name] = ",".join(str(o) for o in n.outputs)
    classes: dict[object, int] = {}
    signature = []
    for u, nodes in enumerate(buckets):
        index = _block_index(labels[u], family) if family and 0 < u < len(labels) - 1 else None
        key = _unit_signature(nodes, specs, family, index)
        signature.append(classes.setdefault(key, len(classes)))
    return LayerUnits(
        labels=labels,
        nodes=tuple(tuple(n.name for n in b) for b in buckets),
        signature=tuple(signature),
        family=family,
    )
