"""A diagnostic of bench/serving.py's DistServe rows: the same simulation, workload and layouts, with the step
times of DistServe's own kernel profiles in place of our prices. ``python bench/serving_profiles.py
--profiles DIR`` (DIR holds DistServe's ``profiler-a100-80g.distserve.json`` and ``profiler-a100-80g.vllm.json``,
``simdistserve/estimators/profile_data/`` at LLMServe/DistServe 82831f1; not shipped here). Writes
bench/results/serving_profiles.json.

This is **not** the planner's comparison (that one prices with our price list, bench/serving.py); it asks
whether the difference between the planner's choices and DistServe's layouts comes from the step prices.
It was decided after bench/serving.py's rows were seen, so it only explains them; nothing is fitted.

It also prints our step prices next to DistServe's fits at a few batches and lengths (``prices_vs_profiles``).

DistServe's fitted step times (``simdistserve/estimators/time_estimator.py``), in ms: a prefill batch of
prompts ``s_i`` takes ``a + b sum(s_i) + c sum(s_i^2)``, each of ``pp`` stages that divided by ``pp`` plus
``pp`` ms; a decode step of ``B`` sequences holding ``T`` tokens (each its context + 1) takes ``a + b T + c B``
(coefficients for ``B`` under and over a threshold), divided by ``pp`` per stage. Per (model, tp), two
engines: ``distserve`` (DistServe's instances) and ``vllm`` (its vLLM baseline). Rows: every instance on
DistServe's kernels ("same kernels"), and colocated instances on vLLM's ("as DistServe simulates vLLM").

**Chunked prefill with the fitted kernels** (``chunked`` rows; the rules written 03:30 UTC 2026-12-07, before
any of these rows was computed). The fits price whole prefills and pure decode steps; an iteration of vLLM
V1's scheduler (decodes and prompt chunks in one pass) needs a rule, and we run two:

- ``ours``: every token of the iteration (each chunk's and one per decode) goes through the layers once, at
  the prefill fit's per-token slope, plus its intercept; a chunk of ``n`` tokens after ``p`` cached ones has
  ``n p + n^2 / 2`` query-key pairs, priced as the fit prices a whole prompt's ``s^2 / 2`` (its ``c s^2``):
  ``c (n^2 + 2 n p)``; the decodes read their cached keys and values at the decode fit's per-token slope;
  never less than a decode step of the same batch: ``max(decode(B, T), a_p + b_p (new + B) + c_p sum(n^2 +
  2 n p) + b_d T)``.
- ``simdistserve``: DistServe's own simulator with ``enable_chunked_prefill`` (``simdistserve/base/worker.py``
  ``do_prefill``): the prefill fit of the chunks' lengths alone (decodes and cached context free), a cheaper
  rule than ours.

The rest is the ``distserve`` engine (memory, 2 ms + 0.1 us per token of host overhead per iteration, 1024
sequences) with the colocated scheduler changed to V1's chunked prefill at 2048 or 8192 tokens per iteration;
pipelines are not priced (the fits hold no chunk rule for them): pp 1 layouts only.
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
sys.path.insert(0, str(ROOT / "bench"))

from serving import LAYOUT_ROWS, PAPER_ROWS, RESULTS, a100_nodes  # noqa: E402

from shardwise.costs.prices import PriceList  # noqa: E402
from shardwise.costs.serving import ENGINES, PhaseTime, ServingPrices  # noqa: E402
from shardwise.planner.serving.model import serving_model  # noqa: E402
from shardwise.planner.serving.search import SLO, Goodput  # noqa: E402
from shardwise.planner.serving.simulator import Colocated, Phase  # noqa: E402
from shardwise.planner.serving.workload import load_workload  # noqa: E402


class ProfilePrices(ServingPrices):
    """``ServingPrices`` whose prefill and decode steps are DistServe's fitted profiles (see the docstring);
    memory, KV transfer and the engine's limits and overhead stay ours (the ``distserve`` engine)."""

    def __init__(self, model, prices, profile: dict, engine="distserve", mixed: str = "ours") -> None:
        super().__init__(model, prices, engine)
        self.profile = profile
        self.mixed = mixed

    def _params(self, tp: int) -> dict:
        if str(tp) not in self.profile:
            raise KeyError(f"no DistServe profile for {self.model.name} tp {tp}")
        return self.profile[str(tp)]

    def prefill(self, tp: int, pp: int, prompt_lens) -> PhaseTime:
        a, b, c = self._params(tp)["prefill"]
        ms = a + b * sum(prompt_lens) + c * sum(s * s for s in prompt_lens)
        stage = (ms / pp + pp) / 1e3
        return PhaseTime(stage * pp, stage)

    def decode_step_s(self, tp: int, pp: int, batch: int, context_tokens: float) -> float:
        if batch <= 0:
            return 0.0
        p = self._params(tp)
        groups = min(pp, batch)
        b_mb, t_mb = batch / groups, (context_tokens + batch) / groups
        key = "decoding_smallbs" if b_mb < p["decoding_large_small_bs_threshold"] else "decoding_largebs"
        a, b, c = p[key]
        return (a + b * t_mb + c * b_mb) / 1e3  # pp stages of (...) / pp each: one micro-batch's pass

    def mixed_step_s(self, tp: int, pp: int, decodes: int, decode_context: float, chunks=()) -> float:
        """An iteration of decodes and prompt chunks ``(new, prior)`` by the ``mixed`` rule (see the
        docstring); pp 1 only."""
        if not chunks:
            return self.decode_step_s(tp, pp, decodes, decode_context)
        if pp != 1:
            raise KeyError(f"no chunked-prefill rule for the fitted profiles at pp {pp}")
        a, b, c = self._params(tp)["prefill"]
        if self.mixed == "simdistserve":
            return (a + b * sum(n for n, _ in chunks) + c * sum(n * n for n, _ in chunks)) / 1e3
        p = self._params(tp)
        key = "decoding_smallbs" if decodes < p["decoding_large_small_bs_threshold"] else "decoding_largebs"
        slope = p[key][1]
        ms = a + b * (sum(n for n, _ in chunks) + decodes) + c * sum(n * n + 2 * n * q for n, q in chunks)
        ms += slope * decode_context
        return max(self.decode_step_s(tp, pp, decodes, decode_context), ms / 1e3)


