"""ZeRO on real gloo processes equals single-process eager PyTorch (issue 19, point 3).

Flat plans at ZeRO stages 2 and 3 (dp=2, cpu:2; stage 2 also at dp=2 x tp=2, cpu:4) and pipelines at stages
1 and 2 (pp=2 x dp=2, 1F1B, cpu:4) train 3 AdamW steps of GPT-2 (Llama for the dp x tp case); the losses and
the final full state_dict equal eager PyTorch in float32 (rtol 1e-4, atol 1e-5). Each case also checks in
the workers that the optimizer state really is sharded (this rank's master shard is about 1/dp of the
sharded parameters). Stage 1 of flat plans is tested with the other parallel plans
(test_parallel_equals_eager).

The planner offers ZeRO 1 and 3 for flat plans and no ZeRO with pipelines yet (issue 15 extends it); the
stages it does not offer are set on a planned plan (``zero_stage=2`` on the plan made with ``zero=1``, same
placements; ``PipelineSpec.zero`` on a pipeline plan): the stage changes only what the runtime does with
gradients and optimizer state.
"""

from __future__ import annotations

import copy
import dataclasses
import functools

import pytest
import torch

import shardwise
from shardwise.cluster.presets import cpu_cluster
from shardwise.testing.eager import assert_training_equal, eager_training
from shardwise.testing.memory import optimizer_layout
from shardwise.zoo import build_model

pytestmark = pytest.mark.multiproc

OPTIMIZER = functools.partial(torch.optim.AdamW, lr=1e-3, eps=1e-6)  # eps: see test_pipeline_equals_eager
PIPELINE = {"pp": 2, "dp": 2, "tp": 1, "schedule": "1f1b", "microbatches": 2, "recompute": "none"}
CASES = {  # name -> (model, processes, constraints, ZeRO stage to run, communication-free links?)
    "dp2-zero2": ("gpt2", 2, {"dp": 2, "zero": 1}, 2, False),
    "dp2-zero3": ("gpt2", 2, {"dp": 2, "zero": 3}, 3, False),
    # on real (nominal cpu:4) links: on communication-free ones the planner may store every weight split over tp
    # and gather it before use (free gathers, less memory), leaving no gradient to the ZeRO buckets under test
    "dp2xtp2-zero2": ("llama", 4, {"dp": 2, "tp": 2, "sp": 1, "zero": 1}, 2, False),
    "pp2xdp2-zero1": ("gpt2", 4, PIPELINE, 1, False),
    "pp2xdp2-zero2": ("gpt2", 4, PIPELINE, 2, False),
}


def _loss(o):
    return o.logits.float().sin().mean()


@pytest.fixture(scope="module")
def pools(worker_pools):  # the session's pools (tests/conftest.py)
    return lambda n: worker_pools(n, timeout_s=180)


def _with_zero(plan, stage: int):
    if plan.pipeline is not None:
        return dataclasses.replace(plan, pipeline=dataclasses.replace(plan.pipeline, zero=stage))
    return dataclasses.replace(plan, zero_stage=stage)


@pytest.mark.parametrize("case", list(CASES))
def test_zero_training_equals_eager(pools, case):
    name, n, constraints, stage, free = CASES[case]
    cluster = cpu_cluster(n, latency=1e-9, bandwidth=1e14, name=f"cpu:{n}-free-links") if free else f"cpu:{n}"
    model, inputs = build_model(name, layers=4) if "pp" in constraints else build_model(name)
    reference = copy.deepcopy(model)
    with shardwise.compile(
        model, cluster, example_inputs=inputs, mode="train", loss_fn=_loss, optimizer=OPTIMIZER,
        constraints=constraints, workers=pools(n),
    ) as cm:  # fmt: skip
        cm.plan = _with_zero(cm.plan, stage)
        losses = [cm.train_step(*inputs)]
        layouts = pools(n).call_function(optimizer_layout)
        losses += [cm.train_step(*inputs) for _ in range(2)]
        state = cm.state_dict()
    for layout in layouts:  # every rank shards most of its parameters' optimizer state over dp=2
        assert layout["sharded_params"] > layout["unsharded"], layout
        assert layout["sharded_params"] / 2 <= layout["shard"] <= layout["sharded_params"] / 2 + 64, layout
    assert_training_equal(losses, state, *eager_training(reference, inputs, _loss, OPTIMIZER))
