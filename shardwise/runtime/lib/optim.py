"""Optimizers around the user's: ZeRO's sharded optimizer, host offload, dynamic loss scaling.

The user gives ``factory(parameters) -> torch.optim.Optimizer``. Elementwise optimizers (SGD, Adam, AdamW,
...) step exactly as they would on the whole parameters, whichever wrapper runs them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import comm
from .gradients import Bucket
from .mesh import Mesh

__all__ = ["HostOptimizer", "LossScale", "ShardedOptimizer"]


def _wait_for_copies(device: torch.device) -> None:
    """Non-blocking copies between device and host are done (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


class ShardedOptimizer:
    """ZeRO: the optimizer state of the parameters of the sharded ``buckets``, each split over its own shard
    axis (``Bucket.shard_axis``: a mesh axis, or combined axes such as ``("dp", "cp")``).

    This rank owns one slice of every sharded bucket (``gradients.Bucket``: the bucket's parameters
    flattened in order, padded to a multiple of its group's size); its shard is those slices in bucket order,
    kept as one fp32 (fp64 if a parameter is) master copy that the wrapped optimizer steps.
    ``step(grad_shard)`` steps it with the reduced gradient of the shard, then all-gathers the updated
    slices bucket by bucket back into the parameters. ``host=True`` (ZeRO-Offload): the master copy and the
    optimizer's state live in host memory.
    """

    def __init__(self, buckets: list[Bucket], factory, mesh: Mesh, host: bool = False) -> None:
        self.buckets = [b for b in buckets if b.shard_axis is not None]
        self.params = [p for b in self.buckets for p in b.params]
        self.mesh = mesh
        slices = []
        for b in self.buckets:
            i = mesh.index(b.shard_axis)
            flat = b.flat([p.detach() for p in b.params])
            slices.append(flat[i * b.slice : (i + 1) * b.slice])
        device = self.params[0].device
        where = torch.device("cpu") if host else device
        self.master = torch.nn.Parameter(torch.cat(slices).to(where))
        self.optimizer = factory([self.master])

    @torch.no_grad()
    def step(self, grad_shard: torch.Tensor) -> None:
        self.master.grad = grad_shard.to(self.master.device, self.master.dtype, non_blocking=True)
        _wait_for_copies(grad_shard.device)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        device = self.params[0].device
        for b in self.buckets:
            mine = self.master.detach()[b.offset : b.offset + b.slice].to(device, non_blocking=True)
            full = comm.gather(mine, 0, self.mesh, b.shard_axis)
            offset = 0
            for p in b.params:
                p.copy_(full[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
            del full


class HostOptimizer:
    """ZeRO-Offload for unsharded optimizer state: an fp32 master copy of each parameter and the optimizer's
    state live in host memory; ``step()`` copies the gradients there (non-blocking), steps the wrapped
    optimizer on the host and copies the updated values back into the parameters. ``param_groups`` names
    the device parameters (as an optimizer over them would), so checkpoints map its state to the
    program's tensors."""

    def __init__(self, params, factory, host: str = "cpu") -> None:
        self.params = list(params)
        low = (torch.bfloat16, torch.float16)
        self.master = [
            torch.nn.Parameter(p.detach().to(host, torch.float32 if p.dtype in low else p.dtype, copy=True))
            for p in self.params
        ]
        self.optimizer = factory(self.master)
        self._device_of = {id(m): p for m, p in zip(self.master, self.params)}

    @property
    def param_groups(self):
        return [
            {**g, "params": [self._device_of[id(m)] for m in g["params"]]}
            for g in self.optimizer.param_groups
        ]

    @property
    def state(self):
        """The wrapped optimizer's state, keyed by the device parameters."""
        return {self._device_of[id(m)]: s for m, s in self.optimizer.state.items()}

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, state) -> None:
        self.optimizer.load_state_dict(state)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self) -> None:
        for p, m in zip(self.params, self.master):
            m.grad = p.grad.to(m.device, m.dtype, non_blocking=True) if p.grad is not None else None
        for p in self.params[:1]:
            _wait_for_copies(p.device)
        self.optimizer.step()
        for p, m in zip(self.params, self.master):
            p.copy_(m, non_blocking=True)
            m.grad = None


class LossScale:
    """Dynamic loss scaling for fp16 training (the GradScaler recipe, agreed on by every rank): scale the
    loss, unscale the gradients, skip the step and halve the scale when any rank saw inf/nan, double it
    after ``interval`` good steps."""

    def __init__(self, mesh: Mesh, scale: float = 2.0**16, interval: int = 2000) -> None:
        self.mesh, self.scale, self.interval, self.good = mesh, scale, interval, 0

    @torch.no_grad()
    def unscale(self, grads) -> bool:
        """Divide the gradients ``grads`` (None entries are skipped) by the scale; False (skip the step)
        when any gradient on any rank is not finite."""
        bad = torch.zeros(1)
        for g in grads:
            if g is not None:
                g.div_(self.scale)
                if not torch.isfinite(g).all():
                    bad.fill_(1.0)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item():
            self.scale /= 2
            self.good = 0
            return False
        self.good += 1
        if self.good % self.interval == 0:
            self.scale *= 2
        return True