#: (model, tp) rows of the price table, and the prefills (prompt lengths) and decode steps (sequences, cached
#: tokens each) priced at each
TABLE_LAYOUTS = [("facebook/opt-13b", 1), ("facebook/opt-13b", 2), ("facebook/opt-13b", 4),
                 ("facebook/opt-66b", 2), ("facebook/opt-66b", 4), ("facebook/opt-66b", 8)]  # fmt: skip
TABLE_PREFILLS = ([128], [744], [1500], [744] * 4, [512] * 16)
TABLE_DECODES = ((1, 1000), (16, 900), (64, 900), (256, 900))


def price_rows(cluster, profiles: dict) -> list[dict]:
    """Our prefill and decode step prices (ms, predicted) against DistServe's fits for its engine and its vLLM
    baseline, at the batches and lengths above (pp 1)."""
    rows = []
    for name, tp in TABLE_LAYOUTS:
        ours = ServingPrices(serving_model(name), PriceList(cluster, "bf16"), "distserve")
        fits = {e: ProfilePrices(ours.model, ours.prices, profiles[e][name]) for e in profiles}
        cases = [("prefill", f"{len(p)} x {p[0]}", lambda sp, p=p, tp=tp: sp.prefill(tp, 1, p).latency_s)
                 for p in TABLE_PREFILLS]  # fmt: skip
        cases += [("decode", f"batch {b}, {b * c} cached", lambda sp, b=b, c=c, tp=tp: sp.decode_step_s(tp, 1, b, b * c))
                  for b, c in TABLE_DECODES]  # fmt: skip
        for kind, what, price in cases:
            row = {"model": name, "tp": tp, "step": kind, "what": what, "ours_ms": price(ours) * 1e3}
            for engine, fit in fits.items():
                row[f"{engine}_ms"] = price(fit) * 1e3
            rows.append(row)
    return rows


#: colocated pp 1 layouts with fitted profiles, per model
CHUNKED_LAYOUTS = {"facebook/opt-13b": (1, 2, 4), "facebook/opt-66b": (2, 4, 8)}


