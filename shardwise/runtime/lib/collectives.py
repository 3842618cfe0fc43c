"""Autograd-aware collectives: the redistributions a program runs between ops.

Each forward collective's backward is its adjoint, so ``loss.backward()`` on every rank is correct:
shard <-> all_gather, all_reduce (sum) <-> identity, reduce_scatter <-> all_gather, and
``grad_all_reduce`` (identity forward, all-reduce backward: Megatron's "f" operator) for values whose
gradient each rank only knows in part. A collective over an axis of one rank returns its input. Without
autograd (``torch.no_grad()``) they run as plain collectives (``comm``).

``schedule="<name>"`` (see ``comm``) runs a forward collective by the plan's point-to-point program; its
backward uses the backend's algorithm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import comm
from .mesh import Mesh

__all__ = [
    "all_gather",
    "all_reduce",
    "all_to_all",
    "grad_all_reduce",
    "reduce_scatter",
    "shard",
    "sharded_cross_entropy",
    "to_partial",
]


class _Shard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, mesh, axis):
        ctx.args = (dim, mesh, axis, x.shape[dim])
        return comm.split(x, dim, mesh, axis)

    @staticmethod
    def backward(ctx, grad):
        dim, mesh, axis, size = ctx.args
        return comm.gather(grad, dim, mesh, axis, size), None, None, None


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, mesh, axis, size, schedule):
        ctx.args = (dim, mesh, axis)
        return comm.gather(x, dim, mesh, axis, size, schedule)

    @staticmethod
    def backward(ctx, grad):
        dim, mesh, axis = ctx.args
        return comm.split(grad, dim, mesh, axis), None, None, None, None, None


class _AllGatherPartialGrad(torch.autograd.Function):
    """All-gather whose output's gradient is a partial sum over the axis: the backward reduce-scatters."""

    @staticmethod
    def forward(ctx, x, dim, mesh, axis, size, schedule):
        ctx.args = (dim, mesh, axis)
        return comm.gather(x, dim, mesh, axis, size, schedule)

    @staticmethod
    def backward(ctx, grad):
        dim, mesh, axis = ctx.args
        return comm.reduce_scatter(grad, dim, mesh, axis, "sum"), None, None, None, None, None


class _AllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mesh, axis, op, schedule):
        ctx.args = (mesh, axis, op)
        y = comm.reduce(x, mesh, axis, op, schedule)
        if op == "max":
            ctx.save_for_backward(x, y)
        return y

    @staticmethod
    def backward(ctx, grad):
        mesh, axis, op = ctx.args
        if op == "avg":
            grad = grad / mesh.size(axis)
        elif op == "max":
            # the gradient goes where the maximum is: shared equally by the ranks that hold it
            x, y = ctx.saved_tensors
            hit = (x == y).to(grad.dtype)
            grad = grad * hit / comm.reduce(hit, mesh, axis, "sum").clamp(min=1)
        return grad, None, None, None, None


