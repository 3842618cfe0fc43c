"""torch.export (non-strict) → ATen graph → :class:`shardwise.ir.Graph`.

Guarantees: every op node carries its output specs, FLOPs, bytes moved, the nn.Module path and the
source line it came from; parameters, buffers and lifted constants are keyed by their state_dict names
(tied weights listed as aliases); ops that assert metadata are dropped (they check nothing at run time).
"""

from __future__ import annotations

import contextlib
import functools
import operator
import os
import traceback
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode, free_unbacked_symbols

from shardwise.errors import TraceError, UnsupportedOpError, UserInputError
from shardwise.frontend.custom_ops import SHARDWISE_OPS, SOURCES, decomposition_table, library_module
from shardwise.frontend.experts import experts_as_one_op
from shardwise.frontend.subgraphs import subgraph_functions
from shardwise.ir.graph import (
    Arg,
    Const,
    DynamicDim,
    Function,
    Graph,
    GraphInput,
    Node,
    Parameter,
    Value,
    iter_values,
)
from shardwise.ir.registry import (
    SCALAR_OPERATORS,
    SYM_FUNCTIONS,
    WHOLE_WHEN_RANDOM,
    op_flops,
    rule_for,
    tensor_operands,
)
from shardwise.ir.tensor import ScalarSpec, TensorSpec, ValueSpec

__all__ = ["trace", "export_program", "lower_program", "unbacked_values", "LossWrapper"]

_DROPPED = {
    "aten._assert_tensor_metadata.default",
    "aten._assert_scalar.default",
    "aten.sym_constrain_range_for_size.default",
    "aten.sym_constrain_range.default",
    "aten._assert_async.msg",
}
# tensors torch.export lifted out of a model's forward (``torch.tensor([0, 2])`` written in it), by model: the
# programs load them with the weights (model_tensors)
_LIFTED: weakref.WeakKeyDictionary[torch.nn.Module, dict[str, torch.Tensor]] = weakref.WeakKeyDictionary()


