"""Attention over a sequence split across a mesh axis (context parallelism), with its backward.

``context_attention(q, k, v, mask, mesh, axis, way, ...)`` computes ``F.scaled_dot_product_attention`` of the
whole sequence while each rank holds a contiguous chunk of it (rank ``i`` of the axis holds chunk ``i`` of the
queries, keys, values and of the mask's rows, the mask's columns whole), and returns this rank's chunk of the
output. Three ways (all-gathering the keys and values is an ordinary redistribution before an ordinary
attention call, except for an ``is_causal=True`` call, whose mask must follow the rows' global positions):

* ``"allgather"``: the keys and values all-gathered (their gradients reduce-scattered back), this rank's rows
  attended to all of them, an ``is_causal`` call masked by the rows' global positions (chunk pairs on a paired
  axis);

* ``"ulysses"`` (DeepSpeed-Ulysses): an all-to-all turns the sequence split of q, k, v into a split of the heads
  (rank ``j`` gets the ``j``-th contiguous group of ``heads / n``), attention runs on whole sequences (the mask's
  rows all-gathered), and one more all-to-all turns the output back. The heads must divide by the axis size
  (key/value heads that do not are repeated to the query heads first). The all-to-alls are
  ``moe.all_to_all_rows`` (heads as rows), whose backward is the reverse all-to-all.
* ``"ring"`` (ring attention): the key/value block passes around the ring (rank ``i`` sends to ``i + 1``) in
  ``n - 1`` steps; each step's message is sent while the block held is attended to. On a paired axis
  (``mesh.Mesh.paired``: rank ``i`` holds sequence chunks ``i`` and ``2n - 1 - i``) each query chunk attends each
  key chunk of the block separately, so that the chunks a causal mask hides are skipped and every rank does
  the same work. Blocks are merged by an online softmax (running maximum, running sum of exponentials,
  running weighted values); a block the mask hides from every query of this rank is skipped.
  Its backward is its own (FlashAttention's, block by block): the forward keeps q, k, v, the output and each
  row's log-sum-exp; the backward passes the blocks around again, recomputes each block's probabilities and
  sends the block's gradient along with it (one hop per step, and one more home at the end), so no block's
  probabilities are kept between the forward and the backward.

Without autograd (``torch.no_grad()``) the same code runs without recording.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .collectives import all_gather
from .mesh import Mesh, chunk_ids, join, pieces
from .moe import all_to_all_rows

__all__ = ["context_attention"]


class _Pending:
    """The point-to-point requests of one ring shift in flight."""

    def __init__(self) -> None:
        self.requests: list = []
        self.sent: torch.Tensor | None = None


def _peers(mesh: Mesh, axis: str, step: int) -> tuple[int, int]:
    """Global ranks (send to, receive from) for a shift of ``step`` along the axis's ring."""
    ranks = mesh.group_ranks[axis]
    n, i = len(ranks), mesh.index(axis)
    return ranks[(i + step) % n], ranks[(i - step) % n]


def _start(x: torch.Tensor, mesh: Mesh, axis: str, step: int, pending: _Pending) -> torch.Tensor:
    x = x.contiguous()
    buf = torch.empty_like(x)
    to, source = _peers(mesh, axis, step)
    group = mesh.group(axis)
    pending.sent = x
    pending.requests = [dist.isend(x, to, group=group), dist.irecv(buf, source, group=group)]
    return buf


def _shift_now(x: torch.Tensor, mesh: Mesh, axis: str, step: int) -> torch.Tensor:
    pending = _Pending()
    buf = _start(x, mesh, axis, step, pending)
    for r in pending.requests:
        r.wait()
    return buf


