"""PyTorch's op corpus (OpInfo's ``op_db``, float32 CPU samples) compiled for cpu:2 and run against eager.

``python bench/op_corpus.py`` compiles every case of shardwise.testing.opcorpus for ``cpu:2``, runs every
program on two gloo worker processes (one pool for all), compares with eager PyTorch at OpInfo's float32
tolerance, prints the counts (captured by torch.export / compiled / equal) and the reasons of every failure,
and writes bench/results/op_corpus.json. ``--compile-only`` skips the runs. Every op equal on cpu:2 is then
compiled for two processes with (nearly) free links, where the planner splits every op a registry rule lets it
split, and each plan that splits something runs and is compared too (``--no-split`` skips this).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"


def _reason(detail: str) -> str:
    """A failure's reason without the case-specific parts (to group them)."""
    text = detail
    if ": op " in text:  # "<line> (module ...): op 'aten.x' ..." -> "op 'aten.x' ..."
        text = "op " + text.split(": op ", 1)[1]
    return text[:150]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compile-only", action="store_true", help="compile every case, run none")
    parser.add_argument("--output", type=Path, default=RESULTS / "op_corpus.json")
    parser.add_argument("--quiet", action="store_true", help="no line per case")
    parser.add_argument("--no-split", action="store_true", help="skip the second pass on free links")
    args = parser.parse_args(argv)
    os.environ.setdefault("SHARDWISE_THREADS_PER_WORKER", "1")
    warnings.filterwarnings("ignore")

    from shardwise.runtime import WorkerPool
    from shardwise.testing.opcorpus import STATUSES, corpus_names, free_links_cluster, run_case

    pools: dict[int, WorkerPool] = {}

    def pool_for(n: int) -> WorkerPool:
        if n not in pools:
            pools[n] = WorkerPool(n, timeout_s=120)
        return pools[n]

    load = os.getloadavg()[0]
    start = time.perf_counter()
    outcomes = []
    split: dict[str, object] = {}
    free = free_links_cluster()
    try:
        for name in corpus_names():
            out = run_case(name, pool_for, run=not args.compile_only)
            outcomes.append(out)
            again = None
            if out.status == "equal" and not args.no_split:
                again = run_case(name, pool_for, run=not args.compile_only, cluster=free, split_only=True)
                if again.detail != "splits nothing":
                    split[name] = again
            if not args.quiet:
                note = f"  {out.detail[:100]}" if out.status != "equal" else ""
                note += f"  split: {again.status} {again.detail[:60]}" if name in split else ""
                print(f"{name:48s} {out.status:12s} {out.seconds:5.2f}s{note}", flush=True)
    finally:
        for pool in pools.values():
            pool.close()
    elapsed = time.perf_counter() - start

    counts = collections.Counter(o.status for o in outcomes)
    captured = [o for o in outcomes if o.status not in ("not-captured", "no-sample", "eager-fails")]
    compiled = [o for o in captured if o.status not in ("refused", "crash")]
    equal = [o for o in compiled if o.status == "equal"]
    reasons: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for o in outcomes:
        if o.status != "equal":
            reasons[o.status][_reason(o.detail)] += 1
    print()
    print(f"op corpus: {len(outcomes)} OpInfos with float32 on the CPU, {elapsed:.0f} s "
          f"(load {load:.1f} at the start){' (compile only)' if args.compile_only else ''}")  # fmt: skip
    print()
    print(f"{'status':16s}{'ops':>6s}")
    for s in STATUSES:
        print(f"{s:16s}{counts[s]:6d}")
    print()
    pct = 100.0 * len(compiled) / max(len(captured), 1)
    print(f"captured by torch.export: {len(captured)}   compiled: {len(compiled)} ({pct:.1f}%)   "
          f"{'equal to eager' if not args.compile_only else 'compiled only'}: {len(equal)}")  # fmt: skip
    split_equal = [n for n, o in split.items() if o.status == "equal"]  # type: ignore[attr-defined]
    if not args.no_split:
        print(f"on free links: {len(split)} plans split an op across the ranks, {len(split_equal)} equal to eager")
        for n, o in split.items():
            if o.status != "equal":  # type: ignore[attr-defined]
                print(f"  {n}: {o.status} {o.detail[:120]}")  # type: ignore[attr-defined]
    for status in STATUSES:
        if status == "equal" or not reasons[status]:
            continue
        print(f"\n{status}:")
        for reason, n in reasons[status].most_common():
            print(f"  {n:4d}  {reason}")
    report = {
        "bench": "op_corpus",
        "compile_only": args.compile_only,
        "seconds": round(elapsed, 1),
        "load_at_start": round(load, 2),
        "opinfos": len(outcomes),
        "captured": len(captured),
        "compiled": len(compiled),
        "equal": len(equal),
        "counts": {s: counts[s] for s in STATUSES},
        "split_on_free_links": {n: {"status": o.status, "detail": o.detail} for n, o in split.items()},  # type: ignore[attr-defined]
        "reasons": {s: dict(c.most_common()) for s, c in reasons.items()},
        "cases": [
            {"name": o.name, "status": o.status, "detail": o.detail, "world_size": o.world_size,
             "splits": o.splits, "seconds": round(o.seconds, 3)}
            for o in outcomes
        ],  # fmt: skip
        "machine": {"python": sys.version.split()[0], "platform": platform.platform(), "cores": os.cpu_count()},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(args.output)
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
