"""Activation checkpointing in a generated program: the statements of each recomputed range of ops
(``ExecutionPlan.recompute``, chosen by ``shardwise.passes.remat``) become a local function that
``compute`` calls through ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``. Autograd then
keeps only the function's inputs, drops what its ops save, and reruns it when the backward reaches it.

The function's parameters are the variables its statements read before setting them (made earlier in
``compute``); it returns the variables it sets that later statements (or the returned value) read.
Variables the range frees (``del``) that were made before it are freed after the call instead. Requires
statements of the form ``emit`` makes (assignments, ``del``), and ``self``/``mesh`` only read.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence

from shardwise.codegen.pysource import uses
from shardwise.codegen.statement import Statement
from shardwise.ir.plan import ExecutionPlan

__all__ = ["checkpoint_ranges", "recompute_ranges"]


def recompute_ranges(
    plan: ExecutionPlan, var: dict[str, str], fresh: Callable[[str], str]
) -> list[tuple[str, frozenset[str]]]:
    """(function name, variables its ops set) per range of ``plan.recompute``; the function is named after
    the module path the range's ops share (``transformer.h.3`` -> ``transformer_h_3``)."""
    index = {n.name: k for k, n in enumerate(plan.graph.nodes)}
    out = []
    for first, last in plan.recompute:
        if first not in index or last not in index or index[last] < index[first]:
            raise ValueError(f"plan.recompute names a range {first!r}..{last!r} that is not in the graph")
        nodes = plan.graph.nodes[index[first] : index[last] + 1]
        paths = [n.module_path.split(".") for n in nodes if n.module_path]
        common = os.path.commonprefix(paths) if paths else []
        out.append((fresh(".".join(common) or first), frozenset(var[n.name] for n in nodes if n.name in var)))
    return out


def checkpoint_ranges(
    body: list[Statement], returns: str, ranges: Sequence[tuple[str, frozenset[str]]], inputs: Sequence[str],
) -> list[Statement]:  # fmt: skip
    """``body`` with each range's statements wrapped (see the module docstring).

    ``ranges``: (function name, the variables the range's ops set); a statement setting one of them belongs
    to the range, and so does every statement between the range's first and last (a statement setting
    variables of two ranges, a fused kernel across their cut, goes to the first). ``inputs``: ``compute``'s
    parameters."""
    used = [uses(s.code()) for s in body]
    returned = uses([f"_ = {returns}"]).reads
    out = list(body)
    spans = []
    for fname, sets in ranges:
        members = [i for i, u in enumerate(used) if sets & set(u.sets)]
        if members:
            spans.append((members[0], members[-1] + 1, fname))
    spans.sort()
    # a fused kernel joining the end of one range with the start of the next runs in the first of them
    for i in range(1, len(spans)):
        a, b, name = spans[i]
        spans[i] = (max(a, spans[i - 1][1]), b, name)
    spans = [(a, b, name) for a, b, name in spans if a < b]
    for a, b, fname in reversed(spans):  # from the last, so the earlier spans' indices stay valid
        made_before = set(inputs)
        for u in used[:a]:
            made_before |= set(u.sets)
        params: list[str] = []
        set_inside: set[str] = set()
        freed_inside: set[str] = set()
        for u in used[a:b]:
            params += [v for v in u.reads if v in made_before and v not in set_inside]
            set_inside |= set(u.sets)
            freed_inside |= set(u.frees)
        params = list(dict.fromkeys(params))
        read_after = set(returned)
        for u in used[b:]:
            read_after |= set(u.reads)
        results = [v for v in dict.fromkeys(v for u in used[a:b] for v in u.sets)
                   if v in read_after and v not in freed_inside]  # fmt: skip
        if not results:
            continue  # nothing of it is read later: nothing to keep or recompute
        local = set(params) | set_inside
        outer_free = [v for v in params if v in freed_inside]
        children = []
        for s in body[a:b]:
            lines = []
            for line in s.lines:
                if line.startswith("del "):
                    # a value made before the range whose last reader is in it, read here only through a
                    # shared collective's result: freed after the call, where it exists
                    names = [v.strip() for v in line[4:].split(",")]
                    outer_free += [v for v in names if v not in local and v in made_before]
                    names = [v for v in names if v in local]
                    if not names:
                        continue
                    line = f"del {', '.join(names)}"
                lines.append(line)
            children.append(dataclasses.replace(s, lines=tuple(lines)))
        children.append(Statement("", (f"return {', '.join(results)}",)))
        target = ", ".join(results)
        after = [
            f"{target} = torch.utils.checkpoint.checkpoint({', '.join([fname, *params])}, use_reentrant=False)"
        ]
        outer_free = list(dict.fromkeys(outer_free))
        if outer_free:
            after.append(f"del {', '.join(outer_free)}")
        comment = "recomputed in the backward (activation checkpointing keeps only its inputs)"
        nodes = tuple(n for s in body[a:b] for n in s.all_nodes())
        out[a:b] = [
            Statement(
                comment, (f"def {fname}({', '.join(params)}):",), nodes=nodes, body=tuple(children),
                after=tuple(after),
            )
        ]  # fmt: skip
    return out
