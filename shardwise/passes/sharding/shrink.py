"""Shrinking the placement ILP before it is solved (see ``auto`` and ``ilp``).

Two reductions, both structural (they look at the graph, not at costs):

1. **Followers** (:func:`follower_groups`): a view or elementwise op whose only tensor operand is one value
   takes its placement from that value (it keeps the split where it can, passes partial sums through
   linear ops, and runs whole otherwise). It gets no variables of its own: it joins the *group* of its
   producer, whose variables decide it.
2. **Repeated layers** (:func:`detect_layers`): the blocks of a transformer (module paths ``prefix.N...``)
   whose ops, shapes and arguments match the first block position by position are solved once: each group
   of a later block shares the variables (the *class*) of the matching group of the first block, and the
   costs of a class are counted once per member.

Requires: a verified graph. Guarantees: every node and parameter maps to a representative of the first
matched layer only when its op, arguments and shapes are the same (so it has the same candidates), and
groups of one class have members that match position by position.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from shardwise.ir.graph import Arg, Const, Graph, Node, Value
from shardwise.ir.registry import rule_for
from shardwise.ir.tensor import TensorSpec

__all__ = ["Layers", "detect_layers", "Unit", "Structure", "build_structure", "FOLLOWER_KINDS"]

_LAYER = re.compile(r"^(.+?)\.(\d+)(?=\.|$)")
FOLLOWER_KINDS = ("elementwise", "view")


@dataclass(frozen=True)
class Layers:
    """Repeated blocks: ``rep`` maps a node or parameter value name of a matched block to the matching
    name in the first block (first-block names map to themselves)."""

    rep: dict[str, str] = field(default_factory=dict)
    blocks: tuple[tuple[str, int], ...] = ()  # (prefix, number of matched blocks) per repeated family


def _normalize(path: str, prefix: str, index: int) -> str:
    head = f"{prefix}.{index}"
    if path == head:
        return f"{prefix}.#"
    if path.startswith(head + "."):
        return f"{prefix}.#" + path[len(head) :]
    return path


def _arg_signature(a: Arg, specs: Mapping[str, object]) -> object:
    if isinstance(a, Value):
        spec = specs.get(a.name)
        return ("v", str(spec) if spec is not None else "?")
    if isinstance(a, tuple):
        return tuple(_arg_signature(x, specs) for x in a)
    if isinstance(a, Const):
        return ("c", a.kind, a.value)
    return a


def _signature(node: Node, prefix: str, index: int, specs: Mapping[str, object]) -> object:
    return (
        node.op,
        _normalize(node.module_path, prefix, index),
        tuple(str(o) for o in node.outputs),
        node.tuple_output,
        tuple(_arg_signature(a, specs) for a in node.args),
        tuple((k, _arg_signature(v, specs)) for k, v in node.kwargs),
    )


def detect_layers(graph: Graph) -> Layers:
    """Find repeated blocks by module path and check that they match the first block op by op."""
    specs: dict[str, object] = {i.name: i.spec for i in graph.inputs}
    specs.update({p.name: p.spec for p in graph.params})
    for n in graph.nodes:
        specs[n.name] = n.outputs if n.tuple_output else n.outputs[0]
    families: dict[str, dict[int, list[Node]]] = {}
    for n in graph.nodes:
        m = _LAYER.match(n.module_path)
        if m is not None:
            families.setdefault(m.group(1), {}).setdefault(int(m.group(2)), []).append(n)
    rep: dict[str, str] = {}
    blocks: list[tuple[str, int]] = []
    params_by_key = {p.key: p for p in graph.params}
    for prefix, layers in families.items():
        if len(layers) < 2:
            continue
        first = min(layers)
        base = layers[first]
        base_sig = [_signature(n, prefix, first, specs) for n in base]
        matched = 0
        for index, nodes in sorted(layers.items()):
            if len(nodes) != len(base):
                continue
            if [_signature(n, prefix, index, specs) for n in nodes] != base_sig:
                continue
            matched += 1
            for n, b in zip(nodes, base, strict=True):
                rep[n.name] = b.name
            head = f"{prefix}.{index}."
            for p in graph.params:
                if p.key.startswith(head):
                    twin = params_by_key.get(f"{prefix}.{first}." + p.key[len(head) :])
                    if twin is not None and twin.spec == p.spec and twin.kind == p.kind:
                        rep[p.name] = twin.name
        if matched > 1:
            blocks.append((prefix, matched))
    return Layers(rep, tuple(blocks))


@dataclass(frozen=True)
class Unit:
    """A value-producing thing with a placement: a graph input, a parameter, or a node."""

    name: str
    kind: str  # "input" | "param" | "node"


@dataclass
class Structure:
    """Units, groups (root -> members in graph order, root first) and classes (group root -> class id)."""

    units: dict[str, Unit]
    producer: dict[str, tuple[str, int]]  # tensor value name -> (unit name, output index)
    root: dict[str, str]  # unit name -> group root
    members: dict[str, list[str]]  # group root -> member unit names (root first, then graph order)
    group_class: dict[str, str]  # group root -> class name (the root of the class's representative group)
    class_count: dict[str, int]  # class name -> how many groups share it
    layers: Layers


def _is_follower(node: Node, operands: list[str], specs: Mapping[str, TensorSpec]) -> bool:
    rule = rule_for(node.op)
    if rule is None or rule.kind not in FOLLOWER_KINDS or node.tuple_output:
        return False
    if not node.outputs or not isinstance(node.outputs[0], TensorSpec):
        return False
    return len(operands) == 1 and operands[0] in specs


def build_structure(
    graph: Graph, specs: Mapping[str, TensorSpec], operands: Mapping[str, list[str]], *, shrink: bool = True
) -> Structure:
    """Units, follower groups and layer classes (``shrink=False``: every unit is its own group and class)."""
    units: dict[str, Unit] = {}
    producer: dict[str, tuple[str, int]] = {}
    for i in graph.inputs:
        if isinstance(i.spec, TensorSpec):
            units[i.name] = Unit(i.name, "input")
            producer[i.name] = (i.name, 0)
    for p in graph.params:
        units[p.name] = Unit(p.name, "param")
        producer[p.name] = (p.name, 0)
    root: dict[str, str] = {u: u for u in units}
    for node in graph.nodes:
        if node.op == "getitem":
            src, idx = node.args[0], node.args[1]
            assert isinstance(src, Value) and isinstance(idx, int)
            if src.name in units:
                producer[node.name] = (src.name, idx)
            continue
        if not any(isinstance(o, TensorSpec) for o in node.outputs):
            continue
        units[node.name] = Unit(node.name, "node")
        if not node.tuple_output:
            producer[node.name] = (node.name, 0)
        ops = [n for n in operands[node.name] if n in producer]
        if shrink and _is_follower(node, ops, specs):
            src_unit = producer[ops[0]][0]
            root[node.name] = root[src_unit]
        else:
            root[node.name] = node.name
    members: dict[str, list[str]] = {}
    for u in units:
        members.setdefault(root[u], []).append(u)
    layers = detect_layers(graph) if shrink else Layers()
    group_class: dict[str, str] = {}
    for r, ms in members.items():
        cls = r
        twin = layers.rep.get(r)
        same = twin is not None and twin != r and twin in members and root.get(twin) == twin
        if same and [layers.rep.get(m) for m in ms] == members[twin]:  # type: ignore[index]
            cls = twin  # type: ignore[assignment]
        group_class[r] = cls
    count: dict[str, int] = {}
    for cls in group_class.values():
        count[cls] = count.get(cls, 0) + 1
    return Structure(units, producer, root, members, group_class, count, layers)
