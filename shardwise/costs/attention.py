"""Prices of attention over a sequence split ``cp`` ways (context parallelism): the three ways to do it.

Every rank holds ``1/cp`` of the sequence of the queries, keys and values (and of the rows of an attention
mask). Attention needs every key for every query; the ways differ in what moves:

* ``allgather``: the keys and values are all-gathered over the cp group before attention and the gradient of
  the gathered copies reduce-scattered in the backward (what the placement ILP does with any split label:
  the redistribution machinery prices and emits it, this module only names it); an ``is_causal=True`` call
  (no mask tensor) gathers them in the program, which masks its rows by their global positions: its kernel
  computes every block of its rows, priced as the causal share once more;
* ``ulysses`` (DeepSpeed-Ulysses, Jacobs et al. 2023): queries, keys and values go from sequence-split to
  head-split by one all-to-all each, attention runs on whole sequences of ``heads/cp`` heads, and the output
  returns by one more all-to-all; the backward runs the four all-to-alls' adjoints (all-to-alls again). The
  mask's rows are all-gathered (no gradient). Needs the heads (after any tensor-parallel split) divisible by
  ``cp``;
* ``ring`` (ring attention, Liu et al. 2023; as torchtitan's context parallelism): the key/value blocks pass
  around the cp ring in ``cp - 1`` steps while each rank attends its queries to the block it holds, the
  blocks merged by an online softmax. Each step's message is hidden behind the block's compute where the
  compute is longer (only the excess is charged). The backward (FlashAttention's, block by block) passes the
  blocks around again, each hop hidden behind a block's backward where that is longer, and sends each block's
  gradient along with it once it is made: ``cp`` hops waited for (one per step, and one more home). Blocks
  that a causal mask hides entirely are skipped. Where the sequence cuts into ``2 cp`` chunks the cp axis
  holds chunk pairs (rank ``r``: chunks ``r`` and ``2cp - 1 - r``, ``ir.placement.pairs_chunks``) and every
  rank does the same work; with contiguous chunks (rank ``r`` holds chunk ``r``) the last rank attends
  ``cp - 1/2`` blocks' worth where the average is ``cp/2``, and the price charges that imbalance. The program
  computes each block with separate kernels (no fused attention kernel returns the log-sum-exp it needs):
  their launches and passes over the block's scores are charged too (``RING_*``). A published compiled system
  (``fused_blocks``: PyTorch's ``context_parallel`` as torchtitan runs it) calls a fused kernel per block, which
  returns the log-sum-exp, and merges the blocks' results itself in float32 (``TORCH_RING_*``): per step, the
  running output merged with the block's, and the keys and values packed into one buffer to send; in the
  backward, each block's gradients accumulated in float32 and the key/value gradients packed and passed along
  in float32 (their hops at twice the 16-bit bytes). These passes are memory-bound and not hidden. Its messages
  move as PyTorch's code moves them (``_templated_ring_attention`` and its backward, unchanged from torch 2.5 to
  the torch of December 2024): the keys and values by the default ``rotate_method``, all-gather, once per call
  (launched before the first block, waited for before the second: only what exceeds one block is exposed, in
  the forward and again in the backward), the key/value gradients by an all-to-all rotater, one hop per step,
  each waited for only after the next block's backward is launched (hidden behind it where the block is
  longer), the last one after the loop (exposed). The bytes are those of the keys and values the call
  receives: a model that repeats its key/value heads before the call (torchtitan's ``repeat_kv``) passes the
  repeated heads. Its blocks are FlashAttention calls of their own: with chunk pairs the first step's block is
  causal and every later one has no mask, so of a causal call's forward the later blocks run at the cluster's
  rate without a mask (``efficiency.attention_forward_full``, :func:`ring_forward_factor`).

All sizes are one rank's local bytes. Returns (forward seconds, backward seconds) of the way's communication
(and, for ring, of the causal imbalance) beyond the attention's own compute share, which the caller prices as
the op split ``cp`` ways.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from shardwise.costs.compute import is_causal_attention
from shardwise.costs.prices import PriceList
from shardwise.ir.graph import Node
from shardwise.ir.placement import DeviceMesh, Shard, ShardingSpec, pairs_chunks
from shardwise.ir.tensor import TensorSpec, dtype_bytes

__all__ = ["CP_WAYS", "AttentionShape", "context_attention_s", "way_label", "way_of",
           "ulysses_problem", "attention_shape", "node_context_attention_s", "ways_s", "ring_blocks",
           "RING_FORWARD_KERNELS", "RING_FORWARD_PASSES", "RING_BACKWARD_KERNELS", "RING_BACKWARD_PASSES",
           "TORCH_RING_MERGE", "TORCH_RING_ACCUMULATE", "TORCH_RING_GRAD_PACK", "TORCH_RING_PACK",
           "ring_causal_share", "ring_forward_factor", "node_ring_forward_factor"]  # fmt: skip

CP_WAYS = ("allgather", "ulysses", "ring")
_SEP = "@"


def way_label(label: str, way: str, causal: bool = False) -> str:
    """The split label a strategy records for a context-parallel attention done ``way`` ("s@ring"). The
    all-gather of keys and values is a plain split (the redistribution does it), except for an ``is_causal``
    call (``causal``), whose program gathers them itself and masks by global positions ("s@allgather")."""
    return label if way == "allgather" and not causal else f"{label}{_SEP}{way}"


def way_of(label: str) -> str | None:
    """The way of a recorded split label ("s@ring" -> "ring"); None for a plain label."""
    return label.split(_SEP, 1)[1] if _SEP in label else None


@dataclass(frozen=True)
class AttentionShape:
    """One rank's share of a context-parallel attention call."""

    q_bytes: float  # local queries
    kv_bytes: float  # local keys plus values
    out_bytes: float  # local output
    mask_bytes: float  # local mask rows (0 without a mask tensor)
    heads: int  # heads on this rank before the all-to-all (after tensor parallelism)
    causal: bool  # the mask (or is_causal) hides the blocks above the diagonal
    balanced: bool = False  # the cp axis holds chunk pairs: a causal mask leaves every rank the same work
    score_bytes: float = 0.0  # the scores of this rank's queries against one rank's keys (one ring block)
    flagged: bool = False  # an ``is_causal=True`` call (no mask tensor): its ways build the mask themselves
    value_bytes: float = 2.0  # bytes of one element of the queries, keys and values (at the run's precision)