class LossWrapper(torch.nn.Module):
    """``loss_fn(model(*inputs))`` as one module, so the loss is traced (and planned) with the model."""

    def __init__(self, model: torch.nn.Module, loss_fn: Callable[[Any], torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.loss_fn(self.model(*args, **kwargs))


def export_program(
    model: torch.nn.Module,
    example_inputs: tuple[Any, ...],
    example_kwargs: dict[str, Any] | None = None,
    dynamic_shapes: Any = None,
    *,
    training: bool = False,
) -> ExportedProgram:
    """torch.export.export(strict=False), then functionalized: in-place and out= ops become functional ops
    (writes into buffers become buffer updates), higher-order ops that only set a mode (no_grad regions) are
    inlined, and ops outside ATen with an exact decomposition are decomposed (:mod:`custom_ops`; ``training``:
    the program will be differentiated); ATen ops are kept as they are."""
    applied: list[tuple[type, str]] = []
    try:
        with _recording_autograd_functions(applied if training else None), experts_as_one_op(model):
            ep = torch.export.export(
                model,
                tuple(example_inputs),
                kwargs=example_kwargs or None,
                dynamic_shapes=dynamic_shapes,
                strict=False,
            )
    except Exception as exc:  # torch raises many kinds; the user needs the cause and what to try
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TraceError(
            f"torch.export could not trace {type(model).__name__} with the example inputs: {type(exc).__name__}: "
            f"{first}\nCheck that the example inputs match the model's forward() (types, shapes, dtypes), and "
            "that data-dependent Python control flow does not depend on tensor values."
        ) from exc
    if applied:  # torch.export keeps a custom autograd.Function's forward and drops its backward
        cls, where = applied[0]
        raise UnsupportedOpError(
            f"{where}: the model applies the autograd.Function {cls.__qualname__!r}, whose own backward torch.export "
            "does not keep (training would differentiate its forward instead). Make it a "
            "torch.library.custom_op with register_autograd: shardwise then runs it whole with its backward."
        )
    _refuse_writes_into_inputs(ep)
    # decompositions made from an op's own Python code may not functionalize (in-place ops inside): such
    # ops then run whole; the first table that works wins
    tables = [decomposition_table(ep, training, SOURCES[:k]) for k in (len(SOURCES), 2, 0)]
    if not (tables[0] or _has_higher_order_ops(ep) or _has_mutations(ep)):
        return ep
    failure: Exception | None = None
    for table in dict.fromkeys(tuple(t.items()) for t in tables):
        try:
            return ep.run_decompositions(dict(table))
        except Exception as exc:  # torch raises many kinds
            failure = failure or exc
    assert failure is not None
    first = str(failure).strip().splitlines()[0] if str(failure).strip() else type(failure).__name__
    raise TraceError(
        f"torch.export traced {type(model).__name__}, but functionalizing its graph failed: "
        f"{type(failure).__name__}: {first}\nCheck the in-place ops and custom ops of the model's forward()."
    ) from failure


@contextlib.contextmanager
def _recording_autograd_functions(applied: list[tuple[type, str]] | None) -> Iterator[None]:
    """While tracing, note every ``torch.autograd.Function`` of the model (not torch's own) that defines its
    own backward, with the model's line that applies it; ``None``: note nothing."""
    if applied is None:
        yield
        return
    original = torch.autograd.Function.__dict__["apply"].__func__

    def apply(cls: type, *args: Any, **kwargs: Any) -> Any:
        own_backward = cls.backward is not torch.autograd.Function.backward or "vjp" in cls.__dict__
        if own_backward and not cls.__module__.startswith("torch."):
            frames = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename]
            where = f"{_relative_path(frames[-1].filename)}:{frames[-1].lineno}" if frames else "the model"
            applied.append((cls, where))
        return original(cls, *args, **kwargs)

    torch.autograd.Function.apply = classmethod(apply)  # type: ignore[method-assign, assignment]
    try:
        yield
    finally:
        torch.autograd.Function.apply = classmethod(original)  # type: ignore[method-assign, assignment]


def _has_mutations(ep: ExportedProgram) -> bool:
    """Does the program write into a tensor (an in-place or out= op)?"""
    return any(
        n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable
        for n in ep.graph.nodes
    )


def _refuse_writes_into_inputs(ep: ExportedProgram) -> None:
    """Raise if an op writes into a user input or a parameter (or a view of one), also inside a no_grad or
    autocast region: functionalization would turn it into a new value, but the caller's tensor (or every
    rank's piece of the parameter) would not change. Writes into buffers and intermediates are fine."""
    kinds = {s.arg.name: s for s in ep.graph_signature.input_specs if hasattr(s.arg, "name")}
    top = {n: kinds[n.name] for n in ep.graph.nodes if n.op == "placeholder" and n.name in kinds}
    _refuse_writes(ep.graph_module, top)


def _refuse_writes(gm: torch.fx.GraphModule, inputs: dict[torch.fx.Node, Any]) -> None:
    """:func:`_refuse_writes_into_inputs` over ``gm``, whose placeholders ``inputs`` maps to input specs."""
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        if isinstance(n.target, torch._ops.HigherOrderOperator):  # a region: follow the operands inside
            at = next((i for i, a in enumerate(n.args) if isinstance(a, torch.fx.Node) and a.op == "get_attr"), None)
            sub = getattr(gm, n.args[at].target, None) if at is not None else None
            if isinstance(sub, torch.fx.GraphModule):
                holders = [p for p in sub.graph.nodes if p.op == "placeholder"]
                outer = [a for a in n.args[at + 1 :] if isinstance(a, torch.fx.Node)]
                mapped = {h: inputs[_view_root(a)] for h, a in zip(holders, outer, strict=False) if _view_root(a) in inputs}
                _refuse_writes(sub, mapped)
            continue
        if not isinstance(n.target, torch._ops.OpOverload) or not n.target._schema.is_mutable:
            continue
        for arg, value in zip(n.target._schema.arguments, n.args, strict=False):
            if arg.alias_info is None or not arg.alias_info.is_write or not isinstance(value, torch.fx.Node):
                continue
            root = _view_root(value)
            spec = inputs.get(root)
            if spec is None or spec.kind not in (InputKind.USER_INPUT, InputKind.PARAMETER):
                continue
            where = _source_line(n.meta.get("stack_trace")) or "the model"
            op = _op_name(n)
            if spec.kind == InputKind.USER_INPUT:
                raise UnsupportedOpError(
                    f"{where}: op {op!r} mutates its input {spec.arg.name!r} in place; the compiled model runs on "
                    "copies of the inputs in other processes, so the caller would not see the write. Compute a "
                    "new tensor instead (x = x + y, not x += y or x.add_(y)) and return it if the caller needs it."
                )
            raise UnsupportedOpError(
                f"{where}: op {op!r} writes into the parameter {spec.target!r} in forward(); every rank holds its "
                "own piece of a parameter and the optimizer owns its updates. Update it outside forward(), or make "
                "it a buffer (register_buffer) if it is state rather than a trained weight."
            )


def _view_root(node: torch.fx.Node) -> torch.fx.Node:
    """The tensor ``node`` is a view of (itself when it is not a view)."""
    while node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) and node.args:
        returns = node.target._schema.returns
        first = node.args[0]
        if not (returns and returns[0].alias_info is not None and isinstance(first, torch.fx.Node)):
            break
        node = first
    return node


def _has_higher_order_ops(ep: ExportedProgram) -> bool:
    return any(
        n.op == "call_function" and isinstance(n.target, torch._ops.HigherOrderOperator) for n in ep.graph.nodes
    )


