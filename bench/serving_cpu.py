"""Serving prices on this machine (issue 18, point 5): ``python bench/serving_cpu.py``.

Predicted against measured prefill and decode step times of the generated program (``compile(mode="generate")``,
``cm.generate(..., return_timings=True)``: each step timed on the workers from a barrier to its return, the
slowest rank)
for GPT-2 and Llama zoo configurations (tiny, small) on ``cpu:1`` (tp 1) and ``cpu:2`` (tp 2), as
``shardwise calibrate`` measured this machine (the cached calibration of ``cpu:N``). Writes
bench/results/serving_cpu.json.

**What the program does, fixed from compile(mode="generate") before comparing**: a batch of ``BATCH`` prompts of
``PROMPT`` tokens (no padding) prefilled in one step, then ``NEW_TOKENS - 1`` decode steps of the batch, in
float32; the KV cache is static (``MAX_SEQ`` slots per sequence) and attention reads every slot with a mask
(the prefill's ``PROMPT`` queries against ``MAX_SEQ`` keys, each decode query against ``MAX_SEQ`` keys).

**Layouts**: tp 1 runs on one process (``cpu:1``). tp 2 must be a tensor-parallel program: on this machine's
real links the planner rightly runs these small models whole on each rank (a collective costs more than a
layer), so, as tests/e2e/test_generate.py does, the tp 2 programs are planned for a copy of ``cpu:2`` whose links
are nearly free (the weights and the KV cache split by heads, two all-reduces per layer; the bench checks the
split) and then run and timed on the real processes and links.

Two predictions per step:

- ``plan``: the step plans' own price (``cm.prefill_plan`` / ``cm.plan``), every traced op and every collective
  of the program as written priced by the price list on the cluster it runs on (the tp 2 plans, planned on
  free links, are priced again on ``cpu:2``'s links with ``costs.step.predict_flat``: the program that runs).
  The tp 2 programs hold more collectives than Megatron's two all-reduces per layer that the serving prices
  assume (on free links the planner also splits the norms' statistics: ``collectives`` in the JSON counts
  them per step);
- ``serving``: ``costs/serving.py``'s analytic prices (``ServingPrices.prefill_sums`` with the static window,
  ``decode_step_s`` with ``MAX_SEQ`` cached slots per sequence), from the model's figures alone.

Timings are noisy on a shared machine: the load average is recorded next to them. The measured figure is the
least over ``REPEATS`` generations (prefill) and over all their decode steps (decode), the statistic
``shardwise calibrate`` uses for the figures the prices are made of (the least of its samples: what the
machine does when nothing preempts it); the medians are recorded beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import shardwise  # noqa: E402
from shardwise.cluster import get_cluster  # noqa: E402
from shardwise.cluster.presets import cpu_cluster  # noqa: E402
from shardwise.costs.prices import price_list  # noqa: E402
from shardwise.costs.serving import ServingPrices  # noqa: E402
from shardwise.costs.step import predict_flat, price_flat  # noqa: E402
from shardwise.ir.placement import Shard  # noqa: E402
from shardwise.planner.serving.model import serving_model_from_config  # noqa: E402
from shardwise.zoo import build_model  # noqa: E402

RESULTS = ROOT / "bench" / "results"
BATCH, PROMPT, MAX_SEQ, NEW_TOKENS, REPEATS = 4, 32, 64, 17, 5
ROWS = [(m, size, tp) for m in ("gpt2", "llama") for size in ("tiny", "small") for tp in (1, 2)]


def measure(name: str, size: str, tp: int) -> dict:
    model, _ = build_model(f"{name}:{size}")
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (BATCH, PROMPT), generator=torch.Generator().manual_seed(0))
    cluster = get_cluster(f"cpu:{tp}")
    planned_for = cluster if tp == 1 else cpu_cluster(tp, latency=1e-9, bandwidth=1e14, name=f"cpu:{tp}-free-links")
    constraints = {"tp": tp, "sp": 1} if tp > 1 else {}
    with shardwise.compile(
        model, planned_for, mode="generate", max_batch=BATCH, max_seq=MAX_SEQ, max_prompt=PROMPT,
        constraints=constraints,
    ) as cm:  # fmt: skip
        if tp > 1:
            axis = cm.plan.mesh.axis_names.index("tp")
            split = [spec for key, spec in cm.plan.param_placements if isinstance(spec.placements[axis], Shard)]
            assert split, "the tp 2 plan must split its weights"
        prefill, decode = [], []
        for _ in range(REPEATS):
            _, timings = cm.generate(ids, max_new_tokens=NEW_TOKENS, eos_token_id=None, return_timings=True)
            prefill.append(timings["prefill_s"])
            decode.extend(timings["decode_s"])
        # the programs as written, priced on the links they run on (tp 1: what the planner predicted)
        plan_prefill = predict_flat(cm.prefill_plan, cluster).step_time_s
        plan_decode = predict_flat(cm.plan, cluster).step_time_s
        prices_fp32 = price_list(cluster, "fp32")
        collectives = {phase: sum(e.kind == "comm" for e in price_flat(p, prices_fp32).events)
                       for phase, p in (("prefill", cm.prefill_plan), ("decode", cm.plan))}  # fmt: skip
        degrees = dict(cm.plan.degrees)
    figures = serving_model_from_config(model.config, f"{name}:{size}", "zoo config", weight_bytes=4)
    prices = ServingPrices(figures, price_list(cluster, "fp32"))
    serving_prefill = prices.prefill_sums(tp, 1, BATCH * PROMPT, BATCH * PROMPT * MAX_SEQ, BATCH, causal=False)
    serving_decode = prices.decode_step_s(tp, 1, BATCH, BATCH * MAX_SEQ)
    return {
        "model": f"{name}:{size}", "tp": tp, "degrees": degrees, "measured_prefill_s": min(prefill),
        "measured_decode_s": min(decode), "median_prefill_s": statistics.median(prefill),
        "median_decode_s": statistics.median(decode), "plan_prefill_s": plan_prefill, "plan_decode_s": plan_decode,
        "collectives": collectives,
        "serving_prefill_s": serving_prefill.latency_s, "serving_decode_s": serving_decode,
        "loadavg": os.getloadavg()[0],
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", default=[], metavar="MODEL:SIZE:TP",
                        help="run only these rows (e.g. gpt2:tiny:2; repeatable); the JSON is then not written")
    args = parser.parse_args(argv)
    chosen = [row for row in ROWS if not args.only or ":".join(map(str, row)) in args.only]
    rows = []
    start = time.time()
    load_start = os.getloadavg()[0]
    for name, size, tp in chosen:
        rows.append(measure(name, size, tp))
        r = rows[-1]
        def ms(x: float | None) -> str:
            return "    -" if x is None else f"{x * 1e3:7.2f}"

        print(f"{r['model']:<12} tp{tp}  prefill measured {ms(r['measured_prefill_s'])} ms, predicted plan "
              f"{ms(r['plan_prefill_s'])} serving {ms(r['serving_prefill_s'])} | decode measured "
              f"{ms(r['measured_decode_s'])} ms, predicted plan {ms(r['plan_decode_s'])} serving "
              f"{ms(r['serving_decode_s'])}  (load {r['loadavg']:.1f})", flush=True)  # fmt: skip
    summary = {}
    for source in ("plan", "serving"):
        errors = [
            abs(r[f"{source}_{phase}_s"] / r[f"measured_{phase}_s"] - 1)
            for r in rows for phase in ("prefill", "decode") if r[f"{source}_{phase}_s"] is not None
        ]  # fmt: skip
        summary[source] = {"median_abs_error": statistics.median(errors), "max_abs_error": max(errors)}
        print(f"{source:<8} predicted vs measured: median |error| {summary[source]['median_abs_error']:.1%}, "
              f"largest {summary[source]['max_abs_error']:.1%}")  # fmt: skip
    agree = [abs(r[f"serving_{ph}_s"] / r[f"plan_{ph}_s"] - 1) for r in rows for ph in ("prefill", "decode")
             if r[f"plan_{ph}_s"] is not None]  # fmt: skip
    summary["serving_vs_plan"] = {"median_abs_difference": statistics.median(agree), "max_abs_difference": max(agree)}
    print(f"serving prices vs the plans' per-op prices: median |difference| {statistics.median(agree):.1%}, "
          f"largest {max(agree):.1%}")  # fmt: skip
    doc = {"rows": rows, "summary": summary, "batch": BATCH, "prompt": PROMPT, "max_seq": MAX_SEQ,
           "new_tokens": NEW_TOKENS, "repeats": REPEATS, "elapsed_s": time.time() - start,
           "loadavg": {"start": load_start, "end": os.getloadavg()[0]},
           "niceness": os.nice(0),
           "calibration": {n: get_cluster(n).efficiency.source("op_overhead_s") for n in ("cpu:1", "cpu:2")}}  # fmt: skip
    print(f"load average {load_start:.2f} at the start, {os.getloadavg()[0]:.2f} at the end (niceness {os.nice(0)})")
    if args.only:
        return 0
    out = RESULTS / "serving_cpu.json"
    out.write_text(json.dumps(doc, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
