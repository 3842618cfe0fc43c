"""Host offload chosen jointly with recomputation on a real plan (GPT-2, 4 layers, dp=2 on cpu:2, planning
only): with nothing offloaded the rewrite is the memory pass; each tier lowers the rank's peak by what it
moves and records what it moves; the cost model's overlap arithmetic; the chooser returns the cheapest
fitting (recompute, tiers) pair, picks host offload where recomputation alone does not fit, respects the
host's memory, and an impossible budget names the smallest device memory reachable; the API and the plan
record the tiers (JSON, summary)."""

from __future__ import annotations

import dataclasses

import pytest

import shardwise
from shardwise.cluster import get_cluster
from shardwise.errors import DoesNotFitError, UserInputError
from shardwise.ir.plan import ExecutionPlan
from shardwise.passes.memory.buffers import lower_bound
from shardwise.passes.offload import (
    Offloaded,
    Tiers,
    apply_offload,
    choose_offload,
    host_traffic,
    layer_params,
    offload_buffers,
    offload_candidates,
)
from shardwise.passes.remat import layer_segments, rank_step, recompute_all_layers
from shardwise.planner.offload import GENERATED_TIERS, with_offload
from shardwise.planner.recompute import fit_by_recomputation
from shardwise.zoo import build_model

SHAPE = {"layers": 4, "seq": 64, "batch": 8}
MiB = 2**20


def _loss(o):
    return o.logits.float().sin().mean()


def _shrunk(memory: int, host: int | None = None):
    spec = get_cluster("cpu:2")
    spec = dataclasses.replace(spec, device=dataclasses.replace(spec.device, memory_bytes=memory))
    return spec if host is None else dataclasses.replace(spec, host_memory_bytes=host)


@pytest.fixture(scope="module")
def model():
    return build_model("gpt2", device="meta", **SHAPE)


@pytest.fixture(scope="module")
def plan(model) -> ExecutionPlan:
    m, inputs = model
    # ZeRO off: the offload tiers are measured against AdamW's whole state on every rank
    return shardwise.compile(
        m, "cpu:2", example_inputs=inputs, mode="train", loss_fn=_loss, constraints={"dp": 2, "zero": 0}
    ).plan


@pytest.fixture(scope="module")
def candidates(plan):
    return offload_candidates(plan, get_cluster("cpu:2"))


def test_nothing_offloaded_is_the_memory_pass(plan, candidates):
    step = rank_step(plan)
    units = layer_segments(plan.graph)
    assert offload_buffers(step, units, (), step.train, Tiers()).buffers == list(step.train)
    plain = next(c for c in candidates if not c.tiers.any and not c.units)
    assert plain.device_peak_bytes == lower_bound(step.train) == plan.memory[0].lower_bound_bytes
    assert plain.cost_s == 0 and plain.host_bytes == 0


@pytest.mark.parametrize("tiers", [Tiers(True), Tiers(True, True), Tiers(activations=True), Tiers(True, True, True)])
def test_each_tier_moves_its_tensors_off_the_device(plan, tiers):
    step = rank_step(plan)
    units = layer_segments(plan.graph)
    off = offload_buffers(step, units, (), step.train, tiers, zero_stage=plan.zero_stage)
    ids = [b.id for b in off.buffers]
    assert len(ids) == len(set(ids))
    kinds = {i.split(":", 1)[0] for i in ids}
    base = lower_bound(step.train)
    assert lower_bound(off.buffers) < base
    n = len(plan.graph.nodes)
    if tiers.optimizer:
        assert "opt" not in kinds and "scratch:optimizer" not in ids
        assert off.host_bytes >= plan.memory[0].optimizer_bytes and off.host_optimizer_bytes > 0
        assert base - lower_bound(off.buffers) >= plan.memory[0].optimizer_bytes
    if tiers.parameters:
        owner = layer_params(step, units)
        assert off.streamed and set(off.streamed) <= set(owner)
        pieces = {b.id: b for b in off.buffers}
        for key in off.streamed:
            (_, s, e) = units[owner[key]]
            fwd, bwd = pieces[f"param:{key}"], pieces[f"param:{key}#backward"]
            # on the device wherever its layer's ops run, forward and backward, and off it in between
            assert fwd.start <= s and fwd.end >= e and bwd.start <= 2 * n - (e - 1) and bwd.end > 2 * n - s
            assert fwd.end < bwd.start
    if tiers.activations:
        assert len(off.offloaded_units) == len(units)
        back = [b for b in off.buffers if b.id.endswith("#host")]
        assert back and off.host_bytes >= sum(b.size for b in back)
    assert off.transfer_bytes > 0