def _repeat_kv(k: torch.Tensor, v: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped-query keys and values repeated to ``heads`` heads (as ``enable_gqa`` does)."""
    if k.shape[-3] == heads:
        return k, v
    r = heads // k.shape[-3]
    return k.repeat_interleave(r, dim=-3), v.repeat_interleave(r, dim=-3)


def _seq_to_heads(t: torch.Tensor, mesh: Mesh, axis: str) -> torch.Tensor:
    """[..., H, s, D] with this rank's piece of the sequence -> [..., H/n, S, D] with the whole sequence and this
    rank's contiguous group of heads: one all-to-all (``moe.all_to_all_rows``: rank j gets head group j)."""
    n, heads, seq = mesh.size(axis), t.dim() - 3, t.dim() - 2
    rows = t.movedim(heads, 0)  # (H, ..., s, D): heads as rows, group j for rank j
    group = rows.shape[0] // n
    got = all_to_all_rows(rows, [group] * n, [group] * n, mesh, axis)  # n x (H/n) rows: one piece per source
    parts = [p.movedim(0, heads) for p in got.split(group)]  # each (..., H/n, s, D)
    return join(parts, seq, mesh, axis)


def _heads_to_seq(t: torch.Tensor, mesh: Mesh, axis: str) -> torch.Tensor:
    """The inverse of :func:`_seq_to_heads`: [..., H/n, S, E] -> [..., H, s, E]."""
    n, heads, seq = mesh.size(axis), t.dim() - 3, t.dim() - 2
    group = t.shape[heads]
    rows = torch.cat([p.movedim(heads, 0) for p in pieces(t, seq, mesh, axis)])  # rank j's sequence piece
    got = all_to_all_rows(rows, [group] * n, [group] * n, mesh, axis)  # (H, ..., s, E): head groups in order
    return got.movedim(0, heads)


def _ulysses(q, k, v, mask, mesh, axis, scale, is_causal, enable_gqa, dropout_p):  # noqa: ANN001, ANN202
    n = mesh.size(axis)
    heads = q.dim() - 3
    if q.shape[heads] % n:
        raise ValueError(f"Ulysses attention needs the heads ({q.shape[heads]}) divisible by the axis size ({n})")
    if k.shape[heads] % n:
        k, v = _repeat_kv(k, v, q.shape[heads])
    q, k, v = (_seq_to_heads(t, mesh, axis) for t in (q, k, v))
    gqa = enable_gqa and k.shape[heads] != q.shape[heads]
    if mask is not None:
        if mask.dim() >= 2 and mask.shape[-2] > 1:  # this rank's rows: gather them all (no gradient)
            mask = all_gather(mask.detach() if mask.is_floating_point() else mask, mask.dim() - 2, mesh, axis)
        mask_heads = heads - (q.dim() - mask.dim())  # the mask's head dimension (broadcast from the right)
        if mask_heads >= 0 and mask.shape[mask_heads] > 1:  # this rank's contiguous group of heads
            mask = mask.chunk(n, dim=mask_heads)[mesh.index(axis)]
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=gqa
    )
    return _heads_to_seq(out, mesh, axis)


def _causal_block(rows: int, cols: int, row0: int, col0: int, device) -> torch.Tensor:  # noqa: ANN001
    i = torch.arange(row0, row0 + rows, device=device).unsqueeze(1)
    j = torch.arange(col0, col0 + cols, device=device).unsqueeze(0)
    return j <= i


class _Online:
    """One group of query rows' running softmax: the largest score (detached: the result does not depend on
    it), the sum of exponentials and the exponential-weighted sum of values."""

    def __init__(self) -> None:
        self.top: torch.Tensor | None = None
        self.acc: torch.Tensor | None = None
        self.total: torch.Tensor | None = None

    def add(self, s: torch.Tensor, v: torch.Tensor) -> None:
        peak = s.detach().amax(dim=-1, keepdim=True)
        top = peak if self.top is None else torch.maximum(self.top, peak)
        safe = torch.where(torch.isinf(top), torch.zeros_like(top), top)
        p = torch.exp(s - safe)
        part, mass = torch.matmul(p, v), p.sum(dim=-1, keepdim=True)
        if self.acc is None:
            self.acc, self.total = part, mass
        else:
            assert self.top is not None and self.total is not None
            old = torch.where(torch.isinf(self.top), torch.zeros_like(self.top), self.top)
            keep = torch.exp(old - safe)
            self.acc, self.total = self.acc * keep + part, self.total * keep + mass
        self.top = top

    def log_sum_exp(self, like: torch.Tensor) -> torch.Tensor:
        """log(sum of exponentials) per query row (-inf for a row every key is hidden from)."""
        if self.acc is None:
            return torch.full(like.shape[:-1] + (1,), float("-inf"), dtype=like.dtype, device=like.device)
        assert self.top is not None and self.total is not None
        return torch.where(torch.isinf(self.top), self.top, self.top + self.total.log())

    def result(self, like: torch.Tensor, width: int) -> torch.Tensor:
        if self.acc is None:  # every key hidden from these queries: what sdpa's softmax of -inf rows gives
            return torch.full(like.shape[:-1] + (width,), float("nan"), dtype=like.dtype, device=like.device)
        assert self.total is not None
        return self.acc / self.total