#: the program's ring attention (``runtime/lib/attention.py``) computes each (query chunk, key chunk) block with
#: separate kernels, counted from its code: per block, the kernels it launches and its passes over the block's
#: scores (each a read or a write of every score). Forward: the scores' matmul, scale, mask, maximum, merge
#: (maxima, rescaling), exponential, sums, the weighted values' matmul; backward: the scores again, the
#: probabilities, their gradient, and three gradient matmuls accumulated
RING_FORWARD_KERNELS = 21
RING_FORWARD_PASSES = 11
RING_BACKWARD_KERNELS = 15
RING_BACKWARD_PASSES = 18

#: PyTorch's ring attention (``torch/distributed/tensor/experimental/_attention.py``, ``_templated_ring_attention``
#: and its backward, with ``convert_to_f32=True``, the default in the torch torchtitan's December 2024 benchmark
#: ran), per ring step, bytes moved per element, each step's passes taken as one fused kernel (Inductor compiles
#: the block, torchtitan's ``fullgraph=True``): the forward merge reads the running float32 output and the block's
#: 16-bit output and writes the running output (4 + 2 + 4); the backward adds each block's 16-bit gradient into
#: float32 accumulators of the queries and of the received key/value gradients (4 + 2 + 4 per element) and packs
#: the key/value gradients into one float32 buffer to send (4 + 4); both directions pack the keys and values into
#: one buffer before each send (a read and a write of their 16-bit bytes). Counted on the busiest rank (every
#: step merges all its rows)
TORCH_RING_MERGE = 10.0
TORCH_RING_ACCUMULATE = 10.0
TORCH_RING_GRAD_PACK = 8.0
TORCH_RING_PACK = 2.0


