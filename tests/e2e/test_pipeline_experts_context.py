"""Expert and context parallelism with pipelines (issue 17, item 2) on real gloo processes, cpu:4: Mixtral's tiny
configuration with ``pp=2, ep=2`` (each stage's 4 experts per layer split over its 2 data-parallel replicas, ZeRO-1,
two micro-batches), and Llama's tiny configuration at sequence 256 with ``pp=2, cp=2`` (each stage's sequence split
over 2 ranks, ring attention, two micro-batches), equal eager PyTorch for inference and for three SGD training steps
(losses and every final parameter, float32, the bounds of the other MoE and context-parallel tests).

Under cp every chunk program cuts its piece of the sequence of what it receives and runs each attention by ring
(``C.context_attention(..., mesh, 'cp', 'ring')``), which the plan's notes and the programs show.

The experts really are split: every chunk program runs its layers' experts as ``C.moe_experts(..., mesh, 'ep')``
(the all-to-all dispatch and combine over the stage's two replicas), and each chunk's plan holds the expert weights
sharded along dim 0 on its ``ep`` axis. Equality with eager checks that the tokens moved: a rank holds half the
experts, so a token routed to the other half gets its result only through the exchange, and the experts' gradients
(complete on their rank, not reduced over dp) would be halved or doubled otherwise. One pool of four gloo
processes serves the module."""

from __future__ import annotations

import copy
import functools
import re
import tempfile
from pathlib import Path

import pytest
import torch

import shardwise
from shardwise.testing.eager import assert_training_equal, assert_weights_moved, eager_training

pytest.importorskip("transformers")

from shardwise.zoo.hf import tiny_causal_lm  # noqa: E402

pytestmark = pytest.mark.multiproc

SGD = functools.partial(torch.optim.SGD, lr=0.1)
EXPERTS = {"pp": 2, "ep": 2, "zero": 1, "microbatches": 2}


@pytest.fixture(scope="module")
def pool(worker_pools):  # the session's pool of four (tests/conftest.py)
    return worker_pools(4)


def _loss(out) -> torch.Tensor:  # noqa: ANN001
    return out.logits.float().sin().mean()


def _chunk_programs(cm) -> list[str]:  # noqa: ANN001
    with tempfile.TemporaryDirectory() as tmp:
        root = cm.save(tmp, weights=False)
        return [p.read_text() for p in sorted(Path(root).glob("chunk*/program.py"))]


def _experts_split(cm) -> None:
    """Each stage's experts are split over its two replicas, and every experts op dispatches over them."""
    spec = cm.plan.pipeline
    assert spec is not None and spec.pp == 2 and spec.ep == 2 and cm.plan.degrees.get("ep") == 2
    for stage in spec.stages:
        a = stage.plan.mesh.axis_names.index("ep")
        experts = {k: s for k, s in stage.plan.param_placements if ".mlp.experts." in k}
        assert experts and all(str(s.placements[a]) == "S(0)" for s in experts.values()), experts
    calls = [c for text in _chunk_programs(cm) for c in re.findall(r"C\.moe_experts\(([^)]*)\)", text)]
    assert len(calls) == 2 and all(re.search(r"mesh,\s*'ep'(,|$)", c.strip()) for c in calls), calls


def _inference_equals_eager(model, inputs, constraints, pool, check) -> None:  # noqa: ANN001
    """Compiles ``model`` for inference on cpu:4 under ``constraints``, runs ``check(cm)`` on the compiled model and
    asserts its logits equal eager's."""
    with shardwise.compile(model, "cpu:4", example_inputs=inputs, constraints=constraints, workers=pool) as cm:
        check(cm)
        out = cm.run(*inputs)
    with torch.no_grad():
        ref = model(*inputs)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)


def test_experts_with_pipeline_inference_equals_eager(pool):
    model, inputs = tiny_causal_lm("mixtral", batch=4)
    constraints = {k: v for k, v in EXPERTS.items() if k in ("pp", "ep")}
    _inference_equals_eager(model, inputs, constraints, pool, _experts_split)


def _three_sgd_steps_equal_eager(model, inputs, constraints, pool, check) -> dict:  # noqa: ANN001
    """Compiles ``model`` for training on cpu:4 under ``constraints``, runs ``check(cm)`` on the compiled model,
    takes three SGD steps and asserts losses and final parameters equal eager's; returns the initial state."""
    reference = copy.deepcopy(model)
    initial = copy.deepcopy(model.state_dict())
    with shardwise.compile(
        model, "cpu:4", example_inputs=inputs, mode="train", loss_fn=_loss, optimizer=SGD, constraints=constraints,
        workers=pool,
    ) as cm:  # fmt: skip
        check(cm)
        losses = [cm.train_step(*inputs) for _ in range(3)]
        state = cm.state_dict()
    expected_losses, expected_state = eager_training(reference, inputs, _loss, SGD)
    assert_weights_moved(initial, expected_state)
    assert_training_equal(losses, state, expected_losses, expected_state)
    return {"initial": initial, "expected": expected_state}