def _allowed(mask, is_causal, qi, r, c, rows, cols, device):  # noqa: ANN001, ANN202
    """The mask of query chunk ``r`` (this rank's ``qi``-th group of rows) against key chunk ``c``: a slice of
    the mask tensor, the causal triangle, or None (every key allowed)."""
    if mask is not None:
        allowed = mask.narrow(-2, qi * rows, rows) if mask.shape[-2] > 1 else mask
        return allowed.narrow(-1, c * cols, cols)
    if is_causal:
        return _causal_block(rows, cols, r * rows, c * cols, device)
    return None


def _hidden(allowed: torch.Tensor | None) -> bool:
    return allowed is not None and allowed.dtype == torch.bool and not bool(allowed.any())


def _scores(q: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor | None, scale: float) -> torch.Tensor:
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if allowed is None:
        return s
    return s.masked_fill(~allowed, float("-inf")) if allowed.dtype == torch.bool else s + allowed


class _RingAttention(torch.autograd.Function):
    """Ring attention with its own backward (FlashAttention's, per block): the forward keeps only q, k, v, the
    output and the log-sum-exp of every query row; the backward passes the key/value block around the ring
    again, recomputes each block's probabilities from the log-sum-exp, and sends the block's gradient along
    with it, so that after the last step one more hop brings each block's gradient home."""

    @staticmethod
    def forward(ctx, q, k, v, mask, mesh, axis, scale, is_causal):
        n, me = mesh.size(axis), mesh.index(axis)
        mine = chunk_ids(mesh, axis)  # the sequence chunks this rank's rows are (two on a paired axis)
        groups = len(mine)
        rows, cols, width = q.shape[-2] // groups, k.shape[-2] // groups, k.shape[-1]
        queries = q.chunk(groups, dim=-2)
        states = [_Online() for _ in mine]
        block = torch.cat([k, v], dim=-1)
        for step in range(n):
            pending = _Pending()
            if step < n - 1:  # the next block travels while this one is attended to
                incoming = _start(block, mesh, axis, 1, pending)
            theirs = chunk_ids(mesh, axis, (me - step) % n)  # the chunks of the block held at this step
            for qi, r in enumerate(mine):
                for kj, c in enumerate(theirs):
                    allowed = _allowed(mask, is_causal, qi, r, c, rows, cols, q.device)
                    if _hidden(allowed):
                        continue  # hidden from every query of this group: not computed (the causal saving)
                    part = block.narrow(-2, kj * cols, cols)
                    states[qi].add(_scores(queries[qi], part[..., :width], allowed, scale), part[..., width:])
            if step < n - 1:
                for request in pending.requests:
                    request.wait()
                block = incoming
        out = torch.cat([st.result(qp, v.shape[-1]) for st, qp in zip(states, queries, strict=True)], dim=-2)
        lse = torch.cat([st.log_sum_exp(qp) for st, qp in zip(states, queries, strict=True)], dim=-2)
        ctx.save_for_backward(q, k, v, out, lse, mask if mask is not None else torch.empty(0))
        ctx.args = (mesh, axis, scale, is_causal, mask is not None)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse, mask = ctx.saved_tensors
        mesh, axis, scale, is_causal, masked = ctx.args
        mask = mask if masked else None
        n, me = mesh.size(axis), mesh.index(axis)
        mine = chunk_ids(mesh, axis)
        groups = len(mine)
        rows, cols, width = q.shape[-2] // groups, k.shape[-2] // groups, k.shape[-1]
        grad = grad.contiguous()
        # rows hidden from every key (lse -inf) get no gradient
        safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
        delta = (grad * out).sum(dim=-1, keepdim=True).nan_to_num(0.0)
        queries, grads = q.chunk(groups, dim=-2), grad.chunk(groups, dim=-2)
        tops, deltas = safe.chunk(groups, dim=-2), delta.chunk(groups, dim=-2)
        dq = [torch.zeros_like(x) for x in queries]
        block = torch.cat([k, v], dim=-1)
        dblock = torch.zeros_like(block)
        for step in range(n):
            pending = _Pending()
            if step < n - 1:  # the next block travels while this one's gradient is made
                incoming = _start(block, mesh, axis, 1, pending)
            theirs = chunk_ids(mesh, axis, (me - step) % n)
            for qi, r in enumerate(mine):
                for kj, c in enumerate(theirs):
                    allowed = _allowed(mask, is_causal, qi, r, c, rows, cols, q.device)
                    if _hidden(allowed):
                        continue
                    part = block.narrow(-2, kj * cols, cols)
                    kb, vb = part[..., :width], part[..., width:]
                    p = torch.exp(_scores(queries[qi], kb, allowed, scale) - tops[qi])
                    dp = torch.matmul(grads[qi], vb.transpose(-1, -2))
                    ds = p * (dp - deltas[qi])
                    dq[qi] += torch.matmul(ds, kb) * scale
                    into = dblock.narrow(-2, kj * cols, cols)
                    into[..., :width] += torch.matmul(ds.transpose(-1, -2), queries[qi]) * scale
                    into[..., width:] += torch.matmul(p.transpose(-1, -2), grads[qi])
            # the block's gradient follows the block (after the last step: home, one hop on)
            dblock = _shift_now(dblock, mesh, axis, 1)
            if step < n - 1:
                for request in pending.requests:
                    request.wait()
                block = incoming
        dk, dv = dblock[..., :width], dblock[..., width:]
        return torch.cat(dq, dim=-2), dk, dv, None, None, None, None, None


