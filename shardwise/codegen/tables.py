"""The tensor tables of a generated program (``TENSORS``, ``ALIASES``, ``PARTS``, ``GRAD_REDUCE``) as source,
with the entries of repeated layers written once.

A model's repeated layers (module paths ``<family>.<i>...``, e.g. ``transformer.h.3.attn``) hold tensors of
the same names, shapes and placements. Such a run of layers is written once with ``{i}`` where the layer's
number goes, and expanded when the program is imported by ``per_layer`` (defined in the program)::

    **per_layer(range(4), {
        "transformer.h.{i}.ln_1.weight": ("transformer_h_{i}_ln_1_weight", (128,), "float32", "parameter", ()),
    }),

Guarantees: the tables the program computes equal, entry for entry and in order, the tables written out one
entry a line (a run is written once only when expanding it gives back exactly its entries).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from shardwise.codegen.layout import tensor_tables
from shardwise.ir.graph import Graph
from shardwise.ir.plan import ExecutionPlan

__all__ = ["program_tables", "repeated_family", "literal", "fill", "layer_of"]

_LAYER = re.compile(r"^(.+?)\.(\d+)(?=\.|$)")


def repeated_family(graph: Graph) -> str:
    """The module path of the model's main repeated layers (``transformer.h``): the family of paths
    ``<family>.<i>`` with the most members (at least two); "" when there is none."""
    families: dict[str, set[int]] = {}
    for n in graph.nodes:
        m = _LAYER.match(n.module_path)
        if m is not None:
            families.setdefault(m.group(1), set()).add(int(m.group(2)))
    candidates = {f: idx for f, idx in families.items() if len(idx) >= 2}
    return max(candidates, key=lambda f: (len(candidates[f]), -len(f)), default="")


def layer_of(path: str, family: str) -> int | None:
    """The layer number of a module path inside ``family`` (``transformer.h.3.attn`` -> 3), else None."""
    if not family or not path.startswith(family + "."):
        return None
    head = path[len(family) + 1 :].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def literal(value: Any) -> str:
    """A Python literal for table data (strings in double quotes, tuples, numbers, dicts)."""
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, tuple | list):
        inner = ", ".join(literal(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{literal(k)}: {literal(v)}" for k, v in value.items()) + "}"
    return repr(value)


def fill(value: Any, i: int) -> Any:
    """``value`` with ``{i}`` (and ``{i+1}``, ``{i-1}``...) in its strings replaced by the layer's number:
    what the program's ``per_layer`` does."""
    if isinstance(value, str):
        return re.sub(r"\{i([+-]\d+)?\}", lambda m: str(i + int(m.group(1) or 0)), value)
    if isinstance(value, tuple):
        return tuple(fill(v, i) for v in value)
    return value


def _template(value: Any, k: int, family: str, family_id: str) -> Any:
    """``value`` with layer ``k``'s prefixes (a key's ``<family>.<k>.``, an attribute's ``<family_id>_<k>_``)
    written ``{i}``."""
    if isinstance(value, str):
        for head, sep in ((family, "."), (family_id, "_")):
            prefix = f"{head}{sep}{k}{sep}"
            if head and value.startswith(prefix):
                return f"{head}{sep}{{i}}{sep}" + value[len(prefix) :]
        return value
    if isinstance(value, tuple):
        return tuple(_template(v, k, family, family_id) for v in value)
    return value


def _has_braces(value: Any) -> bool:
    if isinstance(value, str):
        return "{" in value or "}" in value
    if isinstance(value, tuple):
        return any(_has_braces(v) for v in value)
    return False


def table_lines(name: str, table: Mapping[str, Any], family: str, comment: str = "") -> list[str]:
    """``NAME = {...}`` with each run of repeated layers written once (see the module docstring)."""
    family_id = re.sub(r"[^0-9a-zA-Z_]", "_", family)
    items = list(table.items())
    layer = [layer_of(k, family) if family and not _has_braces((k, v)) else None for k, v in items]
    out = [f"# {comment}"] if comment else []
    if not table:
        return [*out, f"{name} = {{}}"]
    out.append(f"{name} = {{")
    i = 0
    while i < len(items):
        k0 = layer[i]
        if k0 is None:
            out.append(f"    {literal(items[i][0])}: {literal(items[i][1])},")
            i += 1
            continue
        # the run of layers k0, k0 + 1, ... whose entries are the same once written with {i}
        first_end = i
        while first_end < len(items) and layer[first_end] == k0:
            first_end += 1
        pattern = [(_template(k, k0, family, family_id), _template(v, k0, family, family_id)) for k, v in items[i:first_end]]
        end, k = first_end, k0
        while end < len(items) and layer[end] == k + 1:
            stop = end
            while stop < len(items) and layer[stop] == k + 1:
                stop += 1
            if [(fill(a, k + 1), fill(b, k + 1)) for a, b in pattern] != items[end:stop]:
                break
            end, k = stop, k + 1
        if k == k0 or [(fill(a, k0), fill(b, k0)) for a, b in pattern] != items[i:first_end]:
            out += [f"    {literal(a)}: {literal(b)}," for a, b in items[i:first_end]]
            i = first_end
            continue
        out.append(f"    **per_layer(range({k0}, {k + 1}), {{" if k0 else f"    **per_layer(range({k + 1}), {{")
        out += [f"        {literal(a)}: {literal(b)}," for a, b in pattern]
        out.append("    }),")
        i = end
    out.append("}")
    return out


def program_tables(plan: ExecutionPlan, attributes: Mapping[str, str]) -> list[str]:
    """The source lines defining ``TENSORS``, ``ALIASES``, ``PARTS`` and ``GRAD_REDUCE`` of ``plan``'s
    program (``attributes``: parameter value name -> the program's attribute)."""
    tables = tensor_tables(plan)
    attr_of = {p.key: attributes[p.name] for p in plan.graph.params}
    tensors = {key: (attr_of[key], *rest) for key, (_, *rest) in tables["tensors"].items()}
    family = repeated_family(plan.graph)
    note = "state_dict name -> (attribute, whole shape, dtype, kind, ((mesh axis, dim it is split on), ...))"
    if any(p.kind == "state" for p in plan.graph.params):
        note += '; kind "state": kept between calls, zeros at first, not a weight (a KV cache)'
    out = table_lines("TENSORS", tensors, family, note)
    out += table_lines("ALIASES", tables["aliases"], family, "other state_dict names bound to the same tensor (tied weights)")
    out += [
        "# tensors that are slices of another state_dict tensor (a fused projection, split so that each part is",
        "# tensor-parallel on its own): key -> (whole tensor's key, dim, start, stop)",
    ]
    out += table_lines("PARTS", tables["parts"], family)
    # a mapping (the trainers go through the parameters in TENSORS order): written in that order too
    order = {key: k for k, key in enumerate(tensors)}
    grad_reduce = dict(sorted(plan.param_grad_reduce, key=lambda item: order.get(item[0], len(order))))
    out += table_lines(
        "GRAD_REDUCE", grad_reduce, family,
        "parameters whose gradients are partial sums over these mesh axes, reduced once after backward",
    )  # fmt: skip
    return out
