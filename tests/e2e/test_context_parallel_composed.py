"""Context parallelism composed with the other axes (issue 17, point 2): the tiny Llama (sequence 256) on cpu:4
with ``cp=2`` beside ``tp=2`` (ring attention) and beside ``dp=2`` with ZeRO-1 (Ulysses) and ZeRO-3 (ring):
three SGD training steps equal eager (losses and every final parameter, float32). ZeRO shards over dp x cp
(every rank of both holds the same weights, as torchtitan's FSDP over ``dp_shard_cp``): each rank's optimizer
steps a quarter of the model's elements, its master shard a quarter of the sharded parameters (up to each
bucket's padding), sharded over one group of all four ranks. One pool of four gloo processes."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

import shardwise
from shardwise.runtime import WorkerPool
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


@pytest.fixture(scope="module")
def pool():
    made = WorkerPool(4, backend="gloo")
    yield made
    made.close()


def _loss(out) -> torch.Tensor:  # noqa: ANN001
    return out.logits.float().sin().mean()


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_three_sgd_steps_equal_eager(pool, layout):
    constraints = LAYOUTS[layout]
    model, inputs = tiny_causal_lm("llama", seq=256)
    reference = copy.deepcopy(model)
    with shardwise.compile(
        model, "cpu:4", example_inputs=inputs, mode="train", loss_fn=_loss, optimizer=SGD, constraints=constraints,
        workers=pool,
    ) as cm:  # fmt: skip
        degrees = cm.plan.degrees
        assert all(degrees.get(k) == v for k, v in constraints.items() if k in ("cp", "tp", "dp"))
        assert cm.plan.zero_stage == constraints.get("zero", 0)
        way = constraints["cp_attention"]
        assert any(f"by {way}" in note for note in cm.plan.notes)
        losses = [cm.train_step(*inputs)]
        layouts = pool.call_function(optimizer_layout) if cm.plan.zero_stage else []
        losses += [cm.train_step(*inputs) for _ in range(2)]
        state = cm.state_dict()
    whole = sum(p.numel() for p in reference.parameters())
    for layout in layouts:  # ZeRO over dp x cp: a quarter of the state on each of the four ranks
        # one group of all four ranks (ZeRO 3: the rest of a weight split over one of the axes, over the other)
        assert (layout["shard_groups"] == [4]) if constraints["zero"] < 3 else set(layout["shard_groups"]) <= {2, 4}, layout
        stepped = layout["shard"] + layout["unsharded"]
        assert whole / 4 <= stepped <= whole / 4 + 64, (layout, whole)
        assert layout["sharded_params"] / 4 <= layout["shard"] <= layout["sharded_params"] / 4 + 64, layout
    expected_losses, expected_state = eager_training(reference, inputs, _loss, SGD)
    assert_training_equal(losses, state, expected_losses, expected_state)
