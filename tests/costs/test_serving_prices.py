"""Serving prices (costs/serving.py): decode never beats reading the weights, capacity follows memory, prefill
follows the prompt, and the per-model figures count the model's real parameters."""

from __future__ import annotations

import dataclasses

import pytest

from shardwise.cluster import get_cluster
from shardwise.costs.prices import PriceList
from shardwise.costs.serving import ServingPrices
from shardwise.planner.serving.model import serving_model
from shardwise.zoo import build_model


@pytest.fixture(scope="module")
def opt13b():
    return serving_model("facebook/opt-13b")


@pytest.fixture(scope="module")
def llama3():
    return serving_model("Meta-Llama-3-8B")


@pytest.fixture(scope="module")
def a100():
    return PriceList(get_cluster("dgx-a100x2"), "bf16")


@pytest.mark.parametrize("model_name", ["opt13b", "llama3"])
def test_decode_never_beats_reading_the_weights(request, model_name, a100):
    sp = ServingPrices(request.getfixturevalue(model_name), a100)
    for tp in (1, 2, 4, 8):
        for pp in (1, 2):
            bound = sp.weight_read_bound_s(tp, pp)
            for batch, context in ((1, 16), (1, 2048), (32, 32 * 700), (256, 256 * 1500)):
                step = sp.decode_step_s(tp, pp, batch, context)
                assert step >= bound, (tp, pp, batch, step, bound)
            # one sequence, short context: the step is close to the bound (weight reads dominate)
            assert sp.decode_step_s(tp, pp, 1, 16) < 2.0 * bound


def test_capacity_decreases_when_weights_grow(opt13b, a100):
    sp = ServingPrices(opt13b, a100)
    base = sp.kv_capacity_tokens(1, 1)
    assert base > 0
    bigger = ServingPrices(dataclasses.replace(opt13b, layer_params=int(opt13b.layer_params * 1.2)), a100)
    assert bigger.kv_capacity_tokens(1, 1) < base
    # more devices per instance hold more of the cache
    assert sp.kv_capacity_tokens(2, 1) > base and sp.kv_capacity_tokens(2, 2) > sp.kv_capacity_tokens(2, 1)
    # a model that does not fit holds nothing
    huge = dataclasses.replace(opt13b, layer_params=opt13b.layer_params * 20)
    assert ServingPrices(huge, a100).kv_capacity_tokens(1, 1) == 0


def test_capacity_is_whole_blocks_of_the_per_token_bytes(opt13b, a100):
    sp = ServingPrices(opt13b, a100, "distserve")
    tokens = sp.kv_capacity_tokens(1, 1)
    assert tokens % sp.engine.block_tokens == 0
    free = (
        0.95 * a100.cluster.device.memory_bytes
        - sp.weight_bytes_per_device(1, 1)
        - 0.01 * a100.cluster.device.memory_bytes
    )
    per_token = 2 * 40 * 40 * 128 * 2  # K and V, 40 layers, 40 heads of 128, fp16
    assert opt13b.kv_bytes_per_token() == per_token
    assert 0 <= free - tokens * per_token < sp.engine.block_tokens * per_token


def test_gqa_heads_replicate_beyond_tp(llama3):
    assert llama3.kv_heads == 8
    assert llama3.kv_bytes_per_token(8) == llama3.kv_bytes_per_token(1) / 8
    assert llama3.kv_bytes_per_token(16) == llama3.kv_bytes_per_token(8)  # one head per device, replicated


