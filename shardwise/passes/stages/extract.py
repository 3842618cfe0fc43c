"""Cutting a graph into pipeline chunks: one self-contained subgraph per chunk, and the values they pass.

``extract_chunks(graph, owner)`` takes the chunk that owns each node (non-decreasing along every edge) and
builds, for every chunk, a :class:`~shardwise.ir.graph.Graph` that runs on its own:

- its **inputs** are the graph inputs it reads (in the model's order) followed by the values it receives
  from earlier chunks (in graph order);
- values an earlier chunk makes that depend on no trainable parameter (attention masks, position ids,
  rotary tables: functions of the inputs and buffers only) are **recomputed** in every chunk that reads
  them, by copying their producing nodes, instead of being sent: they are cheap, need no gradient, and
  would otherwise cross every stage boundary;
- its **outputs** are the values later chunks read, then (for the last chunk) the model's outputs; a model
  output made by an earlier chunk is passed to the last chunk, which returns all of them;
- it holds every parameter and buffer its nodes read (the first chunk also those no op reads, so that the
  chunks together hold the whole state_dict); a parameter read by several chunks (tied embeddings) is
  listed in ``tied``: each chunk keeps a copy and their gradients are summed after backward.

Requires: a verified graph; ``owner`` maps every node to a chunk in ``range(chunks)`` and never decreases
along an edge. Guarantees: every chunk graph passes ``ir.verify``; every transfer is an output of its source
chunk and an input of its destination; running the chunks in order, feeding each its transfers, computes
the same values as the whole graph.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from shardwise.errors import PlanError
from shardwise.ir.graph import Graph, GraphInput, Node, Value
from shardwise.ir.pipeline import Transfer
from shardwise.ir.tensor import TensorSpec
from shardwise.ir.verify import verify

__all__ = ["Chunks", "extract_chunks", "chunk_owner", "input_derived", "RANDOM_OPS"]

RANDOM_OPS = ("rand", "randn", "randint", "bernoulli", "normal", "uniform", "multinomial", "native_dropout")
_FLOAT = ("float", "bfloat")


@dataclass(frozen=True)
class Chunks:
    graphs: tuple[Graph, ...]
    transfers: tuple[Transfer, ...]
    tied: tuple[tuple[str, tuple[int, ...]], ...]  # (parameter key, chunks that read it), for keys read by 2+
    recomputed: tuple[tuple[int, str], ...]  # (chunk, node) copies of input-derived nodes


def _is_random(node: Node) -> bool:
    name = node.op.split(".")[1] if node.op.count(".") >= 1 else node.op
    return any(name.startswith(r) for r in RANDOM_OPS) or (
        node.op == "aten.dropout.default" and len(node.args) > 1 and node.args[1] not in (0, 0.0)
    )


def input_derived(graph: Graph) -> set[str]:
    """Nodes whose value depends on no trainable parameter and on no random op (recomputable anywhere)."""
    trainable = {p.name for p in graph.params if p.requires_grad and p.kind == "parameter"}
    ok: set[str] = set()
    for n in graph.nodes:
        if _is_random(n):
            continue
        if all(v not in trainable and (v in ok or not graph.has_node(v)) for v in n.inputs):
            ok.add(n.name)
    return ok


def _needs_grad(graph: Graph) -> set[str]:
    """Values that are floating point and depend on a trainable parameter."""
    out = {p.name for p in graph.params if p.requires_grad and p.kind == "parameter"}
    for n in graph.nodes:
        if any(v in out for v in n.inputs):
            spec = n.outputs[0] if n.outputs else None
            if n.tuple_output or (isinstance(spec, TensorSpec) and spec.dtype.startswith(_FLOAT)):
                out.add(n.name)
    return out


def extract_chunks(graph: Graph, owner: Mapping[str, int], chunks: int) -> Chunks:
    """Split ``graph`` into ``chunks`` subgraphs (see the module docstring)."""
    index = {n.name: i for i, n in enumerate(graph.nodes)}
    for n in graph.nodes:
        c = owner[n.name]
        if not 0 <= c < chunks:
            raise ValueError(f"node {n.name} is owned by chunk {c}, outside 0..{chunks - 1}")
        for v in n.inputs:
            if v in owner and owner[v] > c:
                raise ValueError(f"node {n.name} (chunk {c}) reads {v} from a later chunk {owner[v]}")
    derived = input_derived(graph)
    grad = _needs_grad(graph)
    params = {p.name: p for p in graph.params}
    inputs = {i.name: i for i in graph.inputs}
    final = list(dict.fromkeys(graph.output_names))
    last = chunks - 1

    members: list[set[str]] = [set() for _ in range(chunks)]
    for n in graph.nodes:
        members[owner[n.name]].add(n.name)
    # copy input-derived producers into each chunk that reads them (transitively)
    recomputed: list[tuple[int, str]] = []
    for c in range(chunks):
        stack = [v for name in members[c] for v in graph.node(name).inputs]
        stack += [v for v in final if c == last]
        while stack:
            v = stack.pop()
            if v in members[c] or v not in owner or owner[v] == c or v not in derived:
                continue
            members[c].add(v)
            recomputed.append((c, v))
            stack.extend(graph.node(v).inputs)
    # values received from earlier chunks
    received: list[dict[str, int]] = [{} for _ in range(chunks)]
    for c in range(chunks):
        need = [v for name in members[c] for v in graph.node(name).inputs]
        if c == last:
            need += final
        for v in need:
            if v in members[c] or v in params or v in inputs or v not in owner:
                continue
            received[c].setdefault(v, owner[v])
    sent: list[dict[str, None]] = [{} for _ in range(chunks)]
    transfers: list[Transfer] = []
    for c in range(chunks):
        for v in sorted(received[c], key=lambda v: index[v]):
            src = received[c][v]
            spec = graph.node(v).outputs[0] if graph.has_node(v) else None
            if not isinstance(spec, TensorSpec) or graph.node(v).tuple_output:
                raise PlanError(
                    f"value {v} crosses a pipeline stage boundary but is not a tensor ({spec}); "
                    "choose other stage boundaries (constraints) or pp=1"
                )
            transfers.append(Transfer(value=v, src=src, dst=c, spec=spec, grad=v in grad))
            sent[src].setdefault(v, None)
    graphs: list[Graph] = []
    readers: dict[str, set[int]] = {}
    read = {v for n in graph.nodes for v in n.inputs}
    for c in range(chunks):
        nodes = sorted(members[c], key=lambda n: index[n])
        used: dict[str, None] = {}
        for name in nodes:
            for v in graph.node(name).inputs:
                used.setdefault(v, None)
        # a parameter no op reads (dead code) is still the model's: the first chunk keeps it
        chunk_params = tuple(p for p in graph.params if p.name in used or (c == 0 and p.name not in read))
        for p in chunk_params:
            if p.requires_grad and p.kind == "parameter":
                readers.setdefault(p.key, set()).add(c)
        own_inputs = [i for i in graph.inputs if i.name in used or (c == last and i.name in final)]
        recv = sorted(received[c], key=lambda v: index[v])
        chunk_inputs = tuple(own_inputs) + tuple(
            GraphInput(name=v, spec=graph.node(v).outputs[0]) for v in recv
        )
        outs: list[str] = sorted(sent[c], key=lambda v: index[v])
        if c == last:
            outs = final
        updates = tuple(
            (key, v) for key, v in graph.buffer_updates
            if v.name in members[c] and any(p.key == key for p in chunk_params)
        )  # fmt: skip
        g = Graph(
            inputs=chunk_inputs,
            params=chunk_params,
            nodes=tuple(graph.node(n) for n in nodes),
            outputs=tuple(Value(v) for v in outs) if c < last else graph.outputs,
            buffer_updates=updates,
            model_name=f"{graph.model_name} [chunk {c}]" if graph.model_name else f"chunk {c}",
            meta_device=graph.meta_device,
            libraries=graph.libraries,
            functions=graph.functions,
        )
        graphs.append(verify(g))
    tied = tuple(sorted((k, tuple(sorted(cs))) for k, cs in readers.items() if len(cs) > 1))
    return Chunks(tuple(graphs), tuple(transfers), tied, tuple(recomputed))


def chunk_owner(units_nodes: Sequence[Sequence[str]], bounds: Sequence[tuple[int, int]]) -> dict[str, int]:
    """Node -> chunk, from the nodes of each layer unit and the [first, stop) unit range of each chunk."""
    owner: dict[str, int] = {}
    for c, (a, b) in enumerate(bounds):
        for u in range(a, b):
            for n in units_nodes[u]:
                owner[n] = c
    return owner
