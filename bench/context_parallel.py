"""Context parallelism's three attention ways, predicted against measured: ``python bench/context_parallel.py``.

A tiny Llama (transformers, random weights; ``--hidden``, ``--layers``, 4 heads and 2 key/value heads) with one
sequence of ``--seq`` tokens (batch 1: data parallelism cannot split it) is compiled for training on cpu:2 with
``cp=2`` and each way pinned (``cp_attention=allgather|ulysses|ring``), and with the planner's own choice. Per
plan: the planner's predicted step time (labelled predicted) and the mean measured ``train_step`` time over
``--steps`` steps after one warm-up step, on the same pool of two gloo processes, and their ratio; the way
the unpinned plan took. The load average is recorded next to the timings (the machine is shared: timings are
noisy; rerun on a quiet machine for figures to quote). Writes bench/results/context_parallel.json
(``--output`` elsewhere).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
from pathlib import Path

import torch

import shardwise
from shardwise.runtime import WorkerPool
from shardwise.zoo.hf import tiny_causal_lm

RESULTS = Path(__file__).resolve().parent / "results"
WAYS = ("allgather", "ulysses", "ring", "auto")


def _loss(out) -> torch.Tensor:  # noqa: ANN001
    return out.logits.float().sin().mean()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--output", type=Path, default=RESULTS / "context_parallel.json")
    args = parser.parse_args()
    sgd = functools.partial(torch.optim.SGD, lr=0.01)
    rows = []
    load_before = os.getloadavg()
    with WorkerPool(2, backend="gloo") as pool:
        for way in WAYS:
            model, inputs = tiny_causal_lm("llama", seq=args.seq, batch=1, hidden=args.hidden, layers=args.layers)
            constraints: dict = {"cp": 2} | ({} if way == "auto" else {"cp_attention": way})
            with shardwise.compile(
                model, "cpu:2", example_inputs=inputs, mode="train", loss_fn=_loss, optimizer=sgd,
                constraints=constraints, workers=pool,
            ) as cm:  # fmt: skip
                cm.train_step(*inputs)  # warm-up
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    cm.train_step(*inputs)
                measured = (time.perf_counter() - t0) / args.steps
                predicted = cm.plan.predicted.step_time_s
                note = next((n for n in cm.plan.notes if "attention calls" in n), "")
                took = note.split("attention calls: ", 1)[1].split(".", 1)[0] if note else ""
            rows.append({"way": way, "attention": took, "predicted_step_s": predicted, "measured_step_s": measured,
                         "measured_over_predicted": measured / predicted if predicted else None})  # fmt: skip
    load_after = os.getloadavg()
    print(f"Llama hidden {args.hidden}, {args.layers} layers, seq {args.seq}, batch 1, cpu:2, cp=2, train (SGD)")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    print(f"{'pinned':>10} {'attention':>14} {'predicted':>12} {'measured':>12} {'meas/pred':>10}")
    for r in rows:
        print(f"{r['way']:>10} {r['attention']:>14} {r['predicted_step_s'] * 1e3:>10.2f}ms "
              f"{r['measured_step_s'] * 1e3:>10.2f}ms {r['measured_over_predicted']:>10.2f}")  # fmt: skip
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "model": {"type": "llama", "hidden": args.hidden, "layers": args.layers, "seq": args.seq, "batch": 1},
        "cluster": "cpu:2", "steps": args.steps, "load_average": {"before": load_before, "after": load_after},
        "columns": {"predicted_step_s": "predicted by the price list", "measured_step_s": "measured train_step"},
        "rows": rows,
    }, indent=2) + "\n")  # fmt: skip
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