def test_prefill_follows_the_prompt(opt13b, a100):
    sp = ServingPrices(opt13b, a100)
    one = sp.prefill(1, 1, [512]).latency_s
    assert sp.prefill(1, 1, [1024]).latency_s > one
    # attention is quadratic in each prompt: one prompt of 2s costs more than two of s
    assert sp.prefill(1, 1, [2048]).latency_s > sp.prefill(1, 1, [1024, 1024]).latency_s
    # tensor parallelism shortens it, and a pipeline lets the next batch in after one stage
    assert sp.prefill(2, 1, [512]).latency_s < one
    p = sp.prefill(1, 2, [512])
    assert p.stage_s == pytest.approx(p.latency_s / 2)
    # a large prefill is compute-bound: within 30% of its matmul FLOPs at the achieved gemm rate
    tokens = 4 * 2048
    flops = opt13b.prefill_flops_per_token() * tokens
    rate = a100.peak_flops * a100.cluster.efficiency.gemm
    assert flops / rate <= sp.prefill(1, 1, [2048] * 4).latency_s < 1.3 * flops / rate


def test_kv_transfer_is_cheaper_inside_a_node(opt13b, a100):
    sp = ServingPrices(opt13b, a100)
    inside = sp.kv_transfer_s(1000, 0, 1)
    across = sp.kv_transfer_s(1000, 0, 8)
    assert 0 < inside < across


def test_model_figures_count_the_real_parameters():
    for spec in ("gpt2:tiny", "llama:tiny"):
        figures = serving_model(spec)
        model, _ = build_model(spec)
        assert figures.params == sum(p.numel() for p in model.parameters()), spec
        # kernels and views counted on a meta-device trace of one layer: more than the matmuls alone
        assert "trace" in figures.source and figures.layer_kernels > 0 and figures.layer_views > 0, spec
    opt = serving_model("opt-13b")
    assert 12.8e9 < opt.params < 12.9e9  # "13B"
    assert (opt.layers, opt.heads, opt.head_dim) == (40, 40, 128)


@pytest.mark.parametrize("tp", [1, 2])
def test_a_mixed_iteration_reads_the_weights_once(opt13b, a100, tp):
    """A chunked-prefill iteration (decodes and a prompt chunk in one forward pass) is the decode step when it
    has no chunk and the prefill when it holds one whole prompt alone; with both it costs more than either but
    less than the two run one after the other (the weights are read once); a chunk after cached tokens costs
    more than the same chunk alone (it attends to them and reads them). (On a pipeline, pp > 1, an iteration
    is one micro-batch's pass, as a decode step is.)"""
    sp = ServingPrices(opt13b, a100)
    pp = 1
    assert sp.mixed_step_s(tp, 2, 16, 16 * 900) == sp.decode_step_s(tp, 2, 16, 16 * 900)
    decode = sp.decode_step_s(tp, pp, 16, 16 * 900)
    prefill = sp.prefill(tp, pp, [700]).latency_s
    assert sp.mixed_step_s(tp, pp, 16, 16 * 900) == decode
    assert sp.mixed_step_s(tp, pp, 0, 0.0, [(700, 0)]) == pytest.approx(prefill, rel=1e-12)
    both = sp.mixed_step_s(tp, pp, 16, 16 * 900, [(700, 0)])
    assert max(decode, prefill) < both < decode + prefill
    assert sp.mixed_step_s(tp, pp, 0, 0.0, [(700, 1200)]) > prefill


def test_a_pipelined_mixed_iteration_does_not_split_a_chunk(opt13b, a100):
    """On a pipeline (micro-batches in flight) an iteration takes one micro-batch's pass; the micro-batch that
    holds a prompt's chunk holds all of it, so a chunk with a few decodes beside it takes at least the chunk's
    own pass."""
    sp = ServingPrices(opt13b, a100)
    alone = sp.mixed_step_s(1, 2, 0, 0.0, [(1500, 0)])
    assert alone == pytest.approx(sp.prefill(1, 2, [1500]).latency_s, rel=1e-12)
    assert sp.mixed_step_s(1, 2, 3, 3 * 400, [(1500, 0)]) >= alone