def _source_line(stack_trace: str | None) -> str:
    """The innermost frame outside torch as ``package/relative/path.py:LINE`` (no absolute paths)."""
    return _source(stack_trace)[0]


def _source(stack_trace: str | None) -> tuple[str, str]:
    """(``package/relative/path.py:LINE``, never absolute; the text of that line, stripped) of the innermost
    frame outside torch itself: the model's own line, not nn.Linear's forward. ("", "") without a trace."""
    if not stack_trace:
        return "", ""
    lines = stack_trace.splitlines()
    frames = [i for i, line in enumerate(lines) if line.strip().startswith('File "')]
    if not frames:
        return "", ""
    outside_torch = [i for i in frames if "/torch/" not in lines[i].strip().split('"')[1]]
    last = (outside_torch or frames)[-1]
    try:
        path = lines[last].strip().split('"')[1]
        lineno = lines[last].split("line ")[1].split(",")[0]
    except IndexError:
        return "", ""
    text = lines[last + 1].strip() if last + 1 < len(lines) and last + 1 not in frames else ""
    return f"{_relative_path(path)}:{lineno}", _printable(text)


def _printable(text: str) -> str:
    """``text`` without control characters (it is written into a comment of the generated program)."""
    return "".join(c for c in text if c.isprintable())


def _relative_path(path: str) -> str:
    """Repository-relative where the file is in a repository (a pyproject.toml, setup.py or .git above it),
    package-relative inside site-packages, else the bare file name: never absolute, never cwd-dependent."""
    for marker in ("site-packages/", "dist-packages/"):
        if marker in path:
            return path.split(marker, 1)[1]
    root = _project_root(os.path.dirname(os.path.abspath(path)))
    if root is not None:
        return os.path.relpath(path, root)
    return os.path.basename(path)


@functools.lru_cache(maxsize=256)
def _project_root(directory: str) -> str | None:
    current = directory
    while True:
        if any(os.path.exists(os.path.join(current, m)) for m in ("pyproject.toml", "setup.py", ".git")):
            return current
        parent = os.path.dirname(current)
        if parent == current:
            return None
        current = parent


def _size_hint(s: Any, values: Mapping[Any, int]) -> int:
    """The example's size: the hint of a symbolic size, or its value in this example for a size that
    depends on tensor values (``values``: unbacked symbol -> value, see :func:`unbacked_values`)."""
    if isinstance(s, int):
        return s
    expr = s.node.expr
    if free_unbacked_symbols(s):
        if expr.free_symbols <= set(values):
            return int(expr.xreplace({k: v for k, v in values.items() if k in expr.free_symbols}))
        upper = s.node.shape_env.bound_sympy(expr).upper  # a model on the meta device: its largest size
        if upper.is_finite and upper.is_number and abs(upper) < 2**62:
            return int(upper)
        raise TraceError(
            f"a size of the model ({expr}) depends on tensor values that shardwise could not observe; give "
            "the model real weights (not the meta device), or bound the value with torch._check(...)"
        )
    return int(s.node.hint) if s.node.hint is not None else int(s.node.shape_env.size_hint(expr))


