"""The serving planner (planner/serving/): the simulator conserves requests and respects memory, goodput moves
the way the targets say, the search and its report hold together, and bad workloads say what to do."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from shardwise.cluster import get_cluster
from shardwise.costs.prices import PriceList
from shardwise.costs.serving import ServingPrices
from shardwise.errors import UserInputError
from shardwise.planner.serving.model import serving_model
from shardwise.planner.serving.report import launch_commands, plan_data
from shardwise.planner.serving.search import SLO, Scored, max_rate, pairs, search
from shardwise.planner.serving.simulator import Colocated, Disaggregated, Phase, simulate
from shardwise.planner.serving.workload import Request, Workload, load_workload


@pytest.fixture(scope="module")
def opt13b():
    return serving_model("facebook/opt-13b")


@pytest.fixture(scope="module")
def a100(opt13b):
    return ServingPrices(opt13b, PriceList(get_cluster("dgx-a100x1"), "bf16"))


LAYOUTS = [
    Colocated(Phase(1, 1)),
    Colocated(Phase(2, 1, 2)),
    Colocated(Phase(1, 2)),
    Disaggregated(Phase(1, 1), Phase(1, 1)),
    Disaggregated(Phase(2, 1), Phase(1, 2, 2)),
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: lay.describe())
@pytest.mark.parametrize("rate", [2.0, 40.0])
def test_simulator_conserves_requests(a100, layout, rate):
    requests = load_workload("sharegpt").requests(300, rate, seed=3)
    result = simulate(a100, layout, requests)
    assert result.finished + result.rejected == len(requests)
    served = [(a, b) for a, b in zip(result.ttft, result.tpot) if a is not None]
    assert len(served) == result.finished
    assert all(a >= 0 and b >= 0 for a, b in served)
    # nothing is finished before the run ends, and a request's first token follows its arrival by its prefill
    shortest = min(a100.prefill(layout_phase(layout).tp, layout_phase(layout).pp, [r.prompt]).latency_s
                   for r in requests)  # fmt: skip
    assert min(a for a, _ in served) >= shortest * 0.999
    assert result.end_s >= max(r.arrival for r in requests)
    assert 0 < result.peak_fill <= 1.0  # running sequences never hold more than the cache


def layout_phase(layout):
    return layout.phase if isinstance(layout, Colocated) else layout.prefill


def test_requests_longer_than_the_cache_are_rejected(opt13b):
    small = dataclasses.replace(get_cluster("dgx-a100x1").device, memory_bytes=30 * 2**30)
    cluster = dataclasses.replace(get_cluster("dgx-a100x1"), device=small)
    prices = ServingPrices(opt13b, PriceList(cluster, "bf16"))
    capacity = prices.kv_capacity_tokens(1, 1)
    assert 0 < capacity < 4000
    lengths = Workload("mix", *(load_workload("fixed:1,1").prompt,) * 2, pairs=((capacity, 50), (100, 50)))
    requests = lengths.requests(200, 1.0, seed=1)
    too_long = sum(1 for r in requests if r.prompt + r.output > capacity)
    for layout in (Colocated(Phase(1, 1)), Disaggregated(Phase(1, 1), Phase(1, 1))):
        result = simulate(prices, layout, requests)
        assert result.rejected == too_long > 0
        assert result.finished == len(requests) - too_long


def test_attainment_falls_with_load_and_rises_with_looser_targets(a100):
    workload = load_workload("fixed:256,64")
    layout = Colocated(Phase(1, 1))
    results = [simulate(a100, layout, workload.requests(400, rate, seed=0)) for rate in (1, 8, 64)]
    assert (
        results[0].attainment(0.2, 0.05)
        >= results[1].attainment(0.2, 0.05)
        >= results[2].attainment(0.2, 0.05)
    )
    assert results[2].attainment(0.2, 0.05) < 0.5
    for r in results:
        assert r.attainment(0.4, 0.1) >= r.attainment(0.2, 0.05)


def test_goodput_is_monotone_in_the_targets(a100):
    workload = load_workload("fixed:512,64")
    layout = Colocated(Phase(1, 1))

    def goodput(ttft, tpot, target):
        def attained(rate):
            reqs = workload.requests(600, rate, seed=0)
            span = reqs[-1].arrival
            return simulate(a100, layout, reqs).attainment(ttft, tpot, span / 4, 3 * span / 4)

        return max_rate(attained, target)[0]

    tight = goodput(0.15, 0.03, 0.9)
    assert tight > 0
    assert goodput(0.3, 0.06, 0.9) >= tight / 1.03
    assert goodput(0.15, 0.03, 0.5) >= tight / 1.03
    # a target no layout can meet (TTFT below one prefill) has no goodput
    assert goodput(a100.prefill(1, 1, [512]).latency_s / 2, 0.03, 0.9) == 0.0


def test_max_rate_brackets_a_threshold():
    rate, att, capped = max_rate(lambda r: 1.0 if r <= 37.0 else 0.0, 0.9)
    assert 37.0 / 1.03 <= rate <= 37.0 and att == 1.0 and not capped
    rate, _, capped = max_rate(lambda r: 1.0 if r <= 5.0 else None, 0.9)
    assert rate <= 5.0 and capped


def two_a100s():
    """Two A100s (the preset's device and efficiencies) on the two-process topology of cpu:2: a small search."""
    a100 = get_cluster("dgx-a100x1")
    return dataclasses.replace(
        get_cluster("cpu:2"), name="a100x2", device=a100.device, efficiency=a100.efficiency
    )


@pytest.fixture(scope="module")
def small_search(opt13b):
    cluster = two_a100s()
    prices = ServingPrices(opt13b, PriceList(cluster, "bf16"))
    workload = load_workload("fixed:256,32")
    slo = SLO(0.5, 0.05, 0.9)
    return prices, cluster, workload, slo, search(prices, cluster, workload, slo, requests=150)


def test_search_ranks_colocated_and_disaggregated_layouts(small_search):
    prices, cluster, workload, slo, result = small_search
    kinds = {type(s.layout) for s in result.ranked}
    assert kinds == {Colocated, Disaggregated}
    per_device = [s.per_device for s in result.ranked]
    assert per_device == sorted(per_device, reverse=True)
    assert result.best is result.ranked[0] and result.best.goodput_rps > 0
    assert result.best.attainment >= slo.attainment
    assert all(s.layout.devices <= 2 for s in result.ranked)


def test_plan_data_keys_and_launch_commands(small_search):
    prices, cluster, workload, slo, result = small_search
    data = json.loads(json.dumps(plan_data("gpt2", prices, cluster, workload, slo, result)))
    for key in ("layout", "goodput_rps_per_gpu", "kv_capacity_tokens", "alternatives", "launch_command"):
        assert key in data
    assert data["layout"]["kind"] in ("colocated", "disaggregated")
    assert data["goodput_rps_per_gpu"] > 0 and data["predicted"] is True
    assert len(data["alternatives"]) == len(result.ranked) - 1
    for s in result.ranked:
        text = "\n".join(launch_commands("gpt2", s, cluster))
        phases = [s.layout.phase] if isinstance(s.layout, Colocated) else [s.layout.prefill, s.layout.decode]
        assert text.count("vllm serve gpt2") == sum(p.instances for p in phases)
        for p in phases:
            assert f"--tensor-parallel-size {p.tp} --pipeline-parallel-size {p.pp}" in text
        assert ("kv_connector" in text) == isinstance(s.layout, Disaggregated)


def test_a_model_too_big_for_the_cluster_says_what_to_do():
    prices = ServingPrices(serving_model("facebook/opt-66b"), PriceList(get_cluster("dgx-a100x1"), "bf16"))
    tiny = dataclasses.replace(get_cluster("dgx-a100x1"), num_nodes=1)
    small = dataclasses.replace(tiny.device, memory_bytes=8 * 2**30)
    with pytest.raises(UserInputError, match="more .*devices"):
        search(ServingPrices(prices.model, PriceList(dataclasses.replace(tiny, device=small), "bf16")),
               dataclasses.replace(tiny, device=small), load_workload("sharegpt"), SLO(1, 1, 0.9))  # fmt: skip


@pytest.mark.parametrize(
    ("content", "suffix", "message"),
    [
        ("prompt: {distribution: zipf, mean: 3}\noutput: 10\n", ".yaml", "zipf.*unknown.*lognormal"),
        ("prompt: {distribution: lognormal}\noutput: 10\n", ".yaml", "needs 'mean'"),
        ("output: 10\n", ".yaml", "missing `prompt`"),
        (
            "prompt: 10\noutput: 10\narrival: {process: poisson, rate: -1}\n",
            ".yaml",
            "rate must be a number > 0",
        ),
        ("prompt: 10\noutput: 10\narrival: {process: gamma}\n", ".yaml", "Poisson"),
        ('{"prompt": 10, "output": ', ".json", "cannot be read as JSON"),
        ("[[10, 0]]", ".json", "every length >= 1"),
    ],
)
def test_bad_workload_files_say_what_to_do(tmp_path, content, suffix, message):
    path = tmp_path / f"w{suffix}"
    path.write_text(content)
    with pytest.raises(UserInputError, match=message):
        load_workload(str(path))


def test_workload_files_and_names(tmp_path):
    path = tmp_path / "chat.yaml"
    path.write_text("prompt: {distribution: uniform, min: 10, max: 20}\noutput: {distribution: fixed, value: 7}\n"
                    "arrival: {process: poisson, rate: 4}\n")  # fmt: skip
    w = load_workload(str(path))
    reqs = w.requests(500, seed=2)
    assert all(10 <= r.prompt <= 20 and r.output == 7 for r in reqs)
    gaps = [b.arrival - a.arrival for a, b in zip(reqs, reqs[1:])]
    assert sum(gaps) / len(gaps) == pytest.approx(1 / 4, rel=0.15)  # Poisson at 4 requests/s
    share = load_workload("sharegpt")
    prompt, output = share.means(4000)
    assert all(p + o < 2048 for p, o in share.lengths(2000))
    assert 100 < prompt < 200 and 200 < output < 400 and not math.isnan(prompt)
    with pytest.raises(UserInputError, match="neither a known name"):
        load_workload("no-such-workload")
    assert isinstance(Scored(Colocated(Phase(1, 1)), 1.0, 1.0).per_device, float)


def small_cache_prices(opt13b, engine="vllm"):
    """OPT-13B on an A100 with 30 GiB: a KV cache of a few thousand tokens."""
    small = dataclasses.replace(get_cluster("dgx-a100x1").device, memory_bytes=30 * 2**30)
    cluster = dataclasses.replace(get_cluster("dgx-a100x1"), device=small)
    return ServingPrices(opt13b, PriceList(cluster, "bf16"), engine)


@pytest.mark.parametrize("engine", ["vllm", "distserve"])
@pytest.mark.parametrize("disaggregated", [False, True], ids=["colocated", "disaggregated"])
def test_the_cache_grows_with_the_output_and_full_caches_preempt(opt13b, engine, disaggregated):
    """vLLM and DistServe allocate KV blocks as sequences grow (no reservation of the output): two requests
    whose prompts fit together but whose prompts and outputs do not both run at first, and when the cache
    fills, one is preempted (vLLM: recomputed; DistServe's decode instance: swapped out) and both finish."""
    prices = small_cache_prices(opt13b, engine)
    capacity = prices.kv_capacity_tokens(1, 1)
    prompt, output = capacity // 4, capacity // 2  # one request alone fits; two prompts fit, two whole do not
    requests = [Request(0, 0.0, prompt, output), Request(1, 1e-6, prompt, output)]
    layout = Disaggregated(Phase(1, 1), Phase(1, 1)) if disaggregated else Colocated(Phase(1, 1))
    result = simulate(prices, layout, requests)
    assert result.finished == 2 and result.rejected == 0
    assert result.preempted >= 1
    assert result.peak_fill <= 1.0
    # both had their first token before either could have finished decoding alone
    lone = simulate(prices, layout, requests[:1])
    decode_time = lone.tpot[0] * (output - 1)
    assert max(result.ttft) < decode_time / 4


def test_disaggregated_prefill_batches_keep_distserve_limits(opt13b):
    """DistServe's prefill instances batch at most 128 prompts and 8192 tokens (its launch script)."""
    prices = ServingPrices(opt13b, PriceList(get_cluster("dgx-a100x1"), "bf16"), "distserve")
    max_tokens, max_seqs = prices.engine.prefill_limits
    for prompt, n in ((8, 300), (1000, 40)):
        requests = [Request(i, i * 1e-9, prompt, 2) for i in range(n)]
        result = simulate(prices, Disaggregated(Phase(1, 1), Phase(1, 1)), requests, only="prefill")
        assert result.finished == n
        batches: dict[float, int] = {}
        for r, t in zip(requests, result.ttft):
            key = round(r.arrival + t, 9)
            batches[key] = batches.get(key, 0) + 1
        assert max(batches.values()) <= max_seqs and max(batches.values()) * prompt <= max_tokens
        assert len(batches) >= math.ceil(n * prompt / max_tokens)


def test_distserve_iterations_pay_its_host_overhead(opt13b):
    """DistServe's simulator adds 2 ms + 0.1 us per cached token to every iteration (both engines ran under
    Ray); a lone request's decode steps on the distserve engine take that much longer than the price."""
    prices = ServingPrices(opt13b, PriceList(get_cluster("dgx-a100x1"), "bf16"), "distserve")
    prompt, output = 500, 65
    result = simulate(prices, Colocated(Phase(1, 1)), [Request(0, 0.0, prompt, output)])
    steps = [prices.decode_step_s(1, 1, 1, prompt + 1 + k) for k in range(output - 1)]
    overheads = [prices.iteration_overhead_s(prompt + 1 + k) for k in range(output - 1)]
    assert result.tpot[0] == pytest.approx((sum(steps) + sum(overheads)) / (output - 1), rel=1e-9)
    assert sum(overheads) / (output - 1) >= 2e-3


def test_distserve_sharegpt_is_distserve_procedure_output():
    """The shipped DistServe ShareGPT pairs obey the procedure's filters (bench/distserve_sharegpt.py):
    prompt + output < 2048 and not both under 4 tokens; multi-turn prompts make them long."""
    w = load_workload("distserve-sharegpt")
    assert len(w.pairs) > 10000 and "0-prepare-dataset.py" in w.source
    assert all(p + o < 2048 and (p >= 4 or o >= 4) and p >= 1 and o >= 1 for p, o in w.pairs)
    prompt, output = w.means(4000)
    assert prompt > 2 * load_workload("sharegpt").means(4000)[0]  # earlier turns are part of the prompt


@pytest.mark.parametrize("only", [None, "prefill", "decode"])
def test_one_token_outputs_finish_at_their_first_token(a100, only):
    """DistServe's ShareGPT pairs include outputs of one token: they end with their prefill."""
    requests = [Request(0, 0.0, 100, 1), Request(1, 0.01, 50, 5)]
    layouts = [Disaggregated(Phase(1, 1), Phase(1, 1))] + ([Colocated(Phase(1, 1))] if only is None else [])
    for layout in layouts:
        result = simulate(a100, layout, requests, only)
        assert result.finished == 2 and result.tpot[0] == 0.0


def test_disaggregated_pairs_fit_the_cluster_even_when_the_best_phase_fills_it():
    """OPT-66B on one 8-GPU node: the best prefill instances per device (tp 4 x pp 2, tp 8) fill the node
    alone; the search must still pair instances that fit together (DistServe's search enumerates only those),
    most promising first."""
    pre = [(4, 2, 8.0), (8, 1, 7.8), (4, 1, 3.75), (2, 1, 0.03)]
    dec = [(4, 2, 21.7), (2, 2, 8.0), (4, 1, 9.9), (1, 4, 4.0)]
    chosen = pairs(pre, dec, 8)
    assert chosen and len(chosen) <= 4
    assert all(p[0] * p[1] + d[0] * d[1] <= 8 for p, d in chosen)
    # the first is the best balanced pair: prefill tp 4 (3.75) with decode tp 2 x pp 2 (8.0), 3.75 / 8 per GPU,
    # ahead of prefill tp 4 with decode tp 4 (3.75 / 8 as well, same devices) and far ahead of prefill tp 2
    assert chosen[0][0] == (4, 1, 3.75) and chosen[0][1] in ((2, 2, 8.0), (4, 1, 9.9), (1, 4, 4.0))
    assert ((2, 1, 0.03), (2, 2, 8.0)) not in chosen[:2]


def test_launch_commands_pass_the_simulated_scheduler_limits(small_search):
    """The plan was simulated with the engine's scheduling limits; its vLLM commands start the engine with them
    (vLLM's own defaults differ between versions and devices)."""
    prices, cluster, workload, slo, result = small_search
    data = plan_data("gpt2", prices, cluster, workload, slo, result)
    e = prices.engine
    flags = f"--max-num-batched-tokens {e.max_batched_tokens} --max-num-seqs {e.max_seqs}"
    assert data["launch_command"].count(flags) == data["launch_command"].count("vllm serve") > 0


def lone_and_interrupted(prices, tp=1):
    """Request 0 (prompt 300, 64 tokens) alone, and with request 1 (a 1,500-token prompt, one output token: it
    ends with its prefill) arriving while request 0 decodes."""
    long = Request(0, 0.0, 300, 64)
    lone = simulate(prices, Colocated(Phase(tp, 1)), [long])
    arrival = lone.ttft[0] + 10.5 * lone.tpot[0]  # during request 0's eleventh decode step
    both = simulate(prices, Colocated(Phase(tp, 1)), [long, Request(1, arrival, 1500, 1)])
    return lone, both, (both.tpot[0] - lone.tpot[0]) * 63  # what request 1 added to request 0's decoding


def test_a_prefill_stalls_the_decodes_of_its_instance(opt13b):
    """DistServe's vLLM baseline (prefill first, no chunked prefill): an iteration is a prefill or a decode
    step, so a prompt arriving while a request decodes stops it for the prompt's whole prefill (and the
    iteration's host overhead), which counts into that request's TPOT."""
    prices = ServingPrices(opt13b, PriceList(get_cluster("dgx-a100x1"), "bf16"), "distserve")
    assert not prices.engine.chunked_prefill
    lone, both, added = lone_and_interrupted(prices)
    stall = prices.prefill(1, 1, [1500]).latency_s + prices.iteration_overhead_s(1500)
    assert added == pytest.approx(stall, rel=1e-9)
    assert both.finished == 2 and both.ttft[0] == lone.ttft[0]


def test_a_chunked_prefill_shares_the_iterations_of_the_running_decodes(opt13b, a100):
    """vLLM's V1 scheduler (the ``vllm`` engine, what ``vllm serve`` runs): the prompt's chunk and the running
    request's next token go through one forward pass (the weights are read once for both), so the running
    request is slowed by less than the prompt's prefill alone, and the prompt's first token comes from that
    shared iteration."""
    assert a100.engine.chunked_prefill and a100.engine.max_batched_tokens >= 1500
    lone, both, added = lone_and_interrupted(a100)
    alone = a100.prefill(1, 1, [1500]).latency_s
    assert 0 < added < alone
    # request 1 waited at most one decode step of request 0, then ran with request 0's next token
    shared = a100.mixed_step_s(1, 1, 1, 300 + 12, [(1500, 0)])
    assert shared - a100.decode_step_s(1, 1, 1, 300 + 12) == pytest.approx(added, rel=1e-3)
    assert shared <= both.ttft[1] <= shared + a100.decode_step_s(1, 1, 1, 300 + 12)


@pytest.mark.parametrize("rate", [1.0, 30.0])
def test_chunked_iterations_keep_the_budget_and_the_cache(opt13b, rate):
    """Under load the chunked scheduler serves every request, never holds more than the cache, and gives every
    running request a token each iteration of at most ``max_batched_tokens`` tokens: with no preemption (none
    here), no request's TPOT exceeds the price of an iteration at least that large (the budget's tokens as
    decodes of a full cache plus the budget as a chunk after a full cache: more than any real iteration)."""
    prices = small_cache_prices(opt13b, "vllm")
    engine = dataclasses.replace(prices.engine, max_batched_tokens=512)
    prices = ServingPrices(opt13b, prices.prices, engine)
    requests = load_workload("fixed:700,40").requests(120, rate, seed=2)
    result = simulate(prices, Colocated(Phase(1, 1)), requests)
    assert result.finished == len(requests) and result.peak_fill <= 1.0 and result.preempted == 0
    cap = prices.kv_capacity_tokens(1, 1)
    budget_step = prices.mixed_step_s(1, 1, 512, cap, [(512, cap)])
    assert max(t for t in result.tpot if t is not None) <= budget_step
