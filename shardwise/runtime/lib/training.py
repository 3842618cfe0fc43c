"""One training step's gradient reduction and optimizer step: the path every program trains through.

A ``Trainer`` holds this rank's trainable parameters, each with the mesh axes its gradient is a partial sum
over, and:

* a ``GradientReducer`` over their buckets (``gradients``: the gradients are summed while the backward
  runs);
* ZeRO over ``zero_axis`` (the data-parallel axis, or a tuple of them: ``("dp", "cp")``, sharded over as one
  group where the mesh made it, ``gradients``) by stage: 0 none; 1 the optimizer state (and fp32 master
  copy) of the parameters reduced over those axes is sharded (``ShardedOptimizer``), their gradients are
  reduce-scattered at the optimizer step; 2 (and 3, whose sharded parameters the program itself gathers)
  also the gradients: each bucket is reduce-scattered as soon as the backward has made it and only this
  rank's slice is kept;
* the optimizer of the other parameters (``optimizer``: the factory's, or a ``HostOptimizer`` when the
  plan keeps optimizer state in host memory, ``host=True``, which also puts the ZeRO master on the host);
* fp16 dynamic loss scaling when given a ``LossScale``.

Use: ``backward(loss)`` (or ``arm(params)`` then the caller's own backward calls, as a pipeline does per
chunk), then ``step()``: reduce what is left, unscale, step, drop the gradients (``reduce()`` first when
something must happen between the reduction and the step: a pipeline sums its tied weights' copies there).
"""

from __future__ import annotations

import torch

from .gradients import BUCKET_BYTES, GradientReducer, make_buckets
from .mesh import Mesh
from .optim import HostOptimizer, LossScale, ShardedOptimizer

__all__ = ["Trainer"]


class Trainer:
    """See the module docstring. ``params``: (parameter, axes) for every parameter of this rank (axes may be
    empty); ``whole``: parameters never sharded by ZeRO (a pipeline's tied weights)."""

    def __init__(
        self,
        params,
        mesh: Mesh,
        factory,
        *,
        zero_stage: int = 0,
        zero_axis: str | tuple[str, ...] = "dp",
        host: bool = False,
        loss_scale: LossScale | None = None,
        whole=(),
        bucket_bytes: int = BUCKET_BYTES,
    ) -> None:
        params = [(p, tuple(axes)) for p, axes in params if p.requires_grad]
        self.params = [p for p, _ in params]
        self.mesh = mesh
        self.zero_stage = zero_stage
        self.loss_scale = loss_scale
        shard_axis = zero_axis if zero_stage >= 1 and mesh.size(zero_axis) > 1 else None
        # the data-parallel axes are reduced as one group where the mesh has it, with or without ZeRO
        self.buckets = make_buckets(params, mesh, bucket_bytes, shard_axis, whole, combine=zero_axis)
        self.reducer = GradientReducer(self.buckets, mesh, scatter="now" if zero_stage >= 2 else "deferred")
        sharded = [b for b in self.buckets if b.shard_axis is not None]
        self.sharded = ShardedOptimizer(sharded, factory, mesh, host=host) if sharded else None
        self._sharded_ids = {id(p) for b in sharded for p in b.params}
        rest = [p for p in self.params if id(p) not in self._sharded_ids]
        self._reduced = False
        self.optimizer = (HostOptimizer(rest, factory) if host else factory(rest)) if rest else None

    def arm(self, params=None) -> None:
        """The next backward completes the gradients of ``params`` (all when None): reduce them as they
        come."""
        self.reducer.arm(params)

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()`` (scaled under fp16) with every gradient reduced while it runs."""
        self.arm()
        (loss * self.loss_scale.scale if self.loss_scale is not None else loss).backward()

    def reduce(self) -> None:
        """Finish reducing the gradients (ZeRO-1: except the reduce-scatter of the sharded ones, which the
        step does); a second call before ``step()`` does nothing."""
        if not self._reduced:
            self.reducer.finish()
            self._reduced = True

    def step(self) -> None:
        """Finish the reduction, step the optimizers (unless fp16 loss scaling skips the step), drop the
        gradients."""
        self.reduce()
        shard = self.reducer.scatter_deferred() if self.sharded is not None else None
        grads = [p.grad for p in self.params if id(p) not in self._sharded_ids] + [shard]
        if self.loss_scale is None or self.loss_scale.unscale(grads):
            if self.sharded is not None and shard is not None:
                self.sharded.step(shard)
            if self.optimizer is not None:
                self.optimizer.step()
        for p in self.params:
            p.grad = None
        self.reducer.grad_shard = None
        self._reduced = False
