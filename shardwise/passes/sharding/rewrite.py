"""Graph rewrites that expose tensor-parallel structure to the sharding ILP.

Two patterns hide Megatron's split from dimension annotations:

- ``view(x, [-1, k]) -> addmm(bias, ., W) -> view(., [..., n])`` (HF's Conv1D, GPT-2): merging batch and
  sequence into one dimension makes the sequence dimension unsplittable. :func:`conv1d_as_matmul` turns the
  three ops into ``matmul(x, W) + bias`` on the un-merged tensor (same values, same FLOPs).
- a fused projection (QKV in one weight) whose output is ``split`` into equal parts: a contiguous split of
  the fused output dimension gives each rank whole Q and half of K, which the ``split`` cannot use.
  :func:`unfuse_projections` makes one projection per part, over parameter *parts* (``Parameter.part_of``),
  so each part is column-parallel on its own; the loader slices the parts out of the original tensor and
  ``full_state_dict`` puts them back together. The fused gate and up projections of a mixture of experts'
  experts op are cut the same way (:func:`experts_in_parts`).

Two more make a loss split like its tokens (:func:`split_losses`): a mean cross entropy becomes a sum over a
count (:func:`mean_losses_as_sums`), and a cross entropy of logits flattened from ``(batch, sequence, ...,
classes)`` into rows reads them unflattened instead (:func:`unflattened_losses`), so that a split of the
sequence (context parallelism) reaches the loss rather than ending at the flatten.

Requires: a verified graph. Guarantees: a verified graph computing the same outputs; every node that is
not rewritten keeps its name, and every value read by a node outside a rewritten pattern keeps its name.
"""

from __future__ import annotations

import math

from shardwise.ir.graph import Graph, Node, Parameter, Value
from shardwise.ir.registry import MOE_EXPERTS, op_flops, rule_for, tensor_operands
from shardwise.ir.tensor import TensorSpec

__all__ = [
    "conv1d_as_matmul", "unfuse_projections", "experts_in_parts", "mean_losses_as_sums", "expose_tensor_parallelism",
    "unflattened_losses", "split_losses",
]

_VIEWS = ("aten.view.default", "aten.reshape.default", "aten._unsafe_view.default")
_SPLITS = ("aten.split.Tensor", "aten.split_with_sizes.default")


def _specs(graph: Graph) -> dict[str, TensorSpec]:
    out: dict[str, TensorSpec] = {}
    for i in graph.inputs:
        if isinstance(i.spec, TensorSpec):
            out[i.name] = i.spec
    for p in graph.params:
        out[p.name] = p.spec
    for n in graph.nodes:
        if not n.tuple_output and isinstance(n.outputs[0], TensorSpec):
            out[n.name] = n.outputs[0]
    return out


def _costed(node: Node, specs: dict[str, TensorSpec]) -> Node:
    """``node`` with FLOPs and bytes recomputed from its operands (as the frontend does)."""
    ins = [specs[n] for n in tensor_operands(node) if n in specs]
    rule = rule_for(node.op)
    outs = [o for o in node.outputs if isinstance(o, TensorSpec)]
    moves = rule is None or rule.moves_data
    nbytes = (sum(s.nbytes for s in ins) + sum(o.nbytes for o in outs)) if moves else 0
    return node.replace(flops=op_flops(node, ins), bytes_moved=nbytes)


def _fresh(base: str, taken: set[str]) -> str:
    name, k = base, 1
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    taken.add(name)
    return name


