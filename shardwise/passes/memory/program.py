"""One rank's scheduled step as buffers: the lifetime and local size of every tensor the rank holds.

The step is the program codegen emits, in the order it runs (steps are integers):

* forward: op ``k`` of the graph at step ``k``; the collectives that redistribute its operands run at the
  same step (an output buffer per value and destination placement, shared by the ops that read it, as
  codegen shares them; an all-gather also holds a flat copy of its whole output for that step:
  ``torch.distributed.all_gather`` into a list of tensors gathers into one flat buffer and copies the pieces
  out, on gloo and NCCL alike); the collectives on the graph outputs at step ``N``;
* training only: the backward of op ``k`` at step ``2N - k`` (reverse order), the gradient all-reduce
  buckets at ``2N + 1``, the optimizer step at ``2N + 2``.

Buffers (ids carry their kind before the colon: ``param``, ``opt``, ``grad``, ``act``, ``agrad``, ``coll``,
``cgrad``, ``mask``, ``cast``, ``input``, ``bucket``, ``zero``, ``scratch``):

* parameters, module buffers and optimizer state (AdamW: two fp32 moments; ZeRO >= 1: this rank's slice of
  every sharded gradient bucket, with its fp32 master copy) live over the whole step; so does the whole
  input batch (the caller holds it; a rank whose batch is split copies out its piece, an activation);
* an activation lives from its op until its last forward use and, when training, until the backward of
  the last op that saves it for backward (matmuls save their operands, nonlinearities their input or
  output, attention its inputs and output, dropout a 1-byte mask); views share their base's storage
  (so does a dropout with probability 0 or in eval mode: it returns its input)
  (a ``reshape`` or ``contiguous`` of a non-contiguous view copies);
* training: the gradient of each activation that needs one lives from the backward of its last consumer to
  the backward of its producer (gradients of pure views share storage); parameter gradients from the
  backward of their last consumer until after the optimizer step (codegen sets them to ``None``), under
  ZeRO >= 2 those of sharded buckets only until their bucket is flattened (the bucket's flat copy lives
  until the next sharded bucket starts, this rank's slices of the sums until the optimizer step);
  under bf16/fp16 autocast every weight a matmul reads has a 2-byte copy, live until its last backward (a
  weight gathered by a collective: one copy per matmul reading it, which saves that copy instead of the
  gathered fp32 tensor, live only until its last forward read).

Floating activations are counted at 2 bytes per element under bf16/fp16. Sizes are rounded up to
``ALIGN`` bytes (allocator granularity), so offsets assigned by packing them stay aligned.

Guarantees: every buffer has ``size > 0`` and ``end > start``; ids are unique; the result depends only on
its arguments (ranks of one plan with the same local shapes get the same buffers).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from shardwise.costs.compute import is_low
from shardwise.costs.memory import experts_saved_elements
from shardwise.ir.graph import Graph, Node, iter_values
from shardwise.ir.placement import DeviceMesh, ShardingSpec, zero_group
from shardwise.ir.plan import NodeStrategy
from shardwise.ir.registry import MOE_EXPERTS, saves_of, tensor_operands
from shardwise.ir.tensor import TensorSpec, dtype_bytes
from shardwise.passes.memory.buffers import Buffer

__all__ = ["ALIGN", "BUCKET_BYTES", "StepSchedule", "buffer_kind", "optimizer_scratch", "step_buffers"]

ALIGN = 64  # bytes: the CPU allocator's alignment; every buffer size is a multiple of it

# ops whose output shares its (first) operand's storage
_VIEWS = frozenset(
    f"aten.{op}"
    for op in (
        "view.default", "_unsafe_view.default", "alias.default", "transpose.int", "t.default",
        "permute.default", "unsqueeze.default", "squeeze.dim", "squeeze.dims", "squeeze.default",
        "expand.default", "slice.Tensor", "select.int", "as_strided.default", "detach.default",
        "view_as.default", "narrow.default", "unflatten.int", "flatten.using_ints", "diagonal.default",
        "unfold.default", "expand_as.default", "reshape.default", "contiguous.default", "to.dtype_layout",
        "to.dtype", "to.device", "_to_copy.default", "type_as.default",
    )
)  # fmt: skip
# views whose result is not contiguous: a later reshape/contiguous of them copies
_STRIDED = frozenset(
    f"aten.{op}"
    for op in ("transpose.int", "t.default", "permute.default", "expand.default", "slice.Tensor",
               "select.int", "as_strided.default", "diagonal.default", "unfold.default", "expand_as.default",
               "narrow.default")
)  # fmt: skip
_COPY_IF_STRIDED = frozenset(("aten.reshape.default", "aten.contiguous.default", "aten.flatten.using_ints"))
_CASTS = frozenset(("aten.to.dtype_layout", "aten.to.dtype", "aten._to_copy.default", "aten.type_as.default"))
# tuple-producing ops whose elements are views of the operand
_TUPLE_VIEWS = frozenset(
    ("aten.split.Tensor", "aten.split_with_sizes.default", "aten.unbind.int", "aten.chunk.default")
)
# a gradient of these flows back as a view of the output's gradient (same storage)
_GRAD_VIEWS = frozenset(
    f"aten.{op}"
    for op in ("view.default", "_unsafe_view.default", "alias.default", "transpose.int", "t.default",
               "permute.default", "unsqueeze.default", "squeeze.dim", "squeeze.dims", "squeeze.default",
               "detach.default", "view_as.default", "unflatten.int", "flatten.using_ints", "reshape.default",
               "contiguous.default")
)  # fmt: skip
_MATMULS = frozenset(
    f"aten.{op}"
    for op in ("linear.default", "matmul.default", "mm.default", "bmm.default", "addmm.default",
               "baddbmm.default", "conv1d.default", "conv2d.default", "conv3d.default", "convolution.default",
               "einsum.default")
)  # fmt: skip
_NO_BUFFER_COLLECTIVES = ("none", "slice")  # a local slice is a view of the replicated value
BUCKET_BYTES = 25 * 2**20  # the gradient buckets of the runtime library (shardwise.runtime.lib.gradients)


def buffer_kind(buffer_id: str) -> str:
    """The kind of a buffer made here: the part of its id before the first colon."""
    return buffer_id.split(":", 1)[0]


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


@dataclass(frozen=True)
class StepSchedule:
    """Where the phases of a step fall (see the module docstring); ``end`` is one past the last step."""

    nodes: int
    train: bool

    @property
    def outputs(self) -> int:
        return self.nodes

    def backward(self, k: int) -> int:
        return 2 * self.nodes - k

    @property
    def reduce(self) -> int:
        return 2 * self.nodes + 1

    @property
    def optimizer(self) -> int:
        return 2 * self.nodes + 2

    @property
    def end(self) -> int:
        return 2 * self.nodes + 3 if self.train else self.nodes + 1


class _Lives:
    """Storages being built: kind, size, first and last step live (inclusive)."""

    def __init__(self) -> None:
        self.size: dict[str, int] = {}
        self.first: dict[str, int] = {}
        self.last: dict[str, int] = {}

    def new(self, sid: str, size: int, step: int) -> str:
        if sid in self.size:
            raise AssertionError(f"storage {sid!r} made twice")
        self.size[sid] = _align(size) if size > 0 else 0
        self.first[sid] = step
        self.last[sid] = step
        return sid

    def touch(self, sid: str, step: int) -> None:
        self.first[sid] = min(self.first[sid], step)
        self.last[sid] = max(self.last[sid], step)

    def buffers(self) -> list[Buffer]:
        return [Buffer(s, self.first[s], self.last[s] + 1, n) for s, n in self.size.items() if n > 0]


def step_buffers(
    graph: Graph,
    mesh: DeviceMesh,
    strategies: Sequence[NodeStrategy],
    *,
    param_placements: Mapping[str, ShardingSpec],
    input_placements: Mapping[str, ShardingSpec],
    train: bool,
    precision: str = "fp32",
    optimizer_factor: int = 2,
    zero: int = 0,
    grad_reduce: Mapping[str, tuple[str, ...]] | None = None,
    optimizer_foreach: bool = False,
) -> list[Buffer]:
    """The buffers of one rank's step (see the module docstring).

    ``param_placements`` and ``input_placements`` are keyed by graph value name, ``grad_reduce`` by
    state_dict key (the plan's ``param_grad_reduce``); ``optimizer_factor`` is the optimizer's fp32 state
    per parameter element (AdamW 2, SGD with momentum 1); ``optimizer_foreach``: the optimizer steps all
    parameters at once (PyTorch's default on GPUs; on CPUs it steps them one at a time).
    """
    sched = StepSchedule(len(graph.nodes), train)
    low = is_low(precision)
    by_node = {s.node: s for s in strategies}
    lives = _Lives()
    last = sched.end - 1
    storage: dict[str, str] = {}  # value name -> storage id (views map to their base's)
    strided: set[str] = set()  # values that are non-contiguous views
    grad: dict[str, bool] = {}  # value name -> needs a gradient
    local: dict[str, int] = {}  # value name -> local bytes (compute precision for activations)
    is_param: dict[str, str] = {}  # value name -> state_dict key

    def nbytes(spec: TensorSpec, placement: ShardingSpec | None, activation: bool) -> int:
        shape = placement.local_shape(spec.shape, mesh) if placement is not None else spec.shape
        size = 2 if activation and low and spec.dtype in ("float32", "float64") else dtype_bytes(spec.dtype)
        return _numel(shape) * size

    # -- persistent state ---------------------------------------------------------------------------
    params_numel: dict[str, int] = {}
    for p in graph.params:
        pl = param_placements.get(p.name)
        store_low = low and not train and p.spec.dtype.startswith(("float", "bfloat"))
        size = _numel(pl.local_shape(p.spec.shape, mesh) if pl is not None else p.spec.shape)
        params_numel[p.name] = size
        psize = size * (2 if store_low else dtype_bytes(p.spec.dtype))
        storage[p.name] = lives.new(f"param:{p.key}", psize, 0)
        lives.touch(storage[p.name], last)
        local[p.name] = psize
        is_param[p.name] = p.key
        grad[p.name] = train and p.requires_grad and p.spec.dtype.startswith(("float", "bfloat"))
    for i in graph.inputs:
        if isinstance(i.spec, TensorSpec):
            # every rank is handed the whole batch (held by the caller) and copies out its piece
            whole = lives.new(f"input:{i.name}", nbytes(i.spec, None, False), 0)
            lives.touch(whole, last)
            local[i.name] = nbytes(i.spec, input_placements.get(i.name), False)
            piece = local[i.name] < lives.size[whole]
            storage[i.name] = lives.new(f"act:{i.name}", local[i.name], 0) if piece else whole
            grad[i.name] = False
    reduce = dict(grad_reduce or {})
    zero_buckets = _zero_buckets(graph, reduce, mesh, grad, params_numel) if zero >= 1 else []
    sharded = [names for names, _ in zero_buckets]
    in_zero = {name for bucket in sharded for name in bucket}
    # each bucket padded to a multiple of its ZeRO group (the data-parallel axes it is summed over)
    padded = [-(-sum(params_numel[n] for n in bucket) // n) * n for bucket, n in zero_buckets]
    chunk = sum(size // n for size, (_, n) in zip(padded, zero_buckets))  # this rank's slices
    if train and optimizer_factor > 0:
        for p in graph.params:
            if grad[p.name] and p.name not in in_zero:
                sid = lives.new(f"opt:{p.key}", optimizer_factor * 4 * params_numel[p.name], 0)
                lives.touch(sid, last)
        if sharded:
            for what, factor in (("master", 1), ("state", optimizer_factor)):
                lives.touch(lives.new(f"opt:zero-{what}", factor * 4 * chunk, 0), last)
            # the step gathers the update bucket by bucket; ZeRO-1 reduce-scatters the full gradients there
            # first (a flat copy of a bucket and this rank's slices)
            lives.new("zero:gathered", 4 * max(padded), sched.optimizer)
            if zero == 1:
                lives.new("zero:flat-grads", 4 * max(padded), sched.optimizer)
                lives.new("zero:chunk-grad", 4 * chunk, sched.optimizer)

    # -- forward -------------------------------------------------------------------------------------
    users_saving: dict[str, list[int]] = {}  # storage id -> ops whose backward reads it
    coll: dict[tuple[str, str], str] = {}  # (value, destination placement) -> collective buffer
    operand_storage: list[list[str]] = []  # per op: the storage each tensor operand is read from
    redistributed: list[dict[int, tuple[str, int]]] = []  # per op: operand index -> (collective, src bytes)
    tuple_of: dict[str, Node] = {}
    index = {n.name: k for k, n in enumerate(graph.nodes)}
    casts: dict[str, str] = {}  # param name -> its low-precision copy under autocast
    for k, node in enumerate(graph.nodes):
        s = by_node.get(node.name)
        names = tensor_operands(node)
        moved = {r.value: r for r in s.redistributes} if s is not None else {}
        reads: list[str] = []
        redist: dict[int, tuple[str, int]] = {}
        for j, v in enumerate(names):
            if v not in storage:
                reads.append("")
                continue
            r = moved.get(v)
            if r is not None and r.collective not in _NO_BUFFER_COLLECTIVES:
                key = (v, str(r.dst))
                if key not in coll:
                    spec = graph.spec_of(v)
                    size = nbytes(spec, r.dst, v not in is_param) if isinstance(spec, TensorSpec) else 0
                    coll[key] = lives.new(f"coll:{v}->{r.dst}@{k}", size, k)
                    if "allgather" in r.collective:
                        lives.new(f"coll:{v}->{r.dst}@{k}.flat", size, k)  # the library's flat copy
                reads.append(coll[key])
                redist[j] = (r.collective, local.get(v, 0))
            else:
                reads.append(storage[v])
            lives.touch(reads[-1], k)
        operand_storage.append(reads)
        redistributed.append(redist)
        needs = train and any(grad.get(v, False) for v in names)
        if node.op == "getitem":
            base = next(
                (tuple_of[v.name] for a in node.args[:1] for v in iter_values(a) if v.name in tuple_of), None
            )
            out = node.outputs[0]
            pl = s.outputs[0] if s is not None and s.outputs else None
            if isinstance(out, TensorSpec):
                local[node.name] = nbytes(out, pl, True)
                base_reads = operand_storage[index[base.name]] if base is not None else []
                if base is not None and base.op in _TUPLE_VIEWS and base_reads and base_reads[0]:
                    storage[node.name] = base_reads[0]
                    strided.add(node.name)
                else:
                    storage[node.name] = lives.new(f"act:{node.name}", local[node.name], k)
            grad[node.name] = base is not None and grad.get(base.name, False) and _is_float(out)
            continue
        if node.tuple_output:
            tuple_of[node.name] = node
            grad[node.name] = needs
            continue
        out = node.outputs[0]
        if not isinstance(out, TensorSpec):
            continue
        placement = s.outputs[0] if s is not None and s.outputs else None
        local[node.name] = nbytes(out, placement, True)
        grad[node.name] = needs and _is_float(out)
        first = names[0] if names else ""
        inert = saves_of(node.op) == "mask" and _inert_dropout(node)  # returns its input: p == 0 or not training
        view = (node.op in _VIEWS or inert) and bool(reads) and reads[0] != ""
        if node.in_place and not train and reads and reads[0] and reads[0] == storage.get(first):
            view = True  # written into the buffer it reads as stored (Node.in_place): nothing new
        if view and node.op in _COPY_IF_STRIDED and first in strided:
            view = False
        if view and node.op in _CASTS:
            src_spec = graph.spec_of(first)
            view = isinstance(src_spec, TensorSpec) and (src_spec.dtype == out.dtype or low)
        if view:
            storage[node.name] = reads[0]
            if node.op in _STRIDED or (first in strided and node.op not in _COPY_IF_STRIDED):
                strided.add(node.name)
        else:
            storage[node.name] = lives.new(f"act:{node.name}", local[node.name], k)
        if not grad[node.name]:
            continue
        # under autocast a matmul saves the low-precision copy of each fp32 weight it reads, not the weight: a
        # weight gathered by a collective is cast at each read (autocast caches casts of parameters only), so
        # the gathered fp32 tensor lives until its last forward read and its copy until this op's backward
        gathered: dict[int, int] = {}  # operand index -> bytes of the low-precision copy of a gathered weight
        if low and node.op in _MATMULS:
            for j, v in enumerate(names):
                spec = graph.spec_of(v) if j in redist else None
                if v in is_param and grad.get(v) and isinstance(spec, TensorSpec) and _is_float(spec):
                    gathered[j] = nbytes(spec, moved[v].dst, True)
        # what the backward of this op reads (the registry's saves-for-backward rule)
        saves = saves_of(node.op)
        saved: list[str] = []
        if saves == "output":
            saved.append(storage[node.name])
        elif saves == "both":
            saved += [r for r in reads if r] + [storage[node.name]]
        elif saves == "inputs" or (saves == "factors" and len(names) >= 2):
            saved += [r for j, r in enumerate(reads) if r and j not in gathered]
        if node.op == MOE_EXPERTS and s is not None:  # what its own backward keeps (costs.memory)
            x_spec, route_spec, down_spec = (graph.spec_of(v) for v in (names[0], names[1], names[-1]))
            route_pl, down_pl = s.inputs[1], s.inputs[-1]
            rows = _numel(route_pl.local_shape(route_spec.shape, mesh) if route_pl else route_spec.shape)
            inner = (down_pl.local_shape(down_spec.shape, mesh) if down_pl else down_spec.shape)[2]
            size = experts_saved_elements(rows, x_spec.shape[-1], inner) * _local_elt(x_spec, low)
            saved.append(lives.new(f"experts:{node.name}", size, k))
        for sid in saved:
            users_saving.setdefault(sid, []).append(k)
        if saves == "mask" and not inert:  # a 1-byte keep mask per element
            lives.new(f"mask:{node.name}", local[node.name] // _local_elt(out, low), k)
            users_saving.setdefault(f"mask:{node.name}", []).append(k)
        for j, size in gathered.items():
            sid = lives.new(f"cast:{is_param[names[j]]}@{k}.{j}", size, k)
            users_saving.setdefault(sid, []).append(k)
        if low and node.op in _MATMULS:
            for j, v in enumerate(names):
                if v in is_param and grad.get(v) and j not in gathered:
                    if v not in casts:
                        casts[v] = lives.new(f"cast:{is_param[v]}", 2 * params_numel[v], k)
                    lives.touch(casts[v], sched.outputs)
                    users_saving.setdefault(casts[v], []).append(k)
    final = by_node.get("<output>")
    out_names = [v.name for a in graph.outputs for v in iter_values(a)]
    out_moved = {r.value: r for r in final.redistributes} if final is not None else {}
    for v in out_names:
        if v not in storage:
            continue
        lives.touch(storage[v], sched.outputs if not train else last)
        r = out_moved.get(v)
        if r is not None and r.collective not in _NO_BUFFER_COLLECTIVES:
            spec = graph.spec_of(v)
            if isinstance(spec, TensorSpec):
                sid = lives.new(f"coll:{v}->{r.dst}@out", nbytes(spec, r.dst, True), sched.outputs)
                if "allgather" in r.collective:  # the library's flat copy
                    lives.new(f"coll:{v}->{r.dst}@out.flat", nbytes(spec, r.dst, True), sched.outputs)
                lives.touch(sid, last if train else sched.outputs)
    for _, value in graph.buffer_updates:
        if value.name in storage:
            lives.touch(storage[value.name], sched.outputs)
    if not train:
        return lives.buffers()
    for sid, ks in users_saving.items():
        lives.touch(sid, sched.backward(min(ks)))

    # -- backward ------------------------------------------------------------------------------------
    gstore: dict[str, str] = {}  # value name -> storage of its gradient
    done: dict[str, int] = {}  # parameter value name -> the backward step that completes its gradient
    for v in out_names:
        if grad.get(v) and v not in gstore:
            gstore[v] = lives.new(f"agrad:{v}", local.get(v, 0), sched.outputs)
    tuple_grads: dict[str, list[str]] = {}  # tuple producer -> the gradients of its elements
    for k in range(len(graph.nodes) - 1, -1, -1):
        node = graph.nodes[k]
        b = sched.backward(k)
        if node.op == "getitem":
            mine = gstore.get(node.name)
            src = next((v.name for a in node.args[:1] for v in iter_values(a)), "")
            if mine is not None and src in tuple_of:
                lives.touch(mine, b)
                tuple_grads.setdefault(src, []).append(mine)
            continue
        if node.tuple_output:
            elements = tuple_grads.get(node.name, [])
            if not elements:
                continue  # no gradient reaches this op
            for sid in elements:
                lives.touch(sid, b)
            mine = None
        else:
            mine = gstore.get(node.name)
            if mine is None:
                continue  # no gradient reaches this op
            lives.touch(mine, b)
        names = tensor_operands(node)
        for j, v in enumerate(names):
            if not grad.get(v) or not operand_storage[k][j]:
                continue
            if j in redistributed[k]:
                # the gradient arrives in the redistributed layout, the reverse collective brings it back
                lives.new(f"cgrad:{v}@{k}.{j}", lives.size[operand_storage[k][j]], b)
            if v in is_param:
                if v not in gstore:
                    gstore[v] = lives.new(f"grad:{is_param[v]}", 4 * params_numel[v], b)
                    if zero < 2 or v not in in_zero:
                        lives.touch(gstore[v], sched.optimizer)
                done[v] = max(done.get(v, b), b)
                continue
            if v in gstore:
                lives.touch(gstore[v], b)
            elif j == 0 and mine is not None and node.op in _GRAD_VIEWS and j not in redistributed[k]:
                gstore[v] = mine
            else:
                gstore[v] = lives.new(f"agrad:{v}", local.get(v, 0), b)
    # -- gradient all-reduce buckets and the optimizer's scratch ----------------------------------------
    if zero >= 2 and sharded:
        # ZeRO-2/3: a sharded bucket is flattened (its gradients dropped) when its last gradient is complete,
        # and kept until the next sharded bucket starts (one in flight); this rank's slices of every bucket
        # are kept until the optimizer step
        ready = [max((done[n] for n in bucket if n in done), default=sched.reduce) for bucket in sharded]
        for names, at in zip(sharded, ready):
            for n in names:
                if n in gstore:
                    lives.touch(gstore[n], at)
        order = sorted(range(len(sharded)), key=lambda i: (ready[i], i))
        for j, i in enumerate(order):
            end = ready[order[j + 1]] - 1 if j + 1 < len(order) else sched.reduce
            lives.touch(lives.new(f"zero:bucket{i}", 4 * padded[i], ready[i]), max(end, ready[i]))
        lives.touch(lives.new("zero:grad-shard", 4 * chunk, min(ready)), sched.optimizer)
    by_axes: dict[tuple[str, ...], list[int]] = {}
    for p in graph.params:
        axes = tuple(a for a in reduce.get(p.key, ()) if a in mesh.axis_names and mesh.axis_size(a) > 1)
        if zero >= 2 and p.name in in_zero:
            continue  # reduced with its sharded bucket
        if p.name in in_zero:
            axes = tuple(a for a in axes if a not in zero_group(mesh, axes))
        if axes and grad[p.name] and p.name in gstore:
            by_axes.setdefault(axes, []).append(4 * params_numel[p.name])
    for axes, sizes in by_axes.items():
        biggest = run = 0
        for n in sizes:
            run += n
            if run >= BUCKET_BYTES:
                biggest, run = max(biggest, run), 0
        lives.new(f"bucket:{'+'.join(axes)}", max(biggest, run), sched.reduce)
    trainable = [
        params_numel[p.name] for p in graph.params if grad[p.name] and p.name in gstore and p.name not in in_zero
    ]  # fmt: skip
    scratch = optimizer_scratch(trainable, chunk if sharded else 0, optimizer_foreach)
    if scratch and optimizer_factor > 0:
        lives.new("scratch:optimizer", 4 * scratch, sched.optimizer)
    return lives.buffers()


def optimizer_scratch(unsharded: Sequence[int], shard: int, foreach: bool) -> int:
    """Elements of the optimizer step's temporaries (fp32): Adam's denominator. A foreach step makes one for
    every parameter it steps at once, a per-tensor step two of the largest parameter's size (the square root,
    then the quotient). Under ZeRO (``runtime.lib.optim.ShardedOptimizer``) the sharded parameters are stepped
    as this rank's ``shard`` elements (one master tensor), before and apart from the ``unsharded`` ones, so the
    larger of the two steps counts."""
    if foreach:
        return max(sum(unsharded), shard)
    return 2 * max(max(unsharded, default=0), shard)


def _zero_buckets(
    graph: Graph, reduce: Mapping[str, tuple[str, ...]], mesh: DeviceMesh, grad: Mapping[str, bool],
    numel: Mapping[str, int],
) -> list[tuple[list[str], int]]:  # fmt: skip
    """The parameters (value names) of each ZeRO-sharded gradient bucket and the size of the group it is
    sharded over, in the runtime's bucket order (``shardwise.runtime.lib.gradients.make_buckets``): the
    trainable parameters whose gradient is summed over data-parallel axes of more than one rank
    (``ir.placement.zero_group``: dp, and ep and cp where the mesh has them, sharded over together), in
    reverse order, one open bucket per set of axes, closed at ``BUCKET_BYTES`` (fp32 gradients); a gradient of
    that size or more is a bucket of its own."""
    out: list[tuple[list[str], int]] = []
    open_buckets: dict[tuple[str, ...], tuple[list[str], list[int]]] = {}
    for p in reversed(graph.params):
        axes = tuple(a for a in reduce.get(p.key, ()) if a in mesh.axis_names and mesh.axis_size(a) > 1)
        group = zero_group(mesh, axes)
        if not grad[p.name] or not group:
            continue
        key = tuple(a for a in axes if a not in group) + group
        n = mesh.group_size(group)
        nbytes = 4 * numel[p.name]
        if nbytes >= BUCKET_BYTES:
            out.append(([p.name], n))
            continue
        members, size = open_buckets.setdefault(key, ([], [0]))
        members.append(p.name)
        size[0] += nbytes
        if size[0] >= BUCKET_BYTES:
            out.append((members, n))
            del open_buckets[key]
    out += [(members, mesh.group_size(zero_group(mesh, key))) for key, (members, _) in open_buckets.items()]
    return out


def _inert_dropout(node: Node) -> bool:
    """A dropout that returns its input: probability 0 or ``train=False`` (``aten.dropout(x, p, train)``)."""
    args = list(node.args[1:3]) + [None] * 2
    p = args[0] if args[0] is not None else node.kwarg_dict().get("p")
    train = args[1] if args[1] is not None else node.kwarg_dict().get("train", True)
    return p == 0 or train is False


def _is_float(spec: object) -> bool:
    return isinstance(spec, TensorSpec) and spec.dtype.startswith(("float", "bfloat"))


def _local_elt(spec: TensorSpec, low: bool) -> int:
    return 2 if low and spec.dtype in ("float32", "float64") else dtype_bytes(spec.dtype)
