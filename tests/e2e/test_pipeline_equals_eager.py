"""Pipeline-parallel plans on real gloo processes equal single-process eager PyTorch (issue 4, point 4).

GPT-2 and Llama (4 blocks) train 3 AdamW steps under pp=2 (cpu:2), pp=2 x dp=2 and pp=2 x tp=2 (cpu:4),
covering GPipe, 1F1B and interleaved schedules, several micro-batches and full recomputation; the losses and
the final full state_dict equal eager PyTorch in float32 (rtol 1e-4, atol 1e-5). The tensor-parallel case
is planned for a cluster whose links are (nearly) free, so that the ILP splits the chunks' ops (checked).
One worker pool per process count serves the whole module.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

import shardwise
from shardwise.cluster.presets import cpu_cluster
from shardwise.ir.placement import Shard
from shardwise.ir.plan import ExecutionPlan
from shardwise.testing.eager import assert_training_equal, eager_training
from shardwise.zoo import build_model

pytestmark = pytest.mark.multiproc

# eps=1e-6: micro-batching sums the same gradients in another order, and Adam's first steps turn float32
# rounding noise on near-zero gradients into updates of up to lr * noise / eps; a larger eps keeps those
# elements within the tolerance while the others take ordinary Adam steps
OPTIMIZER = functools.partial(torch.optim.AdamW, lr=1e-3, eps=1e-6)
CASES = {  # name -> (processes, constraints, communication-free links?)
    "pp2-gpipe": (2, {"pp": 2, "dp": 1, "tp": 1, "schedule": "gpipe", "microbatches": 2, "recompute": "none"}, False),
    "pp2-interleaved-recompute": (
        2, {"pp": 2, "dp": 1, "tp": 1, "schedule": "interleaved", "virtual": 2, "microbatches": 2, "recompute": "full"},
        False,
    ),
    "pp2xdp2-1f1b": (4, {"pp": 2, "dp": 2, "tp": 1, "schedule": "1f1b", "microbatches": 2, "recompute": "none"}, False),
    "pp2xtp2-1f1b": (
        4, {"pp": 2, "dp": 1, "tp": 2, "sp": 1, "schedule": "1f1b", "microbatches": 2, "recompute": "none"}, True,
    ),
}  # fmt: skip


def _loss(o):
    return o.logits.float().sin().mean()


@pytest.fixture(scope="module")
def pools(worker_pools):  # the session's pools (tests/conftest.py)
    return lambda n: worker_pools(n, timeout_s=180)


def _cluster(n: int, free: bool):
    return cpu_cluster(n, latency=1e-9, bandwidth=1e14, name=f"cpu:{n}-free-links") if free else f"cpu:{n}"


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_three_pipeline_training_steps_equal_eager(pools, name, case):
    n, constraints, free = CASES[case]
    model, inputs = build_model(name, layers=4)
    reference = copy.deepcopy(model)
    with shardwise.compile(
        model, _cluster(n, free), example_inputs=inputs, mode="train", loss_fn=_loss, optimizer=OPTIMIZER,
        constraints=constraints, workers=pools(n),
    ) as cm:  # fmt: skip
        spec = cm.plan.pipeline
        assert spec is not None
        assert cm.plan.degrees == {"dp": constraints["dp"], "tp": constraints["tp"], "pp": 2}
        assert spec.schedule == constraints["schedule"] and spec.microbatches == 2
        assert spec.recompute == constraints["recompute"] and spec.chunks == 2 * constraints.get("virtual", 1)
        if constraints["tp"] > 1:  # the chunks are really tensor parallel
            assert all(
                any(isinstance(s.placements[1], Shard) for _, s in st.plan.param_placements)
                for st in spec.stages
            )
        losses = [cm.train_step(*inputs) for _ in range(3)]
        state = cm.state_dict()
    assert_training_equal(losses, state, *eager_training(reference, inputs, _loss, OPTIMIZER))


def test_pipeline_inference_equals_eager_and_the_plan_round_trips(pools, tmp_path):
    model, inputs = build_model("gpt2", layers=4)
    constraints = {"pp": 2, "dp": 1, "tp": 1, "microbatches": 2}
    with shardwise.compile(
        model, "cpu:2", example_inputs=inputs, constraints=constraints, workers=pools(2)
    ) as cm:
        out = cm.run(*inputs)
        plan = cm.plan
        path = cm.save(tmp_path / "gpt2_pp2")
    with torch.no_grad():
        ref = model(*inputs)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-5)
    assert ExecutionPlan.from_json(plan.to_json()) == plan
    assert plan.predicted.tflops_per_device > 0 and 0 < plan.predicted.mfu <= 1
    assert any(a.chosen for a in plan.alternatives)
    names = sorted(p.name for p in path.iterdir())
    assert {"__init__.py", "_pipeline.py", "__main__.py", "plan.json", "chunk0", "chunk1"} <= set(names)
    runtime = (path / "_pipeline.py").read_text()
    assert "import shardwise" not in runtime and "ACTIONS = " in runtime
