"""The IR graph: frozen nodes of ATen ops over named values, parameters keyed by state_dict names.

Invariants (checked by :func:`shardwise.ir.verify.verify`):
- every value is defined exactly once (graph input, parameter, or node output) before it is used;
- nodes are in a valid execution (topological) order;
- ``Node.outputs`` holds one spec per output; ``tuple_output`` nodes are read through ``getitem`` nodes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Union

from shardwise.ir.tensor import ScalarSpec, TensorSpec, ValueSpec

__all__ = [
    "Value", "Const", "Arg", "Node", "GraphInput", "DynamicDim", "Parameter", "Function", "Graph", "iter_values",
]


@dataclass(frozen=True)
class Value:
    """A reference to a value (graph input, parameter or node output) by name."""

    name: str

    def __str__(self) -> str:
        return f"%{self.name}"


@dataclass(frozen=True)
class Const:
    """A non-numeric constant argument: a dtype, device, layout, memory format or function, by name."""

    kind: str  # "dtype" | "device" | "layout" | "memory_format" | "function" (a subgraph, Graph.functions)
    value: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.value}"


Arg = Union[None, bool, int, float, str, Value, Const, tuple["Arg", ...]]  # noqa: UP007 (recursive alias)


def iter_values(arg: Arg) -> Iterator[Value]:
    """Every Value referenced inside an argument, depth first."""
    if isinstance(arg, Value):
        yield arg
    elif isinstance(arg, tuple):
        for a in arg:
            yield from iter_values(a)


@dataclass(frozen=True)
class Node:
    """One op application. ``op`` is the registry key, e.g. ``aten.linear.default``."""

    name: str
    op: str
    args: tuple[Arg, ...]
    kwargs: tuple[tuple[str, Arg], ...]
    outputs: tuple[ValueSpec, ...]
    module_path: str = ""  # nn.Module path the op came from, e.g. "transformer.h.0.attn.c_attn"
    module_type: str = ""  # the module's class name, e.g. "Conv1D"
    source: str = ""  # "package/relative/file.py:123" of the line that made the op
    source_text: str = ""  # that line's code, stripped (written beside the op in generated programs)
    flops: int = 0
    bytes_moved: int = 0
    tuple_output: bool = False
    # run whole on every rank even if the registry could split the op: its shapes depend on tensor values
    # (``x.tolist()`` sizes), so a split worked out on the example's sizes would not hold for other inputs
    whole: bool = False
    # the op's value is the update of the buffer it reads first, which nothing else reads (a KV cache's
    # ``index_copy``): where the op reads the buffer as it is stored, the program writes into the buffer in place
    # (no new tensor; ``bytes_moved`` counts what is written) and the buffer needs no write-back; inference only
    in_place: bool = False

    def replace(self, **changes: object) -> Node:
        return dataclasses.replace(self, **changes)

    @property
    def inputs(self) -> tuple[str, ...]:
        """Names of the values this node reads, in argument order, without repeats."""
        seen: dict[str, None] = {}
        for a in self.args:
            for v in iter_values(a):
                seen.setdefault(v.name, None)
        for _, a in self.kwargs:
            for v in iter_values(a):
                seen.setdefault(v.name, None)
        return tuple(seen)

    @property
    def output(self) -> ValueSpec:
        if len(self.outputs) != 1 or self.tuple_output:
            raise ValueError(f"node {self.name} ({self.op}) has {len(self.outputs)} outputs")
        return self.outputs[0]

    @property
    def kwarg_dict(self) -> dict[str, Arg]:
        return dict(self.kwargs)


@dataclass(frozen=True)
class DynamicDim:
    """A dimension of a graph input that may change between calls (torch.export's Dim)."""

    dim: int
    name: str
    min: int
    max: int


@dataclass(frozen=True)
class GraphInput:
    name: str
    spec: ValueSpec
    dynamic: tuple[DynamicDim, ...] = ()


@dataclass(frozen=True)
class Parameter:
    """A parameter, buffer or lifted constant, keyed by its state_dict name.

    ``aliases`` lists other state_dict names bound to the same tensor (tied weights).
    ``persistent`` is False for buffers that are not in the state_dict (their value is still needed).
    ``part_of``/``part``: this tensor is ``state_dict[part_of].narrow(dim, start, stop - start)``; the parts
    of one tensor cover it exactly, and ``key`` is then ``f"{part_of}.part{i}"``.
    """

    name: str  # value name in the graph
    key: str  # state_dict name, e.g. "transformer.h.0.attn.c_attn.weight"
    spec: TensorSpec
    kind: str = "parameter"  # "parameter" | "buffer" | "constant" | "state" (kept between calls, zeros at first)
    requires_grad: bool = True
    aliases: tuple[str, ...] = ()
    persistent: bool = True
    # a slice of another state_dict tensor (a fused projection split by a rewrite pass):
    # ``part_of`` is that tensor's key and ``part`` = (dim, start, stop) the slice; "" / () otherwise
    part_of: str = ""
    part: tuple[int, ...] = ()


@dataclass(frozen=True)
class Function:
    """A subgraph of a higher-order op (``torch.cond``'s branches, ``while_loop``'s body) as a pure function:
    ``params`` are its arguments' value names, ``nodes`` its ops in order (as in a Graph, without module paths
    or costs), ``output`` what it returns (a value, or a tuple returned as a tuple). Its ops run whole: the
    higher-order op is called as eager PyTorch calls it."""

    name: str
    params: tuple[str, ...]
    nodes: tuple[Node, ...]
    output: Arg


@dataclass(frozen=True)
class Graph:
    """A traced model: inputs, parameters, nodes in execution order, and outputs."""

    inputs: tuple[GraphInput, ...]
    params: tuple[Parameter, ...]
    nodes: tuple[Node, ...]
    outputs: tuple[Arg, ...]
    buffer_updates: tuple[tuple[str, Value], ...] = ()  # (state_dict key, new value): e.g. BatchNorm statistics
    model_name: str = ""
    meta_device: bool = False  # traced from a model on the meta device: no weights exist
    # Python modules that register the custom ops the graph calls (run whole as torch.ops.<ns>.<op>): the
    # generated program imports them
    libraries: tuple[str, ...] = ()
    # the subgraphs of higher-order ops (torch.cond's branches, ...): a node names one with
    # Const("function", name); the generated program defines each as a Python function
    functions: tuple[Function, ...] = ()
    _index: dict[str, int] = field(default_factory=dict, compare=False, repr=False, hash=False)

    def replace(self, **changes: object) -> Graph:
        return dataclasses.replace(self, _index={}, **changes)

    def _node_index(self) -> dict[str, int]:
        if not self._index and self.nodes:
            self._index.update({n.name: i for i, n in enumerate(self.nodes)})
        return self._index

    def node(self, name: str) -> Node:
        try:
            return self.nodes[self._node_index()[name]]
        except KeyError:
            raise KeyError(f"no node named {name!r}") from None

    def has_node(self, name: str) -> bool:
        return name in self._node_index()

    def spec_of(self, name: str) -> ValueSpec:
        """The spec of any value: an input, a parameter, or a node's (single) output."""
        for i in self.inputs:
            if i.name == name:
                return i.spec
        for p in self.params:
            if p.name == name:
                return p.spec
        return self.node(name).output

    def param_by_key(self, key: str) -> Parameter:
        for p in self.params:
            if p.key == key or key in p.aliases:
                return p
        raise KeyError(f"no parameter with state_dict key {key!r}")

    def users(self) -> dict[str, list[str]]:
        """Value name -> names of the nodes that read it, in execution order."""
        out: dict[str, list[str]] = {}
        for n in self.nodes:
            for v in n.inputs:
                out.setdefault(v, []).append(n.name)
        return out

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(v.name for a in self.outputs for v in iter_values(a))

    @property
    def total_flops(self) -> int:
        return sum(n.flops for n in self.nodes)

    @property
    def param_bytes(self) -> int:
        return sum(p.spec.nbytes for p in self.params)

    @property
    def num_params(self) -> int:
        return sum(p.spec.numel for p in self.params if p.kind == "parameter")


def is_tensor_spec(spec: ValueSpec) -> bool:
    return isinstance(spec, TensorSpec)


def is_scalar_spec(spec: ValueSpec) -> bool:
    return isinstance(spec, ScalarSpec)
