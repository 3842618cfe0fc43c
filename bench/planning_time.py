"""Planning time of big models through the front door, on the meta device: ``python bench/planning_time.py``.

Rows (goals from issues 15 and 17):

- ``gpt3-175b``: GPT-3 175B (``bench/big_models.py``) through ``shardwise.compile(model, "dgx-a100x128",
  mode="train", precision="bf16")``, batch 1536 x 2048: a plan that fits in < 60 s (issue 15, item 7);
- ``mixtral-8x7b``: Mixtral-8x7B's configuration through the CLI, ``shardwise plan
  bench/big_models.py:mixtral_8x7b --meta -c dgx-h100x4 --mode train --precision bf16`` (a fresh process:
  imports included), then ``shardwise explain`` on the plan: < 60 s with a readable explain (issue 17, item 6);
- ``deepseek-v3``: DeepSeek-V3's configuration through ``shardwise.compile`` on its published cluster
  (``bench/clusters/h800-deepseek.yaml``, 2048 H800s), bf16, training: < 120 s (issue 17, item 5).

Per row: the wall and CPU seconds from the built meta model to the plan (tracing included; the CLI row: the
whole process, imports and building the model included), the planner's own
breakdown (its ``planning time`` note), the layout chosen, whether its memory map fits the device, its
predicted step time (predicted by the price list, not measured), and the notes that say what was assumed.
Timings are wall-clock on a shared machine: the load average is recorded beside each row. Writes
``bench/results/planning_time.json`` (``--output``); ``--rows`` picks rows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))

GOALS = {"gpt3-175b": 60.0, "mixtral-8x7b": 60.0, "deepseek-v3": 120.0}
DEEPSEEK_CLUSTER = ROOT / "clusters" / "h800-deepseek.yaml"


def _summary(plan: Any) -> dict[str, Any]:
    peak = max(m.arena_bytes for m in plan.memory) if plan.memory else 0
    capacity = plan.memory[0].capacity_bytes if plan.memory else 0
    pipe = plan.pipeline
    return {
        "degrees": plan.degrees,
        "layout": next((a.note for a in plan.alternatives if a.chosen), ""),
        "schedule": (f"{pipe.schedule}x{pipe.virtual} mb {pipe.microbatch_size}x{pipe.microbatches}"
                     if pipe is not None else "flat"),
        "fits": bool(plan.memory) and peak <= capacity, "peak_gib": peak / 2**30, "capacity_gib": capacity / 2**30,
        "predicted_step_s": plan.predicted.step_time_s, "predicted_mfu": plan.predicted.mfu,
        "notes": [n for n in plan.notes if not n.startswith(("pipeline:", "chunks:"))],
    }  # fmt: skip


def _compile_row(name: str, factory: Any, cluster: str) -> dict[str, Any]:
    import torch

    import shardwise

    load0 = os.getloadavg()
    t0 = time.perf_counter()
    with torch.device("meta"):
        model, inputs, loss = factory()
    model.train()
    build_s = time.perf_counter() - t0
    wall0, cpu0 = time.perf_counter(), time.process_time()
    row = {"row": name, "cluster": cluster, "path": "shardwise.compile", "build_s": build_s, "load_before": load0}
    try:
        cm = shardwise.compile(model, cluster, example_inputs=inputs, mode="train", precision="bf16", loss_fn=loss)
    except shardwise.errors.ShardwiseError as exc:  # no plan: that is the row's result
        row["error"] = f"{type(exc).__name__}: {exc}"
        cm = None
    row |= {"plan_s": time.perf_counter() - wall0, "plan_cpu_s": time.process_time() - cpu0,
            "load_after": os.getloadavg()}  # fmt: skip
    return row | (_summary(cm.plan) if cm is not None else {})


def _cli_row(name: str, target: str, cluster: str) -> dict[str, Any]:
    exe = Path(sys.executable).with_name("shardwise")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT.parent), os.environ.get("PYTHONPATH", "")])}
    with tempfile.TemporaryDirectory() as tmp:
        plan_file = Path(tmp) / "plan.json"
        cmd = [str(exe), "plan", target, "--meta", "-c", cluster, "--mode", "train", "--precision", "bf16",
               "-o", str(plan_file), "-q"]  # fmt: skip
        load0 = os.getloadavg()
        t0 = time.perf_counter()
        cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT.parent)
        wall = time.perf_counter() - t0
        cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
        row: dict[str, Any] = {"row": name, "cluster": cluster, "path": " ".join(["shardwise", *cmd[1:-2]]),
                               "plan_s": wall, "plan_cpu_s": cpu, "load_before": load0,
                               "load_after": os.getloadavg(),
                               "exit_code": done.returncode}  # fmt: skip
        if done.returncode != 0:
            row["error"] = (done.stderr or done.stdout)[-2000:]
            return row
        t1 = time.perf_counter()
        explained = subprocess.run([str(exe), "explain", str(plan_file)], capture_output=True, text=True, env=env)
        row["explain_s"] = time.perf_counter() - t1
        row["explain"] = explained.stdout
        from shardwise.ir.plan import ExecutionPlan

        row.update(_summary(ExecutionPlan.from_json(plan_file.read_text())))
    return row


def main() -> None:
    import big_models

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="*", default=list(GOALS), choices=list(GOALS))
    parser.add_argument("--output", default=str(RESULTS / "planning_time.json"))
    args = parser.parse_args()
    rows = []
    for name in args.rows:
        if name == "gpt3-175b":
            row = _compile_row(name, big_models.gpt3_175b, "dgx-a100x128")
        elif name == "mixtral-8x7b":
            row = _cli_row(name, "bench/big_models.py:mixtral_8x7b", "dgx-h100x4")
        else:
            row = _compile_row(name, big_models.deepseek_v3, str(DEEPSEEK_CLUSTER))
        goal = GOALS[name]
        row["goal_s"] = goal
        row["met"] = bool(row.get("fits")) and row["plan_s"] < goal
        rows.append(row)
        d = row.get("degrees", {})
        print(
            f"{name:>13} {row['cluster']:>30}  {row['plan_s']:7.1f} s wall, {row.get('plan_cpu_s', 0):6.1f} s CPU "
            f"(goal < {goal:.0f} s: "
            f"{'met' if row['met'] else 'missed'})  load {row['load_before'][0]:.1f}->{row['load_after'][0]:.1f}  "
            + (" ".join(f"{k}{v}" for k, v in d.items()) + f"  fits {row.get('fits')}  peak "
               f"{row.get('peak_gib', 0):.1f} GiB  predicted step {row.get('predicted_step_s', 0):.3f} s"
               if d else f"error: {row.get('error', '')[-300:]}"),
            flush=True,
        )  # fmt: skip
        for note in row.get("notes", []):
            if note.startswith(("planning time", "search:", "micro-batch", "balanced")):
                print(f"{'':>15}{note}")
    out = {
        "benchmark": "planning time through the front door on the meta device (figures predicted by the price list)",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "rows": rows,
    }  # fmt: skip
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(out, indent=1))
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
