"""Worker-side steps of ``bench/gpu_check.py``, run in the WorkerPool's processes (``call_function``).

This module is imported by name in the workers (the bench directory is on the caller's ``sys.path``, which
the workers take over); it needs torch and, on the Triton path, triton.
"""

from __future__ import annotations

import time
from typing import Any

__all__ = ["group_decisions", "infer_timed", "train_timed", "triton_launches"]

_LAUNCHES = [0]


def triton_launches() -> int:
    """Triton kernel launches so far in this process (0 when triton is not imported). The first call
    installs the counter on Triton's launch paths (compiled and interpreted kernels)."""
    import sys

    if "triton" not in sys.modules:
        return 0
    from triton.runtime import interpreter, jit

    for cls in (jit.JITFunction, interpreter.InterpretedFunction):
        run = cls.run
        if getattr(run, "_counted", False):
            continue

        def counted(self, *args, _run=run, **kwargs):
            _LAUNCHES[0] += 1
            return _run(self, *args, **kwargs)

        counted._counted = True
        cls.run = counted
    return _LAUNCHES[0]


def group_decisions(module: Any) -> list[bool]:
    """The list every fused-group call of ``module``'s program appends to: True when the group ran its
    Triton kernel, False when it fell back to its eager code (e.g. inputs of other dtypes than planned).
    Empty when the package has no kernels or its kernels module has no ``_use_triton`` to watch."""
    import sys

    kernels = sys.modules.get(type(module).__module__.rsplit(".", 1)[0] + ".kernels")
    use = getattr(kernels, "_use_triton", None)
    if use is None:
        return []
    if not hasattr(use, "decisions"):

        def watched(*args, _use=use, **kwargs):
            decision = _use(*args, **kwargs)
            watched.decisions.append(bool(decision))
            return decision

        watched.decisions = []
        kernels._use_triton = watched
        use = watched
    return use.decisions


def _sync(device: Any) -> None:
    import torch

    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _first_tensor(out: Any) -> Any:
    import torch

    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return next(_first_tensor(o) for o in out if _first_tensor(o) is not None)
    return getattr(out, "logits", None)


def infer_timed(module: Any, inputs: tuple, repeats: int) -> dict:
    """The program's forward on ``inputs`` (already on the rank's device): the first output (CPU, float32),
    the milliseconds of ``repeats`` calls after a warm-up one, the Triton launches of one call and how many
    of its fused-group calls ran on Triton."""
    import torch

    device = getattr(module, "device", None)
    triton_launches()
    with torch.no_grad():
        out = module(*inputs)  # warm-up: compiles the kernels
        _sync(device)
        before, decisions = triton_launches(), group_decisions(module)
        decisions.clear()
        out = module(*inputs)
        _sync(device)
        launches, groups = triton_launches() - before, list(decisions)
        ms = []
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            module(*inputs)
            _sync(device)
            ms.append((time.perf_counter() - t0) * 1e3)
    first = _first_tensor(out)
    return {
        "output": first.detach().float().cpu(), "ms": ms, "triton_launches": launches, "device": str(device),
        "groups_on_triton": sum(groups), "group_calls": len(groups),
    }  # fmt: skip


def train_timed(module: Any, inputs: tuple, steps: int) -> dict:
    """``steps`` training steps (the optimizer configured by the caller): the losses, the milliseconds of
    each step, the Triton launches of the last one and how many of its fused-group calls ran on Triton."""
    device = getattr(module, "device", None)
    losses, ms = [], []
    launches, decisions = 0, group_decisions(module)
    for _ in range(steps):
        before = triton_launches()
        decisions.clear()
        _sync(device)
        t0 = time.perf_counter()
        loss = module.train_step(*inputs)
        _sync(device)
        ms.append((time.perf_counter() - t0) * 1e3)
        launches = triton_launches() - before
        losses.append(float(loss))
    return {
        "losses": losses, "ms": ms, "triton_launches": launches, "groups_on_triton": sum(decisions),
        "group_calls": len(decisions),
    }  # fmt: skip
