"""The whole-plan search: pinned degrees are honoured, memory decides when a pipeline is needed, the
schedules rank as the theory says, and a model of hundreds of blocks is planned with a handful of
placements (one per distinct unit and tensor-parallel choice)."""

from __future__ import annotations

import pytest

from shardwise.cluster import get_cluster
from shardwise.errors import PlanError
from shardwise.frontend.trace import trace
from shardwise.planner.search import SearchOptions, search
from shardwise.zoo import build_model

BF16 = SearchOptions(mode="train", precision="bf16")


@pytest.fixture(scope="module")
def gpt_meta():
    """A 2-block GPT traced on the meta device (hidden 2048, sequence 1024, batch 8)."""
    model, (ids,) = build_model(
        "gpt2", device="meta", layers=2, hidden=2048, heads=16, vocab=51200, seq=1024, batch=8
    )
    return trace(model, (ids,), example_kwargs={"labels": ids}, loss_fn=lambda o: o.loss)[0]


def _opts(**kw):
    return SearchOptions(**{**BF16.__dict__, **kw})


def test_pinned_degrees_and_schedule_are_honoured(gpt_meta):
    r = search(gpt_meta, get_cluster("dgx-a100x1"), {"pp": 2, "dp": 2, "tp": 2, "schedule": "gpipe"},
               _opts(global_batch=64, repeat_blocks=8))  # fmt: skip
    assert {(c.pp, c.dp, c.tp, c.schedule) for c in r.ranked} == {(2, 2, 2, "gpipe")}
    best = r.best
    assert best.simulated and best.fits and len(best.bounds) == 2
    assert best.bounds[0][0] == 0 and best.bounds[-1][1] == len(r.sequence) == 10
    assert best.microbatch * best.microbatches * best.dp == 64


def test_a_model_too_big_for_one_device_gets_a_pipeline(gpt_meta):
    # 96 blocks of hidden 2048 (~4.9B parameters, ~88 GB of weights and Adam state): tensor or pipeline
    # parallelism is needed on 80 GB devices
    r = search(gpt_meta, get_cluster("dgx-a100x1"), {"tp": 1}, _opts(global_batch=32, repeat_blocks=96))
    assert r.best.pp > 1 and r.best.fits
    assert all(m <= 80 * 2**30 for m in r.best.memory_bytes)
    assert any(not c.fits for c in r.ranked)  # the single-device plans are there, marked as not fitting
    # without ZeRO nothing flat fits (the search ranks what it found; the planner says "does not fit", with what
    # the best layout needs)
    flat = search(gpt_meta, get_cluster("dgx-a100x1"), {"tp": 1, "pp": 1, "zero": 0},
                  _opts(global_batch=32, repeat_blocks=96))  # fmt: skip
    assert flat.ranked and not any(c.fits for c in flat.ranked)
    assert min(c.peak_bytes for c in flat.ranked) > 80 * 2**30
    parts = dict(flat.best.memory_parts)
    assert sum(parts.values()) == pytest.approx(flat.best.peak_bytes, rel=0.02)
    assert parts["optimizer state"] > parts["weights"] > 0


def test_memory_and_time_rank_the_schedules_as_the_theory_says(gpt_meta):
    cluster = get_cluster("dgx-a100x1")
    opts = _opts(global_batch=64, repeat_blocks=16, top_k=50)

    def best(schedule, virtual=1):
        pins = {"pp": 4, "dp": 2, "tp": 1, "microbatch_size": 1, "recompute": "none", "schedule": schedule,
                "virtual": virtual}  # fmt: skip
        return search(gpt_meta, cluster, pins, opts).ranked[0]

    gpipe, one, inter = best("gpipe"), best("1f1b"), best("interleaved", 2)
    assert one.step_s == pytest.approx(gpipe.step_s, rel=0.01)  # the same bubble ...
    assert one.memory_bytes[0] < gpipe.memory_bytes[0]  # ... far fewer activations in flight
    assert inter.bubble_s < one.bubble_s  # virtual stages shrink the bubble


def test_full_recomputation_trades_time_for_memory(gpt_meta):
    cluster = get_cluster("dgx-a100x1")
    pins = {"pp": 2, "dp": 4, "tp": 1, "microbatch_size": 2, "schedule": "1f1b"}
    none = search(
        gpt_meta, cluster, {**pins, "recompute": "none"}, _opts(global_batch=64, repeat_blocks=8)
    ).best
    full = search(
        gpt_meta, cluster, {**pins, "recompute": "full"}, _opts(global_batch=64, repeat_blocks=8)
    ).best
    assert full.step_s > none.step_s and full.peak_bytes < none.peak_bytes


def test_hundreds_of_blocks_on_thousands_of_devices_need_few_placements(gpt_meta):
    r = search(gpt_meta, get_cluster("dgx-a100x128"), {}, _opts(global_batch=2048, repeat_blocks=200))
    assert len(r.sequence) == 202 and r.best.fits
    assert r.best.pp * r.best.dp * r.best.tp == 1024
    # three distinct units (pre, block, post) x (tp=1 + two sp choices for each of tp=2, 4, 8)
    assert r.placements <= 3 * 7
    assert r.model_flops > 0 and len(r.ranked) > 1


def test_impossible_constraints_are_clear_errors(gpt_meta):
    cluster = get_cluster("dgx-a100x1")
    with pytest.raises(PlanError, match="need 16 devices"):
        search(gpt_meta, cluster, {"pp": 4, "dp": 4}, _opts())
    with pytest.raises(PlanError, match="schedule"):
        search(gpt_meta, cluster, {"schedule": "zigzag"}, _opts())
    with pytest.raises(PlanError, match="not divisible"):
        search(gpt_meta, cluster, {"pp": 1, "dp": 3, "tp": 1}, _opts(global_batch=8))


def test_more_stages_than_layers_is_a_clear_error():
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    graph = trace(model, (torch.randn(4, 8),))[0]
    with pytest.raises(PlanError, match=r"pp=4 needs at least 4 layers .* the model has 1 .*use pp <= 1"):
        search(graph, get_cluster("cpu:4"), {"pp": 4}, SearchOptions(mode="inference"))
