"""Calls that start from the caller's random generator state, so that random ops draw what eager PyTorch draws.

A compiled model runs every random op whole on every rank that needs it (shardwise.ir.registry.draws_random).
``call_seeded`` sets each rank's CPU generator to the caller's state before the call, so the ranks draw the same
numbers, the numbers eager PyTorch would draw in the caller's process, and returns the state after the call for
the caller to continue from (``CompiledModel.run`` and ``train_step`` do both).
"""

from __future__ import annotations

from typing import Any

__all__ = ["call_seeded"]


def call_seeded(module: Any, method: str, state: Any, *args: Any) -> tuple[Any, Any]:
    """``module.<method>(*args)`` from CPU generator state ``state``; returns (its result, the state after)."""
    import torch

    torch.set_rng_state(state)
    result = getattr(module, method)(*args)
    return result, torch.get_rng_state()
