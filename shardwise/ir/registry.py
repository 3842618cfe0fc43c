"""The op registry: for every ATen op shardwise knows, its kind, its cost and its dimension annotation.

Strategies, communication and costs all derive from this one table (docs/architecture.md, "The op registry").
An annotation is computed per node (``OpRule.dims(node, inputs)``) because many ops take their dimension
mapping from arguments (``transpose(x, 0, 2)``) or shapes (``view``). Shapes themselves come from
torch.export's fake tensors; ``meta_shapes`` recomputes them on the meta device for other sizes.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from shardwise.ir.dimops import Dim, OpDims, Operand, frozen_dims, parse_dimops
from shardwise.ir.graph import Node
from shardwise.ir.tensor import ScalarSpec, TensorSpec

__all__ = [
    "OpRule", "REGISTRY", "SAVES", "RANDOM_OPS", "WHOLE_WHEN_RANDOM", "draws_random", "rule_for", "is_known_op",
    "runs_whole", "tensor_operands", "op_dims", "op_flops", "saves_of", "SPELLINGS", "spelling_of",
]  # fmt: skip

Specs = Sequence[TensorSpec]
DimsFn = Callable[[Node, Specs, Specs], OpDims]
FlopsFn = Callable[[Node, Specs, Specs], int]


#: What an op's backward reads, the one saves-for-backward rule of the memory map and the price list:
#: "inputs" its tensor operands (the default: matmuls, norms, nonlinear elementwise ops, losses); "output" its
#: result (tanh, sigmoid, softmax, exp, ...); "both" operands and result (attention); "none" nothing of size
#: (linear ops: add, sum, cat, copies, views); "factors" a product or quotient reads its other factors, so
#: nothing when only one operand is a tensor; "mask" a dropout's 1-byte keep mask per element.
SAVES = ("inputs", "output", "both", "none", "factors", "mask")


@dataclass(frozen=True)
class OpRule:
    """What shardwise knows about one op."""

    op: str
    kind: str  # elementwise | matmul | view | reduction | norm | softmax | attention | embedding | conv |
    #            pool | creation | index | scalar | loss | getitem
    dims: DimsFn
    flops: FlopsFn
    moves_data: bool = True  # False for views: no bytes moved
    saves: str = "inputs"  # one of SAVES: what the backward reads
    # how generated code writes the op (see SPELLINGS below); "" when it keeps the aten spelling
    spelling: str = ""


REGISTRY: dict[str, OpRule] = {}


def _register(
    ops: str | Sequence[str], kind: str, dims: DimsFn, flops: FlopsFn, moves_data: bool = True
) -> None:
    for op in [ops] if isinstance(ops, str) else ops:
        REGISTRY[op] = OpRule(op, kind, dims, flops, moves_data)


#: ATen ops that draw random numbers (the ops with ATen's nondeterministic_seeded tag, by name without the
#: overload, less the fused attention and RNN kernels; tests/frontend/test_trace_ops.py checks it against torch)
RANDOM_OPS = frozenset({
    "_fused_dropout", "_sample_dirichlet", "_standard_gamma", "alpha_dropout", "alpha_dropout_", "bernoulli",
    "bernoulli_", "binomial", "cauchy", "cauchy_", "dropout", "dropout_", "exponential", "exponential_",
    "feature_alpha_dropout", "feature_alpha_dropout_", "feature_dropout", "feature_dropout_", "geometric",
    "geometric_", "log_normal", "log_normal_", "multinomial", "native_dropout", "normal", "normal_",
    "normal_functional", "poisson", "rand", "rand_like", "randint", "randint_like", "randn", "randn_like", "random",
    "random_", "randperm", "rrelu", "rrelu_", "rrelu_with_noise", "rrelu_with_noise_", "rrelu_with_noise_functional",
    "uniform", "uniform_",
})  # fmt: skip
# the random ops that draw only with a nonzero probability (argument index, name) in training (index, name,
# default): dropouts, and rrelu in evaluation is a leaky relu
_DRAW_ARGS: dict[str, tuple[tuple[int, str] | None, tuple[int, str, bool]]] = {
    **dict.fromkeys(
        ("dropout", "dropout_", "native_dropout", "alpha_dropout", "alpha_dropout_", "feature_alpha_dropout",
         "feature_alpha_dropout_", "feature_dropout", "feature_dropout_"),
        ((1, "p"), (2, "train", True)),
    ),  # fmt: skip
    **dict.fromkeys(("rrelu", "rrelu_"), (None, (3, "training", False))),
    **dict.fromkeys(
        ("rrelu_with_noise", "rrelu_with_noise_", "rrelu_with_noise_functional"), (None, (4, "training", False))
    ),
}


def draws_random(node: Node) -> bool:
    """Does the node draw random numbers? (A dropout with p=0 or in evaluation does not.)"""
    base = node.op.split(".")[1] if node.op.startswith("aten.") and node.op.count(".") >= 1 else ""
    if base not in RANDOM_OPS:
        return False
    prob, train = _DRAW_ARGS.get(base, (None, None))
    if train is not None and not _arg(node, train[0], train[1], train[2]):
        return False
    return prob is None or _arg(node, prob[0], prob[1], 0.5) not in (0, 0.0)


def rule_for(op: str) -> OpRule | None:
    return REGISTRY.get(op)


def saves_of(op: str) -> str:
    """What ``op``'s backward reads (one of :data:`SAVES`); an op outside the registry keeps its operands."""
    rule = REGISTRY.get(op)
    return rule.saves if rule is not None else "inputs"


def is_known_op(op: str) -> bool:
    return op in REGISTRY


def runs_whole(node: Node) -> bool:
    """Does ``node`` run whole (replicated, operands gathered): no rule splits its op, or the frontend
    asked for it (``Node.whole``)?"""
    return node.whole or node.op not in REGISTRY


def tensor_operands(node: Node) -> list[str]:
    """Names of the tensor values a node reads, in argument order (repeats kept: ``mul(x, x)``)."""
    from shardwise.ir.graph import iter_values

    names: list[str] = []
    for a in node.args:
        names.extend(v.name for v in iter_values(a))
    for _, a in node.kwargs:
        names.extend(v.name for v in iter_values(a))
    return names


def op_dims(node: Node, inputs: Specs) -> OpDims:
    """The node's dimension annotation; ops outside the registry get an all-frozen one (run whole)."""
    outs = [o for o in node.outputs if isinstance(o, TensorSpec)]
    tins = [s for s in inputs if isinstance(s, TensorSpec)]
    rule = REGISTRY.get(node.op)
    if rule is None or node.whole:
        return frozen_dims(tuple(s.rank for s in tins), tuple(o.rank for o in outs))
    return rule.dims(node, tins, outs)


def op_flops(node: Node, inputs: Specs) -> int:
    rule = REGISTRY.get(node.op)
    outs = [o for o in node.outputs if isinstance(o, TensorSpec)]
    tins = [s for s in inputs if isinstance(s, TensorSpec)]
    if rule is None:
        return sum(o.numel for o in outs)
    return int(rule.flops(node, tins, outs))