def test_exposed_time_is_transfer_minus_the_window():
    from shardwise.cluster.presets import cpu_cluster
    from shardwise.costs.prices import price_list
    from shardwise.costs.step import OpPrice, offload_s

    off = Offloaded([])
    off.move("fwd", 0, "h2d", 2 * 10**9)  # 2 s at 1 GB/s over a 0.5 s forward window: 1.5 s exposed
    off.move("fwd", 0, "d2h", 10**8)  # the other direction: hidden
    off.move("bwd", 1, "h2d", 10**9)  # 1 s over a 0.6 s backward window (with recomputation): 0.4 s exposed
    off.move("step", -2, "d2h", 10**8)  # outside the layers: exposed whole
    # two layers of one op each: forward 0.5 s / 0.3 s, backward 0.8 s / 0.4 s + 0.2 s recomputed
    ops = {"a": OpPrice(0.5, 0.8, 0.0, 0.0), "b": OpPrice(0.3, 0.4, 0.0, 0.0, 0.2)}
    traffic = host_traffic(off, [("l0", 0, 1), ("l1", 1, 2)])
    prices = price_list(cpu_cluster(1, memory_bandwidth=1e9, name="cpu:1-1GB/s"))
    exposed, host = offload_s(traffic, ops, prices)
    assert prices.cluster.host_link_bandwidth == 1e9
    assert exposed == pytest.approx(1.5 + 0.4 + 0.1)
    assert host == 0.0


def test_choice_is_the_cheapest_pair_that_fits(plan, candidates):
    every = recompute_all_layers(plan)
    generated = [c for c in candidates if c.tiers in GENERATED_TIERS]
    lowest = min(c.device_peak_bytes for c in generated)
    budget = (lowest + every.peak_bytes) // 2  # below what recomputation alone reaches
    with pytest.raises(DoesNotFitError):
        fit_by_recomputation(plan, budget)
    choice = choose_offload(plan, _shrunk(budget), tiers=GENERATED_TIERS)
    assert choice.tiers.any and choice.device_peak_bytes <= budget
    fitting = [c for c in generated if c.device_peak_bytes <= budget]
    assert choice.cost_s == min(c.cost_s for c in fitting)
    # the hook applies it: memory map from the rewritten buffers, step time raised by the cost (the device no
    # longer steps an optimizer the host steps)
    from shardwise.costs.prices import price_list
    from shardwise.costs.step import price_flat

    fitted = with_offload(plan, "auto", _shrunk(budget))
    assert fitted.tiers and max(fitted.predicted.memory_bytes) <= budget
    assert fitted.memory[0].lower_bound_bytes == choice.device_peak_bytes
    events = price_flat(plan, price_list(_shrunk(budget), plan.precision)).events
    device_optimizer = sum(e.seconds for e in events if e.phase == "optimizer" and e.kind == "compute")
    expected = plan.predicted.step_time_s + choice.cost_s - (device_optimizer if choice.tiers.optimizer else 0.0)
    assert fitted.predicted.step_time_s == pytest.approx(expected)
    if choice.tiers.optimizer:
        assert fitted.memory[0].optimizer_bytes == 0
    assert ExecutionPlan.from_json(fitted.to_json()).tiers == fitted.tiers
    assert "host memory (offloaded)" in fitted.summary()
    assert with_offload(plan, "auto", get_cluster("cpu:2")) is plan  # fits already: unchanged


def test_host_memory_bounds_the_choice(plan, candidates):
    every = recompute_all_layers(plan)
    budget = every.peak_bytes - MiB // 2
    # a host that holds nothing: recomputation alone does not fit either, so nothing does
    with pytest.raises(DoesNotFitError, match="on the host of 0.00 GiB per rank"):
        choose_offload(plan, _shrunk(budget, host=2))


def test_impossible_budget_names_the_smallest_device_memory(plan, candidates):
    lowest = min(c.device_peak_bytes for c in candidates if c.tiers in GENERATED_TIERS)
    with pytest.raises(DoesNotFitError, match=f"smallest device memory reachable is .*\\({lowest} bytes"):
        choose_offload(plan, _shrunk(lowest - 4096), tiers=GENERATED_TIERS)
    applied = apply_offload(plan, min(candidates, key=lambda c: c.device_peak_bytes), get_cluster("cpu:2"))
    assert max(applied.predicted.memory_bytes) >= min(c.device_peak_bytes for c in candidates)


def test_compile_offloads_on_a_shrunk_cluster_and_checks_settings(model, plan, candidates):
    m, inputs = model
    common = dict(example_inputs=inputs, mode="train", loss_fn=_loss, constraints={"dp": 2})
    lowest = min(c.device_peak_bytes for c in candidates if c.tiers in GENERATED_TIERS)
    budget = (lowest + recompute_all_layers(plan).peak_bytes) // 2
    assert plan.zero_stage == 0  # pinned below, so the shrunk cluster's plan is the one measured here
    shrunk = {**common, "constraints": {"dp": 2, "zero": 0}}
    made = shardwise.compile(m, _shrunk(budget), offload="auto", recompute="auto", **shrunk).plan
    assert made.tiers and "offload" in made.passes and max(made.predicted.memory_bytes) <= budget
    fixed = shardwise.compile(m, "cpu:2", offload="optimizer", **common).plan
    assert {t for _, t in fixed.tiers} == {"host"} and all(n.startswith("optimizer:") for n, _ in fixed.tiers)
    assert not fixed.recompute
    with pytest.raises(UserInputError, match="offload="):
        shardwise.compile(m, "cpu:2", offload="sometimes", **common)
    # recomputation pinned, offload searched (issue 15: one search, both "auto" by default): every layer is
    # recomputed and nothing goes to the host where the plan fits without it
    both = shardwise.compile(m, "cpu:2", offload="auto", recompute="all", **common).plan
    assert both.recompute and not both.tiers
