"""The search's memory estimate of a pipeline layout against the memory map of the plan realized from it: the
estimate, which decides which layouts are realized at all, is never below the most bytes the map finds live at
one step (a layout estimated to fit that its map then refuses is realized for nothing)."""

from __future__ import annotations

import pytest

from shardwise.cluster import get_cluster
from shardwise.frontend.trace import trace
from shardwise.passes.stages.rebatch import RebatchingTracer
from shardwise.planner.pipeline import realize_pipeline
from shardwise.planner.search import SearchOptions, search
from shardwise.zoo import build_model


@pytest.fixture(scope="module")
def gpt():
    """A 4-block GPT on the meta device (hidden 1024, sequence 1024, batch 8) and a tracer of other batch sizes."""
    model, (ids,) = build_model(
        "gpt2", device="meta", layers=4, hidden=1024, heads=16, vocab=8192, seq=1024, batch=8
    )

    def loss(out):
        return out.logits.float().mean()

    graph = trace(model, (ids,), loss_fn=loss)[0]
    return graph, RebatchingTracer(graph, lambda n: trace(model, (ids[:n],), loss_fn=loss)[0])


@pytest.mark.parametrize("zero", [0, 1, 2])
@pytest.mark.parametrize("schedule", [{"schedule": "1f1b"}, {"schedule": "interleaved", "virtual": 2}])
def test_the_estimate_is_never_below_the_memory_map(gpt, zero, schedule):
    graph, micro = gpt
    cluster = get_cluster("dgx-a100x1")
    options = SearchOptions(mode="train", precision="bf16")
    pinned = {"pp": 2, "dp": 2, "tp": 2, "zero": zero, "microbatches": 2, **schedule}
    result = search(graph, cluster, pinned, options)
    cand = result.best
    assert (cand.pp, cand.dp, cand.tp, cand.zero, cand.schedule) == (2, 2, 2, zero, schedule["schedule"])
    plan = realize_pipeline(graph, cluster, cand, result, micro_graph=micro, mode="train", precision="bf16")
    group = cand.dp * cand.tp
    for stage in range(cand.pp):
        mapped = plan.memory[stage * group]
        assert cand.memory_bytes[stage] >= mapped.lower_bound_bytes, (stage, cand.describe())
        # the map's record says what the stage holds: its weights, gradients and optimizer state are counted
        assert mapped.params_bytes > 0 and mapped.grads_bytes > 0 and mapped.optimizer_bytes > 0
        parts = mapped.params_bytes + mapped.grads_bytes + mapped.optimizer_bytes + mapped.activation_bytes
        assert parts == mapped.arena_bytes
