"""The one gradient-reduction path of every program (flat programs and pipelines alike).

Semantics: each rank's backward leaves its share of the gradient of the step's one loss: for a parameter
whose plan entry names mesh axes, the gradient on a rank is a partial sum over those axes (the rank saw
part of the batch, part of the tokens, part of a contraction). The reduction **sums** the shares, so the
reduced gradient is the gradient of that loss, as eager PyTorch computes it. (A pipeline scales each
micro-batch's loss by its weight in the step's loss, ``1 / (microbatches * dp)`` for a mean over the
batch, so its shares sum the same way.)

Parameters are put in buckets of about ``bucket_bytes`` in reverse order (the order the backward produces
their gradients), one bucket per set of axes; a gradient of ``bucket_bytes`` or more is a bucket of its
own. A bucket starts reducing (asynchronously, over its first axis) when its last gradient arrives;
``finish()`` waits for the buckets, reduces over their further axes and reduces the buckets whose gradients
did not all arrive (unused parameters). Every rank of a group runs the same program, so buckets start in
the same order everywhere.

ZeRO (``shard_axis``): a bucket whose axes include the shard axes (the data-parallel axes: ``dp``, and
``cp`` and ``ep`` where the mesh has them, every rank of which holds the same weights) is *sharded* over
those of them it is reduced over, as one combined group where the mesh made it (``Mesh(combined=...)``;
expert weights reduced over ``dp`` only are sharded over ``dp``, the dense ones over ``dp x ep``): its flat
buffer is padded to a multiple of that group's size ``n`` and rank ``i`` of the group owns slice ``i`` of it;
the owned slices of every sharded bucket, in bucket order, make this rank's shard (what its
``ShardedOptimizer`` steps). Axes reduced together are one collective over their combined group (one
all-reduce over ``dp x cp`` rather than one per axis). The shard axis is reduced last:

* ``scatter="deferred"`` (ZeRO-1): the backward reduces sharded buckets over their other axes only; the
  full gradients stay in ``p.grad`` until ``scatter_deferred()`` (at the optimizer step) reduce-scatters
  them bucket by bucket into the gradient shard;
* ``scatter="now"`` (ZeRO-2 and 3): a sharded bucket is reduced over every axis as soon as it is ready
  (one sharded bucket in flight at a time), this rank's slice is kept in ``grad_shard`` and the full
  gradients are dropped (``p.grad = None``).

``arm(params)`` says which gradients are final with their next accumulation (pipelines accumulate several
micro-batches: only the last backward of each chunk starts reductions); ``arm()`` arms every parameter.

The reducer holds its parameters; their hooks hold the reducer only weakly (``_weak_hook``): torch keeps a
tensor's hooks from C++, where Python's garbage collector cannot see them, so a hook that held the reducer
would keep the reducer, its mesh and the mesh's process groups (with their gloo threads) alive for the
life of the process, after the program that made them is gone.
"""

from __future__ import annotations

import weakref

import torch
import torch.distributed as dist

from . import comm
from .mesh import Mesh

__all__ = ["BUCKET_BYTES", "Bucket", "GradientReducer", "make_buckets", "reduction_axes"]

BUCKET_BYTES = 25 * 2**20


