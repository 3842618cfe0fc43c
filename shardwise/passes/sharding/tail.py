"""The parameters' side of a training step in the placement ILP's terms (see ``auto``).

``costs.step.price_flat`` ends a training step with the autograd engine's accumulation of every parameter
gradient, the bucketed reduction of the gradients left partial (one collective per bucket of ``BUCKET_BYTES``
over each group of axes, and the host's copies into and out of each bucket) and the optimizer step over this
rank's parameter elements. :class:`StepTail` splits these prices, taken from the same price list functions,
into what a placement decides (per local element of a parameter; per parameter whose gradient is bucketed),
what the ILP charges once when any parameter needs it (a bucket's latency) and what no placement changes (per
step).

Deliberately approximate (the ILP's terms are linear): the optimizer's and the copies' prices are their
secants over the replicated model (exact where they are linear in the elements, as on ``cpu:N``); a bucket's
latency is charged once and shared per byte beyond the first bucket; the whole reduction is charged, where
``price_flat`` hides what the backward overlaps (``efficiency.comm_overlap``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from shardwise.costs.prices import MeshPrices
from shardwise.costs.step import BUCKET_BYTES, accumulate_s, gradient_reductions
from shardwise.ir.placement import DeviceMesh, Replicate, ShardingSpec, zero_group
from shardwise.ir.tensor import TensorSpec

if TYPE_CHECKING:
    from shardwise.passes.sharding.auto import PlaceOptions

__all__ = ["StepTail", "local_elements", "zero_shard"]


def local_elements(spec: TensorSpec, placement: ShardingSpec, mesh: DeviceMesh) -> int:
    """Elements of ``spec`` on one device under ``placement`` (as ``costs.step`` counts them)."""
    n = 1
    for d in placement.local_shape(spec.shape, mesh):
        n *= d
    return n


def zero_shard(placement: ShardingSpec, mesh: DeviceMesh, zero: int) -> int:
    """How many ranks ZeRO >= 1 shards a parameter's optimizer state over under ``placement``: the data axes
    (``zero_group``) when it is kept whole over all of them (its gradient is summed over them in a bucket that
    ZeRO shards: ``costs.step.zero_shards``); 1 when ZeRO-3 splits it over one of them (its gather's backward
    reduce-scatters the gradient over that axis and all-reduces it over the others where it is read, so no
    bucket holds it)."""
    if zero < 1:
        return 1
    whole = [a for a, p in zip(mesh.axis_names, placement.placements, strict=True) if isinstance(p, Replicate)]
    data = zero_group(mesh, None)
    if any(a in data and a not in whole and a != "ep" for a in mesh.axis_names):
        return 1
    # (the experts' axis splits experts by expert: their gradients are summed over the other data axes)
    return mesh.group_size(zero_group(mesh, whole))


class StepTail:
    """The parameters' side of a training step, priced as ``costs.step.price_flat`` prices it, split into what
    a placement decides (per local element, per bucketed parameter) and what it does not (per step)."""

    def __init__(self, cost: MeshPrices, mesh: DeviceMesh, opts: PlaceOptions, trainable: list[TensorSpec]) -> None:
        prices = cost.prices
        self.cost = cost
        self.mesh = mesh
        self.opts = opts
        # the replicated model's state sharded over every data-parallel axis (its secant below)
        self.zero_dp = mesh.group_size(zero_group(mesh, None)) if opts.zero >= 1 else 1
        elements = float(sum(s.numel for s in trainable)) / self.zero_dp
        eff = prices.cluster.efficiency

        def opt(n: float) -> float:
            return prices.optimizer_step_s(n, len(trainable), opts.optimizer, foreach=eff.overhead_hidden)

        # the optimizer's secant over the replicated model: exact where its price is linear in the elements
        self.optimizer_element_s = (opt(elements) - opt(elements / 2)) / (elements / 2) if elements else 0.0
        #: per step: the optimizer's fixed part and the autograd engine's accumulation of every gradient
        self.constant_s = (opt(elements) - self.optimizer_element_s * elements if elements else 0.0) + (
            accumulate_s(prices, len(trainable))
        )
        # ZeRO 1 and 2: the updated parameters all-gathered over their group after the step (costs.step's
        # ZeRO gather): its latency once per step (over every data axis), its bytes per parameter (gather_s)
        self.gather_group = zero_group(mesh, None) if opts.zero in (1, 2) else ()
        if len(self.gather_group) == 1:
            self.gather_group = self.gather_group[0]  # type: ignore[assignment]
        if self.gather_group:
            self.constant_s += cost.collective_s("allgather", 1, self.gather_group)
        # a bucket's copies (torch.cat into it, one copy back per parameter) at the rate of a full bucket's bytes
        compute = prices.compute
        bucket = 2.0 * min(float(BUCKET_BYTES), 4.0 * sum(s.numel for s in trainable))
        self.copy_byte_s = compute.byte_s(bucket) / bucket if bucket else 0.0
        self.copy_launch_s = compute.with_overhead(0.0, 1)

    def optimizer_s(self, local_elements: int, shard: int = 1) -> float:
        """The optimizer step's share of one parameter of ``local_elements`` elements on this device, its state
        sharded over ``shard`` ranks by ZeRO (``zero_shard``)."""
        return self.optimizer_element_s * local_elements / max(shard, 1)

    def gather_s(self, local_elements: int, shard: int) -> float:
        """ZeRO 1 and 2: one parameter's share of the all-gather of the updated parameters (float32) over the
        ``shard`` ranks its state is sharded over (``zero_shard``; the group's latency is in ``constant_s``)."""
        if not self.gather_group or shard < 2:
            return 0.0
        nbytes = 4.0 * local_elements
        group = self.gather_group
        return self.cost.collective_s("allgather", nbytes, group) - self.cost.collective_s("allgather", 1, group)

    def bucket_latency_s(self, axes: tuple[str, ...]) -> float:
        """One bucket over ``axes``: its collectives' latency (a 1-byte collective) and the launch of its copy
        in; paid once per bucket (the ILP's charge) and shared per byte when the gradients fill several."""
        steps = gradient_reductions(self.mesh, axes, self.opts.zero)
        return sum(self.cost.collective_s(kind, 1, a) for a, kind in steps) + self.copy_launch_s

    def bucketed_s(self, local_elements: int, axes: tuple[str, ...]) -> float:
        """One parameter's gradient in the bucketed reduction over ``axes`` (float32 gradients): bandwidth of its
        bytes, a bucket's latency per ``BUCKET_BYTES``, its copy into and out of the bucket."""
        nbytes = 4.0 * local_elements
        t = sum(
            self.cost.collective_s(kind, nbytes, a) - self.cost.collective_s(kind, 1, a)
            for a, kind in gradient_reductions(self.mesh, axes, self.opts.zero)
        )
        t += self.bucket_latency_s(axes) * nbytes / BUCKET_BYTES
        return t + self.copy_byte_s * 2 * nbytes + self.copy_launch_s