def ring_blocks(cp: int, causal: bool, balanced: bool) -> tuple[int, float]:
    """(blocks the busiest rank computes, each block's share of one rank's queries x one rank's keys) of the
    program's ring attention: chunk pairs cut each rank's rows and keys in two (blocks of a quarter), contiguous
    chunks do not; a causal mask hides the blocks above the diagonal (the last rank's are all visible)."""
    if balanced:
        return (2 * cp + 1 if causal else 4 * cp), 0.25
    return cp, 1.0


def ring_causal_share(cp: int, balanced: bool) -> float:
    """Of the busiest rank's ring work for a causal call (PyTorch's ring), the share in the block that runs the
    causal kernel: with chunk pairs the first of ``cp`` steps of equal work (``_templated_ring_attention``:
    step 0 causal over the rank's two chunks, every later step a block without a mask over half its rows or
    keys); with contiguous chunks the last rank's diagonal block, half of its ``cp - 1/2`` blocks' work."""
    return 1.0 / cp if balanced else 0.5 / (cp - 0.5)


def ring_forward_factor(prices: PriceList, cp: int, causal: bool, balanced: bool) -> float:
    """PyTorch's ring attention (fused blocks, :func:`context_attention_s` with ``fused_blocks``) over ``cp``
    ranks: its forward seconds over those of the call's share priced as one causal call (every FLOP at
    ``attention_forward``): the causal block at that rate, the blocks without a mask at
    ``attention_forward_full``. 1.0 for a call that is not causal (already priced without a mask) and where the
    cluster lists no rate without a mask."""
    eff = prices.compute.efficiency
    if not causal or cp < 2 or not eff.attention_forward_full:
        return 1.0
    share = ring_causal_share(cp, balanced)
    return share + (1.0 - share) * eff.attention_forward / eff.attention_forward_full


def node_ring_forward_factor(prices: PriceList, node: Node, ins: Sequence[TensorSpec], cp: int) -> float:
    """:func:`ring_forward_factor` of attention ``node`` (operand specs ``ins``) split over ``cp`` ranks: causal by
    its ``is_causal`` flag, balanced where its sequence cuts into ``2 cp`` chunks."""
    balanced = bool(ins) and ins[0].rank >= 2 and pairs_chunks(ins[0].shape[-2], cp)
    return ring_forward_factor(prices, cp, is_causal_attention(node), balanced)


def ulysses_problem(heads: int, kv_heads: int, cp: int) -> str:
    """Why Ulysses cannot split these heads ``cp`` ways ("" when it can)."""
    if heads % cp:
        return f"the {heads} attention heads (per tensor-parallel rank) do not divide by cp={cp}"
    if kv_heads % cp and cp % kv_heads:
        return f"the {kv_heads} key/value heads neither divide by cp={cp} nor divide it (to be repeated)"
    return ""


