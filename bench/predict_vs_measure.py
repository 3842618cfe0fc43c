"""Predicted step times and peak memory against the generated programs measured on this machine:
``python bench/predict_vs_measure.py``.

For the zoo's gpt2, llama and bert (``small``: 4 layers, hidden 128, batch 8 x 32 tokens) x {dp=2, tp=2, pp=2}
x {inference, train} on ``cpu:2`` — this machine as ``shardwise calibrate`` measured it (``get_cluster("cpu:2")``
reads the cached calibration, or calibrates once; the table's header names it) — each configuration is planned
by ``shardwise.compile`` with that one constraint (training: loss ``output.float().sin().mean()``, AdamW), and:

* **predicted**: the plan's ``predicted.step_time_s`` (the price list, ``shardwise/costs``) and its
  ``predicted.memory_bytes`` (the memory map's arena per rank);
* **measured**: the generated package (``CompiledModel.save``) run on two real gloo worker processes
  (``WorkerPool``, loaded as ``CompiledModel`` loads it: ``load_weights``, ``configure_optimizer``), its
  ``train_step`` or ``infer`` timed inside the workers (``shardwise.testing.timing.time_steps``: each step
  starts after a barrier; a step's time is the slower rank's), and one step's peak memory per rank
  (``shardwise.testing.memory``: the allocator's events replayed, plus the resident tensors).

Where each measured step's time went, on its slower rank's main thread (``step_anatomy``): ``cpu`` is the
thread's own CPU time and ``queue`` the time it was ready to run but waited for a CPU that another process held
(Linux scheduler statistics); the rest of the step it was blocked, mostly in collectives waiting for its peer.
The price list predicts the machine undisturbed (``shardwise calibrate`` keeps the least of short samples); on a
2-core machine running 2 workers, any other runnable process takes a core from a worker, and every collective
then makes the other rank wait too: ``queue`` shows how much of a row's error is that.

Timing runs in rounds: each round loads every configuration in turn (the order rotates from round to round),
warms it up (``--warmup`` steps) and times ``--steps`` steps, so that drift of the machine's load hits all
configurations alike. The measured figure is the median of all timed steps; the spread is shown as min,
quartiles and max. The load average is recorded at the start, after every round and at the end.

Goal (issue 15): median |error| <= 15%, none over 35%; predicted peak memory within 10% of the measured.
Writes bench/results/predict_vs_measure.json. A quiet machine is needed for figures worth keeping:
``--max-load 1.5`` waits (up to ``--wait`` seconds) until the 1-minute load average is below it.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
sys.path.insert(0, str(ROOT.parent))

import torch  # noqa: E402

MODELS = ("gpt2", "llama", "bert")
LAYOUTS = {"dp2": {"dp": 2}, "tp2": {"tp": 2}, "pp2": {"pp": 2}}
MODES = ("inference", "train")
LR = 1e-3


def _out(o):
    return o.logits if hasattr(o, "logits") else getattr(o, "last_hidden_state", o)


def _loss(o):
    return _out(o).float().sin().mean()


def load_average() -> float:
    return (
        float(Path("/proc/loadavg").read_text().split()[0])
        if Path("/proc/loadavg").exists()
        else float("nan")
    )


def wait_for_quiet(max_load: float, wait_s: float) -> float:
    """Wait until the 1-minute load average is below ``max_load`` (at most ``wait_s`` seconds)."""
    deadline = time.monotonic() + wait_s
    load = load_average()
    while load >= max_load and time.monotonic() < deadline:
        print(f"  load {load:.2f} >= {max_load}: waiting", flush=True)
        time.sleep(30)
        load = load_average()
    return load


def _quartiles(xs: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    return q[0], q[1], q[2]


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.2f}"


def plan_all(cluster, models, layouts, modes, workdir: Path) -> list[dict]:
    import shardwise
    from shardwise.zoo import build_model

    configs = []
    for name in models:
        for mode in modes:
            for layout in layouts:
                model, inputs = build_model(name, "small")
                start = time.perf_counter()
                cm = shardwise.compile(
                    model, cluster, example_inputs=inputs, mode=mode, loss_fn=_loss if mode == "train" else None,
                    constraints=LAYOUTS[layout],
                    optimizer=functools.partial(torch.optim.AdamW, lr=LR) if mode == "train" else None,
                )  # fmt: skip
                planning = time.perf_counter() - start
                directory = workdir / f"{name}-{layout}-{mode}"
                cm.save(directory)
                plan = cm.plan
                configs.append({
                    "model": name, "layout": layout, "mode": mode, "inputs": inputs, "package": directory,
                    "plan": plan.summary().splitlines()[0], "degrees": plan.degrees,
                    "schedule": plan.pipeline.schedule if plan.pipeline else None,
                    "microbatches": plan.pipeline.microbatches if plan.pipeline else None,
                    "predicted_step_s": plan.predicted.step_time_s,
                    "predicted_compute_s": plan.predicted.compute_s, "predicted_comm_s": plan.predicted.comm_s,
                    "predicted_memory_bytes": list(plan.predicted.memory_bytes), "planning_s": planning,
                })  # fmt: skip
                print(f"  planned {name} {layout} {mode}: predicted {plan.predicted.step_time_s * 1e3:.2f} ms "
                      f"({planning:.1f} s)", flush=True)  # fmt: skip
                cm.close()
    return configs


def load(pool, config: dict) -> None:
    directory = config["package"]
    pool.load(directory, init="load_weights", init_kwargs={"path": str(directory / "model.safetensors")})
    if config["mode"] == "train":
        pool.call("configure_optimizer", functools.partial(torch.optim.AdamW, lr=LR))


def method(config: dict) -> str:
    return "train_step" if config["mode"] == "train" else "infer"


def measure_memory(pool, config: dict) -> list[int]:
    from shardwise.testing.memory import measure_step

    load(pool, config)
    pool.call(method(config), *config["inputs"])  # warm-up: the optimizer's state exists
    pool.call_function(
        measure_step, *config["inputs"], step_method=method(config)
    )  # first profiled step: one-time allocations
    measured = pool.call_function(measure_step, *config["inputs"], step_method=method(config))
    return [m["peak"] for m in measured]


def time_config(pool, config: dict, warmup: int, steps: int) -> list[dict]:
    """The timed steps of one configuration: each step's wall time (the slower rank's), the main threads' CPU
    time and their wait for a CPU (``shardwise.testing.timing.step_anatomy``; the larger of the ranks')."""
    from shardwise.testing.timing import time_steps

    load(pool, config)
    per_rank = pool.call_function(
        time_steps, *config["inputs"], step_method=method(config), warmup=warmup, steps=steps, anatomy=True
    )
    out = []
    for ranks in zip(*per_rank, strict=True):
        queues = [r["run_queue"] for r in ranks]
        out.append({
            "wall": max(r["wall"] for r in ranks), "cpu": max(r["cpu"] for r in ranks),
            "run_queue": None if None in queues else max(queues),
        })  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration and round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after each load")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument(
        "--max-load", type=float, default=0.0, help="wait until the 1-minute load is below this"
    )
    parser.add_argument("--wait", type=float, default=3600.0, help="longest wait for --max-load, seconds")
    parser.add_argument("--output", default=str(RESULTS / "predict_vs_measure.json"))
    args = parser.parse_args()
    models = [m for m in args.models.split(",") if m]
    layouts = [x for x in args.layouts.split(",") if x]
    modes = [x for x in args.modes.split(",") if x]

    from shardwise.cluster import get_cluster
    from shardwise.cluster.machine import cache_file, calibration_note, cpu_mode
    from shardwise.cluster.schema import spec_to_dict
    from shardwise.runtime import WorkerPool

    if args.max_load:
        wait_for_quiet(args.max_load, args.wait)
    loads = {"start": load_average()}
    print(f"load average at the start: {loads['start']:.2f}", flush=True)
    cluster = get_cluster("cpu:2")
    print(f"cluster cpu:2 ({cpu_mode()}): {calibration_note(cluster) or 'fixed nominal figures'}", flush=True)
    with tempfile.TemporaryDirectory(prefix="predict-vs-measure-") as tmp:
        configs = plan_all(cluster, models, layouts, modes, Path(tmp))
        pool = WorkerPool(2, backend="gloo", timeout_s=900.0)
        try:
            if not args.no_memory:
                for c in configs:
                    c["measured_memory_bytes"] = measure_memory(pool, c)
            loads["after_memory"] = load_average()
            times: dict[int, list[dict]] = {k: [] for k in range(len(configs))}
            loads["rounds"] = []
            for r in range(args.rounds):
                order = list(range(len(configs)))
                order = order[r % len(order) :] + order[: r % len(order)]
                for k in order:
                    times[k] += time_config(pool, configs[k], args.warmup, args.steps)
                loads["rounds"].append(load_average())
                print(f"  round {r + 1}/{args.rounds} done (load {loads['rounds'][-1]:.2f})", flush=True)
        finally:
            pool.close()
    loads["end"] = load_average()

    rows = []
    errors = []
    memory_errors = []
    for k, c in enumerate(configs):
        ts = sorted(t["wall"] for t in times[k])
        q1, med, q3 = _quartiles(ts)
        err = c["predicted_step_s"] / med - 1
        errors.append(err)
        row = {key: v for key, v in c.items() if key not in ("inputs", "package")}
        queues = [t["run_queue"] for t in times[k]]
        row.update(measured_step_s={"median": med, "min": ts[0], "q1": q1, "q3": q3, "max": ts[-1], "n": len(ts)},
                   step_error=err, measured_cpu_s=statistics.median(t["cpu"] for t in times[k]),
                   measured_run_queue_s=None if None in queues else statistics.median(queues),
                   steps=times[k])  # fmt: skip
        if "measured_memory_bytes" in c:
            merr = [
                p / m - 1
                for p, m in zip(c["predicted_memory_bytes"], c["measured_memory_bytes"], strict=True)
            ]
            row["memory_error"] = merr
            memory_errors.append(max(merr, key=abs))
        rows.append(row)

    print()
    print(f"predicted (price list) vs measured (generated program, 2 gloo processes) on {cluster.name}; "
          f"load {loads['start']:.2f} at the start, {loads['end']:.2f} at the end")  # fmt: skip
    head = (f"{'model':6} {'layout':6} {'mode':9} {'predicted ms':>12} {'measured ms':>11} {'min':>7} {'q1':>7} "
            f"{'q3':>7} {'max':>7} {'error':>7} {'cpu ms':>7} {'queue ms':>8}   {'predicted MiB':>13} "
            f"{'measured MiB':>12} {'error':>6}")  # fmt: skip
    print(head)
    for row in rows:
        m = row["measured_step_s"]
        line = (f"{row['model']:6} {row['layout']:6} {row['mode']:9} {row['predicted_step_s'] * 1e3:>12.2f} "
                f"{m['median'] * 1e3:>11.2f} {m['min'] * 1e3:>7.2f} {m['q1'] * 1e3:>7.2f} {m['q3'] * 1e3:>7.2f} "
                f"{m['max'] * 1e3:>7.2f} {row['step_error']:>+7.1%} {row['measured_cpu_s'] * 1e3:>7.2f} "
                f"{_ms(row['measured_run_queue_s']):>8}")  # fmt: skip
        if "memory_error" in row:
            worst = max(range(len(row["memory_error"])), key=lambda i: abs(row["memory_error"][i]))
            line += (f"   {row['predicted_memory_bytes'][worst] / 2**20:>13.2f} "
                     f"{row['measured_memory_bytes'][worst] / 2**20:>12.2f} {row['memory_error'][worst]:>+6.1%}")  # fmt: skip
        print(line)
    abs_err = sorted(abs(e) for e in errors)
    summary = {
        "median_abs_step_error": statistics.median(abs_err),
        "max_abs_step_error": abs_err[-1],
        "step_goal_met": statistics.median(abs_err) <= 0.15 and abs_err[-1] <= 0.35,
    }
    if memory_errors:
        summary["max_abs_memory_error"] = max(abs(e) for e in memory_errors)
        summary["memory_goal_met"] = summary["max_abs_memory_error"] <= 0.10
    print()
    print(f"step time: median |error| {summary['median_abs_step_error']:.1%}, largest {summary['max_abs_step_error']:.1%} "
          f"(goal: <= 15%, none over 35%: {'met' if summary['step_goal_met'] else 'missed'})")  # fmt: skip
    if memory_errors:
        print(f"peak memory: largest |error| {summary['max_abs_memory_error']:.1%} "
              f"(goal <= 10%: {'met' if summary['memory_goal_met'] else 'missed'})")  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpu_cluster": cpu_mode(),
            "calibration_cache": str(cache_file(2)),
        },  # fmt: skip
        "load_average": loads,
        "settings": {"rounds": args.rounds, "steps": args.steps, "warmup": args.warmup},
        "cluster": spec_to_dict(cluster),
        "rows": rows,
        "summary": summary,
    }
    Path(args.output).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
