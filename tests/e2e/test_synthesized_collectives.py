"""Plans whose collectives use topology-aware schedules run them, and still equal eager PyTorch (issue 5,
item 7).

``shardwise.compile(..., collectives="synthesize")`` on 4 processes whose links are nearly free (so that
the ILP splits the tiny model's weights over tp=4): recursive halving/doubling still takes fewer latency
steps than the library's ring, so the planner records that non-library algorithm for the tensor-parallel
collectives and the plan carries their point-to-point programs. The generated program runs them with sends and receives; inference outputs and three AdamW
training steps (losses and the final full state_dict) must equal single-process eager PyTorch (float32,
rtol 1e-4, atol 1e-5). One pool of 4 processes serves the module.
"""

from __future__ import annotations

import copy
import functools
import json

import pytest
import torch

import shardwise
from shardwise.cluster.presets import cpu_cluster
from shardwise.errors import UserInputError
from shardwise.testing.eager import assert_training_equal, eager_training
from shardwise.zoo import build_model

pytestmark = pytest.mark.multiproc

OPTIMIZER = functools.partial(torch.optim.AdamW, lr=1e-3)
CONSTRAINTS = {"tp": 4, "sp": 1}
CLUSTER = cpu_cluster(4, latency=1e-9, bandwidth=1e14, name="cpu:4-free-links")


def _loss(o):
    return o.logits.float().sin().mean()


@pytest.fixture(scope="module")
def pool(worker_pools):  # the session's pool of four (tests/conftest.py)
    return worker_pools(4)


def _scheduled(plan) -> list:
    """The redistributions that run a point-to-point program instead of a library collective."""
    programs = dict(plan.collective_programs)
    out = [r for s in plan.strategies for r in s.redistributes if r.algorithm in programs]
    for r in out:
        program = json.loads(programs[r.algorithm])
        assert program["collective"] == r.collective and program["nranks"] == plan.mesh.axis_size(r.axis)
    return out


def test_synthesized_schedules_are_chosen_written_and_run_in_inference(pool, tmp_path):
    model, inputs = build_model("gpt2")
    with shardwise.compile(
        model, CLUSTER, example_inputs=inputs, constraints=CONSTRAINTS, collectives="synthesize", workers=pool
    ) as cm:  # fmt: skip
        scheduled = _scheduled(cm.plan)
        assert scheduled, [r.algorithm for s in cm.plan.strategies for r in s.redistributes]
        package = cm.save(tmp_path / "pkg", weights=False)
        out = cm.run(*inputs)
    program = (package / "program.py").read_text()
    for r in scheduled:
        assert f'schedule="{r.algorithm}"' in program
    assert set(json.loads((package / "_schedules.json").read_text())) == {r.algorithm for r in scheduled}
    for path in package.rglob("*.py"):  # the schedule runner is the runtime library's (needs torch alone)
        assert "import shardwise" not in path.read_text() and "from shardwise" not in path.read_text(), path
    with torch.no_grad():
        ref = model(*inputs)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "constraints, collectives",
    [
        (CONSTRAINTS, {"allreduce"}),  # Megatron's weight split: the all-reduces after row-parallel layers
        ({"tp": 4}, {"allgather"}),  # the ILP's own split on free links: gathers whose gradient is partial
    ],
    ids=["weights-split", "free"],
)
def test_synthesized_schedules_train_like_eager(pool, constraints, collectives):
    model, inputs = build_model("gpt2")
    reference = copy.deepcopy(model)
    with shardwise.compile(
        model, CLUSTER, example_inputs=inputs, mode="train", loss_fn=_loss, optimizer=OPTIMIZER,
        constraints=constraints, collectives="synthesize", workers=pool,
    ) as cm:  # fmt: skip
        assert collectives <= {r.collective for r in _scheduled(cm.plan)}
        losses = [cm.train_step(*inputs) for _ in range(3)]
        state = cm.state_dict()
    assert_training_equal(losses, state, *eager_training(reference, inputs, _loss, OPTIMIZER))


def test_unknown_collectives_choice_is_refused():
    model, inputs = build_model("mlp")
    with pytest.raises(UserInputError, match="collectives='fastest' is not allowed"):
        shardwise.compile(model, "cpu:2", example_inputs=inputs, collectives="fastest")
