"""The spine end to end: every zoo model, compiled for cpu:2, runs on two real gloo processes and equals eager."""

from __future__ import annotations

import pytest
import torch
import torch.utils._pytree as pytree

import shardwise
from shardwise.zoo import MODEL_NAMES, build_model

pytestmark = pytest.mark.multiproc


@pytest.fixture(scope="module")
def pool(worker_pools):  # the session's pool of two (tests/conftest.py)
    return worker_pools(2, timeout_s=120)


def _tensors(x):
    return [t for t in pytree.tree_leaves(x) if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_zoo_model_equals_eager_on_two_processes(name, pool):
    model, inputs = build_model(name)
    # dp=2 pinned: on tiny models the planner may rightly prefer one process (communication outweighs the split)
    with shardwise.compile(model, "cpu:2", example_inputs=inputs, constraints={"dp": 2}, workers=pool) as cm:
        assert cm.plan.world_size == 2
        assert cm.plan.degrees == {"dp": 2, "tp": 1, "pp": 1}
        out = cm.run(*inputs)
    with torch.no_grad():
        ref = model(*inputs)
    assert type(out) is type(ref)  # structured like the model's own output
    got, want = _tensors(out), _tensors(ref)
    assert len(got) == len(want) > 0
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, atol=1e-5, rtol=0)


def test_pool_takes_a_new_plan_without_restarting(pool):
    pids = list(pool.pids)
    model, inputs = build_model("mlp")
    with shardwise.compile(model, "cpu:2", example_inputs=inputs, constraints={"dp": 2}, workers=pool) as cm:
        cm.run(*inputs)
    one = {"dp": 1, "tp": 1, "pp": 1}  # pin them all: an unpinned degree is left to the search
    with shardwise.compile(model, "cpu:2", example_inputs=inputs, constraints=one, workers=pool) as cm1:
        assert cm1.plan.world_size == 1
        with pytest.raises(shardwise.errors.UserInputError, match="1"):
            cm1.run(*inputs)  # a 1-process plan cannot run on a 2-process pool
    assert pool.pids == pids


def test_dynamic_batch_serves_other_sizes_and_rejects_uncovered_ones(pool):
    from torch.export import Dim

    model, inputs = build_model("gpt2")
    batch = Dim("batch", min=2, max=16)
    with shardwise.compile(
        model, "cpu:2", example_inputs=inputs, dynamic_shapes=({0: batch},), constraints={"dp": 2}, workers=pool
    ) as cm:
        bigger = torch.randint(0, 128, (8, 16))
        out = cm.run(bigger)
        with torch.no_grad():
            ref = model(bigger)
        torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=0)
        with pytest.raises(shardwise.errors.ShapeMismatchError, match=r"dimension 1 is 8 .* made for 16"):
            cm.run(torch.randint(0, 128, (4, 8)))
        with pytest.raises(shardwise.errors.ShapeMismatchError, match=r"dimension 0 .* is 32; the plan covers 2..16"):
            cm.run(torch.randint(0, 128, (32, 16)))