def test_the_collectives_priced_are_the_planned_programs():
    """Serving prices price the collectives of the planned program's own layout
    (``LayoutCollectives.from_plans``): for a Llama of hidden size 1024 on the nominal cpu:2 links the planner
    writes Megatron's layout (two all-reduces a layer and the logits' all-gather: the default layout's kinds and
    bytes); for the zoo's tiny Llama on nearly free links (as bench/serving_cpu.py plans its tp 2 programs) it
    also splits the norms' statistics (two more a layer and the final norm's), and the prices count and pay
    exactly the collectives the plans' own prices do, prefill and decode."""
    import shardwise
    from shardwise.cluster.presets import cpu_cluster
    from shardwise.costs.serving import LayoutCollectives
    from shardwise.costs.step import price_flat
    from shardwise.planner.serving.model import serving_model_from_config
    from shardwise.zoo.hf import tiny_causal_lm

    nominal = get_cluster("cpu:2")
    prices = PriceList(nominal, "fp32")
    free = cpu_cluster(2, latency=1e-9, bandwidth=1e14)
    batch, prompt = 4, 16
    cases = ((tiny_causal_lm("llama", hidden=1024, heads=16, layers=1, vocab=1000, seq=32)[0], nominal, 2),
             (build_model("llama:tiny")[0], free, 4))  # fmt: skip
    for model, planned_for, per_layer in cases:
        with shardwise.compile(model, planned_for, mode="generate", max_batch=batch, max_seq=32, max_prompt=prompt,
                               constraints={"tp": 2, "sp": 1}) as cm:  # fmt: skip
            plans = {"prefill": (cm.prefill_plan, batch * prompt), "decode": (cm.plan, batch)}
            layout = LayoutCollectives.from_plans(cm.prefill_plan, cm.plan, batch * prompt, batch, batch)
        figures = serving_model_from_config(model.config, "llama", "a zoo configuration", weight_bytes=4)
        sp = ServingPrices(figures, prices, collectives=layout)
        assert layout.tp == 2 and len(layout.layer) == per_layer
        for phase, (plan, tokens) in plans.items():
            planned = [e for e in price_flat(plan, prices).events if e.kind == "comm"]
            ours = figures.layers * sp.layer_collectives(2, tokens, batch) + sp.edge_collectives(2, tokens, batch)
            assert len(ours) == len(planned), (phase, [e.label for e in planned])
            paid = sum(prices.collective_s(kind, nbytes, (0, 1)) for kind, nbytes in ours)
            assert paid == pytest.approx(sum(e.seconds for e in planned), rel=1e-9), phase
        if per_layer == 2:  # Megatron's layout: the default serving layout's collectives, kinds and bytes
            default = LayoutCollectives.megatron(figures, 2)
            assert [k for k, *_ in layout.layer] == [k for k, *_ in default.layer]
            assert sp.layer_collectives(2, 8) == ServingPrices(figures, prices).layer_collectives(2, 8)
        with pytest.raises(ValueError, match="tp=2 layout"):
            sp.layer_collectives(4, 8)


def test_serving_prices_pay_a_matmul_kinds_fixed_cost_once_per_kernel(opt13b):
    """A model whose layers' matmuls and head are traced as `linear` pays the price list's fixed cost of that kind
    (efficiency.kernel_overhead_s) once per matmul kernel, as the plans' per-op prices do: layers x matmuls a layer
    + the head, more a decode step than the same model with no kind known."""
    from shardwise.cluster.presets import CPU_EFFICIENCY, cpu_cluster

    eff = dataclasses.replace(CPU_EFFICIENCY, op_overhead_s=2e-6, kernel_overhead_s=(("linear", 5e-6),))
    prices = PriceList(cpu_cluster(2, flops=50e9, memory_bandwidth=10e9, efficiency=eff, name="cpu:2-kinds"), "fp32")
    traced = dataclasses.replace(opt13b, matmul_op="linear", head_op="linear")
    unknown = dataclasses.replace(opt13b, matmul_op="", head_op="")
    more = ServingPrices(traced, prices).decode_step_s(1, 1, 4, 4 * 64) - ServingPrices(unknown, prices).decode_step_s(
        1, 1, 4, 4 * 64)  # fmt: skip
    assert more == pytest.approx((opt13b.layers * opt13b.layer_matmuls + 1) * 5e-6, rel=1e-9)
