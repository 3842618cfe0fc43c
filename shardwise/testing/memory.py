"""Measured memory of one rank's training step, to check the memory map's predictions against.

``measure_train_step(module, *inputs)`` runs in a worker (``WorkerPool.call_function``) on the generated
program's module (``measure_infer`` likewise for an inference program's ``infer``). It runs one
``train_step`` under ``torch.profiler`` with ``profile_memory=True`` and
replays the allocation events the CPU allocator reported (every allocation and free: tensors autograd
keeps for backward, gradients, collective buffers, optimizer temporaries) in time order; the step's peak
is the bytes that existed before it (the storages of the parameters, buffers, optimizer state and inputs)
plus the largest total the step had allocated at one time. Run a step first so that the optimizer's
state exists, as in steady-state training.

The events come from ``kineto_results.experimental_event_tree()`` (an experimental PyTorch API):
``measure_train_step`` raises ``RuntimeError`` naming the problem if it is missing or changed.
"""

from __future__ import annotations

from typing import Any

__all__ = ["measure_train_step", "measure_infer", "measure_step", "optimizer_layout", "resident_bytes"]


def resident_bytes(module: Any, inputs: tuple[Any, ...]) -> int:
    """Bytes of the distinct storages of the module's parameters and buffers (a pipeline rank's: its
    chunks'), its optimizers' state (the ``trainer``'s optimizer, and its ZeRO ``sharded`` optimizer with
    the master copy of this rank's shard) and the tensors among ``inputs``."""
    import torch

    modules = [module] + [m for _, m in getattr(module, "chunks", {}).values()]  # a pipeline rank's chunks
    tensors: list[torch.Tensor] = [t for t in inputs if isinstance(t, torch.Tensor)]
    for m in modules:
        tensors += list(m.parameters())
        tensors += list(m.buffers()) if hasattr(m, "buffers") else []
    trainer = getattr(module, "trainer", None)
    sharded = getattr(trainer, "sharded", None)
    optimizers = [getattr(trainer, "optimizer", None), getattr(sharded, "optimizer", None)]
    if sharded is not None:
        tensors.append(sharded.master)
    for opt in optimizers:
        if opt is None:
            continue
        for state in opt.state.values():
            tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def measure_train_step(module: Any, *inputs: Any) -> dict[str, int]:
    """``{"resident": ..., "transient_peak": ..., "peak": ...}`` bytes of one ``module.train_step``."""
    return measure_step(module, *inputs, step_method="train_step")


def measure_infer(module: Any, *inputs: Any) -> dict[str, int]:
    """The same for one ``module.infer`` (an inference program's forward pass)."""
    return measure_step(module, *inputs, step_method="infer")


def measure_step(module: Any, *inputs: Any, step_method: str = "train_step") -> dict[str, int]:
    """``{"resident": ..., "transient_peak": ..., "peak": ...}`` bytes of one ``module.<step_method>(*inputs)``."""
    from torch.profiler import ProfilerActivity, profile

    try:
        from torch._C._profiler import _EventType
    except ImportError as exc:  # pragma: no cover - depends on the PyTorch version
        raise RuntimeError(f"this PyTorch has no profiler event types: {exc}") from exc
    resident = resident_bytes(module, inputs)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        getattr(module, step_method)(*inputs)
    events: list[tuple[int, int]] = []
    try:
        stack = list(prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            e = stack.pop()
            if e.tag == _EventType.Allocation:
                events.append((e.start_time_ns, e.extra_fields.alloc_size))
            stack.extend(e.children)
    except AttributeError as exc:  # pragma: no cover - depends on the PyTorch version
        raise RuntimeError(f"the profiler's allocation events changed: {exc}") from exc
    if not events:
        raise RuntimeError("the profiler reported no allocations: memory profiling is not working here")
    events.sort()
    live = peak = 0
    for _, size in events:
        live += size
        peak = max(peak, live)
    return {"resident": resident, "transient_peak": peak, "peak": resident + peak}


def optimizer_layout(module: Any) -> dict[str, int]:
    """How this rank's trainer holds its optimizer (run in a worker after ``configure_optimizer``):
    ``{"sharded_params": elements of the parameters whose optimizer state ZeRO shards, "shard": elements of
    this rank's master shard of them, "unsharded": elements stepped by the ordinary optimizer (this rank's
    pieces of parameters it holds split), "shard_groups": the sizes of the groups its buckets are sharded over
    (sorted, each once)}``."""
    trainer = module.trainer
    sharded = trainer.sharded
    stepped = {id(p) for p in sharded.params} if sharded is not None else set()
    groups = [trainer.mesh.size(b.shard_axis) for b in trainer.buckets if b.shard_axis is not None]
    return {
        "sharded_params": sum(p.numel() for p in sharded.params) if sharded is not None else 0,
        "shard": sharded.master.numel() if sharded is not None else 0,
        "unsharded": sum(p.numel() for p in trainer.params if id(p) not in stepped),
        "shard_groups": sorted(set(groups)),
    }