class Bucket:
    """Parameters whose gradients are reduced together (same axes), in the order they are flattened.

    ``axes``: the reductions, one per mesh axis or combined axes (``reduction_axes``), the shard axis last
    when the bucket is sharded; ``shard_axis``: the axis (or combined axes) ZeRO shards it over; ``numel``: the
    elements of its gradients; ``padded``: ``numel`` rounded up to a multiple of the shard axis's size;
    ``offset``: where this rank's slice of the bucket starts in its shard (sharded buckets)."""

    def __init__(self, params: list[torch.Tensor], axes: tuple, shard_axis, n: int) -> None:
        self.params = params
        self.axes = axes
        self.shard_axis = shard_axis
        self.numel = sum(p.numel() for p in params)
        self.padded = -(-self.numel // n) * n
        self.slice = self.padded // n
        self.offset = 0

    @property
    def dtype(self) -> torch.dtype:
        """The dtype gradients are flattened in for the shard (float64 if any parameter is, else float32)."""
        return torch.float64 if any(p.dtype == torch.float64 for p in self.params) else torch.float32

    def flat(self, grads: list[torch.Tensor | None]) -> torch.Tensor:
        """The gradients (zeros where None) in one buffer of ``padded`` elements."""
        parts = [
            (g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, self.params)
        ]
        if self.padded > self.numel:
            parts.append(parts[0].new_zeros(self.padded - self.numel))
        return torch.cat([t.to(self.dtype) for t in parts]) if self.shard_axis else torch.cat(parts)


def _names(key) -> tuple[str, ...]:
    """The axis names of a mesh axis or of combined axes."""
    return (key,) if isinstance(key, str) else tuple(key)


def reduction_axes(axes, mesh: Mesh, zero=(), combine=None) -> tuple[tuple, object]:
    """(the reductions a gradient over ``axes`` runs, in order; the one ZeRO shards over, or None): each an axis
    or combined axes (``mesh.Mesh``). The axes among ``combine`` (default: the ZeRO axes ``zero``) are one
    reduction over their combined group where the mesh made it (``Mesh(combined=...)``), else one per axis.
    The ZeRO reduction is the combined one when it has only ZeRO axes, else the first ZeRO axis (in ``zero``'s
    order) among ``axes``; it comes last. Axes of one rank are dropped."""
    zero = _names(zero) if zero else ()
    together = zero if combine is None else (_names(combine) if combine else ())
    axes = tuple(a for a in axes if mesh.size(a) > 1)
    data = tuple(a for a in mesh.axes if a in axes and a in together)
    rest = tuple(a for a in axes if a not in data)
    keys: list = list(rest) + ([data] if len(data) > 1 and mesh.has_group(data) else list(data))
    shard = next((k for k in keys if not isinstance(k, str) and all(a in zero for a in k)), None)
    if shard is None:
        shard = next((a for a in zero if a in keys), None)
    if shard is not None:
        keys.remove(shard)
        keys.append(shard)
    return tuple(keys), shard


def make_buckets(
    params, mesh: Mesh, bucket_bytes: int = BUCKET_BYTES, shard_axis=None, whole=(), combine=None
) -> list[Bucket]:
    """Buckets of ``params`` ((parameter, axes) pairs) as the module docstring describes. Axes of one rank
    are dropped; parameters with no axis left or no gradient get no bucket. ``shard_axis``: the ZeRO axis, or
    the ZeRO axes (a tuple: the data-parallel axes, sharded over together where the mesh has their combined
    group; None: no bucket is sharded); parameters in ``whole`` are never sharded (tied weights of pipelines,
    whose copies are summed after the reduction); ``combine``: the axes reduced as one group where the mesh
    has it (default: the ZeRO axes; see ``reduction_axes``)."""
    keep_whole = {id(p) for p in whole}
    zero = _names(shard_axis) if shard_axis else ()
    buckets: list[Bucket] = []
    open_buckets: dict[tuple, tuple[list[torch.Tensor], list[int]]] = {}
    for p, axes in reversed(list(params)):
        if not p.requires_grad:
            continue
        together = zero if combine is None else combine
        axes, shard = reduction_axes(axes, mesh, () if id(p) in keep_whole else zero, together)
        if not axes:
            continue
        n = mesh.size(shard) if shard is not None else 1
        if n == 1:
            shard = None
        key = (axes, shard)
        nbytes = p.numel() * p.element_size()
        if nbytes >= bucket_bytes:  # a large gradient is a bucket of its own
            buckets.append(Bucket([p], axes, shard, n))
            continue
        members, size = open_buckets.setdefault(key, ([], [0]))
        members.append(p)
        size[0] += nbytes
        if size[0] >= bucket_bytes:
            buckets.append(Bucket(members, axes, shard, n))
            del open_buckets[key]
    for (axes, shard), (members, _) in open_buckets.items():
        buckets.append(Bucket(members, axes, shard, mesh.size(shard) if shard is not None else 1))
    offset = 0
    for b in buckets:
        if b.shard_axis is not None:
            b.offset = offset
            offset += b.slice
    return buckets


def _weak_hook(method):
    """A hook calling the bound ``method`` while its object lives (a no-op after), without keeping it."""
    ref = weakref.WeakMethod(method)

    def hook(p: torch.Tensor) -> None:
        bound = ref()
        if bound is not None:
            bound(p)

    return hook


class GradientReducer:
    """Reduces the gradients of ``buckets`` while the backward runs (see the module docstring)."""

    def __init__(self, buckets: list[Bucket], mesh: Mesh, scatter: str = "deferred") -> None:
        if scatter not in ("deferred", "now"):
            raise ValueError(f"scatter must be 'deferred' or 'now', got {scatter!r}")
        self.mesh = mesh
        self.buckets = buckets
        self.scatter = scatter
        self.shard_numel = sum(b.slice for b in buckets if b.shard_axis is not None)
        self.shard_dtype = next((b.dtype for b in buckets if b.shard_axis is not None), torch.float32)
        self.grad_shard: torch.Tensor | None = None  # this rank's slices of the sharded buckets' sums
        self._bucket_of: dict[int, int] = {}
        for index, bucket in enumerate(buckets):
            for p in bucket.params:
                self._bucket_of[id(p)] = index
                p.register_post_accumulate_grad_hook(_weak_hook(self._ready))
        self._armed: set[int] = set()
        self._reset()

    def _reset(self) -> None:
        self._waiting = [len(b.params) for b in self.buckets]
        self._started: dict[int, tuple[torch.Tensor, object, list[int] | None]] = {}
        self._done: set[int] = set()  # buckets reduced already (sharded ones completed in the backward)
        self._in_flight: int | None = None  # the sharded bucket started last ("now")

    # -- during the backward -----------------------------------------------------------------------------

    def arm(self, params=None) -> None:
        """The next accumulation of these parameters' gradients (all when None) completes them."""
        self._armed.update(id(p) for p in (params if params is not None else
                                             [p for b in self.buckets for p in b.params]))  # fmt: skip

    def _ready(self, p: torch.Tensor) -> None:
        if id(p) not in self._armed:
            return
        self._armed.discard(id(p))
        b = self._bucket_of[id(p)]
        self._waiting[b] -= 1
        if self._waiting[b] == 0:
            self._start(b)

    def _reduced_now(self, b: int) -> bool:
        """Whether bucket ``b``'s shard axis is reduced in the backward (else at the optimizer step)."""
        return self.buckets[b].shard_axis is None or self.scatter == "now"

    def _start(self, b: int) -> None:
        bucket = self.buckets[b]
        axes = bucket.axes if self._reduced_now(b) else bucket.axes[:-1]
        if not axes:
            return  # ZeRO-1 with the shard axis only: nothing to reduce in the backward
        grads = [p.grad for p in bucket.params]
        if all(g is None for g in grads):
            return
        if bucket.shard_axis is not None and self.scatter == "now":
            if self._in_flight is not None:  # one sharded bucket in flight: finish the previous one first
                self._complete(self._in_flight)
            self._in_flight = b
            flat = bucket.flat(grads)
            for p in bucket.params:  # ZeRO-2: the full gradients are not kept
                p.grad = None
        else:
            alone = len(grads) == 1 and grads[0] is not None and grads[0].is_contiguous()
            flat = grads[0] if alone else bucket.flat(grads)
        counts = comm.use_counts([flat])
        work = dist.all_reduce(flat, group=self.mesh.group(axes[0]), async_op=True)
        self._started[b] = (flat, work, counts)

    def _complete(self, b: int) -> None:
        """Wait for bucket ``b``, reduce it over its further axes and put the sums where they belong."""
        bucket = self.buckets[b]
        flat, work, counts = self._started.pop(b)
        self._done.add(b)
        axes = bucket.axes if self._reduced_now(b) else bucket.axes[:-1]
        work.wait()
        del work  # the Work holds the buffer until it is dropped
        comm.let_go([flat], counts, self.mesh.group(axes[0]))
        for axis in axes[1:]:
            group = self.mesh.group(axis)
            comm.run(lambda: dist.all_reduce(flat, group=group, async_op=True), [flat], group)  # noqa: B023
        if bucket.shard_axis is not None and self.scatter == "now":
            self._keep_slice(bucket, flat)
            if self._in_flight == b:
                self._in_flight = None
            return
        offset = 0
        for p in bucket.params:
            if p.grad is not None and p.grad is not flat:
                p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
            offset += p.numel()

    def _keep_slice(self, bucket: Bucket, summed: torch.Tensor) -> None:
        """Copy this rank's slice of a bucket's sum (``padded`` elements) into the gradient shard."""
        if self.grad_shard is None:
            self.grad_shard = torch.zeros(self.shard_numel, dtype=self.shard_dtype, device=summed.device)
        i = self.mesh.index(bucket.shard_axis)
        self.grad_shard[bucket.offset : bucket.offset + bucket.slice].copy_(
            summed[i * bucket.slice : (i + 1) * bucket.slice]
        )

    # -- after the backward ------------------------------------------------------------------------------

    def finish(self) -> None:
        """Every gradient reduced (ZeRO-1: except over the shard axis, see ``scatter_deferred``)."""
        for b in range(len(self.buckets)):
            if b in self._done:
                continue
            if b not in self._started:  # some gradients did not arrive (unused parameters): reduce the rest
                self._start(b)
            if b in self._started:
                self._complete(b)
            elif self.buckets[b].shard_axis is not None and self.scatter == "now":
                self._keep_slice(self.buckets[b], self.buckets[b].flat([None] * len(self.buckets[b].params)))
        self._armed.clear()
        self._reset()

    def scatter_deferred(self) -> torch.Tensor | None:
        """ZeRO-1: reduce-scatter the sharded buckets' gradients (over their shard axis, bucket by bucket)
        into ``grad_shard`` and return it. With ``scatter="now"`` it is already there."""
        for bucket in self.buckets:
            if bucket.shard_axis is None or self.scatter == "now":
                continue
            flat = bucket.flat([p.grad for p in bucket.params])
            piece = comm.reduce_scatter(flat, 0, self.mesh, bucket.shard_axis, "sum")
            del flat
            if bucket.slice == self.shard_numel:  # the only sharded bucket: its slice is the shard
                self.grad_shard = piece
                continue
            if self.grad_shard is None:
                self.grad_shard = torch.zeros(self.shard_numel, dtype=self.shard_dtype, device=piece.device)
            self.grad_shard[bucket.offset : bucket.offset + bucket.slice].copy_(piece)
        return self.grad_shard
