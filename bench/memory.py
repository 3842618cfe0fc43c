"""Memory mapping (offset assignment): ``python bench/memory.py``.

Sections (each a function returning rows; ``main`` prints a table per section and merges them into
bench/results/memory.json under the section's key):

* ``minimalloc``: the 11 "challenging" instances of google/minimalloc (read from
  ``$SHARDWISE_DATA/minimalloc-challenging/``, never copied here; see CONTRIBUTING.md, "Data"). Each must fit in its capacity (the number in
  the file name); greedy best-fit needs 1.28-1.41x of it. The budget is ``--node-limit`` search nodes
  (deterministic: the outcome does not depend on the machine's load). Per instance: buffers, capacity, lower bound,
  best-fit arena / capacity (by size, by lifetime), ours / capacity, whether it fits (checked by
  ``verify_assignment``), wall and CPU seconds of ``assign_offsets``.

* ``models``: every zoo model (``--size``, default small) planned by ``plan_auto`` on ``--cluster``
  (default cpu:2) for training and inference. Per model and mode: the degrees, the buffers of a rank's
  step, the arena and the lower bound of the memory map (``plan.memory``), their ratio (goal <= 1.03),
  how the offsets were found, the seconds of the memory pass and of the whole planning.

Run one section with ``--sections minimalloc``; ``--instances A,B`` picks instances.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
RESULTS = ROOT / "results"
sys.path.insert(0, str(REPO))

# public data sets live outside the repository, in the directory $SHARDWISE_DATA names (CONTRIBUTING.md)
MINIMALLOC_DIR = Path(os.environ.get("SHARDWISE_DATA") or "/nonexistent") / "minimalloc-challenging"


def _read_minimalloc(path: Path):
    from shardwise.passes.memory import Buffer

    with path.open() as f:
        return [Buffer(r["id"], int(r["lower"]), int(r["upper"]), int(r["size"])) for r in csv.DictReader(f)]


def minimalloc_section(args: argparse.Namespace) -> list[dict] | None:
    """Rows for the MiniMalloc challenging suite, or None (with a message) when its data is absent."""
    from shardwise.passes.memory import assign_offsets, best_fit, lower_bound, verify_assignment

    files = sorted(MINIMALLOC_DIR.glob("*.csv"))
    if not files:
        print(f"[minimalloc] skipped: no instances in {MINIMALLOC_DIR} (set SHARDWISE_DATA, see CONTRIBUTING.md)")
        return None
    wanted = set(args.instances.split(",")) if args.instances else None
    rows = []
    header = (
        f"{'instance':9s} {'buffers':>7s} {'capacity':>9s} {'lower':>9s} {'bf-size':>7s} {'bf-life':>7s} "
        f"{'ours':>6s} {'fits':>5s} {'method':>14s} {'wall s':>7s} {'cpu s':>6s}"
    )
    print("MiniMalloc challenging suite (arena / capacity)")
    print(header)
    print("-" * len(header))
    for path in files:
        name, capacity = path.stem.split(".")[0], int(path.stem.split(".")[1])
        if wanted and name not in wanted:
            continue
        bufs = _read_minimalloc(path)
        by_size = best_fit(bufs, order="size")
        by_life = best_fit(bufs, order="lifetime")
        wall, cpu = time.perf_counter(), time.process_time()
        ours = assign_offsets(
            bufs, capacity=capacity, time_limit_s=args.time_limit, node_limit=args.node_limit
        )
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        verify_assignment(bufs, ours)  # valid in any case; capacity checked below
        fits = ours.arena_bytes <= capacity
        row = {
            "instance": name,
            "buffers": len(bufs),
            "capacity_bytes": capacity,
            "arena_bytes": ours.arena_bytes,
            "fits": fits,
            "lower_bound_bytes": lower_bound(bufs),
            "best_fit_arena_bytes": min(by_size.arena_bytes, by_life.arena_bytes),
            "greedy_ratio": round(min(by_size.arena_bytes, by_life.arena_bytes) / capacity, 4),
            "best_fit_size_arena_bytes": by_size.arena_bytes,
            "best_fit_lifetime_arena_bytes": by_life.arena_bytes,
            "method": ours.method,
            "node_limit": args.node_limit,
            "solve_s": round(wall, 3),
            "cpu_s": round(cpu, 3),
        }
        rows.append(row)
        print(
            f"{name:9s} {len(bufs):7d} {capacity:9d} {row['lower_bound_bytes']:9d} "
            f"{by_size.arena_bytes / capacity:7.3f} {by_life.arena_bytes / capacity:7.3f} "
            f"{ours.arena_bytes / capacity:6.3f} {str(fits):>5s} {ours.method:>14s} {wall:7.2f} {cpu:6.2f}",
            flush=True,
        )
    if rows:
        fitted = sum(r["fits"] for r in rows)
        print(
            f"fits: {fitted}/{len(rows)}; total {sum(r['solve_s'] for r in rows):.1f} s wall, "
            f"{sum(r['cpu_s'] for r in rows):.1f} s CPU"
        )
    return rows


def models_section(args: argparse.Namespace) -> list[dict]:
    """Rows for the zoo models: each rank's memory map, as the planner records it."""
    from shardwise.cluster import get_cluster
    from shardwise.frontend.trace import trace
    from shardwise.passes.memory import verify_assignment
    from shardwise.passes.memory.mapping import map_memory, plan_memory_inputs
    from shardwise.planner.auto import plan_auto
    from shardwise.zoo import MODEL_NAMES, build_model

    cluster = get_cluster(args.cluster)
    rows = []
    header = (
        f"{'model':9s} {'mode':9s} {'degrees':14s} {'buffers':>7s} {'arena':>12s} {'lower bound':>12s} "
        f"{'ratio':>6s} {'method':>17s} {'map s':>6s} {'plan s':>6s}"
    )
    print(f"Zoo models ({args.size}) on {cluster.name}: each rank's arena / lower bound of live bytes")
    print(header)
    print("-" * len(header))
    for name in MODEL_NAMES:
        for mode in ("train", "inference"):
            model, inputs = build_model(name, args.size)
            graph = trace(model, inputs)[0]
            t0 = time.perf_counter()
            plan = plan_auto(graph, cluster, mode=mode)
            plan_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            mapped = map_memory(
                plan.graph, plan.mesh, plan.strategies, capacity_bytes=cluster.device.memory_bytes,
                optimizer_foreach=cluster.device.kind != "cpu", **plan_memory_inputs(plan),
            )  # fmt: skip
            map_s = time.perf_counter() - t0
            for bufs, assignment in zip(mapped.buffers, mapped.assignments):
                verify_assignment(bufs, assignment)
            if mapped.memory != plan.memory:
                raise AssertionError(f"{name} {mode}: the plan's memory differs from the memory pass's")
            m = max(plan.memory, key=lambda m: m.arena_bytes)
            a = mapped.assignments[m.rank]
            degrees = "x".join(f"{k}{v}" for k, v in plan.degrees_ if v > 1) or "1 device"
            row = {
                "model": name,
                "size": args.size,
                "mode": mode,
                "cluster": cluster.name,
                "degrees": dict(plan.degrees_),
                "buffers": len(mapped.buffers[m.rank]),
                "arena_bytes": m.arena_bytes,
                "lower_bound_bytes": m.lower_bound_bytes,
                "ratio": round(m.arena_bytes / max(m.lower_bound_bytes, 1), 4),
                "method": a.method + (" (optimal)" if a.optimal else ""),
                "memory_pass_s": round(map_s, 3),
                "planning_s": round(plan_s, 3),
            }
            rows.append(row)
            print(
                f"{name:9s} {mode:9s} {degrees:14s} {row['buffers']:7d} {m.arena_bytes:12d} "
                f"{m.lower_bound_bytes:12d} {row['ratio']:6.3f} {row['method']:>17s} {map_s:6.2f} {plan_s:6.2f}",
                flush=True,
            )
    worst = max(r["ratio"] for r in rows)
    print(f"worst ratio {worst:.4f} (goal <= 1.03): {'met' if worst <= 1.03 else 'NOT met'}")
    return rows