def unbacked_values(ep: ExportedProgram, model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[Any, int]:
    """Sizes that depend on tensor values (``n = counts.tolist()``: unbacked symbols): their values on the
    example inputs, found by running the program once; empty when there are none or the model is on the
    meta device (its tensors have no values)."""
    symbols = [
        n for n in ep.graph.nodes if isinstance(n.meta.get("val"), torch.SymInt | torch.SymFloat | torch.SymBool)
        and free_unbacked_symbols(n.meta["val"])
    ]
    if not symbols:
        return {}
    if any(t.is_meta for t in model_tensors(model).values()):
        return balanced_values(ep)
    state = model_tensors(model)
    user = iter(pytree.tree_leaves((tuple(args), dict(kwargs or {}))))
    flat = []
    for spec in ep.graph_signature.input_specs:
        if spec.kind == InputKind.USER_INPUT:
            flat.append(next(user))
        elif spec.kind == InputKind.CONSTANT_TENSOR:
            flat.append(ep.constants[str(spec.target)])
        else:
            flat.append(state[str(spec.target)])
    seen: dict[str, Any] = {}

    class _Record(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> Any:
            out = super().run_node(n)
            seen[n.name] = out
            return out

    with torch.no_grad():
        _Record(ep.graph_module).run(*flat)
    out: dict[Any, int] = {}
    for n in symbols:
        expr = n.meta["val"].node.expr
        if len(expr.free_symbols) == 1 and expr == next(iter(expr.free_symbols)) and n.name in seen:
            out[expr] = int(seen[n.name])
    return out


def balanced_values(ep: ExportedProgram) -> dict[Any, int]:
    """Sizes that depend on tensor values, for a model on the meta device (no values to observe): a tensor
    split into pieces whose sizes are such sizes (``x.split(counts.tolist())``: tokens per expert) gets
    equal pieces, ``rows // k`` each (the first ``rows % k`` one more), and any piece whose size is
    written in terms of them (the rest) what remains: the assumption of balanced routing, which the plan
    states (``planner.assumptions``). The ops on such sizes run whole (``Node.whole``)."""
    out: dict[Any, int] = {}
    for n in ep.graph.nodes:
        if n.op != "call_function" or n.target is not torch.ops.aten.split_with_sizes.default:
            continue
        source, sizes = n.args[0], n.args[1]
        dim = n.args[2] if len(n.args) > 2 else n.kwargs.get("dim", 0)
        val = source.meta.get("val") if isinstance(source, torch.fx.Node) else None
        if not isinstance(val, torch.Tensor) or not isinstance(sizes, list | tuple):
            continue
        total = val.shape[dim]
        if not isinstance(total, int):
            continue
        free = []
        for size in sizes:
            v = size.meta.get("val") if isinstance(size, torch.fx.Node) else size
            if isinstance(v, torch.SymInt) and free_unbacked_symbols(v):
                expr = v.node.expr
                if expr.is_Symbol and expr not in out and expr not in free:
                    free.append(expr)
        for k, sym in enumerate(free):
            out[sym] = total // len(free) + (1 if k < total % len(free) else 0)
    return out


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _refuse_sparse(val: Any, name: str, info: Any, strip_prefix: str) -> None:
    """Refuse a graph input (the model's input, or a parameter, buffer or constant ``info`` describes) that is
    not a dense (strided) tensor: a plan may split any input over the ranks, which a sparse layout does not
    allow (``Sparse CSR tensors do not have strides``)."""
    if not isinstance(val, torch.Tensor) or val.layout == torch.strided:
        return
    layout = str(val.layout)
    if info is None or info.kind == InputKind.USER_INPUT:
        raise UserInputError(
            f"the model's input {name!r} is a sparse tensor ({layout}, shape {tuple(val.shape)}); shardwise "
            f"plans dense (strided) tensors only, and a plan may split an input over the ranks. Pass it dense "
            f"({name}.to_dense()), as example input and when running."
        )
    kind = {InputKind.PARAMETER: "parameter", InputKind.BUFFER: "buffer"}.get(info.kind, "constant tensor")
    key = str(info.target).removeprefix(strip_prefix)
    raise UserInputError(
        f"the model's {kind} {key!r} is a sparse tensor ({layout}, shape {tuple(val.shape)}); shardwise plans "
        f"dense (strided) tensors only. Keep it dense in the model (e.g. register {key}.to_dense())."
    )


def _spec_of(val: Any, values: Mapping[Any, int]) -> ValueSpec:
    if isinstance(val, torch.Tensor):
        return TensorSpec(tuple(_size_hint(s, values) for s in val.shape), _dtype_name(val.dtype))
    if isinstance(val, torch.SymInt | int):
        return ScalarSpec("int")
    if isinstance(val, torch.SymFloat | float):
        return ScalarSpec("float")
    if isinstance(val, torch.SymBool | bool):
        return ScalarSpec("bool")
    raise TypeError(f"unsupported value {type(val).__name__}")


def _output_specs(
    val: Any, tuple_output: bool, op: str, where: str, values: Mapping[Any, int]
) -> tuple[ValueSpec, ...]:
    """The specs of a node's outputs (``values``: see :func:`_size_hint`); an output the IR cannot hold is
    refused with the op and its line."""
    try:
        return tuple(_spec_of(v, values) for v in val) if tuple_output else (_spec_of(val, values),)
    except GuardOnDataDependentSymNode:
        raise UnsupportedOpError(
            f"{where}: op {op!r} makes a tensor whose size depends on the values of its inputs; shardwise plans "
            "static shapes. Give the result a fixed size (e.g. a mask and torch.where instead of selecting)."
        ) from None
    except TypeError as exc:  # e.g. a list of tensors inside a tuple output
        raise UnsupportedOpError(f"{where}: op {op!r} has an output shardwise cannot represent ({exc})") from None


def _convert_arg(a: Any, where: str) -> Arg:
    if isinstance(a, torch.fx.Node):
        return Value(a.name)
    if a is None or isinstance(a, bool | int | float | str):
        return a
    if isinstance(a, list | tuple | torch.fx.immutable_collections.immutable_list):
        return tuple(_convert_arg(x, where) for x in a)
    if isinstance(a, torch.dtype):
        return Const("dtype", _dtype_name(a))
    if isinstance(a, torch.device):
        return Const("device", a.type)
    if isinstance(a, torch.layout):
        return Const("layout", str(a).removeprefix("torch."))
    if isinstance(a, torch.memory_format):
        return Const("memory_format", str(a).removeprefix("torch."))
    raise UnsupportedOpError(f"{where}: an argument of type {type(a).__name__} ({a!r}) cannot be represented")


def _op_name(node: torch.fx.Node) -> str:
    target = node.target
    if target is operator.getitem:
        return "getitem"
    if isinstance(target, torch._ops.OpOverload):
        name = f"{target.namespace}.{target._schema.name.split('::')[-1]}.{target._overloadname}"
        if name in ("aten.sym_size.int",):
            return "sym_size"
        if name in ("aten.sym_numel.default",):
            return "sym_numel"
        return name
    if isinstance(target, torch._ops.HigherOrderOperator):
        return f"higher_order.{target.name()}"
    if _scalar_function(target) is not None:
        return "scalar_op"
    return str(getattr(target, "__name__", target))


def _scalar_function(target: Any) -> str | None:
    """The name of a Python function on symbolic sizes (``operator.ge``, ``math.ceil``, ``torch.sym_max``),
    or None for anything else."""
    name = getattr(target, "__name__", None)
    if name in SCALAR_OPERATORS and SCALAR_OPERATORS[name] is target:
        return name
    if name in SYM_FUNCTIONS and getattr(torch, name, None) is target:
        return name
    return None


def _module_info(node: torch.fx.Node, strip_prefix: str) -> tuple[str, str]:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", ""
    path, kind = list(stack.values())[-1]
    path = str(path)
    if path.startswith("L['self']."):
        path = path[len("L['self'].") :]
    if strip_prefix and (path == strip_prefix.rstrip(".") or path.startswith(strip_prefix)):
        path = path[len(strip_prefix) :]
    kind_name = kind.__name__ if isinstance(kind, type) else str(kind).rsplit(".", 1)[-1]
    return path, kind_name


def _draws_random(fx_node: torch.fx.Node) -> bool:
    """Does the op draw random numbers (ATen's ``nondeterministic_seeded`` tag)? Dropouts, attention and RNN
    kernels carry the tag for their dropout: they draw only with a dropout probability, in training."""
    target = fx_node.target
    if not isinstance(target, torch._ops.OpOverload) or torch.Tag.nondeterministic_seeded not in target.tags:
        return False
    schema = target._schema.arguments
    args = {a.name: a.default_value for a in schema if a.has_default_value()}
    args |= dict(zip((a.name for a in schema), fx_node.args, strict=False)) | dict(fx_node.kwargs)
    if args.get("train", args.get("training", True)) is False:
        return False
    return not any(args.get(name, None) in (0, 0.0) for name in ("p", "dropout_p", "dropout"))


def _check_random(fx_node: torch.fx.Node, op: str, where: str) -> None:
    """A random op runs whole on every rank, from the caller's generator state (CompiledModel.run): every rank
    draws what eager PyTorch draws. An op whose rule would split it (attention with dropout) is refused."""
    rule = rule_for(op)
    if rule is not None and op not in WHOLE_WHEN_RANDOM and _draws_random(fx_node):
        raise UnsupportedOpError(
            f"{where}: op {op!r} draws random numbers on pieces of its inputs; shardwise cannot make them agree "
            "with eager PyTorch. Disable it for planning (e.g. dropout_p=0 or model.eval())."
        )


def _check_supported(fx_node: torch.fx.Node, op: str, where: str) -> str | None:
    """Refuse what cannot run (with what to do); for a custom op that runs whole, the Python module the
    program imports to call it (None for anything else)."""
    target = fx_node.target
    if op in SHARDWISE_OPS:
        return None  # shardwise's own ops: generated programs call the runtime library
    if isinstance(target, torch._ops.OpOverload) and target.namespace not in ("aten", "prims"):
        module = library_module(target)
        if module is None:
            raise UnsupportedOpError(
                f"{where}: custom op {op!r} has no decomposition into ATen ops and shardwise cannot tell which "
                "Python module registers it, so the generated program could not call it. Define it in an "
                "importable module (torch.library.custom_op), or give it a CompositeImplicitAutograd kernel."
            )
        if module == "__main__":
            raise UnsupportedOpError(
                f"{where}: custom op {op!r} has no decomposition into ATen ops, so it runs whole, and it is "
                "defined in the main script, which the worker processes (and a generated package) do not import. "
                "Move its definition into a module the script imports."
            )
        return module
    if isinstance(target, torch._ops.HigherOrderOperator):
        return None  # runs whole; its subgraphs become functions of the program (see lower_program)
    if not op.startswith("aten.") and op not in ("getitem", "sym_size", "sym_numel", "scalar_op"):
        raise UnsupportedOpError(
            f"{where}: {op!r} is not an op (the traced graph calls a Python function); the generated code "
            "must run with torch alone. Write it with torch operations."
        )
    if isinstance(target, torch._ops.OpOverload) and target._schema.is_mutable:  # functionalization left it
        raise UnsupportedOpError(
            f"{where}: op {op!r} writes into a tensor in place and torch's functionalization kept it; "
            "write it out of place (y = x.op(...) instead of x.op_(...))."
        )
    return None


def lower_program(
    ep: ExportedProgram,
    model: torch.nn.Module,
    *,
    model_name: str = "",
    strip_prefix: str = "",
    meta_device: bool = False,
    values: Mapping[Any, int] | None = None,
) -> Graph:
    """Lower an ExportedProgram into a shardwise Graph (see the module docstring for the guarantees).
    ``values``: the example's value of each size that depends on tensor values (:func:`unbacked_values`)."""
    values = values or {}
    sig = ep.graph_signature
    input_kinds = {spec.arg.name: spec for spec in sig.input_specs if hasattr(spec.arg, "name")}
    aliases = _tensor_aliases(model, strip_prefix)
    specs: dict[str, ValueSpec] = {}
    inputs: list[GraphInput] = []
    params: list[Parameter] = []
    nodes: list[Node] = []
    outputs: list[Arg] = []
    buffer_updates: list[tuple[str, Value]] = []
    rename: dict[str, str] = {}  # placeholder of a tied weight's second name -> the parameter's value
    libraries: dict[str, None] = {}  # modules registering the custom ops that run whole
    functions: dict[str, Function] = {}  # the subgraphs of higher-order ops, by name
    for fx_node in ep.graph.nodes:
        if fx_node.op == "placeholder":
            info = input_kinds.get(fx_node.name)
            _refuse_sparse(fx_node.meta["val"], fx_node.name, info, strip_prefix)
            spec = _spec_of(fx_node.meta["val"], values)
            specs[fx_node.name] = spec
            if info is None or info.kind == InputKind.USER_INPUT:
                inputs.append(GraphInput(fx_node.name, spec, _dynamic_dims(fx_node.meta["val"])))
                continue
            assert isinstance(spec, TensorSpec)
            key = str(info.target).removeprefix(strip_prefix)
            tied = next((p for p in params if p.key in aliases.get(key, ())), None)
            if tied is not None:  # tied weights are lifted once per name: keep one parameter, read by both uses
                rename[fx_node.name] = tied.name
                continue
            kind = {InputKind.PARAMETER: "parameter", InputKind.BUFFER: "buffer"}.get(info.kind, "constant")
            params.append(
                Parameter(
                    name=fx_node.name,
                    key=key,
                    spec=spec,
                    kind=kind,
                    requires_grad=kind == "parameter",
                    aliases=tuple(a for a in aliases.get(key, ()) if a != key),
                    persistent=bool(info.persistent) if kind == "buffer" else kind == "parameter",
                )
            )
        elif fx_node.op == "call_function":
            op = _op_name(fx_node)
            if op in _DROPPED:
                continue
            module_path, module_type = _module_info(fx_node, strip_prefix)
            source, source_text = _source(fx_node.meta.get("stack_trace"))
            where = f"{source or 'unknown line'} (module {module_path or '<root>'})"
            _check_random(fx_node, op, where)
            library = _check_supported(fx_node, op, where)
            if library is not None:
                libraries.setdefault(library, None)
            args = tuple(_convert_arg(a, where) for a in fx_node.args)
            kwargs = tuple((k, _convert_arg(v, where)) for k, v in fx_node.kwargs.items())
            if isinstance(fx_node.target, torch._ops.HigherOrderOperator):  # subgraphs: functions of the program
                args = tuple(_subgraph_arg(a, fx_node, ep.graph_module, functions, where, values) for a in args)
            if op == "scalar_op":
                args = (fx_node.target.__name__,) + args  # type: ignore[union-attr]
            val = fx_node.meta.get("val")
            tuple_output = isinstance(val, list | tuple)
            outs = _output_specs(val, tuple_output, op, where, values)
            node = Node(
                name=fx_node.name,
                op=op,
                args=args,
                kwargs=kwargs,
                outputs=outs,
                module_path=module_path,
                module_type=module_type,
                source=source,
                source_text=source_text,
                tuple_output=tuple_output,
                whole=op != "getitem" and _value_dependent_shapes(fx_node),
            )
            in_specs = [specs[n] for n in tensor_operands(node) if n in specs]
            flops = op_flops(node, in_specs) if op not in ("getitem", "sym_size", "scalar_op") else 0
            rule = rule_for(op)
            moves = rule is None or rule.moves_data
            nbytes = (sum(s.nbytes for s in in_specs) + sum(o.nbytes for o in outs)) if moves else 0
            node = node.replace(flops=flops, bytes_moved=nbytes)
            nodes.append(node)
            if tuple_output:
                specs[fx_node.name] = ScalarSpec("tuple")
            else:
                specs[fx_node.name] = outs[0]
        elif fx_node.op == "output":
            flat = fx_node.args[0]
            for out_spec, arg in zip(sig.output_specs, flat, strict=True):
                if out_spec.kind == OutputKind.USER_OUTPUT:
                    outputs.append(_convert_arg(arg, "output"))
                elif out_spec.kind == OutputKind.BUFFER_MUTATION:
                    buffer_updates.append((str(out_spec.target).removeprefix(strip_prefix), Value(arg.name)))
                else:
                    raise UnsupportedOpError(_mutation_message(ep, out_spec, arg, strip_prefix))
    if rename:
        nodes = [n.replace(args=_renamed(n.args, rename), kwargs=_renamed(n.kwargs, rename)) for n in nodes]
        outputs = [_renamed(o, rename) for o in outputs]
    nodes = _without_unused_scalars(nodes, outputs, buffer_updates)
    return Graph(
        inputs=tuple(inputs),
        params=tuple(params),
        nodes=tuple(nodes),
        outputs=tuple(outputs),
        buffer_updates=tuple(buffer_updates),
        model_name=model_name,
        meta_device=meta_device,
        libraries=tuple(libraries),
        functions=tuple(functions.values()),
    )


def _mutation_message(ep: ExportedProgram, out_spec: Any, arg: Any, strip_prefix: str) -> str:
    """Why a program that writes into one of its inputs or parameters cannot be planned, and what to do."""
    target = str(out_spec.target).removeprefix(strip_prefix) if out_spec.target else "?"
    writer = arg if isinstance(arg, torch.fx.Node) else None
    source = _source_line(writer.meta.get("stack_trace")) if writer is not None else ""
    where = source or "the model"
    if out_spec.kind == OutputKind.USER_INPUT_MUTATION:
        return (
            f"{where}: the model writes into its input {target!r} in place; the compiled model runs on copies of "
            "the inputs in other processes, so the caller would not see the write. Compute a new tensor instead "
            "(x = x + y, not x += y or x.add_(y)) and return it if the caller needs it."
        )
    if out_spec.kind == OutputKind.PARAMETER_MUTATION:
        return (
            f"{where}: the model writes into its parameter {target!r} in forward(); every rank holds its own "
            "piece of a parameter and the optimizer owns its updates. Update it outside forward(), or make it "
            "a buffer (register_buffer) if it is state rather than a trained weight."
        )
    return f"{where}: the model's graph has an output of kind {out_spec.kind.name}, which shardwise cannot run"


def _subgraph_arg(
    a: Arg, fx_node: torch.fx.Node, root: torch.fx.GraphModule, functions: dict[str, Function], where: str,
    values: Mapping[Any, int],
) -> Arg:  # fmt: skip
    """A higher-order op's argument, with each subgraph it names replaced by the function made of it."""
    if isinstance(a, tuple):
        return tuple(_subgraph_arg(x, fx_node, root, functions, where, values) for x in a)
    if not isinstance(a, Value):
        return a
    source = next((n for n in fx_node.all_input_nodes if n.name == a.name), None)
    if source is None or source.op != "get_attr":
        return a
    name = f"subgraph_{source.target}"

    def specs(val: Any) -> tuple[ValueSpec, ...]:
        return tuple(_spec_of(v, values) for v in val) if isinstance(val, list | tuple) else (_spec_of(val, values),)

    try:
        for fn in subgraph_functions(root, str(source.target), name, _op_name, _convert_arg, specs):
            functions.setdefault(fn.name, fn)
    except UnsupportedOpError as exc:
        raise UnsupportedOpError(f"{where}: {fx_node.target.name()}: {exc}") from None
    return Const("function", name)


def _value_dependent_shapes(fx_node: torch.fx.Node) -> bool:
    """Does a tensor this node reads or makes have a size that depends on tensor values (an unbacked
    symbol, e.g. from ``sizes.tolist()``)?"""
    vals = [fx_node.meta.get("val")] + [a.meta.get("val") for a in fx_node.all_input_nodes]
    return any(
        isinstance(t, torch.Tensor) and free_unbacked_symbols(t)
        for v in vals
        for t in (v if isinstance(v, list | tuple) else (v,))
    )


def _without_unused_scalars(nodes: list[Node], outputs: list[Arg], buffer_updates: list[tuple[str, Value]]) -> list[Node]:
    """``nodes`` without the size arithmetic nobody reads (the comparisons that fed the dropped run-time
    assertions, ``u0 >= 0``); other nodes are kept even when unused."""
    pure = ("scalar_op", "sym_size", "sym_numel")
    while True:
        read = {v.name for o in outputs for v in iter_values(o)} | {v.name for _, v in buffer_updates}
        for n in nodes:
            read.update(n.inputs)
        kept = [n for n in nodes if n.op not in pure or n.name in read]
        if len(kept) == len(nodes):
            return nodes
        nodes = kept


def _renamed(arg: Any, rename: dict[str, str]) -> Any:
    """``arg`` with every Value named in ``rename`` replaced."""
    if isinstance(arg, Value):
        return Value(rename[arg.name]) if arg.name in rename else arg
    if isinstance(arg, tuple):
        return tuple(_renamed(a, rename) for a in arg)
    return arg


def _dynamic_dims(val: Any) -> tuple[DynamicDim, ...]:
    if not isinstance(val, torch.Tensor):
        return ()
    out = []
    for i, s in enumerate(val.shape):
        if isinstance(s, torch.SymInt) and not isinstance(s.node.expr, int) and s.node.expr.free_symbols:
            shape_env = s.node.shape_env
            expr = s.node.expr
            rng = shape_env.var_to_range.get(expr) if hasattr(shape_env, "var_to_range") else None
            lo = int(rng.lower) if rng is not None else 0
            hi_raw = rng.upper if rng is not None else None
            try:
                hi = int(hi_raw) if hi_raw is not None else 2**31 - 1
            except (TypeError, ValueError, OverflowError, AttributeError):  # sympy's oo (an unbounded Dim.AUTO)
                hi = 2**31 - 1
            out.append(DynamicDim(i, str(expr), lo, min(hi, 2**31 - 1)))
    return tuple(out)


def _tensor_aliases(model: torch.nn.Module, strip_prefix: str) -> dict[str, tuple[str, ...]]:
    """state_dict key -> every key bound to the same tensor (tied weights)."""
    by_id: dict[int, list[str]] = {}
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(
        model.named_buffers(remove_duplicate=False)
    ):
        by_id.setdefault(id(t), []).append(name.removeprefix(strip_prefix))
    out: dict[str, tuple[str, ...]] = {}
    for names in by_id.values():
        for n in names:
            out[n] = tuple(names)
    return out


def trace(
    model: torch.nn.Module,
    example_inputs: Sequence[Any],
    *,
    example_kwargs: dict[str, Any] | None = None,
    dynamic_shapes: Any = None,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    model_name: str | None = None,
    prefix: str = "",
) -> tuple[Graph, Any]:
    """Trace ``model`` (or ``loss_fn(model(...))`` when a loss is given) into a Graph.

    ``prefix``: ``model`` wraps the user's model under this attribute path (``"model."``, e.g.
    ``frontend.generation.StepModule``): it is stripped from the keys and module paths, so that the weights
    keep the user's model's state_dict names.

    Returns the graph and the output TreeSpec, to give results the structure of the model's own output.
    """
    if not isinstance(model, torch.nn.Module):
        raise TraceError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(example_inputs, tuple | list):
        raise TraceError("example_inputs must be a tuple of the model's positional inputs, e.g. (input_ids,)")
    meta = any(p.is_meta for p in model.parameters())
    target: torch.nn.Module = model
    if loss_fn is not None:
        if prefix:
            raise TraceError("a wrapped model (prefix=...) is traced without a loss")
        target = LossWrapper(model, loss_fn)
        prefix = "model."
        if dynamic_shapes is not None and isinstance(dynamic_shapes, dict):
            dynamic_shapes = {"args": tuple(dynamic_shapes.values())}
    ep = export_program(target, tuple(example_inputs), example_kwargs, dynamic_shapes, training=loss_fn is not None)
    _LIFTED[model] = {
        str(s.target).removeprefix(prefix): ep.constants[s.target].detach()
        for s in ep.graph_signature.input_specs
        if s.kind == InputKind.CONSTANT_TENSOR and isinstance(ep.constants.get(s.target), torch.Tensor)
    }
    values = unbacked_values(ep, target, tuple(example_inputs), example_kwargs or {})
    graph = lower_program(
        ep, target, model_name=model_name or type(model).__name__, strip_prefix=prefix, meta_device=meta,
        values=values,
    )  # fmt: skip
    return graph, ep.call_spec.out_spec


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by state_dict name, non-persistent buffers included (the programs need
    them: e.g. rotary frequencies), tied weights under each of their names, and the constants torch.export
    lifted out of the model's forward when it was last traced (``lifted_tensor_0``, ...)."""
    out: dict[str, torch.Tensor] = dict(_LIFTED.get(model, {}))
    for name, t in model.named_parameters(remove_duplicate=False):
        out[name] = t.detach()
    for name, t in model.named_buffers(remove_duplicate=False):
        out[name] = t.detach()
    return out
