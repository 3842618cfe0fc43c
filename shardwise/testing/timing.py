"""Step times measured inside a worker, so that the pool's messages are not counted.

``time_train_steps(module, *inputs, steps=5)`` runs in a worker (``WorkerPool.call_function``) on the
generated program's module: one untimed ``train_step``, then ``steps`` timed ones; returns their seconds.
Every rank runs the same steps (their collectives pair up), so call it on all ranks.
"""

from __future__ import annotations

import time
from typing import Any

__all__ = ["time_train_steps"]


def time_train_steps(module: Any, *inputs: Any, steps: int = 5) -> list[float]:
    """Seconds of each of ``steps`` ``module.train_step(*inputs)`` calls, after one warm-up step."""
    module.train_step(*inputs)
    out = []
    for _ in range(steps):
        start = time.perf_counter()
        module.train_step(*inputs)
        out.append(time.perf_counter() - start)
    return out
