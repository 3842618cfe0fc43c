"""Ops outside ATen (custom ops of a library or of the user's model): decompose them into ATen ops where
that is exact, and say which Python modules a program must import to call the rest.

An op is decomposed, in this order, by:
1. ``KNOWN_DECOMPOSITIONS`` below: ATen formulations of custom ops that popular libraries use while
   torch.export traces (their own implementation cannot be traced: it reads tensor values into Python);
2. torch's decomposition table (``torch._decomp``);
3. its CompositeImplicitAutograd kernel (a decomposition by definition);
4. its Python implementation (``torch.library.custom_op``), when that implementation traces to ATen ops
   with symbolic shapes, unless the program is trained and the op has an autograd formula of its own
   (which a decomposition would drop).
Anything else runs whole: the generated program calls it as ``torch.ops.<namespace>.<op>``, after
importing the module that registers it (:func:`library_module`). So does an op whose decomposition torch
cannot functionalize (the frontend retries with fewer ``SOURCES``).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
from torch.export import ExportedProgram

__all__ = ["KNOWN_DECOMPOSITIONS", "SHARDWISE_OPS", "SOURCES", "custom_ops", "decomposition_table", "library_module", "is_aten"]


def _grouped_mm(input: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``transformers::grouped_mm_fallback``: rows ``offs[i-1]:offs[i]`` of ``input`` (sorted by expert)
    times ``weight[i]``; rows after ``offs[-1]`` are zero. The same product per group as transformers'
    loop; the group sizes are read from ``offs`` at run time (sizes that depend on tensor values)."""
    counts = torch.diff(offs, prepend=offs.new_zeros(1)).tolist()
    rest = input.size(0) - sum(counts)
    pieces = input.split(counts + [rest])
    outs = [piece @ weight[i] for i, piece in enumerate(pieces[:-1])]
    outs.append(input.new_zeros(rest, weight.size(2)))
    return torch.cat(outs)


# qualified op name -> ATen formulation with the op's signature
KNOWN_DECOMPOSITIONS: dict[str, Callable[..., Any]] = {
    "transformers::grouped_mm_fallback": _grouped_mm,
}


# shardwise's own ops (frontend.experts): kept whole in the graph, never decomposed (the IR knows them)
SHARDWISE_OPS = frozenset({"shardwise.moe_experts.default"})


def is_aten(op: torch._ops.OpOverload) -> bool:
    return op.namespace in ("aten", "prims")


def custom_ops(ep: ExportedProgram) -> list[torch._ops.OpOverload]:
    """The ops outside ATen that the program calls (subgraphs of higher-order ops included), in order."""
    found: dict[torch._ops.OpOverload, None] = {}
    for gm in ep.graph_module.modules():
        if not isinstance(gm, torch.fx.GraphModule):
            continue
        for n in gm.graph.nodes:
            if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) and not is_aten(n.target):
                found.setdefault(n.target, None)
    return list(found)


def _qualified(op: torch._ops.OpOverload) -> str:
    return op._schema.name  # "namespace::name"


def _example_args(ep: ExportedProgram, op: torch._ops.OpOverload) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """Real tensors shaped like the first call of ``op`` in the program (zeros), to trace with."""
    for gm in ep.graph_module.modules():
        if not isinstance(gm, torch.fx.GraphModule):
            continue
        for n in gm.graph.nodes:
            if n.op == "call_function" and n.target is op:

                def real(a: Any) -> Any:
                    if isinstance(a, torch.fx.Node):
                        v = a.meta.get("val")
                        if isinstance(v, torch.Tensor):
                            shape = [int(s) if isinstance(s, int) else int(s.node.hint or 1) for s in v.shape]
                            return torch.zeros(shape, dtype=v.dtype)
                        return v
                    if isinstance(a, list | tuple):
                        return type(a)(real(x) for x in a)
                    return a

                return tuple(real(a) for a in n.args), {k: real(v) for k, v in n.kwargs.items()}
    return None