def context_attention_s(
    prices: PriceList, ranks: Sequence[int], way: str, shape: AttentionShape, *, compute_forward_s: float,
    compute_backward_s: float, train: bool, fused_blocks: bool = False,
) -> tuple[float, float]:  # fmt: skip
    """(forward, backward) seconds of ``way``'s communication over the cp group ``ranks`` (see the module
    docstring); ``compute_*_s``: the attention's own share on one rank (what ring hides its messages behind);
    ``fused_blocks``: ring's blocks run as fused attention kernels (a published system's program: PyTorch's
    ``context_parallel``), so the ``RING_*`` charges of shardwise's own block kernels do not apply and its
    float32 merges and accumulations (``TORCH_RING_*``) do."""
    cp = len(ranks)
    if cp < 2:
        return 0.0, 0.0
    if way == "allgather":
        fwd = prices.collective_s("allgather", shape.kv_bytes * cp, ranks)  # (the mask's rows stay split)
        bwd = prices.collective_s("reduce_scatter", shape.kv_bytes * cp, ranks) if train else 0.0
        if shape.flagged:  # is_causal: the program's call takes a mask of global positions, so its kernel
            # computes every block of its rows (twice the causal share the op is priced at)
            fwd += compute_forward_s
            bwd += compute_backward_s if train else 0.0
        return fwd, bwd
    if way == "ulysses":
        moved = (shape.q_bytes, shape.kv_bytes, shape.out_bytes)
        fwd = sum(prices.collective_s("alltoall", b, ranks) for b in moved)
        fwd += prices.collective_s("allgather", shape.mask_bytes * cp, ranks)
        bwd = sum(prices.collective_s("alltoall", b, ranks) for b in moved) if train else 0.0
        return fwd, bwd
    if way == "ring":
        hop = max(prices.p2p_s(shape.kv_bytes, ranks[i], ranks[(i + 1) % cp]) for i in range(cp))
        steps = cp - 1
        # the busiest rank's blocks: all cp of them, or under a causal mask with contiguous chunks the last
        # rank's cp - 1 whole blocks and half of the diagonal one, against an average of cp / 2
        imbalance = 0.0
        if shape.causal and not shape.balanced:
            imbalance = (cp - 0.5) / (cp / 2) - 1.0
        block_f = compute_forward_s * (1 + imbalance) / cp
        # the program computes each block with its own kernels (RING_*): their launches and passes over scores
        blocks, share = ring_blocks(cp, shape.causal, shape.balanced)
        compute = prices.compute

        def unfused(kernels: int, passes: int) -> float:
            return compute.with_overhead(compute.byte_s(passes * shape.score_bytes * share * blocks), kernels * blocks)

        # a published system's fused blocks: PyTorch's float32 merges and accumulations (TORCH_RING_*)
        out_el, q_el, kv_el = (b / shape.value_bytes for b in (shape.out_bytes, shape.q_bytes, shape.kv_bytes))
        merges_f = steps * (TORCH_RING_MERGE * out_el + TORCH_RING_PACK * shape.kv_bytes)
        merges_b = cp * (TORCH_RING_ACCUMULATE * (q_el + kv_el) + TORCH_RING_GRAD_PACK * kv_el)
        merges_b += steps * TORCH_RING_PACK * shape.kv_bytes

        if fused_blocks:  # PyTorch's ring: keys and values all-gathered once, behind the first block
            gather = prices.collective_s("allgather", shape.kv_bytes * cp, ranks)
            fwd = max(gather - block_f, 0.0) + compute_forward_s * imbalance + compute.byte_s(merges_f)
        else:
            fwd = steps * max(hop - block_f, 0.0) + compute_forward_s * imbalance
            fwd += unfused(RING_FORWARD_KERNELS, RING_FORWARD_PASSES)
        if not train:
            return fwd, 0.0
        # the blocks travel again (hidden where a block's backward is longer), and each block's gradient
        # follows its block once made: in the program, cp hops waited for (cp - 1 steps and one more home);
        # PyTorch's ring passes the gradients in float32
        grad_hop = hop
        if fused_blocks:
            grad_bytes = shape.kv_bytes * 4.0 / shape.value_bytes
            grad_hop = max(prices.p2p_s(grad_bytes, ranks[i], ranks[(i + 1) % cp]) for i in range(cp))
        block_b = compute_backward_s * (1 + imbalance) / cp
        if fused_blocks:  # the keys and values gathered again behind the first block's backward; each float32
            # gradient hop waited for after the next block's backward is launched, the last one after the loop
            bwd = max(gather - block_b, 0.0) + steps * max(grad_hop - block_b, 0.0) + grad_hop
            return fwd, bwd + compute_backward_s * imbalance + compute.byte_s(merges_b)
        bwd = steps * max(hop - block_b, 0.0) + cp * grad_hop + compute_backward_s * imbalance
        bwd += unfused(RING_BACKWARD_KERNELS, RING_BACKWARD_PASSES)
        return fwd, bwd
    raise ValueError(f"unknown context-parallel attention way {way!r}: use one of {', '.join(CP_WAYS)}")


def _local(spec: TensorSpec, placement: ShardingSpec | None, mesh: DeviceMesh, width: float) -> float:
    n = spec.nbytes * (width if spec.dtype.startswith(("float", "bfloat")) else 1.0)
    if placement is not None:  # (a placement borrowed from the queries splits only the dimensions it has)
        for size, p in zip(mesh.shape, placement.placements, strict=True):
            if isinstance(p, Shard) and p.dim < spec.rank and spec.shape[p.dim] > 1:
                n /= size
    return n


