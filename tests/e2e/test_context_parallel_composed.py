"""Context parallelism composed with the other axes (issue 17, point 2): the tiny Llama (sequence 256) on cpu:4
with ``cp=2`` beside ``tp=2`` (ring attention) and beside ``dp=2`` with ZeRO-1 (Ulysses): three SGD training
steps equal eager (losses and every final parameter, float32). One pool of four gloo processes."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

import shardwise
from shardwise.runtime import WorkerPool
from shardwise.testing.eager import assert_training_equal, eager_training

pytest.importorskip("transformers")

from shardwise.zoo.hf import tiny_causal_lm  # noqa: E402

pytestmark = pytest.mark.multiproc

SGD = functools.partial(torch.optim.SGD, lr=0.1)
LAYOUTS = {
    "cp2-tp2-ring": {"cp": 2, "tp": 2, "cp_attention": "ring"},
    "dp2-cp2-zero1-ulysses": {"cp": 2, "dp": 2, "zero": 1, "cp_attention": "ulysses"},
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
        losses = [cm.train_step(*inputs) for _ in range(3)]
        state = cm.state_dict()
    expected_losses, expected_state = eager_training(reference, inputs, _loss, SGD)
    assert_training_equal(losses, state, expected_losses, expected_state)