def chunked_rows(cluster, workload, profiles: dict, targets: list = LAYOUT_ROWS) -> list[dict]:
    """Colocated instances on the fitted kernels, prefill-first (DistServe's vLLM baseline scheduler) and
    chunked (V1's scheduler, each budget and mixing rule), req/s per GPU (predicted); DistServe's layout on
    its kernels is in ``rows``."""
    out = []
    for name, ttft, tpot, *_ in targets:
        model = serving_model(name)
        slo = SLO(ttft, tpot, 0.9)
        for kernels in ("distserve", "vllm"):
            for tp in CHUNKED_LAYOUTS[name]:
                row = {"model": name, "kernels": kernels, "tp": tp, "pp": 1}
                first = ProfilePrices(model, PriceList(cluster, "bf16"), profiles[kernels][name])
                row["prefill_first"] = Goodput(first, workload, slo)(Colocated(Phase(tp, 1)))[0] / tp
                for budget in (2048, 8192):
                    engine = dataclasses.replace(
                        ENGINES["distserve"], chunked_prefill=True, max_batched_tokens=budget
                    )
                    for mixed in ("ours", "simdistserve"):
                        fit = ProfilePrices(
                            model, PriceList(cluster, "bf16"), profiles[kernels][name], engine, mixed
                        )
                        rate = Goodput(fit, workload, slo)(Colocated(Phase(tp, 1)))[0]
                        row[f"chunked_{budget}_{mixed}"] = rate / tp
                print(json.dumps(row), flush=True)
                out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profiles", required=True, help="DistServe's simdistserve/estimators/profile_data")
    parser.add_argument("--output", default=str(RESULTS / "serving_profiles.json"))
    parser.add_argument(
        "--paper-targets", action="store_true", help="only bench/serving.py's PAPER_ROWS, added to --output"
    )
    args = parser.parse_args(argv)
    profiles = {
        e: json.loads((Path(args.profiles) / f"profiler-a100-80g.{e}.json").read_text())
        for e in ("distserve", "vllm")
    }
    cluster = a100_nodes(1)
    workload = load_workload("distserve-sharegpt")
    table = price_rows(cluster, profiles)
    print(
        f"{'model':<18}{'tp':>3} {'step':<8}{'':<26}{'ours ms':>9}{'DistServe':>11}{'vLLM':>9}   (ours predicted)"
    )
    for r in table:
        print(f"{r['model']:<18}{r['tp']:>3} {r['step']:<8}{r['what']:<26}{r['ours_ms']:>9.1f}"
              f"{r['distserve_ms']:>11.1f}{r['vllm_ms']:>9.1f}")  # fmt: skip
    ours = json.loads((RESULTS / "serving.json").read_text())
    targets = PAPER_ROWS if args.paper_targets else LAYOUT_ROWS
    searched = ours["paper_targets_by_engine"]["distserve"] if args.paper_targets else ours["layouts"]
    chosen = {r["model"]: r["chosen"]["layout"] for r in searched}
    rows = []
    for name, ttft, tpot, (tp_p, pp_p), (tp_d, pp_d), (tp_v, pp_v) in targets:
        model = serving_model(name)
        slo = SLO(ttft, tpot, 0.9)
        start = time.perf_counter()
        ds = ProfilePrices(model, PriceList(cluster, "bf16"), profiles["distserve"][name])
        vl = ProfilePrices(model, PriceList(cluster, "bf16"), profiles["vllm"][name])
        g_ds, g_vl = Goodput(ds, workload, slo), Goodput(vl, workload, slo)
        rp, rd = g_ds.prefill(tp_p, pp_p)[0], g_ds.decode(tp_d, pp_d)[0]
        paired = g_ds.pair(cluster, (tp_p, pp_p, rp), (tp_d, pp_d, rd))
        row = {"model": name, "ttft_s": ttft, "tpot_s": tpot,
               "distserve_layout_distserve_kernels": None if paired is None else
               {"goodput_rps_per_gpu": paired[0].per_device, "prefill_instance_rps": rp, "decode_instance_rps": rd,
                "layout": paired[0].layout.describe()}}  # fmt: skip
        colocated = {"vllm_baseline": (tp_v, pp_v)}
        c = chosen[name]
        if c["kind"] == "colocated":
            colocated["planner_choice"] = (c["tp"], c["pp"])
        for label, (tp, pp) in colocated.items():
            for kernels, g in (("distserve_kernels", g_ds), ("vllm_kernels", g_vl)):
                try:
                    rate = g(Colocated(Phase(tp, pp)))[0]
                except KeyError as exc:
                    row[f"{label}_tp{tp}_pp{pp}_{kernels}"] = str(exc)
                    continue
                row[f"{label}_tp{tp}_pp{pp}_{kernels}"] = {"goodput_rps_per_gpu": rate / (tp * pp)}
        row["seconds"] = time.perf_counter() - start
        rows.append(row)
        print(json.dumps(row, indent=1), flush=True)
    chunked = chunked_rows(cluster, workload, profiles, targets)
    if args.paper_targets:  # added to the results of a whole run
        out = json.loads(Path(args.output).read_text())
        out["paper_targets"] = {"rows": rows, "chunked": chunked, "loadavg": os.getloadavg()}
        Path(args.output).write_text(json.dumps(out, indent=1))
        print(f"wrote {args.output}")
        return 0
    out = {"note": "diagnostic, predicted: our simulation with DistServe's fitted step times (see docstring)",
           "workload": workload.name, "rows": rows, "chunked": chunked, "prices_vs_profiles": table,
           "loadavg": os.getloadavg()}  # fmt: skip
    Path(args.output).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
