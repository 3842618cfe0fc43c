"""Custom ops a user's model might register, one of each kind shardwise treats differently (see
shardwise/frontend/custom_ops.py). A module of its own: worker processes import it to call the ops that run
whole, as a generated program would."""

from __future__ import annotations

import torch

__all__ = ["softsign2", "grad_clip", "cia_square_plus", "first_positive_rows"]


@torch.library.custom_op("swuser::softsign2", mutates_args=())
def softsign2(x: torch.Tensor) -> torch.Tensor:
    """A Python implementation that traces to ATen ops: decomposed for inference; in training its own
    autograd formula is kept (it runs whole)."""
    return 2 * x / (1 + x.abs())


@softsign2.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def _softsign2_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _softsign2_backward(ctx, grad):
    (x,) = ctx.saved_tensors
    return grad * 2 / (1 + x.abs()) ** 2


softsign2.register_autograd(_softsign2_backward, setup_context=_softsign2_setup)


@torch.library.custom_op("swuser::grad_clip", mutates_args=())
def grad_clip(x: torch.Tensor) -> torch.Tensor:
    """Identity forward, clipped gradient: its own autograd formula, which a decomposition would drop, so
    it runs whole."""
    return x.clone()


@grad_clip.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def _grad_clip_setup(ctx, inputs, output):
    pass


def _grad_clip_backward(ctx, grad):
    return grad.clamp(-1e-3, 1e-3)


grad_clip.register_autograd(_grad_clip_backward, setup_context=_grad_clip_setup)


_LIB = torch.library.Library("swuser", "FRAGMENT")
_LIB.define("square_plus(Tensor x) -> Tensor")
_LIB.impl("square_plus", lambda x: x * x + x, "CompositeImplicitAutograd")


def cia_square_plus(x: torch.Tensor) -> torch.Tensor:
    """An op with a CompositeImplicitAutograd kernel: decomposed."""
    return torch.ops.swuser.square_plus(x)


@torch.library.custom_op("swuser::first_positive_rows", mutates_args=())
def first_positive_rows(x: torch.Tensor) -> torch.Tensor:
    """Reads a tensor value into Python (how many leading rows have a positive sum): its implementation does
    not trace, it has no decomposition, so it runs whole."""
    n = int((x.sum(-1) > 0).long().cumprod(0).sum())
    out = x.clone()
    out[n:] = 0
    return out


@first_positive_rows.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def _rows_setup(ctx, inputs, output):
    ctx.save_for_backward((output != 0).any(-1, keepdim=True))


def _rows_backward(ctx, grad):
    (kept,) = ctx.saved_tensors
    return grad * kept


first_positive_rows.register_autograd(_rows_backward, setup_context=_rows_setup)
