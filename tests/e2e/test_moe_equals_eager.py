"""Mixture-of-experts models of transformers 5 (issue 16, point 4): Mixtral, Qwen3-MoE and OLMoE (tiny
configurations, shardwise/zoo/hf.py) compile for cpu:2 and equal eager PyTorch, for inference and for three
SGD training steps (losses and every final parameter), with the plan the planner picks, dp=2 and tp=2.

Each layer's experts become one op while torch.export traces (``shardwise.moe_experts``, see
shardwise/frontend/experts.py), run by the runtime library on each rank's tokens with every expert on every rank
(expert parallelism is tests/e2e/test_expert_parallel.py's). One pool of two gloo processes serves the module."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

import shardwise
from shardwise.testing.eager import assert_training_equal, assert_weights_moved, eager_training

pytest.importorskip("transformers")

from shardwise.zoo.hf import tiny_causal_lm  # noqa: E402

pytestmark = pytest.mark.multiproc

MODELS = ["mixtral", "qwen3_moe", "olmoe"]
PLANS = {"default": None, "dp2": {"dp": 2}, "tp2": {"tp": 2}}
SGD = functools.partial(torch.optim.SGD, lr=0.1)


def _loss(out) -> torch.Tensor:  # noqa: ANN001
    return out.logits.float().sin().mean()


def _experts_ops(cm) -> list[str]:  # noqa: ANN001
    """The experts of each MoE layer, as one op."""
    return [n.name for n in cm.graph.nodes if n.op == "shardwise.moe_experts.default"]


@pytest.mark.parametrize("plan", ["default", "tp2"])
@pytest.mark.parametrize("name", MODELS)
def test_inference_equals_eager(pool, name, plan):
    model, inputs = tiny_causal_lm(name)
    with shardwise.compile(model, "cpu:2", example_inputs=inputs, constraints=PLANS[plan], workers=pool) as cm:
        assert cm.plan.world_size == 2
        assert not any(n.op.startswith("transformers.") for n in cm.graph.nodes)
        assert len(_experts_ops(cm)) == model.config.num_hidden_layers  # one op per layer's experts
        out = cm.run(*inputs)
    with torch.no_grad():
        ref = model(*inputs)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("plan", list(PLANS))
@pytest.mark.parametrize("name", MODELS)
def test_three_sgd_steps_equal_eager(pool, name, plan):
    model, inputs = tiny_causal_lm(name)
    reference = copy.deepcopy(model)
    with shardwise.compile(
        model, "cpu:2", example_inputs=inputs, mode="train", loss_fn=_loss, optimizer=SGD,
        constraints=PLANS[plan], workers=pool,
    ) as cm:  # fmt: skip
        assert cm.plan.world_size == 2
        losses = [cm.train_step(*inputs) for _ in range(3)]
        state = cm.state_dict()
    expected_losses, expected_state = eager_training(reference, inputs, _loss, SGD)
    assert_weights_moved(model.state_dict(), expected_state)  # well beyond the tolerance
    assert_training_equal(losses, state, expected_losses, expected_state)
