"""Host offload joint with recomputation: ``python bench/offload.py`` (issue 6, item 4).

GPT-shaped models on the meta device (planning only), planned flat for one DGX A100 node (8 GPUs, dp=8,
so the optimizer state is replicated and large), then the device's memory shrunk to a fraction of the
plan's no-offload, no-recompute peak. Per budget, the cheapest choice (``passes.offload``: every
(recompute choice on the layer chain's Pareto front, tiers) pair measured on rank 0's buffers) among:

* recompute only (``tiers = none``), offload only (no layer recomputed, any tiers the generated programs
  apply: optimizer state, layers' activations), joint (both, the tiers generated programs apply: what
  ``shardwise.compile(offload="auto")`` picks), and joint with parameter streaming (planned and costed, not
  generated);

with its device memory (rank 0's peak, the lower bound the memory map reaches), host memory per rank and
predicted step time (the plan's + recompute + exposed host-link transfers + the host optimizer step; PCIe4
x16 31.5 GB/s per GPU, host DRAM 409.6 GB/s per node shared by 8 GPUs: see cluster/host.py).
"-" = no choice of that kind fits (the lowest device memory it reaches is listed). Results:
bench/results/offload.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

MODELS = [  # (label, zoo name, options)
    ("GPT-2 124M shape (12L h768 s1024 b64)", "gpt2:base", {"batch": 64}),
    ("GPT-2 350M shape (24L h1024 s1024 b64)", "gpt2:base", {"layers": 24, "hidden": 1024, "heads": 16, "batch": 64}),
    ("GPT 1.3B shape (24L h2048 s1024 b8)", "gpt2:base", {"layers": 24, "hidden": 2048, "heads": 16, "batch": 8}),
]  # fmt: skip
FRACTIONS = (0.8, 0.6, 0.45, 0.3)
GiB = 2**30


def _loss(o):
    return o.logits.float().sin().mean()


def _pick(cands, budget):
    fits = [c for c in cands if c.device_peak_bytes <= budget]
    if fits:
        return min(fits, key=lambda c: (c.cost_s, c.device_peak_bytes)), True
    return min(cands, key=lambda c: c.device_peak_bytes), False


def run(args: argparse.Namespace) -> list[dict]:
    import shardwise
    from shardwise.cluster import get_cluster
    from shardwise.passes.offload import offload_candidates
    from shardwise.planner.offload import GENERATED_TIERS
    from shardwise.zoo import build_model

    spec = get_cluster("dgx-a100x1")
    roomy = dataclasses.replace(spec, device=dataclasses.replace(spec.device, memory_bytes=2**40))
    rows = []
    for label, name, opts in MODELS:
        if args.models and not any(m in label for m in args.models.split(",")):
            continue
        model, inputs = build_model(name, device="meta", **opts)
        start = time.perf_counter()
        plan = shardwise.compile(
            model, roomy, example_inputs=inputs, mode="train", loss_fn=_loss, constraints={"dp": 8, "zero": 0},
        ).plan  # fmt: skip
        plan_s = time.perf_counter() - start
        start = time.perf_counter()
        cands = offload_candidates(plan, spec)
        choose_s = time.perf_counter() - start
        base = next(c for c in cands if not c.tiers.any and not c.units)
        step = plan.predicted.step_time_s
        kinds = {
            "recompute only": [c for c in cands if not c.tiers.any],
            "offload only": [c for c in cands if not c.units and c.tiers in GENERATED_TIERS],
            "joint": [c for c in cands if c.tiers in GENERATED_TIERS],
            "joint + param streaming": cands,
        }
        row = {"model": label, "degrees": dict(plan.degrees), "zero": plan.zero_stage, "plan_s": round(plan_s, 1),
               "choose_s": round(choose_s, 1), "candidates": len(cands), "step_time_s": step,
               "baseline_bytes": base.device_peak_bytes, "budgets": []}  # fmt: skip
        for f in FRACTIONS:
            budget = int(f * base.device_peak_bytes)
            entry = {"fraction": f, "budget_bytes": budget}
            for kind, group in kinds.items():
                c, fits = _pick(group, budget)
                entry[kind] = {
                    "fits": fits, "device_bytes": c.device_peak_bytes, "host_bytes": c.host_bytes,
                    "step_time_s": step + c.cost_s, "tiers": str(c.tiers), "recomputed": len(c.units),
                    "exposed_s": c.exposed_s, "host_optimizer_s": c.host_optimizer_s, "recompute_s": c.recompute_s,
                    "transfer_bytes": c.transfer_bytes,
                }  # fmt: skip
            row["budgets"].append(entry)
        rows.append(row)
    return rows


def _table(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        lines.append(
            f"{r['model']}: dp={r['degrees'].get('dp')} tp={r['degrees'].get('tp')} ZeRO-{r['zero']}, "
            f"no-offload/no-recompute peak {r['baseline_bytes'] / GiB:.2f} GiB, step {r['step_time_s'] * 1e3:.1f} ms "
            f"(planned in {r['plan_s']} s; {r['candidates']} pairs measured in {r['choose_s']} s)"
        )
        lines.append(f"  {'budget':>14} {'choice':<24} {'device GiB':>10} {'host GiB':>9} {'step ms':>9}  tiers / recomputed layers")
        for b in r["budgets"]:
            for kind in ("recompute only", "offload only", "joint", "joint + param streaming"):
                e = b[kind]
                budget = f"{b['fraction']:.0%} {b['budget_bytes'] / GiB:.2f}" if kind == "recompute only" else ""
                step = f"{e['step_time_s'] * 1e3:9.1f}" if e["fits"] else f"{'-':>9}"
                lines.append(
                    f"  {budget:>14} {kind:<24} {e['device_bytes'] / GiB:>10.2f} {e['host_bytes'] / GiB:>9.2f} {step}  "
                    f"{e['tiers']} / {e['recomputed']}" + ("" if e["fits"] else "  (does not fit: lowest reached)")
                )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="", help="comma-separated label substrings")
    parser.add_argument("--output", default=str(ROOT / "results" / "offload.json"))
    args = parser.parse_args()
    rows = run(args)
    print(_table(rows))
    Path(args.output).write_text(json.dumps({"rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