# ---------------------------------------------------------------------------------------------------------
# argument helpers


def _arg(node: Node, index: int, name: str, default: object = None) -> object:
    if len(node.args) > index:
        return node.args[index]
    return node.kwarg_dict.get(name, default)


def _norm_dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


def _dims_arg(value: object, rank: int) -> list[int]:
    if value is None or value == ():
        return list(range(rank))
    if isinstance(value, int):
        return [_norm_dim(value, rank)]
    return [_norm_dim(int(d), rank) for d in value]  # type: ignore[union-attr]


class _Labels:
    def __init__(self) -> None:
        self._n = 0

    def fresh(self, prefix: str = "x", frozen: bool = False) -> Dim:
        self._n += 1
        return Dim(f"{prefix}{self._n}", frozen=frozen)


def _all_frozen(node: Node, ins: Specs, outs: Specs) -> OpDims:
    return frozen_dims(tuple(s.rank for s in ins), tuple(o.rank for o in outs))


# ---------------------------------------------------------------------------------------------------------
# flops


def _zero(node: Node, ins: Specs, outs: Specs) -> int:
    return 0


def _per_output(node: Node, ins: Specs, outs: Specs) -> int:
    return sum(o.numel for o in outs)


def _per_input(node: Node, ins: Specs, outs: Specs) -> int:
    return ins[0].numel if ins else 0


def _per_input_x5(node: Node, ins: Specs, outs: Specs) -> int:
    return 5 * (ins[0].numel if ins else 0)


def _linear_flops(node: Node, ins: Specs, outs: Specs) -> int:
    x, w = ins[0], ins[1]
    return 2 * math.prod(x.shape[:-1]) * w.shape[0] * x.shape[-1]


def _addmm_flops(node: Node, ins: Specs, outs: Specs) -> int:
    m1, m2 = ins[1], ins[2]
    return 2 * m1.shape[0] * m1.shape[1] * m2.shape[1]


def _matmul_flops(node: Node, ins: Specs, outs: Specs) -> int:
    a = ins[0]
    return 2 * outs[0].numel * a.shape[-1]


def _sdpa_flops(node: Node, ins: Specs, outs: Specs) -> int:
    q, k = ins[0], ins[1]
    b_h = math.prod(q.shape[:-2])
    s, d, t = q.shape[-2], q.shape[-1], k.shape[-2]
    e = ins[2].shape[-1]
    return 2 * b_h * s * t * d + 2 * b_h * s * t * e + 5 * b_h * s * t


def _conv_flops(node: Node, ins: Specs, outs: Specs) -> int:
    w = ins[1]
    return 2 * outs[0].numel * math.prod(w.shape[1:])


# ---------------------------------------------------------------------------------------------------------
# annotations


def _elementwise(node: Node, ins: Specs, outs: Specs) -> OpDims:
    out = outs[0]
    labels = [Dim(f"d{i}") for i in range(out.rank)]
    operands: list[Operand] = []
    for s in ins:
        off = out.rank - s.rank
        operands.append(
            tuple(
                Dim("1") if s.shape[i] == 1 and out.shape[off + i] != 1 else labels[off + i]
                for i in range(s.rank)
            )
        )
    return OpDims(tuple(operands), tuple(tuple(labels) for _ in outs))


def _identity(node: Node, ins: Specs, outs: Specs) -> OpDims:
    labels = tuple(Dim(f"d{i}") for i in range(outs[0].rank))
    return OpDims((labels,) + tuple(_all_frozen(node, ins[1:], []).inputs), (labels,))


def _static(text: str, partial: str = "sum") -> DimsFn:
    parsed = parse_dimops(text, partial)

    def dims(node: Node, ins: Specs, outs: Specs) -> OpDims:
        return parsed

    return dims


def _linear(node: Node, ins: Specs, outs: Specs) -> OpDims:
    x = ins[0]
    batch = tuple(Dim(f"b{i}") for i in range(x.rank - 1))
    k = Dim("k", reduce=True)
    n = Dim("n")
    operands: list[Operand] = [batch + (k,), (n, k)]
    if len(ins) > 2:
        operands.append((n,))
    return OpDims(tuple(operands), (batch + (n,),))


def _addmm(node: Node, ins: Specs, outs: Specs) -> OpDims:
    bias = ins[0]
    m, n, k = Dim("m"), Dim("n"), Dim("k", reduce=True)
    bias_dims: Operand = (n,) if bias.rank == 1 else ((Dim("1") if bias.shape[0] == 1 else m), n)
    return OpDims((bias_dims, (m, k), (k, n)), ((m, n),))


def _matmul(node: Node, ins: Specs, outs: Specs) -> OpDims:
    a, b = ins[0], ins[1]
    out = outs[0]
    if a.rank < 2 or b.rank < 2:
        return _all_frozen(node, ins, outs)
    batch = [Dim(f"b{i}") for i in range(out.rank - 2)]
    m, n, k = Dim("m"), Dim("n"), Dim("k", reduce=True)

    def operand(s: TensorSpec, last2: tuple[Dim, Dim]) -> Operand:
        off = len(batch) - (s.rank - 2)
        lead = tuple(
            Dim("1") if s.shape[i] == 1 and out.shape[off + i] != 1 else batch[off + i]
            for i in range(s.rank - 2)
        )
        return lead + last2

    return OpDims((operand(a, (m, k)), operand(b, (k, n))), (tuple(batch) + (m, n),))


