"""Step times measured inside a worker, so that the pool's messages are not counted.

``time_train_steps(module, *inputs, steps=5)`` runs in a worker (``WorkerPool.call_function``) on the
generated program's module: one untimed ``train_step``, then ``steps`` timed ones; returns their seconds.
``time_steps(module, *inputs, step_method=..., warmup=..., steps=...)`` does the same for any step method
(``train_step`` or ``infer``), starting every timed step after a barrier over all ranks, so that the ranks'
clocks measure the same step (a step's time is the largest of its ranks'). Every rank runs the same steps
(their collectives pair up), so call them on all ranks.

``time_steps(..., anatomy=True)`` returns, for each step, where the calling thread's wall time went
(:func:`step_anatomy`): ``wall``; ``cpu``, the thread's own CPU time (``time.thread_time``); ``run_queue``, the
time it was ready to run but waited for a CPU another thread held (Linux's per-thread scheduler statistics,
``/proc/thread-self/schedstat``; None where the kernel does not give them); the rest of ``wall`` the thread
was blocked (in a collective, waiting for its peers). On a machine shared with other processes, ``run_queue``
is the share of a step the machine's other load took, which the price list (the machine undisturbed, as
``shardwise calibrate`` measures it) does not include.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

__all__ = ["time_train_steps", "time_steps", "run_queue_s", "step_anatomy"]

_SCHEDSTAT = Path("/proc/thread-self/schedstat")


def run_queue_s() -> float | None:
    """Seconds the calling thread has spent ready to run but waiting for a CPU (None when unknown)."""
    try:
        fields = _SCHEDSTAT.read_text().split()
        return int(fields[1]) * 1e-9
    except (OSError, IndexError, ValueError):
        return None


def step_anatomy(run: Any, *inputs: Any) -> dict[str, float | None]:
    """Call ``run(*inputs)`` once; its ``wall``, ``cpu`` and ``run_queue`` seconds (module docstring)."""
    queue0 = run_queue_s()
    cpu0 = time.thread_time()
    start = time.perf_counter()
    run(*inputs)
    wall = time.perf_counter() - start
    cpu = time.thread_time() - cpu0
    queue1 = run_queue_s()
    queue = None if queue0 is None or queue1 is None else max(queue1 - queue0, 0.0)
    return {"wall": wall, "cpu": cpu, "run_queue": queue}


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
    module: Any, *inputs: Any, step_method: str = "train_step", warmup: int = 2, steps: int = 5,
    anatomy: bool = False,
) -> list[float] | list[dict[str, float | None]]:  # fmt: skip
    """Seconds of each of ``steps`` ``module.<step_method>(*inputs)`` calls after ``warmup`` untimed ones; each
    timed call starts after a barrier over the default process group (when one is initialised). With
    ``anatomy``, each step's :func:`step_anatomy` instead of its seconds."""
    import torch.distributed as dist

    run = getattr(module, step_method)
    for _ in range(warmup):
        run(*inputs)
    synced = dist.is_available() and dist.is_initialized()
    out: list[Any] = []
    for _ in range(steps):
        if synced:
            dist.barrier()
        if anatomy:
            out.append(step_anatomy(run, *inputs))
        else:
            start = time.perf_counter()
            run(*inputs)
            out.append(time.perf_counter() - start)
    return out