def conv1d_as_matmul(graph: Graph) -> Graph:
    """``view -> addmm -> view`` (a Linear on flattened tokens) becomes ``matmul + add`` on the tokens."""
    users = graph.users()
    specs = _specs(graph)
    replace: dict[str, list[Node]] = {}
    drop: set[str] = set()
    for node in graph.nodes:
        if node.op != "aten.addmm.default" or node.kwargs or len(node.args) != 3:
            continue
        bias, flat, weight = node.args
        if not all(isinstance(a, Value) for a in (bias, flat, weight)):
            continue
        assert isinstance(bias, Value) and isinstance(flat, Value) and isinstance(weight, Value)
        if not graph.has_node(flat.name) or users.get(flat.name) != [node.name]:
            continue
        view_in = graph.node(flat.name)
        if view_in.op not in _VIEWS or not isinstance(view_in.args[0], Value):
            continue
        x = view_in.args[0].name
        x_spec, w_spec, b_spec = specs.get(x), specs.get(weight.name), specs.get(bias.name)
        out_users = users.get(node.name, [])
        if x_spec is None or w_spec is None or b_spec is None or x_spec.rank < 3 or len(out_users) != 1:
            continue
        view_out = graph.node(out_users[0])
        if view_out.op not in _VIEWS or b_spec.rank != 1 or w_spec.rank != 2:
            continue
        want = x_spec.shape[:-1] + (w_spec.shape[1],)
        if not isinstance(view_out.outputs[0], TensorSpec) or view_out.outputs[0].shape != want:
            continue
        if math.prod(x_spec.shape[:-1]) != specs[flat.name].shape[0]:
            continue
        out_spec = TensorSpec(want, view_out.outputs[0].dtype)
        mm = node.replace(op="aten.matmul.default", args=(Value(x), weight), outputs=(out_spec,))
        specs[mm.name] = out_spec
        add = view_out.replace(op="aten.add.Tensor", args=(Value(mm.name), bias), kwargs=())
        replace[node.name] = [_costed(mm, specs)]
        replace[view_out.name] = [_costed(add, specs)]
        drop.add(view_in.name)
    if not replace:
        return graph
    nodes: list[Node] = []
    for n in graph.nodes:
        if n.name in drop:
            continue
        nodes.extend(replace.get(n.name, [n]))
    return graph.replace(nodes=tuple(nodes))