class _ToPartial(torch.autograd.Function):
    """Replicate -> Partial("sum"): rank 0 keeps the value, the others hold zeros. The sum over ranks is the
    value itself, so the backward passes the (whole) gradient to every rank unchanged."""

    @staticmethod
    def forward(ctx, x, mesh, axis):
        return x.clone() if mesh.index(axis) == 0 else torch.zeros_like(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


class _ShardedCrossEntropy(torch.autograd.Function):
    """Cross entropy over classes split along dim 1 across the axis (vocabulary parallel, as in Megatron-LM):
    each rank holds the logits of its classes; the maximum, the sum of exponentials and the target's logit
    are combined by three all-reduces of one value per target, so the logits are never gathered. The
    backward is local: softmax minus the one-hot of the target, on this rank's classes."""

    @staticmethod
    def forward(ctx, x, target, mesh, axis, reduction, ignore_index, size):
        wide = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        classes = wide.shape[1]
        # this rank's first class: the pieces are torch.chunk's (the first ones ceil(size / n) classes)
        start = mesh.index(axis) * (classes if size is None else -(-size // mesh.size(axis)))
        peak = comm.reduce(wide.detach().amax(dim=1, keepdim=True), mesh, axis, "max")
        shifted = wide - peak
        exp = shifted.exp()
        total = comm.reduce(exp.sum(dim=1, keepdim=True), mesh, axis, "sum")
        valid = target != ignore_index
        local = target - start
        mine = valid & (local >= 0) & (local < classes)
        index = local.clamp(0, classes - 1).unsqueeze(1)
        picked = comm.reduce(shifted.gather(1, index) * mine.unsqueeze(1), mesh, axis, "sum")
        loss = (total.log() - picked).squeeze(1) * valid
        ctx.save_for_backward(exp / total, index, mine, valid)
        ctx.reduction, ctx.dtype = reduction, x.dtype
        out = loss.sum() if reduction == 2 else loss.sum() / valid.sum() if reduction == 1 else loss
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        softmax, index, mine, valid = ctx.saved_tensors
        if ctx.reduction == 1:
            grad = grad / valid.sum()
        g = (grad.expand(valid.shape) if ctx.reduction else grad).to(softmax.dtype) * valid
        out = softmax * g.unsqueeze(1)
        out.scatter_add_(1, index, -(g * mine).unsqueeze(1))
        return out.to(ctx.dtype), None, None, None, None, None, None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, mesh, axis, op, schedule):
        ctx.args = (dim, mesh, axis, op, x.shape[dim])
        return comm.reduce_scatter(x, dim, mesh, axis, op, schedule)

    @staticmethod
    def backward(ctx, grad):
        dim, mesh, axis, op, size = ctx.args
        grad = comm.gather(grad, dim, mesh, axis, size)
        if op == "avg":
            grad = grad / mesh.size(axis)
        return grad, None, None, None, None, None


class _AllToAll(torch.autograd.Function):
    """Shard(src_dim) -> Shard(dst_dim) by schedule; the backward moves the gradient back (library)."""

    @staticmethod
    def forward(ctx, x, src_dim, dst_dim, mesh, axis, schedule):
        ctx.args = (src_dim, dst_dim, mesh, axis)
        return comm.exchange(x, src_dim, dst_dim, mesh, axis, schedule)

    @staticmethod
    def backward(ctx, grad):
        src_dim, dst_dim, mesh, axis = ctx.args
        return all_to_all(grad, dst_dim, src_dim, mesh, axis), None, None, None, None, None


class _GradAllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mesh, axes):
        ctx.args = (mesh, axes)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        mesh, axes = ctx.args
        for axis in axes:
            grad = comm.reduce(grad, mesh, axis, "sum")
        return grad, None, None


def shard(x: torch.Tensor, dim: int, mesh: Mesh, axis: str) -> torch.Tensor:
    """Replicate -> Shard(dim): keep this rank's piece (no communication)."""
    if mesh.size(axis) == 1:
        return x
    return _Shard.apply(x, dim, mesh, axis) if torch.is_grad_enabled() else comm.split(x, dim, mesh, axis)


def all_gather(x, dim, mesh, axis, partial_grad=False, size=None, schedule=None):
    """Shard(dim) -> Replicate. ``partial_grad``: the consumers leave a partial gradient (Megatron's
    sequence-parallel all-gather), which the backward reduce-scatters. ``size``: the whole dimension, given
    when it is not a multiple of the axis size (uneven torch.chunk pieces). ``schedule``: see the module."""
    if mesh.size(axis) == 1:
        return x
    if not torch.is_grad_enabled():
        return comm.gather(x, dim, mesh, axis, size, schedule)
    if partial_grad and x.requires_grad:
        return _AllGatherPartialGrad.apply(x, dim, mesh, axis, size, schedule)
    return _AllGather.apply(x, dim, mesh, axis, size, schedule)


def all_reduce(x, mesh, axis, op="sum", schedule=None):
    """Partial -> Replicate."""
    if mesh.size(axis) == 1:
        return x
    if torch.is_grad_enabled():
        return _AllReduce.apply(x, mesh, axis, op, schedule)
    return comm.reduce(x, mesh, axis, op, schedule)


def reduce_scatter(x, dim, mesh, axis, op="sum", schedule=None):
    """Partial -> Shard(dim)."""
    if mesh.size(axis) == 1:
        return x
    if torch.is_grad_enabled():
        return _ReduceScatter.apply(x, dim, mesh, axis, op, schedule)
    return comm.reduce_scatter(x, dim, mesh, axis, op, schedule)


def all_to_all(x, src_dim, dst_dim, mesh, axis, size=None, schedule=None):
    """Shard(src_dim) -> Shard(dst_dim); ``size``: the whole ``src_dim`` when its pieces are uneven."""
    n = mesh.size(axis)
    if size is None and n > 1 and x.shape[dst_dim] % n == 0 and comm.schedule_runs(schedule, x):
        if torch.is_grad_enabled():
            return _AllToAll.apply(x, src_dim, dst_dim, mesh, axis, schedule)
        return comm.exchange(x, src_dim, dst_dim, mesh, axis, schedule)
    return shard(all_gather(x, src_dim, mesh, axis, size=size), dst_dim, mesh, axis)


def to_partial(x, mesh, axis, op="sum"):
    """Replicate -> Partial: the first rank of the group keeps the value, the others hold zeros (for sums)."""
    if mesh.size(axis) == 1 or op != "sum":
        return x
    if torch.is_grad_enabled() and x.requires_grad:
        return _ToPartial.apply(x, mesh, axis)
    return x if mesh.index(axis) == 0 else torch.zeros_like(x)


def sharded_cross_entropy(x, target, mesh, axis, reduction=1, ignore_index=-100, size=None):
    """``F.cross_entropy(x, target)`` (no class weight, no smoothing) with x's classes (dim 1) split over
    ``axis``; reduction 0 "none", 1 "mean", 2 "sum". Every rank returns the whole result. ``size``: the
    number of classes, given when it is not a multiple of the axis size (uneven torch.chunk pieces)."""
    if mesh.size(axis) == 1:
        return F.cross_entropy(
            x, target, reduction=("none", "mean", "sum")[reduction], ignore_index=ignore_index
        )
    return _ShardedCrossEntropy.apply(x, target, mesh, axis, reduction, ignore_index, size)


def grad_all_reduce(x, mesh, axes):
    """Identity forward; sums the gradient over ``axes`` in the backward."""
    axes = tuple(a for a in axes if mesh.size(a) > 1)
    if not axes or not torch.is_grad_enabled() or not x.requires_grad:
        return x
    return _GradAllReduce.apply(x, mesh, axes)