def _ring(q, k, v, mask, mesh, axis, scale, is_causal, enable_gqa):  # noqa: ANN001, ANN202
    if enable_gqa:
        k, v = _repeat_kv(k, v, q.shape[-3])
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if mask is not None and mask.is_floating_point() and mask.requires_grad:
        mask = mask.detach()  # (a mask's gradient is not computed)
    return _RingAttention.apply(q, k, v, mask, mesh, axis, scale, is_causal)


def _positions(mesh: Mesh, axis: str, rows: int, device) -> torch.Tensor:  # noqa: ANN001
    """The global sequence positions of this rank's ``rows`` rows (its chunks, ``chunk_ids``, in order)."""
    ids = chunk_ids(mesh, axis)
    size = rows // len(ids)
    return torch.cat([torch.arange(c * size, (c + 1) * size, device=device) for c in ids])


def _gathered(q, k, v, mask, mesh, axis, scale, is_causal, enable_gqa):  # noqa: ANN001, ANN202
    """The keys and values all-gathered (their gradients, partial over the axis, reduce-scattered back) and this
    rank's rows attended to all of them; ``is_causal``: masked by the rows' global positions."""
    seq = k.dim() - 2
    k = all_gather(k, seq, mesh, axis, partial_grad=True)
    v = all_gather(v, seq, mesh, axis, partial_grad=True)
    if is_causal:
        rows = _positions(mesh, axis, q.shape[-2], q.device)
        mask = torch.arange(k.shape[-2], device=q.device).unsqueeze(0) <= rows.unsqueeze(1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=enable_gqa)


def context_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, mesh: Mesh, axis: str,
    way: str, *, dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:  # fmt: skip
    """This rank's chunk of ``F.scaled_dot_product_attention(q, k, v, mask, ...)`` over the sequence split
    along ``axis`` (see the module docstring); ``way``: ``"allgather"``, ``"ulysses"`` or ``"ring"``."""
    if mesh.size(axis) == 1:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa
        )
    if dropout_p:
        raise ValueError("context-parallel attention runs without dropout (dropout_p must be 0)")
    if way == "ulysses":
        return _ulysses(q, k, v, mask, mesh, axis, scale, is_causal, enable_gqa, dropout_p)
    if way == "ring":
        return _ring(q, k, v, mask, mesh, axis, scale, is_causal, enable_gqa)
    if way == "allgather":
        return _gathered(q, k, v, mask, mesh, axis, scale, is_causal, enable_gqa)
    raise ValueError(f"unknown context-parallel attention way {way!r}: 'allgather', 'ulysses' or 'ring'")
