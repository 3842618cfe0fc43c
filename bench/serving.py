"""Serving prices and the serving planner against DistServe (Zhong et al., OSDI'24, A100-80GB):
``python bench/serving.py [--skip-layouts]``. Writes bench/results/serving.json.

**Assumptions fixed from DistServe's source before any row was compared** (LLMServe/DistServe at 82831f1):

- *KV capacity* (``simdistserve/estimators/profile_data/max_num_tokens.csv``, made by
  ``simdistserve/profilers/profile_memory.py``): tokens = blocks of 16 (``block_size=16``) that fit in
  ``total_memory x 0.95`` (``gpu_memory_utilization=0.95``) after a peak runtime memory of ``total_memory x 0.01
  + the model``; the model in fp16 (``dtype="fp16"``, 2 bytes) with the vocabulary and position embeddings
  whole on every device (``distserve/config.py``, ``get_model_size_in_bytes``: embeddings not divided by tp);
  a K and V entry per layer of the device's stage and head of its tp share. ``total_memory`` is what
  ``torch.cuda.get_device_properties(0).total_memory`` reports on an A100-SXM4-80GB: 84,987,740,160 bytes
  (81,051 MiB: a public deviceQuery listing of an A100-SXM4-80GB with ECC on, driver 12.2; a second listing,
  driver 12.5, shows 85,100,068,864, 0.13% more). This is the ``distserve`` engine of ``costs/serving.py``;
  the weights themselves are ours (HF config, parameters counted on the meta device), not DistServe's formula.
- *Workload, targets, attainment, engine limits* (docs/serving.md, "DistServe comparison: assumptions and where
  they come from", written before this bench was rerun): the ``distserve-sharegpt`` workload (DistServe's own
  ShareGPT preparation, ``evaluation/2-benchmark-serving/0-prepare-dataset.py``, rebuilt by
  ``bench/distserve_sharegpt.py``; multi-turn prompts, mean prompt 744 and output 191 tokens); Poisson
  arrivals; both TTFT and TPOT within target for 90% of requests (``evaluation/ae-scripts/e2e/_plot.py``);
  OPT-13B TTFT 0.25 s / TPOT 0.1 s, OPT-66B TTFT 0.4 s / TPOT 0.1 s (the same file, Figure 8); the
  ``distserve`` engine's scheduling limits from ``2-start-api-server.py`` and its per-iteration overhead from
  ``simdistserve/base/worker.py``. The rows before 22:52 UTC on 2026-12-06 used the ``sharegpt`` workload
  (the vLLM paper's single-turn means, a log-normal shape we assumed): not DistServe's.
- *Cluster*: one DGX-A100 node (8 x A100-80GB, NVLink; the preset's device figures and achieved efficiencies,
  the device memory as above): DistServe places a prefill and a decode instance of one pair in one node.

DistServe's published layouts (issue 18): OPT-13B prefill tp 2, decode tp 1; OPT-66B prefill tp 4, decode
tp 2 x pp 2. The bench prints the planner's choice and the predicted goodput of DistServe's layouts under the
same simulation, so a different choice is judged by its predicted goodput. Every goodput is predicted.

**Engines** (written 03:25 UTC 2026-12-07, before any row below was computed; the step times are our price
list's in every row, the engines differ in scheduling, memory accounting, limits and host overhead only):

- ``distserve`` (``costs.serving.ENGINES``): disaggregated instances as DistServe runs them; colocated
  instances as DistServe's vLLM baseline (vLLM v0.2.x, prefill-first: a prefill stalls the running decodes).
  This is the comparison DistServe published.
- ``vllm`` (serve-plan's engine): vLLM's V1 engine, chunked prefill always on, 8192 tokens / 256 sequences
  per iteration (what serve-plan's launch commands pass), 0.9 of device memory, no host overhead.
- ``vllm-a100-default``: the same with vLLM's own default budget for ``vllm serve`` on an A100, 2048 tokens
  / 256 sequences (``EngineArgs.get_batch_defaults``: 8192 / 1024 only on devices of 70 GiB or more whose
  name is not A100; a larger budget on A100s lowered throughput, vLLM PR #17885).

Per engine: DistServe's layout, our best disaggregated layout, DistServe's vLLM baseline layout (colocated tp 1
/ tp 4) and the planner's choice, each searched and simulated under that engine. The scheduler alone
(``scheduler_only``): every colocated layout under DistServe's engine (its memory, overhead and limits) with
only the colocated scheduler changed to V1's chunked prefill at 2048 and at 8192 tokens per iteration.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shardwise.cluster import get_cluster  # noqa: E402
from shardwise.costs.prices import PriceList  # noqa: E402
from shardwise.costs.serving import ENGINES, ServingPrices  # noqa: E402
from shardwise.planner.serving.model import serving_model  # noqa: E402
from shardwise.planner.serving.report import layout_data  # noqa: E402
from shardwise.planner.serving.search import SLO, Goodput, search  # noqa: E402
from shardwise.planner.serving.simulator import Colocated, Phase  # noqa: E402
from shardwise.planner.serving.workload import load_workload  # noqa: E402

RESULTS = ROOT / "bench" / "results"
#: torch's total_memory of an A100-SXM4-80GB (see the module docstring)
A100_TOTAL_MEMORY = 84_987_740_160
#: DistServe's max_num_tokens.csv: (model, tp, pp) -> tokens (the issue's two rows first)
DISTSERVE_KV = {
    ("facebook/opt-13b", 1, 1): 66144,
    ("facebook/opt-175b", 8, 2): 192784,
    ("facebook/opt-13b", 2, 1): 163008,
    ("facebook/opt-13b", 4, 2): 744224,
    ("facebook/opt-66b", 2, 2): 78512,
    ("facebook/opt-66b", 4, 1): 78496,
    ("facebook/opt-66b", 8, 1): 212304,
    ("facebook/opt-175b", 4, 4): 192800,
    ("facebook/opt-175b", 8, 4): 459328,
}
#: (model, TTFT, TPOT, DistServe's prefill (tp, pp), decode (tp, pp), its vLLM baseline's (tp, pp)), from
#: DistServe's evaluation/2-benchmark-serving/2-start-api-server.py MODEL_TO_PARALLEL_PARAMS
LAYOUT_ROWS = [
    ("facebook/opt-13b", 0.25, 0.1, (2, 1), (1, 1), (1, 1)),
    ("facebook/opt-66b", 0.4, 0.1, (4, 1), (2, 2), (4, 1)),
]
#: OPT-66B at the targets of the paper's Figure 8 (chatbot): DistServe's plotting notebook,
#: evaluation/2-benchmark-serving/plot.ipynb ``plot_fig8_upper``, draws OPT-66B at TTFT 2.5 s / TPOT 0.15 s (OPT-13B
#: at 0.25 / 0.1, as above) and prints DistServe's rate at 90% attainment over vLLM's: 4.6x (OPT-13B) and 2.75x
#: (OPT-66B); the artifact's evaluation/ae-scripts/e2e/_plot.py, which the rows above follow, uses 0.4 / 0.1
#: (added 03:41 UTC 2026-12-07, after the rows above were seen; the targets are DistServe's, not ours)
PAPER_ROWS = [("facebook/opt-66b", 2.5, 0.15, (4, 1), (2, 2), (4, 1))]


def a100_nodes(nodes: int = 1):
    c = get_cluster(f"dgx-a100x{nodes}")
    return dataclasses.replace(c, device=dataclasses.replace(c.device, memory_bytes=A100_TOTAL_MEMORY))


def kv_rows(cluster) -> list[dict]:
    rows = []
    models = {}
    for (name, tp, pp), published in DISTSERVE_KV.items():
        model = models.setdefault(name, serving_model(name))
        prices = ServingPrices(model, PriceList(cluster, "bf16"), "distserve")
        predicted = prices.kv_capacity_tokens(tp, pp)
        rows.append({"model": name, "tp": tp, "pp": pp, "distserve_tokens": published, "predicted_tokens": predicted,
                     "error": predicted / published - 1})  # fmt: skip
    return rows


def bound_rows(cluster) -> list[dict]:
    rows = []
    for name in ("facebook/opt-13b", "facebook/opt-66b", "facebook/opt-175b"):
        prices = ServingPrices(serving_model(name), PriceList(cluster, "bf16"), "distserve")
        worst = None
        for tp in (1, 2, 4, 8):
            for pp in (1, 2, 4):
                bound = prices.weight_read_bound_s(tp, pp)
                for batch, context in ((1, 128), (8, 8 * 600), (64, 64 * 600), (256, 256 * 1500)):
                    ratio = prices.decode_step_s(tp, pp, batch, context) / bound
                    if worst is None or ratio < worst[0]:
                        worst = (ratio, tp, pp, batch)
        rows.append({"model": name, "min_step_over_bound": worst[0], "at": {"tp": worst[1], "pp": worst[2],
                     "batch": worst[3]}})  # fmt: skip
    return rows


#: the engines the layouts are compared under (see the module docstring)
ENGINE_CHOICES = {
    "distserve": ENGINES["distserve"],
    "vllm": ENGINES["vllm"],
    "vllm-a100-default": dataclasses.replace(
        ENGINES["vllm"], name="vllm-a100-default", max_batched_tokens=2048
    ),
}
#: tokens per iteration of the chunked-prefill scheduler in the scheduler-only rows
SCHEDULER_BUDGETS = (2048, 8192)


def _scored(s) -> dict:
    return {"layout": layout_data(s), "goodput_rps_per_gpu": s.per_device, "attainment": s.attainment,
            "lower_bound": s.capped}  # fmt: skip


def layout_rows(cluster, workload, engine: str = "distserve", targets: list | None = None) -> list[dict]:
    """Per model (``targets``: ``LAYOUT_ROWS`` by default): the planner's search under ``engine`` and the goodput
    of DistServe's layout, our best disaggregated one and DistServe's vLLM baseline under the same engine
    (predicted)."""
    rows = []
    for name, ttft, tpot, (tp_p, pp_p), (tp_d, pp_d), (tp_v, pp_v) in targets or LAYOUT_ROWS:
        prices = ServingPrices(serving_model(name), PriceList(cluster, "bf16"), ENGINE_CHOICES[engine])
        slo = SLO(ttft, tpot, 0.9)
        start = time.perf_counter()
        result = search(prices, cluster, workload, slo, progress=lambda text: print(f"  {text}", flush=True))
        elapsed = time.perf_counter() - start
        goodput = Goodput(prices, workload, slo)
        phases = {kind: {(tp, pp): rate for tp, pp, rate in rows_} for kind, rows_ in result.phases.items()}
        rp = phases["prefill"].get((tp_p, pp_p)) or goodput.prefill(tp_p, pp_p)[0]
        rd = phases["decode"].get((tp_d, pp_d)) or goodput.decode(tp_d, pp_d)[0]
        paired = goodput.pair(cluster, (tp_p, pp_p, rp), (tp_d, pp_d, rd))
        theirs = paired[0] if paired else None
        v_rate, v_att, _ = goodput(Colocated(Phase(tp_v, pp_v)))
        best = result.best
        disaggregated = [s for s in result.ranked if not isinstance(s.layout, Colocated)]
        rows.append({
            "model": name, "ttft_s": ttft, "tpot_s": tpot, "attainment": 0.9, "engine": engine,
            "distserve_layout": {"prefill": {"tp": tp_p, "pp": pp_p}, "decode": {"tp": tp_d, "pp": pp_d}},
            "distserve_layout_predicted": None if theirs is None else {
                **_scored(theirs), "prefill_instance_rps": rp, "decode_instance_rps": rd,
            },
            "best_disaggregated": _scored(disaggregated[0]) if disaggregated else None,
            "vllm_baseline_layout": {"tp": tp_v, "pp": pp_v},
            "vllm_baseline_predicted": {"goodput_rps_per_gpu": v_rate / (tp_v * pp_v), "attainment": v_att},
            "chosen": _scored(best),
            "ranked": [{"layout": layout_data(s), "goodput_rps_per_gpu": s.per_device} for s in result.ranked],
            "phase_goodput": {kind: [{"tp": tp, "pp": pp, "rps": rate} for tp, pp, rate in rows_]
                              for kind, rows_ in result.phases.items()},
            "search_s": elapsed,
        })  # fmt: skip
    return rows


def scheduler_rows(cluster, workload, layouts: dict[str, list[dict]]) -> list[dict]:
    """Every colocated layout the ``distserve`` search ranked, under DistServe's engine with only the colocated
    scheduler changed to V1's chunked prefill at each of ``SCHEDULER_BUDGETS`` (predicted req/s per GPU)."""
    rows = []
    for (name, ttft, tpot, *_), searched in zip(LAYOUT_ROWS, layouts["distserve"]):
        model = serving_model(name)
        slo = SLO(ttft, tpot, 0.9)
        colocated = sorted({(s["layout"]["tp"], s["layout"]["pp"]): s["goodput_rps_per_gpu"]
                            for s in searched["ranked"] if s["layout"]["kind"] == "colocated"}.items())  # fmt: skip
        for budget in SCHEDULER_BUDGETS:
            engine = dataclasses.replace(
                ENGINES["distserve"], chunked_prefill=True, max_batched_tokens=budget
            )
            goodput = Goodput(ServingPrices(model, PriceList(cluster, "bf16"), engine), workload, slo)
            for (tp, pp), prefill_first in colocated:
                rate = goodput(Colocated(Phase(tp, pp)))[0]
                rows.append({"model": name, "budget_tokens": budget, "tp": tp, "pp": pp,
                             "chunked_rps_per_gpu": rate / (tp * pp), "prefill_first_rps_per_gpu": prefill_first})  # fmt: skip
                print(f"  {name} V1 scheduler, {budget} tokens, colocated tp{tp} pp{pp}: {rate / (tp * pp):.3g} "
                      f"req/s per GPU (prefill-first {prefill_first:.3g}; predicted)", flush=True)  # fmt: skip
    return rows


