"""Context parallelism composed with the other axes (issue 17, point 2): the tiny Llama (sequence 256) on cpu:4
with ``cp=2`` beside ``tp=2`` (ring attention) and beside ``dp=2`` with ZeRO-1 (Ulysses) and ZeRO-3 (ring):
three SGD training steps equal eager (losses and every final parameter, float32). One pool of four gloo
processes.

ZeRO shards over dp x cp (every rank of both holds the same weights, as torchtitan's FSDP over its
``dp_shard_cp`` mesh). ZeRO-1: each rank's optimizer steps a quarter of the model's elements, sharded over one
group of all four ranks. ZeRO-3 is planned on communication-free links, where the placement stores the weights
split over dp and cp (on cpu:4's links it keeps them whole, which ZeRO-1's case covers): weights split over both
axes, gathered where used, trained equal to eager; each rank steps what the price list says it holds
(``costs.step.zero_shards``: its piece of each weight, over the group its gradient is summed over).
"""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch

import shardwise
from shardwise.cluster.presets import cpu_cluster
from shardwise.costs.step import zero_shards
from shardwise.ir.placement import Shard
from shardwise.testing.eager import assert_training_equal, eager_training
from shardwise.testing.memory import optimizer_layout

pytest.importorskip("transformers")

from shardwise.zoo.hf import tiny_causal_lm  # noqa: E402

pytestmark = pytest.mark.multiproc

SGD = functools.partial(torch.optim.SGD, lr=0.1)
LAYOUTS = {
    "cp2-tp2-ring": {"cp": 2, "tp": 2, "cp_attention": "ring"},
    "dp2-cp2-zero1-ulysses": {"cp": 2, "dp": 2, "zero": 1, "cp_attention": "ulysses"},
    "dp2-cp2-zero3-ring": {"cp": 2, "dp": 2, "zero": 3, "cp_attention": "ring"},
}
FREE_LINKS = {"dp2-cp2-zero3-ring"}


@pytest.fixture(scope="module")
def pool(worker_pools):  # the session's pool of four (tests/conftest.py)
    return worker_pools(4)


def _loss(out) -> torch.Tensor:  # noqa: ANN001
    return out.logits.float().sin().mean()


def _stepped(plan) -> float:  # noqa: ANN001
    """Elements one rank's optimizer steps by the price list: its piece of each trainable parameter over the ZeRO
    group that shards its state."""
    shards = zero_shards(plan)
    placements = dict(plan.param_placements)
    return sum(
        math.prod(placements[p.key].local_shape(p.spec.shape, plan.mesh)) / shards[p.name]
        for p in plan.graph.params
        if p.name in shards
    )


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_three_sgd_steps_equal_eager(pool, layout):
    constraints = LAYOUTS[layout]
    model, inputs = tiny_causal_lm("llama", seq=256)
    reference = copy.deepcopy(model)
    cluster = cpu_cluster(4, latency=1e-9, bandwidth=1e14, name="cpu:4-free-links") if layout in FREE_LINKS else "cpu:4"
    with shardwise.compile(
        model, cluster, example_inputs=inputs, mode="train", loss_fn=_loss, optimizer=SGD, constraints=constraints,
        workers=pool,
    ) as cm:  # fmt: skip
        plan = cm.plan
        assert all(plan.degrees.get(k) == v for k, v in constraints.items() if k in ("cp", "tp", "dp"))
        assert plan.zero_stage == constraints.get("zero", 0)
        way = constraints["cp_attention"]
        assert any(f"by {way}" in note for note in plan.notes)
        losses = [cm.train_step(*inputs)]
        layouts = pool.call_function(optimizer_layout) if plan.zero_stage else []
        losses += [cm.train_step(*inputs) for _ in range(2)]
        state = cm.state_dict()
    whole = sum(p.numel() for p in reference.parameters())
    if plan.zero_stage >= 3:  # weights stored split over both data axes (a quarter each), gathered where used
        dp, cp = plan.mesh.axis_names.index("dp"), plan.mesh.axis_names.index("cp")
        both = [k for k, s in plan.param_placements if isinstance(s.placements[dp], Shard)
                and isinstance(s.placements[cp], Shard)]  # fmt: skip
        assert len(both) >= 8, plan.param_placements
    for layout in layouts:
        stepped = layout["shard"] + layout["unsharded"]
        assert _stepped(plan) <= stepped <= _stepped(plan) + 64, (layout, _stepped(plan))
        if plan.zero_stage < 3:  # a quarter of every weight's state on each rank: one group of all four
            assert layout["shard_groups"] == [4], layout
            assert whole / 4 <= stepped <= whole / 4 + 64, (layout, whole)
            assert layout["sharded_params"] / 4 <= layout["shard"] <= layout["sharded_params"] / 4 + 64, layout
    expected_losses, expected_state = eager_training(reference, inputs, _loss, SGD)
    assert_training_equal(losses, state, expected_losses, expected_state)


def test_own_loss_stays_split_over_dp_and_cp(pool):
    """The model's own next-token loss (labels as an input, some ignored) on dp2 x cp2: the cross entropy reads
    the logits split over the batch and the sequence (``rewrite.unflattened_losses``), so the float32 logits are
    never gathered over cp; three SGD steps equal eager."""
    model, (ids,) = tiny_causal_lm("llama", seq=256)
    labels = ids.clone()
    labels[0, :40] = -100  # the ranks holding the first chunk hold more ignored targets than the others
    reference = copy.deepcopy(model)
    constraints = {"cp": 2, "dp": 2, "cp_attention": "ring"}
    with shardwise.compile(
        model, "cpu:4", example_inputs=(ids,), example_kwargs={"labels": labels}, mode="train",
        loss_fn=lambda out: out.loss, optimizer=SGD, constraints=constraints, workers=pool,
    ) as cm:  # fmt: skip
        plan = cm.plan
        loss = next(s for s in plan.strategies if plan.graph.node(s.node).op == "aten.cross_entropy_loss.default")
        assert dict(loss.split).keys() >= {"dp", "cp"}, loss.split
        vocab = model.config.vocab_size
        gathered = [r for s in plan.strategies for r in s.redistributes
                    if r.axis == "cp" and "allgather" in r.collective and r.nbytes >= 256 * vocab * 4]  # fmt: skip
        assert not gathered, gathered
        losses = [cm.train_step(ids, labels) for _ in range(3)]
        state = cm.state_dict()
    expected = eager_training(reference, (ids,), lambda out: out.loss, SGD, kwargs={"labels": labels})
    assert_training_equal(losses, state, *expected)
