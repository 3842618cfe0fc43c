"""How planning scales through the front door: ``python bench/ilp_scaling.py`` (``--quick`` for a short run).

GPT-shaped models (GPT-3 175B's width: hidden 12288, 96 heads, sequence 2048, vocabulary 50257, global batch
1536; the layer count varies) built on the meta device and compiled with ``shardwise.compile(model,
"dgx-a100xN", mode="train", precision="bf16")`` — the one planner with every layout in the search (pipelines,
ZeRO, recomputation) — plus the largest row of Megatron-LM's Table 1 (hidden 25600, 160 heads, 128 layers,
3072 GPUs, batch 3072: the "1T" model). Per row: the layout chosen, whether its memory map fits the device (only
plans that fit count: a plan that does not fit is not a plan), its predicted step time, and the wall and CPU
time of tracing and of compiling (everything after building the model). Goals: GPT-3 175B (96 layers, 1024
GPUs) planned to a plan that fits in < 60 s on this machine's 2 cores; the 1T row in < 120 s. Writes
``bench/results/ilp_scaling.json`` (or ``--output``). Timings are wall-clock on a shared machine: the JSON records
the load average and the CPU seconds alongside.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
sys.path.insert(0, str(ROOT.parent))

GPT3 = dict(hidden=12288, heads=96, vocab=50257, seq=2048, batch=1536)
ONE_T = dict(hidden=25600, heads=160, vocab=51200, seq=2048, batch=3072, layers=128)
GOALS = {(96, 1024, 12288): 60.0, (128, 3072, 25600): 120.0}


def _loss(out):
    return out.logits.float().mean()


def _row(layers: int, devices: int, shape: dict) -> dict:
    import shardwise
    from shardwise.zoo import build_model

    t0 = time.perf_counter()
    model, inputs = build_model("gpt2", device="meta", layers=layers, **shape)
    model.train()
    build_s = time.perf_counter() - t0
    wall0, cpu0 = time.perf_counter(), time.process_time()
    cm = shardwise.compile(
        model, f"dgx-a100x{devices // 8}", example_inputs=inputs, mode="train", precision="bf16", loss_fn=_loss
    )
    plan_s, cpu_s = time.perf_counter() - wall0, time.process_time() - cpu0
    plan = cm.plan
    peak = max(m.arena_bytes for m in plan.memory) if plan.memory else 0
    capacity = plan.memory[0].capacity_bytes if plan.memory else 0
    pipe = plan.pipeline
    return {
        "layers": layers, "devices": devices, "hidden": shape["hidden"], "batch": shape["batch"],
        "degrees": plan.degrees, "zero": pipe.zero if pipe is not None else plan.zero_stage,
        "schedule": (f"{pipe.schedule}x{pipe.virtual} mb {pipe.microbatch_size}x{pipe.microbatches}"
                     if pipe is not None else "flat"),
        "recompute": pipe.recompute if pipe is not None else ("ranges" if plan.recompute else "none"),
        "fits": bool(plan.memory) and peak <= capacity, "peak_gib": peak / 2**30, "capacity_gib": capacity / 2**30,
        "predicted_step_s": plan.predicted.step_time_s, "predicted_mfu": plan.predicted.mfu,
        "build_s": build_s, "compile_s": plan_s, "compile_cpu_s": cpu_s,
        "notes": [n for n in plan.notes if n.startswith("search:")],
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="*", default=[8, 24, 48, 96])
    parser.add_argument("--devices", type=int, nargs="*", default=[64, 256, 1024])
    parser.add_argument("--no-1t", action="store_true", help="leave out the 1T row")
    parser.add_argument("--quick", action="store_true", help="8 layers on 64 GPUs and the 96 x 1024 goal row")
    parser.add_argument("--output", default=str(RESULTS / "ilp_scaling.json"))
    args = parser.parse_args()
    cases = [(n, d, GPT3) for n in args.layers for d in args.devices]
    if args.quick:
        cases = [(8, 64, GPT3), (96, 1024, GPT3)]
    if not args.no_1t:
        cases.append((ONE_T["layers"], 3072, {k: v for k, v in ONE_T.items() if k != "layers"}))
    header = (
        f"{'layers':>6} {'hidden':>6} {'GPUs':>5} {'chosen':>18} {'zero':>4} {'schedule':>26} {'recompute':>9} "
        f"{'fits':>4} {'peak GiB':>8} {'pred. step s':>12} {'compile s':>9} {'cpu s':>7}"
    )
    print(header)
    print("-" * len(header))
    rows = []
    for layers, devices, shape in cases:
        row = _row(layers, devices, shape)
        rows.append(row)
        d = row["degrees"]
        chosen = f"pp{d['pp']} dp{d['dp']} tp{d['tp']}"
        print(
            f"{layers:>6} {shape['hidden']:>6} {devices:>5} {chosen:>18} {row['zero']:>4} {row['schedule']:>26} "
            f"{row['recompute']:>9} {'yes' if row['fits'] else 'NO':>4} {row['peak_gib']:>8.1f} "
            f"{row['predicted_step_s']:>12.3f} {row['compile_s']:>9.1f} {row['compile_cpu_s']:>7.1f}",
            flush=True,
        )
    print()
    fitting = [r for r in rows if r["fits"]]
    print(f"plans that fit: {len(fitting)} of {len(rows)} (a plan that does not fit is not counted as planned)")
    for (layers, devices, hidden), limit in GOALS.items():
        r = next((r for r in rows if (r["layers"], r["devices"], r["hidden"]) == (layers, devices, hidden)), None)
        if r is None:
            continue
        ok = r["fits"] and r["compile_s"] < limit
        print(
            f"goal {layers} layers x hidden {hidden} on {devices} GPUs, a plan that fits in < {limit:.0f} s: "
            f"{'met' if ok else 'missed'} (fits: {r['fits']}, compile {r['compile_s']:.1f} s wall, "
            f"{r['compile_cpu_s']:.1f} s CPU; building the meta model {r['build_s']:.1f} s)"
        )
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    out = {
        "benchmark": "planning through the front door (shardwise.compile, one planner)",
        "machine": {
            "cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            "load_average_1_5_15_min_at_end": os.getloadavg(),
        },
        "rows": rows,
    }  # fmt: skip
    output.write_text(json.dumps(out, indent=1))
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