def _describe(layout: dict) -> str:
    if layout["kind"] == "colocated":
        return f"colocated {layout['instances']}x tp{layout['tp']} pp{layout['pp']}"
    p, d = layout["prefill"], layout["decode"]
    return f"P {p['instances']}x tp{p['tp']}pp{p['pp']} + D {d['instances']}x tp{d['tp']}pp{d['pp']}"


def _cell(entry: dict | None) -> str:
    if entry is None:
        return "does not fit"
    bound = ">= " if entry.get("lower_bound") else ""
    return f"{_describe(entry['layout'])}: {bound}{entry['goodput_rps_per_gpu']:.3g}"


def print_layouts(doc: dict) -> None:
    """The per-engine table: DistServe's layout, our best disaggregated, the vLLM baseline, the choice."""
    print("\nreq/s per GPU at 90% attainment (predicted; our step prices in every row)")
    for engine, rows in doc["layouts_by_engine"].items():
        for r in rows:
            v = r["vllm_baseline_layout"]
            print(
                f"[{engine}] {r['model']} TTFT {r['ttft_s']} s TPOT {r['tpot_s']} s (search {r['search_s']:.0f} s)"
            )
            print(f"  DistServe's layout:     {_cell(r['distserve_layout_predicted'])}")
            print(f"  best disaggregated:     {_cell(r['best_disaggregated'])}")
            print(
                f"  vLLM baseline tp{v['tp']} pp{v['pp']}:  {r['vllm_baseline_predicted']['goodput_rps_per_gpu']:.3g}"
            )
            print(f"  chosen:                 {_cell(r['chosen'])}")
            for s in r["ranked"][1:4]:
                print(f"  runner-up:              {_describe(s['layout'])}: {s['goodput_rps_per_gpu']:.3g}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--skip-layouts", action="store_true", help="only the KV capacity and decode-bound rows"
    )
    parser.add_argument("--engines", nargs="+", choices=list(ENGINE_CHOICES), default=list(ENGINE_CHOICES))
    parser.add_argument("--skip-scheduler", action="store_true", help="no scheduler-only rows")
    parser.add_argument(
        "--paper-targets", action="store_true",
        help="only OPT-66B at the paper's Figure 8 targets (PAPER_ROWS), added to --output's results",
    )  # fmt: skip
    parser.add_argument("--output", default=str(RESULTS / "serving.json"))
    args = parser.parse_args(argv)
    cluster = a100_nodes(1)
    testbed = a100_nodes(4)  # DistServe's testbed: 4 nodes of 8 A100-80GB (layouts up to 32 devices)
    workload = load_workload("distserve-sharegpt")
    doc: dict = {"cluster": "dgx-a100x1, device memory 84,987,740,160 bytes", "engine": "distserve",
                 "workload": {"name": workload.name, "source": workload.source,
                              "mean_prompt_output": workload.means()}}  # fmt: skip

    doc["kv_capacity"] = kv_rows(testbed)
    print("KV cache capacity per instance, tokens (DistServe's accounting; ours predicted)")
    print(f"{'model':<20}{'tp':>4}{'pp':>4}{'DistServe':>12}{'predicted':>12}{'error':>9}")
    for r in doc["kv_capacity"]:
        print(f"{r['model']:<20}{r['tp']:>4}{r['pp']:>4}{r['distserve_tokens']:>12,}{r['predicted_tokens']:>12,}"
              f"{r['error']:>+9.2%}")  # fmt: skip

    doc["decode_bound"] = bound_rows(testbed)
    print("\ndecode step over the weight-read bound (weights / tp / HBM peak), least over layouts and batches "
          "(predicted)")  # fmt: skip
    for r in doc["decode_bound"]:
        at = r["at"]
        print(
            f"{r['model']:<20} min {r['min_step_over_bound']:.3f} (tp{at['tp']} pp{at['pp']} batch {at['batch']})"
        )

    if args.paper_targets:  # added to the results of a whole run
        out = Path(args.output)
        doc = json.loads(out.read_text()) if out.exists() else doc
        doc["paper_targets_loadavg_before"] = os.getloadavg()
        doc["paper_targets_by_engine"] = {}
        for engine in args.engines:
            print(f"\nOPT-66B at the paper's Figure 8 targets under the {engine} engine (goodput predicted)")
            doc["paper_targets_by_engine"][engine] = layout_rows(cluster, workload, engine, PAPER_ROWS)
        doc["paper_targets_loadavg_after"] = os.getloadavg()
        print_layouts({"layouts_by_engine": doc["paper_targets_by_engine"]})
        out.write_text(json.dumps(doc, indent=1))
        print(f"wrote {out}")
        return 0
    if not args.skip_layouts:
        doc["loadavg_before"] = os.getloadavg()
        doc["layouts_by_engine"] = {}
        for engine in args.engines:
            print(f"\nchosen layouts under the {engine} engine (SLO attainment >= 90%, goodput predicted)")
            doc["layouts_by_engine"][engine] = layout_rows(cluster, workload, engine)
        if "distserve" in doc["layouts_by_engine"]:
            doc["layouts"] = doc["layouts_by_engine"]["distserve"]  # the comparison DistServe published
            if not args.skip_scheduler:
                print(
                    "\nthe scheduler alone: colocated layouts under DistServe's engine, V1's chunked prefill"
                )
                doc["scheduler_only"] = scheduler_rows(cluster, workload, doc["layouts_by_engine"])
        doc["loadavg_after"] = os.getloadavg()
        print_layouts(doc)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