def test_experts_with_pipeline_three_sgd_steps_equal_eager(pool):
    def check(cm) -> None:  # noqa: ANN001
        _experts_split(cm)
        spec = cm.plan.pipeline
        assert spec.zero == 1 and spec.microbatches == 2 and spec.dp == 2

    model, inputs = tiny_causal_lm("mixtral", batch=4)
    states = _three_sgd_steps_equal_eager(model, inputs, EXPERTS, pool, check)
    initial, expected_state = states["initial"], states["expected"]
    moved = min((expected_state[k] - v).abs().max().item() for k, v in initial.items() if ".mlp.experts." in k)
    assert moved > 1e-4  # every layer's experts moved beyond the tolerance too


CONTEXT = {"pp": 2, "cp": 2, "cp_attention": "ring", "microbatches": 2, "schedule": "1f1b"}


def _sequence_split(cm) -> None:  # noqa: ANN001
    """Each stage's chunk runs on its replica's cp x tp ranks, and every attention runs by ring over cp."""
    spec = cm.plan.pipeline
    assert spec is not None and spec.pp == 2 and spec.cp == 2 and cm.plan.degrees.get("cp") == 2
    assert all(st.plan.mesh.axis_names == ("cp", "tp") and st.plan.mesh.shape == (2, 1) for st in spec.stages)
    assert sum(n.startswith("chunk ") and "attention calls: 1 by ring" in n for n in cm.plan.notes) == 2
    programs = _chunk_programs(cm)
    assert len(programs) == 2 and all(re.search(r"mesh, 'cp', 'ring'", text) for text in programs)


def test_context_with_pipeline_inference_equals_eager(pool):
    model, inputs = tiny_causal_lm("llama", seq=256)
    _inference_equals_eager(model, inputs, CONTEXT, pool, _sequence_split)


def test_context_with_pipeline_three_sgd_steps_equal_eager(pool):
    def check(cm) -> None:  # noqa: ANN001
        _sequence_split(cm)
        assert cm.plan.pipeline.microbatches == 2

    model, inputs = tiny_causal_lm("llama", seq=256)
    _three_sgd_steps_equal_eager(model, inputs, CONTEXT, pool, check)


def test_deepseek_v3_with_pipeline_three_sgd_steps_equal_eager(pool):
    """DeepSeek-V3's tiny configuration (MLA's ``expand_kv`` fills a new tensor by ``copy_``; the routing scatters
    a group mask and gathers each token's top-k weights) cut into two micro-batches under ``pp=2, ep=2``, which
    the batch-rows check allows (``passes.stages.rows``): three SGD steps equal eager."""

    def check(cm) -> None:  # noqa: ANN001
        spec = cm.plan.pipeline
        assert spec is not None and (spec.pp, spec.ep, spec.dp, spec.microbatches) == (2, 2, 2, 2)

    model, inputs = tiny_causal_lm("deepseek_v3", batch=4)
    _three_sgd_steps_equal_eager(model, inputs, EXPERTS, pool, check)


def test_context_with_pipeline_own_loss_stays_split(pool):
    """The model's own next-token loss (labels as an input) in the last stage of a pp2 x cp2 pipeline whose
    micro-batches hold two sequences each: the cross entropy reads the logits split over the sequence
    (``rewrite.split_losses``; flattened rows of two sequences could not follow a cp split, so the loss ran whole
    on gathered logits), and three SGD steps equal eager."""
    model, (ids,) = tiny_causal_lm("llama", seq=256, batch=4)
    labels = ids.clone()  # (every micro-batch holds as many targets: the mean of their means is eager's mean)
    reference = copy.deepcopy(model)
    with shardwise.compile(
        model, "cpu:4", example_inputs=(ids,), example_kwargs={"labels": labels}, mode="train",
        loss_fn=lambda out: out.loss, optimizer=SGD, constraints=CONTEXT, workers=pool,
    ) as cm:  # fmt: skip
        _sequence_split(cm)
        losses = [
            dict(s.split) for st in cm.plan.pipeline.stages for s in st.plan.strategies
            if st.plan.graph.has_node(s.node) and st.plan.graph.node(s.node).op == "aten.cross_entropy_loss.default"
        ]  # fmt: skip
        assert len(losses) == 1 and "cp" in losses[0], losses
        got = [cm.train_step(ids, labels) for _ in range(3)]
        state = cm.state_dict()
    expected = eager_training(reference, (ids,), lambda out: out.loss, SGD, kwargs={"labels": labels})
    assert_training_equal(got, state, *expected)
