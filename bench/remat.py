"""Rematerialization: ``python bench/remat.py`` (issue 6, point 3).

For zoo transformers (dp=2 on cpu:2, 4 layers, sequence 64, batch 8: activations outweigh the weights) and
longer GPTs planned on the meta device (planning only), at budgets of 50% and 70% of the no-recompute
peak: the peak our choice reaches (the recompute DP, checked on the rank's buffers) and its recompute
overhead (predicted recompute seconds / predicted step time), against recomputing every layer (the usual
hand setting). "lowest" is the lowest peak recomputation reaches (every layer recomputed, or the DP's
lowest): a budget below it is reported as not reachable. The ILP's recompute time is listed to show it
agrees with the DP ("ilp="), and the DP's choice among finer units (the layers' children: attention, MLP,
norms, residual adds; several tensors cross those cuts) is listed as "sub-layer units".

``--measure`` (default on) also runs the small models' steps on real gloo processes (cpu:2): measured peak
of rank 0's ``train_step`` (shardwise.testing.memory) and the step time ratio to no recomputation, timed
inside the workers (shardwise.testing.timing)
(the fastest of ``--rounds`` x ``--steps`` steps, the settings timed in turn each round; the median is
recorded too; the machine is shared, so times are noisy). Results: bench/results/remat.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

SMALL = {"layers": 4, "seq": 64, "batch": 8}
MODELS = [  # (label, zoo name, options, device)
    ("gpt2 4L", "gpt2", SMALL, "cpu"),
    ("llama 4L", "llama", SMALL, "cpu"),
    ("bert 4L", "bert", SMALL, "cpu"),
    ("gpt2-small 24L s512", "gpt2:small", {"layers": 24, "seq": 512, "batch": 8}, "meta"),
    ("gpt2-base 48L s1024", "gpt2:base", {"layers": 48, "seq": 1024, "batch": 4}, "meta"),
]
FRACTIONS = (0.5, 0.7)


def _out(o):
    return o.logits if hasattr(o, "logits") else getattr(o, "last_hidden_state", o)


def _loss(o):
    return _out(o).float().sin().mean()


def _mib(n: int) -> float:
    return n / 2**20


def _peak(pool, compiled, inputs) -> int:
    from shardwise.testing.memory import measure_train_step

    compiled.train_step(*inputs)  # warm-up: optimizer state
    pool.call_function(measure_train_step, *inputs)  # the first profiled step makes one-time allocations
    return pool.call_function(measure_train_step, *inputs)[0]["peak"]


def _times(pool, inputs, steps: int) -> list[float]:
    from shardwise.testing.timing import time_train_steps

    per_rank = pool.call_function(time_train_steps, *inputs, steps=steps)
    return [max(ts) for ts in zip(*per_rank, strict=True)]  # a step ends when its slowest rank does


def run(args: argparse.Namespace) -> list[dict]:
    import shardwise
    from shardwise.api import CompiledModel
    from shardwise.cluster import get_cluster
    from shardwise.errors import DoesNotFitError
    from shardwise.passes.remat import (
        apply_recomputation,
        choose_recomputation,
        problem_of,
        recompute_all_layers,
    )
    from shardwise.zoo import build_model

    pool = None
    if args.measure:
        from shardwise.runtime import WorkerPool

        pool = WorkerPool(2, backend="gloo")
    spec = get_cluster("cpu:2")
    # planning-only rows: a flat plan however large (the host's memory would send them to a pipeline)
    cluster = dataclasses.replace(spec, name="cpu:2-1TiB", device=dataclasses.replace(spec.device, memory_bytes=2**40))
    rows = []
    try:
        for label, name, opts, device in MODELS:
            if args.models and not any(m in label for m in args.models.split(",")):
                continue
            model, inputs = build_model(name, device=device, **opts)
            start = time.perf_counter()
            compiled = shardwise.compile(
                model, cluster if device == "meta" else "cpu:2", example_inputs=inputs, mode="train",
                loss_fn=_loss, constraints={"dp": 2}, workers=pool if device == "cpu" else None,
            )  # fmt: skip
            plan_s = time.perf_counter() - start
            plan = compiled.plan
            start = time.perf_counter()
            _, problem = problem_of(plan)
            every = recompute_all_layers(plan)
            build_s = time.perf_counter() - start
            base = problem.baseline_bytes
            step = plan.predicted.step_time_s
            row = {
                "model": label, "layers": len(problem.units), "plan_s": round(plan_s, 2),
                "problem_s": round(build_s, 3), "baseline_bytes": base, "step_time_s": step,
                "all": {"peak_bytes": every.peak_bytes, "recompute_s": every.recompute_s,
                        "overhead": every.recompute_s / step},
                "budgets": {},
            }  # fmt: skip
            choices = {"none": None, "all": every}
            for f in FRACTIONS:
                budget = int(f * base)
                entry: dict = {"budget_bytes": budget}
                try:
                    start = time.perf_counter()
                    c = choose_recomputation(plan, budget)
                    entry["dp_s"] = round(time.perf_counter() - start, 3)
                    entry.update(peak_bytes=c.peak_bytes, layers=len(c.units), recompute_s=c.recompute_s,
                                 overhead=c.recompute_s / step, units=list(c.units))  # fmt: skip
                    start = time.perf_counter()
                    ilp = choose_recomputation(plan, budget, method="ilp")
                    entry["ilp_s"] = round(time.perf_counter() - start, 3)
                    entry["ilp_recompute_s"] = ilp.recompute_s
                    try:  # finer units: the layers' children (attention, MLP, norms, residual adds)
                        sub = choose_recomputation(plan, budget, depth=1)
                        entry["sublayer"] = {"peak_bytes": sub.peak_bytes, "units": len(sub.units),
                                             "recompute_s": sub.recompute_s, "overhead": sub.recompute_s / step}  # fmt: skip
                    except DoesNotFitError as exc:
                        entry["sublayer"] = {"not_reachable": str(exc)}
                    choices[f"{int(f * 100)}%"] = c
                except DoesNotFitError as exc:
                    entry["not_reachable"] = str(exc)
                row["budgets"][f"{int(f * 100)}%"] = entry
            if pool is not None and device == "cpu":
                measured: dict[str, dict] = {}
                plans = {k: plan if c is None else apply_recomputation(plan, c) for k, c in choices.items()}
                times: dict[str, list[float]] = {k: [] for k in plans}
                for round_ in range(args.rounds):  # settings timed in turn, so load changes hit them alike
                    for key, p in plans.items():
                        with CompiledModel(p, model=model, out_spec=compiled._out_spec, cluster=compiled.cluster,
                                           workers=pool) as cm:  # fmt: skip
                            if round_ == 0:
                                measured[key] = {"peak_bytes": _peak(pool, cm, inputs),
                                                 "predicted_bytes": p.predicted.memory_bytes[0]}  # fmt: skip
                            cm.train_step(*inputs)  # loads the program
                            times[key] += _times(pool, inputs, args.steps)
                for key, t in times.items():
                    measured[key].update(step_s=min(t), step_s_median=statistics.median(t))
                ref = measured["none"]["step_s"]
                for m in measured.values():
                    m["step_ratio"] = m["step_s"] / ref
                row["measured"] = measured
            compiled.close()
            rows.append(row)
            _print_row(row)
    finally:
        if pool is not None:
            pool.close()
    return rows


def _print_row(row: dict) -> None:
    base = row["baseline_bytes"]
    a = row["all"]
    meas = row.get("measured", {})

    def measured(key: str) -> str:
        m = meas.get(key)
        return f"{_mib(m['peak_bytes']):8.2f} {m['step_ratio']:6.2f}" if m else f"{'-':>8s} {'-':>6s}"

    print(f"{row['model']:22s} {row['layers']:3d} {'none':>6s} {_mib(base):9.2f} {'':>4s} {0:7.1%} {0:7.1%} "
          f"{measured('none')}")  # fmt: skip
    print(f"{'':22s} {'':3s} {'all':>6s} {_mib(a['peak_bytes']):9.2f} {row['layers']:4d} {a['peak_bytes'] / base:7.1%} "
          f"{a['overhead']:7.1%} {measured('all')}")  # fmt: skip
    for key, e in row["budgets"].items():
        if "not_reachable" in e:
            print(f"{'':22s} {'':3s} {key:>6s} {'not reachable (lowest ' + format(_mib(a['peak_bytes']), '.2f') + ' MiB)':>40s}")
            continue
        finer = e.get("sublayer", {})
        sub = (f"sub-layer units: {_mib(finer['peak_bytes']):.2f} MiB, {finer['overhead']:.1%}" if "overhead" in finer
               else "sub-layer units: not reachable")  # fmt: skip
        same = "=" if abs(e["ilp_recompute_s"] - e["recompute_s"]) <= 1e-12 + 1e-9 * e["recompute_s"] else "!"
        print(f"{'':22s} {'':3s} {key:>6s} {_mib(e['peak_bytes']):9.2f} {e['layers']:4d} {e['peak_bytes'] / base:7.1%} "
              f"{e['overhead']:7.1%} {measured(key)}  ilp{same}  {sub}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-measure", dest="measure", action="store_false", help="planning only")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per setting and round")
    parser.add_argument("--rounds", type=int, default=4, help="rounds over the settings (timing)")
    parser.add_argument("--models", default="", help="comma-separated substrings of the model labels")
    parser.add_argument("--output", default=str(ROOT / "results" / "remat.json"))
    args = parser.parse_args()
    print("peak per rank (MiB), recomputed layers, peak / no-recompute peak, predicted recompute overhead "
          "(recompute s / step s); measured on cpu:2: rank 0 peak (MiB) and step time / no recompute")  # fmt: skip
    print(f"{'model':22s} {'L':>3s} {'budget':>6s} {'peak MiB':>9s} {'rec':>4s} {'peak %':>7s} {'overhd':>7s} "
          f"{'meas MiB':>8s} {'step x':>6s}")  # fmt: skip
    rows = run(args)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"fractions": FRACTIONS, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