def _split_parts(node: Node, spec: TensorSpec) -> tuple[int, list[tuple[int, int]]] | None:
    """(dim, [(start, stop), ...]) of a split along the last dimension into equal parts, else None."""
    rank = spec.rank
    if node.op == "aten.split.Tensor":
        size = node.args[1] if len(node.args) > 1 else node.kwarg_dict.get("split_size")
        dim = node.args[2] if len(node.args) > 2 else node.kwarg_dict.get("dim", 0)
        if not isinstance(size, int) or not isinstance(dim, int):
            return None
        sizes = [size] * (spec.shape[dim % rank] // size) if size > 0 else []
    else:
        sizes_arg = node.args[1] if len(node.args) > 1 else node.kwarg_dict.get("split_sizes")
        dim = node.args[2] if len(node.args) > 2 else node.kwarg_dict.get("dim", 0)
        if not isinstance(sizes_arg, tuple) or not all(isinstance(s, int) for s in sizes_arg):
            return None
        if not isinstance(dim, int):
            return None
        sizes = list(sizes_arg)  # type: ignore[arg-type]
    dim %= rank
    if dim != rank - 1 or len(sizes) < 2 or sum(sizes) != spec.shape[dim] or len(set(sizes)) != 1:
        return None
    bounds, start = [], 0
    for s in sizes:
        bounds.append((start, start + s))
        start += s
    return dim, bounds


def unfuse_projections(graph: Graph) -> Graph:
    """Split a fused projection whose output is split into equal parts into one projection per part."""
    users = graph.users()
    specs = _specs(graph)
    params = {p.name: p for p in graph.params}
    taken = {n.name for n in graph.nodes} | set(params) | {i.name for i in graph.inputs}
    replace: dict[str, list[Node]] = {}
    drop: set[str] = set()
    new_params: dict[str, list[Parameter]] = {}
    for split in graph.nodes:
        if split.op not in _SPLITS or not isinstance(split.args[0], Value):
            continue
        fused = split.args[0].name
        if not graph.has_node(fused) or users.get(fused) != [split.name]:
            continue
        parts = _split_parts(split, specs[fused])
        getitems = [graph.node(u) for u in users.get(split.name, [])]
        if parts is None or len(getitems) != len(parts[1]) or any(g.op != "getitem" for g in getitems):
            continue
        if sorted(int(g.args[1]) for g in getitems) != list(range(len(parts[1]))):  # type: ignore[arg-type]
            continue
        chain = _projection(graph, fused, users, params)
        if chain is None:
            continue
        proj, weight, wdim, bias, add = chain
        if any(p.aliases or p.part_of for p in (weight, bias) if p is not None):
            continue
        _, bounds = parts
        by_index = {int(g.args[1]): g for g in getitems}  # type: ignore[arg-type]
        out_nodes: list[Node] = []
        made: list[Parameter] = []
        for j, (start, stop) in enumerate(bounds):
            w_shape = list(weight.spec.shape)
            w_shape[wdim] = stop - start
            w_j = Parameter(
                name=_fresh(f"{weight.name}_part{j}", taken), key=f"{weight.key}.part{j}",
                spec=TensorSpec(tuple(w_shape), weight.spec.dtype), kind=weight.kind,
                requires_grad=weight.requires_grad, persistent=weight.persistent, part_of=weight.key,
                part=(wdim, start, stop),
            )  # fmt: skip
            made.append(w_j)
            specs[w_j.name] = w_j.spec
            b_j = None
            if bias is not None:
                b_j = Parameter(
                    name=_fresh(f"{bias.name}_part{j}", taken), key=f"{bias.key}.part{j}",
                    spec=TensorSpec((stop - start,), bias.spec.dtype), kind=bias.kind,
                    requires_grad=bias.requires_grad, persistent=bias.persistent, part_of=bias.key,
                    part=(0, start, stop),
                )  # fmt: skip
                made.append(b_j)
                specs[b_j.name] = b_j.spec
            target = by_index[j].name
            out_shape = specs[fused].shape[:-1] + (stop - start,)
            out_spec = TensorSpec(out_shape, specs[fused].dtype)
            args = list(proj.args)
            args[1] = Value(w_j.name)
            if proj.op == "aten.linear.default" and b_j is not None:
                args[2] = Value(b_j.name)
            p_name = target if add is None else _fresh(f"{proj.name}_part{j}", taken)
            p_node = proj.replace(name=p_name, args=tuple(args), outputs=(out_spec,))
            specs[p_name] = out_spec
            out_nodes.append(_costed(p_node, specs))
            if add is not None:
                assert b_j is not None
                a_node = add.replace(name=target, args=(Value(p_name), Value(b_j.name)), outputs=(out_spec,))
                specs[target] = out_spec
                out_nodes.append(_costed(a_node, specs))
        anchor = add.name if add is not None else proj.name
        replace[anchor] = out_nodes
        drop.update({proj.name, split.name} | {g.name for g in getitems})
        drop.discard(anchor)
        new_params[weight.name] = made
        if bias is not None:
            new_params[bias.name] = []
    if not replace:
        return graph
    nodes: list[Node] = []
    for n in graph.nodes:
        if n.name in replace:
            nodes.extend(replace[n.name])
        elif n.name not in drop:
            nodes.append(n)
    out_params: list[Parameter] = []
    for p in graph.params:
        out_params.extend(new_params.get(p.name, [p]))
    return graph.replace(nodes=tuple(nodes), params=tuple(out_params))


def _projection(
    graph: Graph, fused: str, users: dict[str, list[str]], params: dict[str, Parameter]
) -> tuple[Node, Parameter, int, Parameter | None, Node | None] | None:
    """The projection making ``fused``: (projection node, weight, weight's output dim, bias, bias add)."""
    node = graph.node(fused)

    def sole_param(v: object, reader: str) -> Parameter | None:
        if not isinstance(v, Value) or v.name not in params or users.get(v.name) != [reader]:
            return None
        return params[v.name]

    if node.op == "aten.linear.default" and not node.kwargs:
        weight = sole_param(node.args[1], node.name)
        bias = (
            sole_param(node.args[2], node.name) if len(node.args) > 2 and node.args[2] is not None else None
        )
        has_bias = len(node.args) > 2 and node.args[2] is not None
        if weight is None or weight.spec.rank != 2 or (has_bias and bias is None):
            return None
        return node, weight, 0, bias, None
    if node.op == "aten.add.Tensor" and len(node.args) == 2 and isinstance(node.args[0], Value):
        mm_name = node.args[0].name
        if not graph.has_node(mm_name) or users.get(mm_name) != [node.name]:
            return None
        mm = graph.node(mm_name)
        bias = sole_param(node.args[1], node.name)
        if mm.op != "aten.matmul.default" or bias is None or bias.spec.rank != 1:
            return None
        weight = sole_param(mm.args[1], mm.name)
        if weight is None or weight.spec.rank != 2:
            return None
        return mm, weight, 1, bias, node
    return None


def mean_losses_as_sums(graph: Graph) -> Graph:
    """``cross_entropy(x, t)`` with reduction "mean" (no class weight, no smoothing) becomes
    ``cross_entropy(x, t, reduction="sum") / count(t != ignore_index)``: the same value, and both parts are
    sums that split over the batch (each rank's part is a partial sum; the mean of per-rank means would
    be wrong whenever ranks hold different numbers of ignored targets)."""
    specs = _specs(graph)
    taken = {n.name for n in graph.nodes} | {p.name for p in graph.params} | {i.name for i in graph.inputs}
    replace: dict[str, list[Node]] = {}
    for node in graph.nodes:
        if node.op != "aten.cross_entropy_loss.default" or len(node.args) < 2:
            continue
        args = dict(enumerate(node.args))
        kw = node.kwarg_dict
        weight = args.get(2, kw.get("weight"))
        reduction = args.get(3, kw.get("reduction", 1))
        ignore = args.get(4, kw.get("ignore_index", -100))
        smoothing = args.get(5, kw.get("label_smoothing", 0.0))
        target = node.args[1]
        if weight is not None or reduction != 1 or smoothing not in (0, 0.0) or not isinstance(target, Value):
            continue
        if not isinstance(ignore, int) or not isinstance(node.outputs[0], TensorSpec):
            continue
        t_spec = specs[target.name]
        out = node.outputs[0]
        total = node.replace(
            name=_fresh(f"{node.name}_sum", taken), args=(node.args[0], target, None, 2, ignore), kwargs=()
        )
        kept = node.replace(
            name=_fresh(f"{node.name}_kept", taken), op="aten.ne.Scalar", args=(target, ignore), kwargs=(),
            outputs=(TensorSpec(t_spec.shape, "bool"),),
        )  # fmt: skip
        count = node.replace(
            name=_fresh(f"{node.name}_count", taken), op="aten.sum.default", args=(Value(kept.name),), kwargs=(),
            outputs=(TensorSpec((), "int64"),),
        )  # fmt: skip
        for n in (total, kept, count):
            specs[n.name] = n.outputs[0]  # type: ignore[assignment]
        mean = node.replace(
            op="aten.div.Tensor", args=(Value(total.name), Value(count.name)), kwargs=(), outputs=(out,)
        )
        replace[node.name] = [_costed(n, specs) for n in (total, kept, count, mean)]
    if not replace:
        return graph
    nodes: list[Node] = []
    for n in graph.nodes:
        nodes.extend(replace.get(n.name, [n]))
    return graph.replace(nodes=tuple(nodes))


def _flattened_from(graph: Graph, value: object, rows: int, specs: dict[str, TensorSpec]) -> str | None:
    """The value a reshape merged into ``rows`` leading rows (its last dimension kept) to make ``value``, if it
    did; else None."""
    if not isinstance(value, Value) or not graph.has_node(value.name):
        return None
    view = graph.node(value.name)
    if view.op not in _VIEWS or not view.args or not isinstance(view.args[0], Value):
        return None
    src, out = specs.get(view.args[0].name), specs.get(view.name)
    if src is None or out is None or src.rank < 3 or out.rank != 2:
        return None
    if out.shape != (rows, src.shape[-1]) or math.prod(src.shape[:-1]) != rows:
        return None
    return view.args[0].name


def unflattened_losses(graph: Graph) -> Graph:
    """``cross_entropy(x.view(-1, C), t, reduction="sum")``, ``x`` of shape ``(b, s, ..., C)`` and ``t`` of
    ``b * s * ...`` rows, becomes ``cross_entropy(x.permute(0, -1, 1, ...), t.view(b, s, ...), reduction="sum")``
    (PyTorch's K-dimensional form, the classes in dimension 1): the same sum over the same (logit row, target)
    pairs, whose every dimension but the classes may be split. A split of the flattened rows can follow the batch
    only (the sequence is merged inside the rows), so the sequence split of context parallelism would have to
    gather the whole logits there first; unflattened, the loss keeps the logits split over the sequence and sums
    its partial results. The flatten is dropped where nothing else reads it. Applies to static shapes only
    (the new view's sizes are the traced ones); a "sum" reduction only (``mean_losses_as_sums`` makes one).

    Requires: a verified graph. Guarantees: a verified graph computing the same outputs."""
    if any(i.dynamic for i in graph.inputs):
        return graph
    specs = _specs(graph)
    users = graph.users()
    taken = {n.name for n in graph.nodes} | {p.name for p in graph.params} | {i.name for i in graph.inputs}
    outputs = set(graph.output_names)
    replace: dict[str, list[Node]] = {}
    drop: set[str] = set()
    for node in graph.nodes:
        if node.op != "aten.cross_entropy_loss.default" or node.kwargs or len(node.args) != 5:
            continue
        x, target, weight, reduction, ignore = node.args
        x_spec = specs.get(x.name) if isinstance(x, Value) else None
        t_spec = specs.get(target.name) if isinstance(target, Value) else None
        if weight is not None or reduction != 2 or x_spec is None or t_spec is None or x_spec.rank != 2:
            continue
        rows = x_spec.shape[0]
        source = _flattened_from(graph, x, rows, specs)
        if source is None or t_spec.shape != (rows,):
            continue
        src = specs[source]
        lead = src.shape[:-1]
        order = (0, src.rank - 1, *range(1, src.rank - 1))
        moved = TensorSpec(tuple(src.shape[i] for i in order), src.dtype)
        permute = node.replace(
            name=_fresh(f"{node.name}_classes", taken), op="aten.permute.default", args=(Value(source), order),
            outputs=(moved,), flops=0, bytes_moved=0,
        )  # fmt: skip
        t_rows = node.replace(
            name=_fresh(f"{node.name}_targets", taken), op="aten.view.default", args=(target, lead),
            outputs=(TensorSpec(lead, t_spec.dtype),), flops=0, bytes_moved=0,
        )  # fmt: skip
        specs[permute.name], specs[t_rows.name] = moved, t_rows.outputs[0]  # type: ignore[assignment]
        loss = node.replace(args=(Value(permute.name), Value(t_rows.name), None, 2, ignore))
        replace[node.name] = [permute, t_rows, _costed(loss, specs)]
        assert isinstance(x, Value)
        if users.get(x.name) == [node.name] and x.name not in outputs:
            drop.add(x.name)
    if not replace:
        return graph
    nodes = [m for n in graph.nodes if n.name not in drop for m in replace.get(n.name, [n])]
    return graph.replace(nodes=tuple(nodes))


def split_losses(graph: Graph) -> Graph:
    """The loss rewrites for a graph run on several ranks, in order: :func:`mean_losses_as_sums`, then
    :func:`unflattened_losses`."""
    return unflattened_losses(mean_losses_as_sums(graph))


def experts_in_parts(graph: Graph) -> Graph:
    """Every experts op (``shardwise.moe_experts``) whose fused gate and up projections (``gate_up``: experts x
    2 intermediate x hidden, gate first) are a parameter of their own, read by it alone, reads them as two
    parameter parts instead, ``gate`` and ``up`` (experts x intermediate x hidden each): a split of the
    intermediate dimension then gives each rank matching halves of both (tensor parallelism inside each
    expert), which a contiguous split of the fused dimension would not."""
    params = {p.name: p for p in graph.params}
    taken = {n.name for n in graph.nodes} | set(params) | {i.name for i in graph.inputs}
    readers: dict[str, int] = {}
    for n in graph.nodes:
        for v in n.inputs:
            readers[v] = readers.get(v, 0) + 1
    specs = _specs(graph)
    new_params: dict[str, list[Parameter]] = {}
    nodes: list[Node] = []
    for n in graph.nodes:
        fused = n.args[3] if n.op == MOE_EXPERTS and len(n.args) == 6 else None
        p = params.get(fused.name) if isinstance(fused, Value) else None
        if p is None or p.aliases or p.part_of or readers.get(p.name) != 1 or p.spec.shape[1] % 2:
            nodes.append(n)
            continue
        e, two_f, h = p.spec.shape
        parts = []
        for j, (start, stop) in enumerate(((0, two_f // 2), (two_f // 2, two_f))):
            part = Parameter(
                name=_fresh(f"{p.name}_part{j}", taken), key=f"{p.key}.part{j}",
                spec=TensorSpec((e, stop - start, h), p.spec.dtype), kind=p.kind, requires_grad=p.requires_grad,
                persistent=p.persistent, part_of=p.key, part=(1, start, stop),
            )  # fmt: skip
            parts.append(part)
            specs[part.name] = part.spec
        new_params[p.name] = parts
        args = (*n.args[:3], Value(parts[0].name), Value(parts[1].name), *n.args[4:])
        nodes.append(_costed(n.replace(args=args), specs))
    if not new_params:
        return graph
    out_params: list[Parameter] = []
    for p in graph.params:
        out_params.extend(new_params.get(p.name, [p]))
    return graph.replace(nodes=tuple(nodes), params=tuple(out_params))


def expose_tensor_parallelism(graph: Graph) -> Graph:
    """The rewrites, in order (see the module docstring)."""
    return experts_in_parts(unfuse_projections(conv1d_as_matmul(graph)))
