"""The optimizer step of a ZeRO plan is priced over this rank's share of the state, once: ZeRO 1 shards the
state of the whole parameters whose gradient is summed over dp; a ZeRO 3 parameter split over dp is this rank's
piece already (its local elements), not divided by dp again."""

from __future__ import annotations

import pytest

import shardwise
from shardwise.cluster import get_cluster
from shardwise.costs.prices import price_list
from shardwise.costs.step import price_flat
from shardwise.ir.placement import Replicate, Shard, ShardingSpec
from shardwise.zoo import build_model


def _plan(zero: int):
    model, inputs = build_model("gpt2", device="meta", layers=2, batch=8)
    return shardwise.compile(
        model, "cpu:2", example_inputs=inputs, mode="train", loss_fn=lambda o: o.logits.float().mean(),
        constraints={"dp": 2, "tp": 1, "pp": 1, "zero": zero, "recompute": "none"},
    ).plan  # fmt: skip


def _optimizer_s(plan) -> float:
    events = price_flat(plan, price_list(get_cluster("cpu:2"), plan.precision)).events
    return sum(e.seconds for e in events if e.phase == "optimizer" and e.kind == "compute")


def test_zero3_steps_the_same_share_as_zero1():
    one, three = _plan(1), _plan(3)
    assert three.zero_stage == 3
    dp = three.mesh.axis_names.index("dp")
    shapes = {p.key: p.spec.shape for p in three.graph.params}
    # the parameters ZeRO 1 shards: those whose gradient the runtime sums over dp (the position embedding's is
    # summed on its activation, so no bucket holds it and its state stays whole on every rank)
    reduced = {k for k, axes in three.param_grad_reduce if "dp" in axes}

    def split(key: str, spec: ShardingSpec) -> ShardingSpec:  # each of them with an even dim 0 split over dp
        if key not in reduced or not shapes[key] or shapes[key][0] % 2:
            return spec
        return ShardingSpec(tuple(Shard(0) if i == dp else Replicate() for i in range(len(spec.placements))))

    pieces = three.replace(param_placements=tuple((k, split(k, s)) for k, s in three.param_placements))
    assert sum(isinstance(s.placements[dp], Shard) for _, s in pieces.param_placements) > 10
    assert _optimizer_s(one) < _optimizer_s(_plan(0))  # half the state per rank
    assert _optimizer_s(pieces) == pytest.approx(_optimizer_s(one), rel=1e-9)
