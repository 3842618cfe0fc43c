"""Differential fuzzing against eager PyTorch: ``python bench/fuzz.py --n 1000``.

Generates ``--n`` random models (shardwise.testing.fuzz; seeds ``--start`` to ``--start + n - 1``, so that
batches cover a range), compiles each for a random mesh on cpu:2 or cpu:4 (the parallel degrees the planner
supports now), runs inference and one SGD training step on real worker
processes and compares with eager PyTorch. By default the generator's extensions are on (``--features``):
in-place ops, custom ops that decompose to ATen, size arithmetic with a dynamic batch, a batch the mesh
divides, and models of repeated blocks, at least as many as the pipeline stages it picks. Prints cases tried, mismatches and crashes (a clear shardwise
error is "unsupported", not a crash), saves every failing case as a standalone reproducer under
bench/results/fuzz_failures/ and writes bench/results/fuzz.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
FAILURES = RESULTS / "fuzz_failures"


def _signature(detail: str) -> str:
    """The first line of an error, without the case-specific parts, to group failures."""
    line = detail.splitlines()[0] if detail else ""
    if line.startswith("fuzz_case_"):
        line = line.split(" ", 1)[-1]
    return line[:140]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="cases to run")
    parser.add_argument("--start", type=int, default=0, help="first seed")
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="seconds any step may take on the workers"
    )
    parser.add_argument("--output", type=Path, default=RESULTS / "fuzz.json")
    parser.add_argument("--failures", type=Path, default=FAILURES, help="where reproducers are written")
    parser.add_argument("--quiet", action="store_true", help="no line per case")
    parser.add_argument(
        "--features", default="all",
        help="generator extensions, comma-separated (inplace,custom,symbolic,deep), 'all' or 'none'",
    )  # fmt: skip
    args = parser.parse_args(argv)
    os.environ.setdefault("SHARDWISE_THREADS_PER_WORKER", "1")

    from shardwise.testing.differential import STATUSES, Fuzzer, save_reproducer
    from shardwise.testing.fuzz import FEATURES

    features = {"all": FEATURES, "none": ()}.get(args.features) or tuple(args.features.split(","))

    args.failures.mkdir(parents=True, exist_ok=True)
    seeds = range(args.start, args.start + args.n)
    for seed in seeds:  # reproducers of earlier runs of these seeds (other seed ranges are kept)
        args.failures.joinpath(f"case_{seed}.py").unlink(missing_ok=True)
    counts: collections.Counter[str] = collections.Counter()
    by_mesh: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    by_dtype: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    signatures: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    ops: collections.Counter[str] = collections.Counter()
    results = []
    load = os.getloadavg()[0]
    start = time.perf_counter()
    with Fuzzer(timeout_s=args.timeout, features=features) as fuzzer:
        degrees = fuzzer.degrees
        for seed in seeds:
            case = fuzzer.case(seed)
            result = fuzzer.run(case)
            results.append(result)
            counts[result.status] += 1
            mesh = f"cpu:{case.world_size} " + ",".join(f"{k}={v}" for k, v in case.constraints)
            by_mesh[mesh][result.status] += 1
            by_dtype[case.dtype][result.status] += 1
            ops.update(case.ops)
            if result.status != "ok":
                signatures[result.status][f"{result.stage}: {_signature(result.detail)}"] += 1
            if result.status in ("mismatch", "crash", "invalid"):
                save_reproducer(case, result, args.failures)
            if not args.quiet:
                note = f"  {result.stage}: {_signature(result.detail)}" if result.status != "ok" else ""
                print(f"seed {seed:5d} {mesh:18s} {case.dtype:9s} {result.status:11s} {result.seconds:5.2f}s{note}",
                      flush=True)  # fmt: skip
    elapsed = time.perf_counter() - start

    print()
    print(f"differential fuzzing: {args.n} cases (seeds {args.start}..{args.start + args.n - 1}), "
          f"degrees {', '.join(degrees)}, features {', '.join(features) or 'none'}, {elapsed:.0f} s "
          f"({elapsed / max(args.n, 1):.2f} s per case, load {load:.1f} at the start)")  # fmt: skip
    print()
    header = f"{'':24s}" + "".join(f"{s:>12s}" for s in ("tried",) + STATUSES)
    print(header)
    print("-" * len(header))

    def row(name: str, c: collections.Counter[str]) -> None:
        print(f"{name:24s}{sum(c.values()):12d}" + "".join(f"{c[s]:12d}" for s in STATUSES))

    row("all cases", counts)
    for mesh in sorted(by_mesh):
        row(mesh, by_mesh[mesh])
    for dtype in sorted(by_dtype):
        row(dtype, by_dtype[dtype])
    print()
    print(f"cases tried: {args.n}   mismatches: {counts['mismatch']}   crashes: {counts['crash']}   "
          f"unsupported (clear errors): {counts['unsupported']}   invalid (generator bugs): {counts['invalid']}")  # fmt: skip
    for status in ("mismatch", "crash", "invalid", "unsupported"):
        if signatures[status]:
            print(f"\n{status}:")
            for sig, n in signatures[status].most_common(12):
                print(f"  {n:4d}  {sig}")
    if counts["mismatch"] + counts["crash"] + counts["invalid"]:
        print(f"\nreproducers: {args.failures}/case_<seed>.py (run one with python)")

    args.output.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "bench": "fuzz",
        "cases": args.n,
        "first_seed": args.start,
        "last_seed": args.start + args.n - 1,
        "degrees": list(degrees or ()),
        "features": list(features),
        "seconds": round(elapsed, 1),
        "load_at_start": round(load, 2),
        "counts": {s: counts[s] for s in STATUSES},
        "by_mesh": {m: dict(c) for m, c in sorted(by_mesh.items())},
        "by_dtype": {d: dict(c) for d, c in sorted(by_dtype.items())},
        "signatures": {s: dict(c.most_common()) for s, c in signatures.items()},
        "ops_generated": dict(ops.most_common()),
        "failures": [r.to_dict() for r in results if r.status in ("mismatch", "crash", "invalid")],
        "machine": {
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "cores": os.cpu_count(),
        },
    }
    tmp = args.output.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