def _reshape_groups(src: tuple[int, ...], dst: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(src) or j < len(dst):
        if i < len(src) and src[i] == 1 and (j >= len(dst) or dst[j] != 1):
            groups.append(([i], []))
            i += 1
            continue
        if j < len(dst) and dst[j] == 1 and (i >= len(src) or src[i] != 1):
            groups.append(([], [j]))
            j += 1
            continue
        if i >= len(src) or j >= len(dst):
            raise ValueError(f"cannot match reshape {src} -> {dst}")
        gi, gj = [i], [j]
        pi, pj = src[i], dst[j]
        i += 1
        j += 1
        while pi != pj:
            if pi < pj:
                pi *= src[i]
                gi.append(i)
                i += 1
            else:
                pj *= dst[j]
                gj.append(j)
                j += 1
        groups.append((gi, gj))
    return groups


def _reshape(node: Node, ins: Specs, outs: Specs) -> OpDims:
    src, dst = ins[0].shape, outs[0].shape
    labels = _Labels()
    in_dims: list[Dim] = [Dim("1")] * len(src)
    out_dims: list[Dim] = [Dim("1")] * len(dst)
    try:
        groups = _reshape_groups(src, dst)
    except (ValueError, IndexError):
        return _all_frozen(node, ins, outs)
    for gi, gj in groups:
        if not gi or not gj:
            continue
        lead = labels.fresh("g")
        in_dims[gi[0]] = lead
        out_dims[gj[0]] = lead
        for i in gi[1:]:
            in_dims[i] = labels.fresh("g", frozen=True)
        for j in gj[1:]:
            out_dims[j] = labels.fresh("g", frozen=True)
    return OpDims((tuple(in_dims),), (tuple(out_dims),))


def _transpose(node: Node, ins: Specs, outs: Specs) -> OpDims:
    rank = ins[0].rank
    if node.op == "aten.t.default":
        perm = list(range(rank))[::-1]
    elif node.op == "aten.permute.default":
        perm = [_norm_dim(int(d), rank) for d in _arg(node, 1, "dims")]  # type: ignore[union-attr]
    else:
        a, b = _norm_dim(int(_arg(node, 1, "dim0")), rank), _norm_dim(int(_arg(node, 2, "dim1")), rank)  # type: ignore[arg-type]
        perm = list(range(rank))
        perm[a], perm[b] = perm[b], perm[a]
    labels = tuple(Dim(f"d{i}") for i in range(rank))
    return OpDims((labels,), (tuple(labels[p] for p in perm),))


def _unsqueeze(node: Node, ins: Specs, outs: Specs) -> OpDims:
    rank = outs[0].rank
    d = _norm_dim(int(_arg(node, 1, "dim")), rank)  # type: ignore[arg-type]
    labels = [Dim(f"d{i}") for i in range(ins[0].rank)]
    out = labels[:d] + [Dim("1")] + labels[d:]
    return OpDims((tuple(labels),), (tuple(out),))


def _squeeze(node: Node, ins: Specs, outs: Specs) -> OpDims:
    return _reshape(node, ins, outs)


def _expand(node: Node, ins: Specs, outs: Specs) -> OpDims:
    src, dst = ins[0], outs[0]
    off = dst.rank - src.rank
    out_dims = [
        Dim(f"e{j}") for j in range(dst.rank)
    ]  # new leading dims may be split: each rank expands locally
    in_dims: list[Dim] = []
    for i in range(src.rank):
        if src.shape[i] == 1 and dst.shape[off + i] != 1:
            in_dims.append(Dim("1"))
        else:
            in_dims.append(out_dims[off + i])
    if len(ins) > 1:  # expand_as(x, other): the output takes other's (local) shape, so other splits alike
        return OpDims((tuple(in_dims), tuple(out_dims)), (tuple(out_dims),))
    return OpDims((tuple(in_dims),), (tuple(out_dims),))


def _one_frozen_dim(dim_index: int, dim_name: str) -> DimsFn:
    """Shape-preserving op over one dimension it needs whole (softmax, cumsum, ...)."""

    def dims(node: Node, ins: Specs, outs: Specs) -> OpDims:
        rank = ins[0].rank
        d = _norm_dim(int(_arg(node, dim_index, dim_name, -1)), rank)  # type: ignore[arg-type]
        labels = tuple(Dim(f"d{i}", frozen=(i == d)) for i in range(rank))
        return OpDims((labels,) + _all_frozen(node, ins[1:], []).inputs, tuple(labels for _ in outs))

    return dims


def _select(node: Node, ins: Specs, outs: Specs) -> OpDims:
    rank = ins[0].rank
    d = _norm_dim(int(_arg(node, 1, "dim")), rank)  # type: ignore[arg-type]
    labels = [Dim(f"d{i}") for i in range(rank)]
    in_dims = list(labels)
    in_dims[d] = Dim("sel", frozen=True)
    return OpDims((tuple(in_dims),), (tuple(labels[:d] + labels[d + 1 :]),))


def _slice(node: Node, ins: Specs, outs: Specs) -> OpDims:
    rank = ins[0].rank
    d = _norm_dim(int(_arg(node, 1, "dim", 0)), rank)  # type: ignore[arg-type]
    labels = [Dim(f"d{i}") for i in range(rank)]
    in_dims, out_dims = list(labels), list(labels)
    if ins[0].shape[d] != outs[0].shape[d]:
        in_dims[d] = Dim("sl_in", frozen=True)
        out_dims[d] = Dim("sl_out", frozen=True)
    return OpDims((tuple(in_dims),), (tuple(out_dims),))


def _cat(node: Node, ins: Specs, outs: Specs) -> OpDims:
    rank = outs[0].rank
    d = _norm_dim(int(_arg(node, 1, "dim", 0)), rank)  # type: ignore[arg-type]
    labels = [Dim(f"d{i}") for i in range(rank)]
    operands = []
    for k, s in enumerate(ins):
        if s.rank != rank:  # legacy empty tensors in cat
            operands.append(tuple(Dim(f"z{k}_{i}", frozen=True) for i in range(s.rank)))
            continue
        dims = list(labels)
        dims[d] = Dim(f"c{k}", frozen=True)
        operands.append(tuple(dims))
    out = list(labels)
    out[d] = Dim("cat", frozen=True)
    return OpDims(tuple(operands), (tuple(out),))


def _split(node: Node, ins: Specs, outs: Specs) -> OpDims:
    rank = ins[0].rank
    d = _norm_dim(int(_arg(node, 2, "dim", 0)), rank)  # type: ignore[arg-type]
    labels = [Dim(f"d{i}") for i in range(rank)]
    in_dims = list(labels)
    in_dims[d] = Dim("split_in", frozen=True)
    out_ops = []
    for k in range(len(outs)):
        o = list(labels)
        o[d] = Dim(f"split{k}", frozen=True)
        out_ops.append(tuple(o))
    return OpDims((tuple(in_dims),), tuple(out_ops))


def _unbind(node: Node, ins: Specs, outs: Specs) -> OpDims:
    """``unbind(x, dim)``: one output per index of ``dim`` (needed whole), each with the other dims."""
    rank = ins[0].rank
    d = _norm_dim(int(_arg(node, 1, "dim", 0)), rank)  # type: ignore[arg-type]
    labels = [Dim(f"d{i}") for i in range(rank)]
    in_dims = list(labels)
    in_dims[d] = Dim("unbind", frozen=True)
    out = tuple(labels[:d] + labels[d + 1 :])
    return OpDims((tuple(in_dims),), tuple(out for _ in outs))


def _slice_scatter(node: Node, ins: Specs, outs: Specs) -> OpDims:
    """``slice_scatter(x, src, dim, start, end, step)`` (a functionalized ``x[..., a:b] = src``): the other
    dims map through; ``dim`` is needed whole unless the slice covers it."""
    x, src = ins[0], ins[1]
    d = _norm_dim(int(_arg(node, 2, "dim", 0)), x.rank)  # type: ignore[arg-type]
    labels = [Dim(f"d{i}") for i in range(x.rank)]
    if src.shape[d] != x.shape[d]:
        labels[d] = Dim("scatter", frozen=True)
    out = tuple(labels)
    return OpDims((out, out), (out,))


def _select_scatter(node: Node, ins: Specs, outs: Specs) -> OpDims:
    """``select_scatter(x, src, dim, index)`` (a functionalized ``x[..., i] = src``): ``dim`` whole."""
    x = ins[0]
    d = _norm_dim(int(_arg(node, 2, "dim", 0)), x.rank)  # type: ignore[arg-type]
    labels = [Dim(f"d{i}") for i in range(x.rank)]
    labels[d] = Dim("scatter", frozen=True)
    return OpDims((tuple(labels), tuple(labels[:d] + labels[d + 1 :])), (tuple(labels),))


def _index_copy(node: Node, ins: Specs, outs: Specs) -> OpDims:
    """``index_copy(x, dim, index, src)`` (a functionalized ``x.index_copy_(dim, index, src)``: a KV cache's
    write at its slots): the other dims of ``x`` and ``src`` map through; ``dim`` and the index are whole
    (the index names global positions)."""
    x = ins[0]
    if x.rank == 0 or ins[2].rank != x.rank:  # a 0-dim tensor (or source): nothing to split
        return _all_frozen(node, ins, outs)
    d = _norm_dim(int(_arg(node, 1, "dim", 0)), x.rank)  # type: ignore[arg-type]
    labels = [Dim(f"d{i}") for i in range(x.rank)]
    labels[d] = Dim("slots", frozen=True)
    src = list(labels)
    src[d] = Dim("copied", frozen=True)
    index = tuple(Dim(f"i{i}", frozen=True) for i in range(ins[1].rank))
    return OpDims((tuple(labels), index, tuple(src)), (tuple(labels),))


def _matrix_op(node: Node, ins: Specs, outs: Specs) -> OpDims:
    """An op on the matrices of the last two dims (``tril``, ``triu``): the leading dims map through."""
    rank = ins[0].rank
    labels = tuple(Dim(f"d{i}", frozen=i >= rank - 2) for i in range(rank))
    return OpDims((labels,), tuple(labels for _ in outs))


def _reduction(partial: str) -> DimsFn:
    def dims(node: Node, ins: Specs, outs: Specs) -> OpDims:
        x = ins[0]
        dims_arg = _arg(node, 1, "dim", None)
        if node.op.endswith(".default") and node.op not in ("aten.amax.default", "aten.amin.default"):
            dims_arg = None  # sum.default / mean.default reduce everything
        reduced = set(_dims_arg(dims_arg, x.rank))
        keepdim = bool(_arg(node, 2, "keepdim", False))
        in_dims, out_dims = [], []
        for i in range(x.rank):
            if i in reduced:
                in_dims.append(Dim(f"r{i}", reduce=True))
                if keepdim:
                    out_dims.append(Dim("1"))
            else:
                in_dims.append(Dim(f"d{i}"))
                out_dims.append(Dim(f"d{i}"))
        return OpDims((tuple(in_dims),), (tuple(out_dims),), partial)

    return dims


def _layer_norm(node: Node, ins: Specs, outs: Specs) -> OpDims:
    x = ins[0]
    normalized = len(_arg(node, 1, "normalized_shape"))  # type: ignore[arg-type]
    lead = tuple(Dim(f"d{i}") for i in range(x.rank - normalized))
    tail = tuple(Dim(f"n{i}", frozen=True) for i in range(normalized))
    operands: list[Operand] = [lead + tail] + [tail for _ in ins[1:]]
    out_ops: list[Operand] = [lead + tail]
    for o in outs[1:]:  # native_layer_norm's mean and rstd: [..., 1, ...]
        out_ops.append(lead + tuple(Dim("1") for _ in range(o.rank - len(lead))))
    return OpDims(tuple(operands), tuple(out_ops))


def _batch_norm_eval(node: Node, ins: Specs, outs: Specs) -> OpDims:
    x = ins[0]
    b, c = Dim("b"), Dim("c")
    spatial = tuple(Dim(f"s{i}") for i in range(x.rank - 2))
    operands: list[Operand] = [(b, c) + spatial] + [(c,) if s.rank == 1 else () for s in ins[1:]]
    out_ops: list[Operand] = [(b, c) + spatial] + [
        tuple(Dim(f"o{k}_{i}", frozen=True) for i in range(o.rank)) for k, o in enumerate(outs[1:])
    ]
    return OpDims(tuple(operands), tuple(out_ops))


def _batch_norm_train(node: Node, ins: Specs, outs: Specs) -> OpDims:
    x = ins[0]
    b, c = Dim("b", frozen=True), Dim("c")
    spatial = tuple(Dim(f"s{i}", frozen=True) for i in range(x.rank - 2))
    operands: list[Operand] = [(b, c) + spatial] + [(c,) if s.rank == 1 else () for s in ins[1:]]
    out_ops: list[Operand] = [(b, c) + spatial] + [
        (c,)
        if o.rank == 1 and o.shape[0] == x.shape[1]
        else tuple(Dim(f"o{k}", frozen=True) for _ in range(o.rank))
        for k, o in enumerate(outs[1:])
    ]
    return OpDims(tuple(operands), tuple(out_ops))


def _embedding(node: Node, ins: Specs, outs: Specs) -> OpDims:
    ids = ins[1]
    lead = tuple(Dim(f"b{i}") for i in range(ids.rank))
    h = Dim("h")
    return OpDims(((Dim("V", frozen=True), h), lead), (lead + (h,),))


def _sdpa(node: Node, ins: Specs, outs: Specs) -> OpDims:
    q, k, v = ins[0], ins[1], ins[2]
    lead = [Dim(f"b{i}") for i in range(q.rank - 2)]
    gqa = k.shape[:-2] != q.shape[:-2]
    if gqa and lead:  # grouped-query attention: the heads map many-to-one (the batch dimensions do not)
        lead[-1] = Dim(lead[-1].label, frozen=True)
    # a causal call's query sequence splits only over the context-parallel axis (its ways mask by global
    # positions, costs.attention); a plain split would mask each piece by its local positions
    causal = bool(_arg(node, 5, "is_causal", False))
    s = Dim("s")
    d, t, e = Dim("d", frozen=True), Dim("t", frozen=True), Dim("e")

    def lead_of(x: TensorSpec) -> tuple[Dim, ...]:
        if x.shape[:-2] == q.shape[:-2]:
            return tuple(lead)
        # keys and values of fewer heads: their batch dimensions are the queries', their heads their own
        return tuple(
            lead[i] if x.rank == q.rank and i < x.rank - 3 and x.shape[i] == q.shape[i] else Dim(f"g{i}", frozen=True)
            for i in range(x.rank - 2)
        )

    operands: list[Operand] = [tuple(lead) + (s, d), lead_of(k) + (t, d), lead_of(v) + (t, e)]
    if len(ins) > 3:  # attention mask, broadcast to [..., s, t]
        mask = ins[3]
        full = list(lead) + [s, t]
        off = len(full) - mask.rank
        ref = tuple(q.shape[:-2]) + (q.shape[-2], k.shape[-2])
        operands.append(
            tuple(
                Dim("1") if mask.shape[i] == 1 and ref[off + i] != 1 else full[off + i]
                for i in range(mask.rank)
            )
        )
    return OpDims(tuple(operands), (tuple(lead) + (s, e),), context=frozenset({"s"}) if causal else frozenset())


def _conv(node: Node, ins: Specs, outs: Specs) -> OpDims:
    groups = int(_arg(node, 6, "groups", 1))  # type: ignore[arg-type]
    x = ins[0]
    spatial_in = tuple(Dim(f"i{i}", frozen=True) for i in range(x.rank - 2))
    spatial_k = tuple(Dim(f"k{i}", frozen=True) for i in range(x.rank - 2))
    spatial_out = tuple(Dim(f"o{i}", frozen=True) for i in range(x.rank - 2))
    b = Dim("b")
    if groups != 1:
        c = Dim("c", frozen=True)
        o = Dim("oc", frozen=True)
    else:
        c = Dim("c", reduce=True)
        o = Dim("oc")
    operands: list[Operand] = [(b, c) + spatial_in, (o, c) + spatial_k]
    if len(ins) > 2:
        operands.append((o,))
    return OpDims(tuple(operands), ((b, o) + spatial_out,))


def _pool(node: Node, ins: Specs, outs: Specs) -> OpDims:
    x = ins[0]
    lead = tuple(Dim(f"d{i}") for i in range(x.rank - 2))
    sp_in = tuple(Dim(f"i{i}", frozen=True) for i in range(2))
    out_ops = tuple(lead + tuple(Dim(f"o{k}{i}", frozen=True) for i in range(2)) for k in range(len(outs)))
    return OpDims((lead + sp_in,), out_ops)


def _creation(node: Node, ins: Specs, outs: Specs) -> OpDims:
    return _all_frozen(node, ins, outs)


def _getitem(node: Node, ins: Specs, outs: Specs) -> OpDims:
    # handled by the passes directly (it selects one output of a tuple-valued node)
    labels = tuple(Dim(f"d{i}") for i in range(outs[0].rank)) if outs else ()
    return OpDims((labels,), (labels,))


def _dropout(node: Node, ins: Specs, outs: Specs) -> OpDims:
    """A dropout that draws (p > 0, training) runs whole: every rank draws the numbers of the whole tensor, as
    eager PyTorch does; one that does not is the identity."""
    return _all_frozen(node, ins, outs) if draws_random(node) else _identity(node, ins, outs)


def _cross_entropy(node: Node, ins: Specs, outs: Specs) -> OpDims:
    """``cross_entropy_loss(x[N, C, d...], target[N, d...], weight[C]?, reduction, ignore_index, smoothing)``:
    the class dimension may be split (its pieces are combined inside the op); with reduction "none" the
    others map to the output, with "sum" they are contractions (partial sums); "mean" divides by a count the op keeps to itself: run whole (the
    planner rewrites a mean into sum / count, see passes.sharding.rewrite)."""
    reduction = _arg(node, 3, "reduction", 1)
    smoothing = _arg(node, 5, "label_smoothing", 0.0)
    x = ins[0]
    if reduction not in (0, 2) or smoothing not in (0, 0.0) or len(ins) != 2 or x.rank < 2:
        return _all_frozen(node, ins, outs)  # (a class weight would need a rule of its own)
    n = Dim("n", reduce=reduction == 2)
    rest = tuple(Dim(f"d{i}", reduce=reduction == 2) for i in range(x.rank - 2))
    # the classes may be split (vocabulary-parallel cross entropy): the sharded implementation combines
    # the per-class pieces with three all-reduces of one value per target (codegen: C.sharded_cross_entropy)
    c = Dim("c")
    operands: list[Operand] = [(n, c) + rest, (n,) + rest]
    out: Operand = () if reduction == 2 else (n,) + rest
    return OpDims(tuple(operands), (out,), combined=frozenset({"c"}))


def _where(node: Node, ins: Specs, outs: Specs) -> OpDims:
    return _elementwise(node, ins, outs)


def _topk(node: Node, ins: Specs, outs: Specs) -> OpDims:
    """``topk(x, k, dim)``: the dimension searched is needed whole; the others may be split (a router's top
    experts per token)."""
    rank = ins[0].rank
    d = _norm_dim(int(_arg(node, 2, "dim", -1)), rank)  # type: ignore[arg-type]
    labels = [Dim(f"d{i}") for i in range(rank)]
    inp, out = list(labels), list(labels)
    inp[d], out[d] = Dim("n", frozen=True), Dim("k", frozen=True)
    return OpDims((tuple(inp),), tuple(tuple(out) for _ in outs))


#: the routed experts of an MoE layer as one op (shardwise.frontend.experts): every token goes through its own
#: experts alone, so the tokens may be split like a batch; the experts are split by expert parallelism
#: (passes.sharding.experts), whose all-to-all the op's sharded implementation runs itself
MOE_EXPERTS = "shardwise.moe_experts.default"


def _moe_experts(node: Node, ins: Specs, outs: Specs) -> OpDims:
    """``moe_experts(hidden[t, h], index[t, k], weights[t, k], gate_up[e, 2f, h], down[e, h, f], act)``; with the
    gate and up projections as parts of their fused weight (``passes.sharding.rewrite``),
    ``moe_experts(hidden, index, weights, gate[e, f, h], up[e, f, h], down[e, h, f], act)``, whose intermediate
    dimension ``f`` tensor parallelism may split inside each expert (summed inside the op: partial outputs)."""
    if len(ins) == 6:
        dims = parse_dimops("t h^, t k^, t k^, e^ f h^, e^ f h^, e^ h^ f -> t h^")
        return dataclasses.replace(dims, inner=frozenset({"f"}))
    return parse_dimops("t h^, t k^, t k^, e^ g^ h^, e^ h^ f^ -> t h^")


def _moe_experts_flops(node: Node, ins: Specs, outs: Specs) -> int:
    """Each of the t * k routed rows through one expert: 2 h 2f (gate and up) + 2 f h (down)."""
    hidden, index, down = ins[0], ins[1], ins[-1]
    rows = index.shape[0] * index.shape[1]
    return 6 * rows * hidden.shape[1] * down.shape[2]


# ---------------------------------------------------------------------------------------------------------
# the table

_UNARY = [
    "abs", "neg", "exp", "log", "log1p", "sqrt", "rsqrt", "sin", "cos", "tanh", "sigmoid", "relu", "gelu", "silu",
    "erf", "reciprocal", "logical_not", "bitwise_not", "sign", "floor", "ceil", "round", "hardtanh", "leaky_relu",
    "elu", "softplus", "mish", "hardswish", "hardsigmoid", "relu6", "isnan", "isinf", "square",
]  # fmt: skip
_BINARY = [
    "add", "sub", "mul", "div", "pow", "maximum", "minimum", "eq", "ne", "lt", "le", "gt", "ge",
    "__and__", "__or__", "__xor__", "bitwise_and", "bitwise_or", "logical_and", "logical_or", "remainder",
    "fmod", "atan2", "rsub", "floor_divide",
]  # fmt: skip
_OVERLOADS = ["default", "Tensor", "Scalar", "Tensor_Scalar", "Tensor_Tensor", "Scalar_Tensor", "Tensor_mode"]

for name in _UNARY:
    _register([f"aten.{name}.default", f"aten.{name}_.default"], "elementwise", _elementwise, _per_output)
for name in _BINARY:
    _register([f"aten.{name}.{o}" for o in _OVERLOADS], "elementwise", _elementwise, _per_output)
_register(["aten.where.self", "aten.where.ScalarOther", "aten.where.ScalarSelf", "aten.where.Scalar"],
          "elementwise", _where, _per_output)  # fmt: skip
_register(["aten.masked_fill.Scalar", "aten.masked_fill.Tensor", "aten.clamp.default", "aten.clamp.Tensor",
           "aten.clamp_min.default", "aten.clamp_max.default", "aten.lerp.Scalar", "aten.addcmul.default",
           "aten.addcdiv.default", "aten.gelu_backward.default", "aten.threshold.default"],
          "elementwise", _elementwise, _per_output)  # fmt: skip
#: ops whose rule runs them whole when they draw random numbers (every rank draws the whole tensor)
WHOLE_WHEN_RANDOM = frozenset({"aten.dropout.default", "aten.native_dropout.default", "aten.alpha_dropout.default",
                               "aten.feature_dropout.default", "aten.feature_alpha_dropout.default"})  # fmt: skip
_register(sorted(WHOLE_WHEN_RANDOM), "elementwise", _dropout, _per_output)
_register(["aten.clone.default", "aten.contiguous.default", "aten.to.dtype", "aten.to.dtype_layout",
           "aten._to_copy.default", "aten.to.device", "aten.type_as.default", "aten.lift_fresh_copy.default"],
          "elementwise", _identity, _per_output)  # fmt: skip
_register(
    ["aten.alias.default", "aten.detach.default", "aten.view_as.default"], "view", _identity, _zero, False
)

_register("aten.linear.default", "matmul", _linear, _linear_flops)
_register("aten.addmm.default", "matmul", _addmm, _addmm_flops)
_register(["aten.mm.default", "aten.bmm.default", "aten.matmul.default"], "matmul", _matmul, _matmul_flops)
_register(["aten.view.default", "aten.reshape.default", "aten._unsafe_view.default", "aten.flatten.using_ints",
           "aten.unflatten.int", "aten.squeeze.dim", "aten.squeeze.dims", "aten.squeeze.default"],
          "view", _reshape, _zero, False)  # fmt: skip
_register(["aten.transpose.int", "aten.permute.default", "aten.t.default"], "view", _transpose, _zero, False)
_register("aten.unsqueeze.default", "view", _unsqueeze, _zero, False)
_register(["aten.expand.default", "aten.expand_as.default"], "view", _expand, _zero, False)
_register("aten.select.int", "view", _select, _zero, False)
_register(["aten.slice.Tensor", "aten.narrow.default"], "view", _slice, _zero, False)
_register(["aten.cat.default", "aten.concat.default"], "index", _cat, _per_output)
_register(
    ["aten.split.Tensor", "aten.split_with_sizes.default", "aten.chunk.default"], "view", _split, _zero, False
)
_register(["aten.sum.dim_IntList", "aten.sum.default"], "reduction", _reduction("sum"), _per_input)
_register(["aten.mean.dim", "aten.mean.default"], "reduction", _reduction("avg"), _per_input)
_register(["aten.amax.default", "aten.max.default"], "reduction", _reduction("max"), _per_input)
_register(["aten.softmax.int", "aten._softmax.default", "aten.log_softmax.int", "aten._log_softmax.default",
           "aten.cumsum.default"], "softmax", _one_frozen_dim(1, "dim"), _per_input_x5)  # fmt: skip
_register(["aten.layer_norm.default", "aten.native_layer_norm.default", "aten.rms_norm.default"],
          "norm", _layer_norm, _per_input_x5)  # fmt: skip
_register(["aten._native_batch_norm_legit_no_training.default", "aten.batch_norm.default"], "norm",
          _batch_norm_eval, _per_input_x5)  # fmt: skip
_register(["aten._native_batch_norm_legit_functional.default", "aten._native_batch_norm_legit.default"], "norm",
          _batch_norm_train, _per_input_x5)  # fmt: skip
_register("aten.embedding.default", "embedding", _embedding, _zero)
_register("aten.scaled_dot_product_attention.default", "attention", _sdpa, _sdpa_flops)
_register(
    ["aten.conv2d.default", "aten.conv1d.default", "aten.convolution.default"], "conv", _conv, _conv_flops
)
_register(["aten.max_pool2d.default", "aten.avg_pool2d.default", "aten.adaptive_avg_pool2d.default",
           "aten.max_pool2d_with_indices.default", "aten._adaptive_avg_pool2d.default"],
          "pool", _pool, _per_input)  # fmt: skip
_register(["aten.arange.default", "aten.arange.start", "aten.arange.start_step", "aten.full.default",
           "aten.zeros.default", "aten.ones.default", "aten.empty.memory_format", "aten.new_ones.default",
           "aten.new_zeros.default", "aten.new_full.default", "aten.new_empty.default", "aten.scalar_tensor.default"],
          "creation", _creation, _zero)  # fmt: skip
# a tensor of the input's shape: each rank makes its piece of it
_register(["aten.zeros_like.default", "aten.ones_like.default", "aten.full_like.default", "aten.empty_like.default"],
          "creation", _identity, _zero)  # fmt: skip
_register(["aten.tril.default", "aten.triu.default"], "elementwise", _matrix_op, _per_output)
_register("aten.unbind.int", "view", _unbind, _zero, False)
# what functionalization makes of in-place writes: x.fill_(v), x.copy_(y), x[..., a:b] = y, x[..., i] = y
_register(["aten.fill.Scalar", "aten.fill.Tensor", "aten.copy.default"], "elementwise", _elementwise, _per_output)
_register("aten.slice_scatter.default", "index", _slice_scatter, _per_output)
_register("aten.select_scatter.default", "index", _select_scatter, _per_output)
_register("aten.index_copy.default", "index", _index_copy, _per_output)
_register(["aten.index.Tensor", "aten.gather.default", "aten.index_select.default", "aten.diff.default",
           "aten.repeat.default", "aten.stack.default", "aten.flip.default", "aten.roll.default",
           "aten.argmax.default", "aten.sort.default", "aten.var.correction",
           "aten.var_mean.correction", "aten.std.correction", "aten.max.dim", "aten.min.dim",
           "aten.pad.default", "aten.constant_pad_nd.default", "aten.any.dim", "aten.all.dim", "aten.prod.dim_int"],
          "index", _all_frozen, _per_output)  # fmt: skip
_register("aten.topk.default", "index", _topk, _per_output)
_register(MOE_EXPERTS, "matmul", _moe_experts, _moe_experts_flops)
_register("aten.cross_entropy_loss.default", "loss", _cross_entropy, _per_input_x5)
_register(["aten.nll_loss_forward.default", "aten.nll_loss.default",
           "aten.mse_loss.default", "aten.l1_loss.default", "aten.smooth_l1_loss.default",
           "aten.binary_cross_entropy_with_logits.default"], "loss", _all_frozen, _per_input_x5)  # fmt: skip
_register("getitem", "getitem", _getitem, _zero, False)
_register(["sym_size", "sym_numel", "scalar_op"], "scalar", _all_frozen, _zero, False)


def _set_saves(saves: str, ops: Sequence[str]) -> None:
    for op in ops:
        REGISTRY[op] = dataclasses.replace(REGISTRY[op], saves=saves)


# what the backward reads (SAVES); views and other ops that move no data save nothing
for _rule in list(REGISTRY.values()):
    if not _rule.moves_data:
        _set_saves("none", [_rule.op])
_set_saves("none", [
    f"aten.{op}" for op in (
        "add.Tensor", "add.Scalar", "sub.Tensor", "sub.Scalar", "rsub.Scalar", "neg.default", "sum.default",
        "sum.dim_IntList", "mean.default", "mean.dim", "cat.default", "concat.default", "stack.default",
        "clone.default", "contiguous.default", "split.Tensor", "split_with_sizes.default", "chunk.default",
        "adaptive_avg_pool2d.default", "_adaptive_avg_pool2d.default", "avg_pool2d.default", "index_select.default",
        "embedding.default", "index.Tensor", "zeros_like.default", "ones_like.default", "full_like.default",
        "masked_fill.Scalar", "where.self", "pad.default", "constant_pad_nd.default", "repeat.default",
        "roll.default", "flip.default", "cumsum.default", "to.dtype", "to.dtype_layout", "_to_copy.default",
        "to.device", "type_as.default", "lift_fresh_copy.default", "tril.default", "triu.default",
        "empty_like.default", "fill.Scalar", "fill.Tensor", "copy.default", "slice_scatter.default",
        "select_scatter.default", "index_copy.default",
    )
])  # fmt: skip
_set_saves("output", [
    f"aten.{op}" for op in (
        "tanh.default", "tanh_.default", "relu.default", "relu_.default", "sigmoid.default", "sigmoid_.default",
        "softmax.int", "_softmax.default", "log_softmax.int", "_log_softmax.default", "exp.default", "exp_.default",
        "sqrt.default", "sqrt_.default", "rsqrt.default", "rsqrt_.default", "hardtanh.default",
    )
])  # fmt: skip
_set_saves("both", ["aten.scaled_dot_product_attention.default"])
_set_saves("factors", ["aten.mul.Tensor", "aten.div.Tensor", "aten.mul.Scalar", "aten.div.Scalar"])
_set_saves("mask", ["aten.dropout.default", "aten.native_dropout.default", "aten.alpha_dropout.default",
                    "aten.feature_dropout.default"])  # fmt: skip

# Python arithmetic on sizes (SymInt / SymFloat / SymBool) that torch.export records as graph nodes: the
# generated code evaluates it (``scalar_op`` nodes, their first argument names the function)
SCALAR_OPERATORS: dict[str, Callable[..., object]] = {
    "add": operator.add,
    "sub": operator.sub,
    "mul": operator.mul,
    "floordiv": operator.floordiv,
    "truediv": operator.truediv,
    "mod": operator.mod,
    "neg": operator.neg,
    "pow": operator.pow,
    "abs": operator.abs,
    "ge": operator.ge,
    "gt": operator.gt,
    "le": operator.le,
    "lt": operator.lt,
    "eq": operator.eq,
    "ne": operator.ne,
    "and_": operator.and_,
    "or_": operator.or_,
    "not_": operator.not_,
    "lshift": operator.lshift,
    "rshift": operator.rshift,
    "ceil": math.ceil,
    "floor": math.floor,
    "trunc": math.trunc,
    "round": round,
}
# torch's own functions on symbolic values (torch.sym_max, ...), evaluated as such by the generated code
SYM_FUNCTIONS = ("sym_int", "sym_float", "sym_ite", "sym_max", "sym_min", "sym_not", "sym_sqrt", "sym_sum")


def is_scalar_spec_list(specs: Sequence[object]) -> bool:
    return all(isinstance(s, ScalarSpec) for s in specs)


# ---------------------------------------------------------------------------------------------------------
# spellings: how a person writes each op in PyTorch (codegen.spelling reads them; ops without one are written
# ``aten.<name>.<overload>(...)``). Alternatives are separated by ";", the first that applies is used:
#   "torch.matmul", "F.linear"  a function called with the op's arguments in aten's order (and its keywords)
#   ".transpose"                 a method of the first argument, called with the others
#   ".reshape(*)"                a method whose one list argument (the second) is spread: x.reshape(8, -1)
#   "{0} @ {1}", "F.embedding({1}, {0})"
#                                a template: applies when the op has no keyword arguments and exactly the
#                                positional arguments it names ("{~5}" names one it leaves out)
# A spelling must compute exactly what the aten op computes for the arguments it applies to.

_INFIX = {"add": "+", "sub": "-", "mul": "*", "div": "/", "eq": "==", "ne": "!=", "lt": "<", "le": "<=", "gt": ">",
          "ge": ">=", "__and__": "&", "__or__": "|", "__xor__": "^"}  # fmt: skip
_TORCH_UNARY = ["abs", "exp", "log", "log1p", "sqrt", "rsqrt", "sin", "cos", "tanh", "sigmoid", "erf", "reciprocal",
                "logical_not", "bitwise_not", "sign", "floor", "ceil", "round", "isnan", "isinf", "square"]  # fmt: skip
_TORCH_BINARY = ["maximum", "minimum", "bitwise_and", "bitwise_or", "logical_and", "logical_or", "remainder", "fmod",
                 "atan2", "floor_divide", "pow"]  # fmt: skip

SPELLINGS: dict[str, str] = {}
# Tensor.to takes its memory_format by keyword only
_TO_DTYPE = ";".join(["{0}.to({1})", "{0}.to({1}, {2})", "{0}.to({1}, {2}, {3})", "{0}.to({1}, {2}, {3}, memory_format={4})"])
_TO_DEVICE = ";".join(
    ["{0}.to({1})", "{0}.to({1}, {2})", "{0}.to({1}, {2}, {3})", "{0}.to({1}, {2}, {3}, {4})",
     "{0}.to({1}, {2}, {3}, {4}, memory_format={5})"]
)  # fmt: skip
for _name, _sign in _INFIX.items():
    for _overload in ("Tensor", "Scalar"):
        _function = {
            "__and__": "torch.bitwise_and",
            "__or__": "torch.bitwise_or",
            "__xor__": "torch.bitwise_xor",
        }
        SPELLINGS[f"aten.{_name}.{_overload}"] = (
            f"{{0}} {_sign} {{1}};{_function.get(_name, f'torch.{_name}')}"
        )
SPELLINGS["aten.div.Tensor_mode"] = "torch.div"
SPELLINGS["aten.rsub.Scalar"] = SPELLINGS["aten.rsub.Tensor"] = "{1} - {0};torch.rsub({0}, {1}, alpha={2})"
for _name in _TORCH_UNARY:
    SPELLINGS[f"aten.{_name}.default"] = f"torch.{_name}"
for _name in _TORCH_BINARY:
    for _overload in _OVERLOADS:
        SPELLINGS[f"aten.{_name}.{_overload}"] = f"torch.{_name}"
SPELLINGS.update(
    {f"aten.pow.{o}": "{0} ** {1};torch.pow" for o in ("Tensor_Scalar", "Tensor_Tensor", "Scalar")}
)
SPELLINGS.update({
    "aten.neg.default": "-{0};torch.neg",
    "aten.relu.default": "F.relu", "aten.gelu.default": "F.gelu", "aten.silu.default": "F.silu",
    "aten.mish.default": "F.mish", "aten.hardswish.default": "F.hardswish", "aten.hardsigmoid.default": "F.hardsigmoid",
    "aten.relu6.default": "F.relu6", "aten.hardtanh.default": "F.hardtanh", "aten.leaky_relu.default": "F.leaky_relu",
    "aten.elu.default": "F.elu({0});F.elu({0}, {1})", "aten.softplus.default": "F.softplus",
    "aten.threshold.default": "F.threshold",
    "aten.where.self": "torch.where", "aten.where.ScalarOther": "torch.where", "aten.where.ScalarSelf": "torch.where",
    "aten.where.Scalar": "torch.where", "aten.masked_fill.Scalar": ".masked_fill",
    "aten.masked_fill.Tensor": ".masked_fill", "aten.clamp.default": "torch.clamp", "aten.clamp.Tensor": "torch.clamp",
    "aten.clamp_min.default": "torch.clamp_min", "aten.clamp_max.default": "torch.clamp_max",
    "aten.lerp.Scalar": "torch.lerp", "aten.addcmul.default": "torch.addcmul", "aten.addcdiv.default": "torch.addcdiv",
    "aten.dropout.default": "F.dropout", "aten.alpha_dropout.default": "F.alpha_dropout",
    "aten.feature_dropout.default": "torch.feature_dropout",
    "aten.clone.default": ".clone", "aten.contiguous.default": ".contiguous", "aten.to.dtype": _TO_DTYPE,
    "aten.to.device": _TO_DEVICE, "aten.type_as.default": ".type_as", "aten.detach.default": ".detach",
    "aten.view_as.default": ".view_as",
    "aten.linear.default": "F.linear", "aten.addmm.default": "torch.addmm", "aten.mm.default": "{0} @ {1};torch.mm",
    "aten.bmm.default": "{0} @ {1};torch.bmm", "aten.matmul.default": "{0} @ {1};torch.matmul",
    "aten.view.default": ".reshape(*)", "aten.reshape.default": ".reshape(*)", "aten._unsafe_view.default": ".reshape(*)",
    "aten.flatten.using_ints": "torch.flatten", "aten.unflatten.int": "torch.unflatten",
    "aten.squeeze.dim": "torch.squeeze", "aten.squeeze.dims": "torch.squeeze", "aten.squeeze.default": "torch.squeeze",
    "aten.transpose.int": ".transpose", "aten.permute.default": ".permute(*)", "aten.t.default": ".t",
    "aten.unsqueeze.default": ".unsqueeze", "aten.expand.default": ".expand(*)", "aten.expand_as.default": ".expand_as",
    "aten.select.int": "torch.select", "aten.cat.default": "torch.cat", "aten.concat.default": "torch.cat",
    "aten.split.Tensor": "torch.split", "aten.split_with_sizes.default": "torch.split", "aten.chunk.default": "torch.chunk",
    "aten.sum.dim_IntList": "torch.sum", "aten.sum.default": "torch.sum", "aten.mean.dim": "torch.mean",
    "aten.mean.default": "torch.mean", "aten.amax.default": "torch.amax", "aten.max.default": "torch.max",
    "aten.max.dim": "torch.max", "aten.min.dim": "torch.min",
    "aten.softmax.int": "torch.softmax", "aten.log_softmax.int": "torch.log_softmax", "aten.cumsum.default": "torch.cumsum",
    "aten.layer_norm.default": "F.layer_norm({0}, {1});F.layer_norm({0}, {1}, {2});F.layer_norm({0}, {1}, {2}, {3})"
                               ";F.layer_norm({0}, {1}, {2}, {3}, {4});F.layer_norm({0}, {1}, {2}, {3}, {4}){~5}",
    "aten.rms_norm.default": "F.rms_norm",
    "aten.batch_norm.default": "F.batch_norm({0}, {3}, {4}, {1}, {2}, {5}, {6}, {7}){~8}",
    "aten.embedding.default": "F.embedding({1}, {0});torch.embedding",
    "aten.scaled_dot_product_attention.default": "F.scaled_dot_product_attention",
    "aten.conv1d.default": "F.conv1d", "aten.conv2d.default": "F.conv2d", "aten.convolution.default": "torch.convolution",
    "aten.max_pool2d.default": "F.max_pool2d", "aten.avg_pool2d.default": "F.avg_pool2d",
    "aten.adaptive_avg_pool2d.default": "F.adaptive_avg_pool2d", "aten._adaptive_avg_pool2d.default": "F.adaptive_avg_pool2d",
    "aten.arange.default": "torch.arange", "aten.arange.start": "torch.arange", "aten.arange.start_step": "torch.arange",
    "aten.full.default": "torch.full", "aten.zeros.default": "torch.zeros", "aten.ones.default": "torch.ones",
    "aten.empty.memory_format": "torch.empty", "aten.new_ones.default": ".new_ones", "aten.new_zeros.default": ".new_zeros",
    "aten.new_full.default": ".new_full", "aten.new_empty.default": ".new_empty",
    "aten.scalar_tensor.default": "torch.scalar_tensor", "aten.zeros_like.default": "torch.zeros_like",
    "aten.ones_like.default": "torch.ones_like", "aten.full_like.default": "torch.full_like",
    "aten.empty_like.default": "torch.empty_like", "aten.tril.default": "torch.tril", "aten.triu.default": "torch.triu",
    "aten.gather.default": "torch.gather", "aten.index_select.default": "torch.index_select", "aten.diff.default": "torch.diff",
    "aten.repeat.default": ".repeat(*)", "aten.stack.default": "torch.stack", "aten.flip.default": "torch.flip",
    "aten.roll.default": "torch.roll", "aten.argmax.default": "torch.argmax", "aten.topk.default": "torch.topk",
    "aten.sort.default": "torch.sort", "aten.var.correction": "torch.var", "aten.var_mean.correction": "torch.var_mean",
    "aten.std.correction": "torch.std", "aten.pad.default": "F.pad", "aten.constant_pad_nd.default": "F.pad({0}, {1})",
    "aten.index_copy.default": "torch.index_copy", "aten.any.dim": "torch.any", "aten.all.dim": "torch.all", "aten.prod.dim_int": "torch.prod",
    # (aten.copy has no autograd formula: written as what it computes)
    "aten.copy.default": "{1}.to({0}.dtype).expand_as({0}).clone()",
    MOE_EXPERTS: "C.moe_experts",
})  # fmt: skip


def spelling_of(op: str) -> str:
    """The op's spelling (see SPELLINGS), "" when generated code writes it the aten way."""
    rule = REGISTRY.get(op)
    return rule.spelling if rule is not None else ""


for _op, _spelling in SPELLINGS.items():
    if _op in REGISTRY:
        REGISTRY[_op] = dataclasses.replace(REGISTRY[_op], spelling=_spelling)
