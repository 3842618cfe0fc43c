"""Step times measured inside a worker, so that the pool's messages are not counted.

``time_train_steps(module, *inputs, steps=5)`` runs in a worker (``WorkerPool.call_function``) on the
generated program's module: one untimed ``train_step``, then ``steps`` timed ones; returns their seconds.
``time_steps(module, *inputs, step_method=..., warmup=..., steps=...)`` does the same for any step method
(``train_step`` or ``infer``), starting every timed step after a barrier over all ranks, so that the ranks'
clocks measure the same step (a step's time is the largest of its ranks'). Every rank runs the same steps
(their collectives pair up), so call them on all ranks.
"""

from __future__ import annotations

import time
from typing import Any

__all__ = ["time_train_steps", "time_steps"]


def time_train_steps(module: Any, *inputs: Any, steps: int = 5) -> list[float]:
    """Seconds of each of ``steps`` ``module.train_step(*inputs)`` calls, after one warm-up step."""
    module.train_step(*inputs)
    out = []
    for _ in range(steps):
        start = time.perf_counter()
        module.train_step(*inputs)
        out.append(time.perf_counter() - start)
    return out


def time_steps(
    module: Any, *inputs: Any, step_method: str = "train_step", warmup: int = 2, steps: int = 5
) -> list[float]:
    """Seconds of each of ``steps`` ``module.<step_method>(*inputs)`` calls after ``warmup`` untimed ones; each
    timed call starts after a barrier over the default process group (when one is initialised)."""
    import torch.distributed as dist

    run = getattr(module, step_method)
    for _ in range(warmup):
        run(*inputs)
    synced = dist.is_available() and dist.is_initialized()
    out = []
    for _ in range(steps):
        if synced:
            dist.barrier()
        start = time.perf_counter()
        run(*inputs)
        out.append(time.perf_counter() - start)
    return out
