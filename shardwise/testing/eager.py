"""The single-process eager reference that distributed training is compared with.

``eager_training(model, inputs, loss_fn, optimizer_factory, steps=3, kwargs=None)`` trains ``model`` in this
process the way a user would (training mode, dropout off as ``shardwise.compile`` sets it,
``loss_fn(model(*inputs, **kwargs))``,
backward, optimizer step, gradients cleared) and returns the losses and the final state_dict.
``assert_training_equal`` compares another run's losses and full state_dict with it (float32 tolerances by
default: rtol 1e-4, atol 1e-5), naming the first tensor that differs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

__all__ = ["eager_training", "assert_training_equal", "assert_weights_moved"]


def eager_training(
    model: torch.nn.Module,
    inputs: Sequence[Any],
    loss_fn: Callable[[Any], torch.Tensor],
    optimizer_factory: Callable[..., torch.optim.Optimizer],
    steps: int = 3,
    kwargs: Mapping[str, Any] | None = None,
) -> tuple[list[float], dict[str, torch.Tensor]]:
    """(loss of each step, final state_dict) of ``steps`` eager training steps of ``model`` (modified);
    ``kwargs`` are passed to every call of ``model`` (e.g. ``labels`` for a model's own loss)."""
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    optimizer = optimizer_factory(model.parameters())
    losses = []
    for _ in range(steps):
        loss = loss_fn(model(*inputs, **(kwargs or {})))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, model.state_dict()


def assert_training_equal(
    losses: Sequence[float],
    state: Mapping[str, torch.Tensor],
    expected_losses: Sequence[float],
    expected_state: Mapping[str, torch.Tensor],
    *,
    rtol: float = 1e-4,
    atol: float = 1e-5,
) -> None:
    """Raise AssertionError unless the losses and every tensor of ``expected_state`` match."""
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected_losses), rtol=rtol, atol=atol)
    missing = set(expected_state) - set(state)
    assert not missing, f"the state_dict lacks {sorted(missing)[:5]}"
    for key, value in expected_state.items():
        torch.testing.assert_close(state[key], value, rtol=rtol, atol=atol, msg=lambda m, key=key: f"{key}: {m}")


def assert_weights_moved(
    initial: Mapping[str, torch.Tensor], final: Mapping[str, torch.Tensor], *, at_least: float = 1e-3
) -> None:
    """Raise AssertionError unless some tensor of ``final`` differs from ``initial`` by more than ``at_least``
    (training steps that changed the weights well beyond a comparison's tolerance)."""
    largest = max((final[k] - v).abs().max().item() for k, v in initial.items())
    assert largest > at_least, f"the steps moved no weight by more than {at_least} (largest change {largest:.3g})"