def _merge(old: list[dict] | None, new: list[dict]) -> list[dict]:
    """Rows of a partial run replace the same instances' rows of the last full run."""
    by_name = {r.get("instance"): r for r in old or []}
    by_name.update({r.get("instance"): r for r in new})
    return sorted(by_name.values(), key=lambda r: str(r.get("instance")))


# Each section: (JSON key, function)
SECTIONS: dict[str, Callable[[argparse.Namespace], list[dict] | None]] = {
    "models": models_section,
    "minimalloc": minimalloc_section,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help="comma-separated: " + ",".join(SECTIONS)
    )
    parser.add_argument("--instances", default="", help="minimalloc: only these instances (e.g. A,B)")
    parser.add_argument(
        "--node-limit", type=int, default=200_000,
        help="minimalloc: canonical-search nodes per instance (CP-SAT then gets 1e-4 deterministic s per node): "
        "the budget, the same on a loaded machine",
    )  # fmt: skip
    parser.add_argument(
        "--time-limit", type=float, default=900.0, help="wall seconds per instance: a safety net"
    )
    parser.add_argument("--size", default="small", help="models: zoo size (tiny, small, base)")
    parser.add_argument("--cluster", default="cpu:2", help="models: the cluster to plan for")
    parser.add_argument("--output", type=Path, default=RESULTS / "memory.json")
    args = parser.parse_args(argv)
    out: dict = {}
    if args.output.exists():  # keep the sections not run this time
        try:
            out = json.loads(args.output.read_text())
        except json.JSONDecodeError:
            out = {}
    for key in args.sections.split(","):
        if key not in SECTIONS:
            parser.error(f"unknown section {key!r}; choose from {', '.join(SECTIONS)}")
        rows = SECTIONS[key](args)
        print()
        if rows is not None:
            out[key] = _merge(out.get(key), rows) if args.instances and key == "minimalloc" else rows
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