def _traces_to_aten(fn: Callable[..., Any], example: tuple[tuple[Any, ...], dict[str, Any]] | None) -> bool:
    """Does ``fn`` trace into ATen ops without reading tensor values into Python?"""
    if example is None:
        return False
    args, kwargs = example
    try:
        gm = torch.fx.experimental.proxy_tensor.make_fx(lambda *a: fn(*a, **kwargs), tracing_mode="symbolic")(*args)
    except Exception:  # data-dependent control flow, unsupported Python: not a decomposition
        return False
    return all(
        n.op != "call_function" or not isinstance(n.target, torch._ops.OpOverload) or is_aten(n.target)
        for n in gm.graph.nodes
    )


def _implementation(op: torch._ops.OpOverload, training: bool) -> Callable[..., Any] | None:
    """The Python implementation of a ``torch.library.custom_op``; None in training when the op has an
    autograd formula of its own (decomposing would replace it with the implementation's own gradient)."""
    from torch._library.custom_ops import _maybe_get_opdef

    opdef = _maybe_get_opdef(op)
    if opdef is None or (training and getattr(opdef, "_backward_fn", None) is not None):
        return None
    return getattr(opdef, "_init_fn", None)


def _cia_kernel(op: torch._ops.OpOverload) -> Callable[..., Any]:
    """The op's CompositeImplicitAutograd kernel, called directly (``op.decompose`` would dispatch back to
    the entry export registers to keep the op, and recurse)."""

    def kernel(*args: Any, **kwargs: Any) -> Any:
        return op._op_dk(torch._C.DispatchKey.CompositeImplicitAutograd, *args, **kwargs)

    return kernel


SOURCES = ("known", "torch", "composite", "implementation")  # where a decomposition comes from, in order


def decomposition_table(
    ep: ExportedProgram, training: bool, sources: tuple[str, ...] = SOURCES
) -> dict[torch._ops.OpOverload, Callable[..., Any]]:
    """For each op outside ATen that the program calls and that has an exact ATen decomposition from one of
    ``sources`` (see the module docstring): that decomposition, for ``ExportedProgram.run_decompositions``.
    ``training``: the program will be differentiated (a custom op's own autograd formula must then be kept)."""
    from torch._decomp import decomposition_table as torch_table

    table: dict[torch._ops.OpOverload, Callable[..., Any]] = {}
    for op in custom_ops(ep):
        if op.namespace == "shardwise":
            continue
        known = KNOWN_DECOMPOSITIONS.get(_qualified(op))
        if known is not None:
            if "known" in sources:
                table[op] = known
        elif op in torch_table:
            if "torch" in sources:
                table[op] = torch_table[op]
        elif op.has_kernel_for_dispatch_key(torch._C.DispatchKey.CompositeImplicitAutograd):
            if "composite" in sources:
                table[op] = _cia_kernel(op)
        elif "implementation" in sources:
            impl = _implementation(op, training)
            if impl is not None and _traces_to_aten(impl, _example_args(ep, op)):
                table[op] = impl
    return table


def library_module(op: torch._ops.OpOverload) -> str | None:
    """The Python module that registers the custom op ``op``, for the generated program to import
    (``"__main__"`` for the user's script, which no other process can import); None when it is not known
    (e.g. an op registered from C++ or from code without a module)."""
    from torch._library.custom_ops import _maybe_get_opdef

    opdef = _maybe_get_opdef(op)
    fn = getattr(opdef, "_init_fn", None) if opdef is not None else None
    if fn is not None and getattr(fn, "__module__", None):
        return _importable(fn.__module__)
    # torch.library.Library: the dispatcher records the file that defined the op
    dump = torch._C._dispatch_dump(_qualified(op))
    line = next((x for x in dump.splitlines() if x.startswith("debug: registered at ")), "")
    path = line.removeprefix("debug: registered at ").rsplit(":", 1)[0]
    if not path or not os.path.isfile(path):
        return None
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if file and os.path.abspath(file) == os.path.abspath(path):
            return _importable(name)
    return None


def _importable(module: str) -> str | None:
    if module in ("__main__", "__mp_main__"):
        return "__main__"
    try:
        importlib.import_module(module)
    except Exception:  # any failure means the program could not import it either
        return None
    return module
