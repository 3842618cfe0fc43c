"""Prefill and decode step times of generated generation programs, predicted against measured:
``python bench/generate_steps.py``.

For GPT-2 and Llama at two sizes (``tiny``: 2 layers, hidden 64, vocabulary 128; ``small``: 4 layers,
hidden 256, 8 heads, vocabulary 2048; random weights, ``shardwise.zoo.hf.tiny_causal_lm``), each compiled with
``mode="generate"`` (``--batch`` rows, ``--prompt`` tokens of prefill window, ``--seq`` cache slots) on
``cpu:2`` as this machine measures it (``get_cluster("cpu:2")``: the cached calibration) with the plan the
planner picks and with ``tp=2`` pinned:

* **predicted**: the decode plan's and the prefill plan's ``predicted.step_time_s`` (the price list's price
  of each program as it is written, ``shardwise/costs``);
* **measured**: ``cm.generate(..., return_timings=True)`` on two gloo worker processes: each step timed
  on the workers from a barrier to the step's return (``runtime/lib/generation.py``); the prefill's median over
  ``--rounds`` generations, the decode step's median over every decode step of them.

The load average is recorded at the start and the end: figures measured on a busy machine are noisy.
Writes bench/results/generate_steps.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
sys.path.insert(0, str(ROOT.parent))

import torch  # noqa: E402

SIZES = {"tiny": {"layers": 2, "hidden": 64, "heads": 4, "vocab": 128},
         "small": {"layers": 4, "hidden": 256, "heads": 8, "vocab": 2048}}  # fmt: skip
MODELS = ("gpt2", "llama")
LAYOUTS = {"planner": None, "tp2": {"tp": 2}}


def _prompts(rows: int, width: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (rows, width), generator=g)
    mask = torch.ones_like(ids)
    for r in range(rows):  # prompts of different lengths, left padded
        mask[r, : r * width // (2 * rows)] = 0
    return ids * mask, mask


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--new", type=int, default=16, help="new tokens per generation")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", default=str(RESULTS / "generate_steps.json"))
    args = parser.parse_args(argv)

    import shardwise
    from shardwise.cluster import get_cluster
    from shardwise.runtime import WorkerPool
    from shardwise.zoo.hf import tiny_causal_lm

    load_start = os.getloadavg()[0]
    cluster = get_cluster("cpu:2")
    rows = []
    pool = WorkerPool(2, backend="gloo")
    try:
        for size, dims in SIZES.items():
            for name in MODELS:
                model, _ = tiny_causal_lm(name, **dims, seq=args.seq)  # positions for every cache slot
                ids, mask = _prompts(args.batch, args.prompt, dims["vocab"])
                for layout, constraints in LAYOUTS.items():
                    t0 = time.perf_counter()
                    cm = shardwise.compile(model, cluster, mode="generate", max_batch=args.batch, max_seq=args.seq,
                                           max_prompt=args.prompt, constraints=constraints, workers=pool)  # fmt: skip
                    planned_s = time.perf_counter() - t0
                    prefill, decode = [], []
                    cm.generate(ids, mask, max_new_tokens=2, eos_token_id=None)  # warm-up
                    for _ in range(args.rounds):
                        _, seconds = cm.generate(ids, mask, max_new_tokens=args.new, eos_token_id=None,
                                                 return_timings=True)  # fmt: skip
                        prefill.append(seconds["prefill_s"])
                        decode.extend(seconds["decode_s"])
                    row = {
                        "model": name, "size": size, "layout": layout, "degrees": dict(cm.plan.degrees),
                        "cache_split": str(dict(cm.plan.param_placements)["kv_cache.0.keys"]),
                        "prefill_predicted_s": cm.prefill_plan.predicted.step_time_s,
                        "prefill_measured_s": statistics.median(prefill),
                        "decode_predicted_s": cm.plan.predicted.step_time_s,
                        "decode_measured_s": statistics.median(decode),
                        "planning_s": planned_s,
                    }  # fmt: skip
                    cm.close()
                    rows.append(row)
                    print(
                        f"{name:6} {size:6} {layout:8} tp={row['degrees']['tp']} cache {row['cache_split']:9} "
                        f"prefill {row['prefill_predicted_s'] * 1e3:8.2f} ms predicted {row['prefill_measured_s'] * 1e3:8.2f} "
                        f"measured ({row['prefill_predicted_s'] / row['prefill_measured_s']:.2f}x)  decode "
                        f"{row['decode_predicted_s'] * 1e3:7.3f} ms predicted {row['decode_measured_s'] * 1e3:7.3f} "
                        f"measured ({row['decode_predicted_s'] / row['decode_measured_s']:.2f}x)",
                        flush=True,
                    )
    finally:
        pool.close()
    errors = [abs(r[f"{s}_predicted_s"] / r[f"{s}_measured_s"] - 1) for r in rows for s in ("prefill", "decode")]
    summary = {"median_abs_error": statistics.median(errors), "max_abs_error": max(errors)}
    print(f"|predicted / measured - 1|: median {summary['median_abs_error']:.0%}, max {summary['max_abs_error']:.0%}")
    out = {
        "cluster": cluster.name, "batch": args.batch, "prompt": args.prompt, "seq": args.seq, "new": args.new,
        "rounds": args.rounds, "load_start": load_start, "load_end": os.getloadavg()[0], "rows": rows,
        "summary": summary,
    }  # fmt: skip
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