def attention_shape(
    node: Node, ins: Sequence[TensorSpec], out: TensorSpec, inputs: Sequence[ShardingSpec | None], mesh: DeviceMesh,
    axis: str, width: float = 1.0,
) -> AttentionShape:  # fmt: skip
    """One rank's share of attention ``node`` (operand specs ``ins``, output ``out``) whose operands are placed
    ``inputs`` on ``mesh``, split over ``axis`` (the cp axis); ``width``: bytes at the precision over traced."""
    pl = list(inputs) + [None] * (len(ins) - len(inputs))
    q = _local(ins[0], pl[0], mesh, width)
    kv = _local(ins[1], pl[1], mesh, width) + _local(ins[2], pl[2], mesh, width)
    mask = _local(ins[3], pl[3], mesh, width) if len(ins) > 3 else 0.0
    heads = ins[0].shape[-3] if ins[0].rank >= 3 else 1
    p0 = pl[0]
    if p0 is not None and ins[0].rank >= 3:
        for size, p in zip(mesh.shape, p0.placements, strict=True):
            if isinstance(p, Shard) and p.dim == ins[0].rank - 3:
                heads //= size
    out_bytes = _local(out, pl[0], mesh, width) * (out.numel / max(ins[0].numel, 1))
    causal = is_causal_attention(node) or len(ins) > 3  # a mask tensor: taken as causal (a language model's)
    cp = mesh.axis_size(axis)
    balanced = ins[0].rank >= 2 and pairs_chunks(ins[0].shape[-2], cp)
    scores = q / max(ins[0].shape[-1], 1) * ins[1].shape[-2] / cp  # this rank's rows x one rank's keys
    value = dtype_bytes(ins[0].dtype) * width
    return AttentionShape(q, kv, out_bytes, mask, heads, causal, balanced, scores, is_causal_attention(node), value)


def node_context_attention_s(
    prices: PriceList, mesh: DeviceMesh, axis: str, way: str, node: Node, ins: Sequence[TensorSpec],
    out: TensorSpec, inputs: Sequence[ShardingSpec | None], *, compute_forward_s: float, compute_backward_s: float,
    train: bool, width: float = 1.0, fused_blocks: bool = False,
) -> tuple[float, float]:  # fmt: skip
    """:func:`context_attention_s` of attention ``node`` placed ``inputs`` on ``mesh`` (cp axis ``axis``)."""
    shape = attention_shape(node, ins, out, inputs, mesh, axis, width)
    return context_attention_s(
        prices, prices.axis_group(mesh, axis), way, shape, compute_forward_s=compute_forward_s,
        compute_backward_s=compute_backward_s, train=train, fused_blocks=fused_blocks,
    )  # fmt: skip


def ways_s(
    prices: PriceList, mesh: DeviceMesh, axis: str, node: Node, ins: Sequence[TensorSpec], out: TensorSpec,
    q_placement: ShardingSpec, *, compute_forward_s: float, compute_backward_s: float, train: bool,
    width: float = 1.0,
) -> dict[str, tuple[float, float] | str]:  # fmt: skip
    """Every way's (forward, backward) seconds for attention ``node`` whose queries are placed ``q_placement``
    (the keys, values and mask rows taken as split the same way), or why the way cannot run (Ulysses: heads):
    what ``explain`` compares."""
    shape = attention_shape(node, ins, out, [q_placement] * len(ins), mesh, axis, width)
    ranks = prices.axis_group(mesh, axis)
    cp = len(ranks)
    kv_heads = ins[1].shape[-3] if ins[1].rank >= 3 else 1
    kv_heads = max(kv_heads * shape.heads // max(ins[0].shape[-3], 1), 1) if ins[0].rank >= 3 else kv_heads
    out_ways: dict[str, tuple[float, float] | str] = {}
    for way in CP_WAYS:
        problem = ulysses_problem(shape.heads, kv_heads, cp) if way == "ulysses" else ""
        out_ways[way] = problem or context_attention_s(
            prices, ranks, way, shape, compute_forward_s=compute_forward_s, compute_backward_s=compute_backward_s,
            train=train,
        )
    return out_ways
