"""Collective synthesis against baselines and lower bounds: ``python bench/collectives.py``.

For every cluster x collective x size (defaults: NDv2 x2/x4, DGX-2 x1/x2, DGX-A100 x2/x4, DGX-H100 x4;
allgather, reduce-scatter, allreduce, alltoall; 1 KB to 1 GB) it runs ``synth_table`` (CP-SAT searches +
baselines, every schedule verified), prints the table and writes bench/results/collectives.json with every
row and a summary of the goals. Which figures are which (``legend`` in the JSON, ``[sim]`` / ``[closed]`` /
``[pub]`` in the table):

* simulated (predicted by the synthesizer's simulator, every message priced by the price list,
  ``costs.comm.message_s`` at ``route_alpha_beta``'s figures, contention included): the synthesized
  schedule and the baselines run as schedules;
* closed form: the price list's library prices (``costs.comm.CommPrices.algorithms``: ring, NCCL's tree and
  PAT where the library offers them) and the lower bound;
* published: TACCL's measured figures for 2 x NDv2 (allgather, TACCL's link profile): 1 GB output 53.8 ms,
  1 MB 62.2 us.

Goals in the summary:

* never slower than the best baseline (``speedup >= 1``), and how often a search (not a baseline) won; also
  compared with the library's closed-form price;
* the published TACCL figures: at or below each, and within 15% of it;
* within 15% of the lower bound at >= 64 MB;
* synthesis time (wall and, since the machine may be shared, as measured here) per case, with the machine's
  load average at the start and the end of the run.

Results are cached (``$SHARDWISE_CACHE_DIR``); ``--no-cache`` recomputes everything. Synthesis times in a
cached row are those of the run that computed it.
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

CLUSTERS = ("ndv2x2", "ndv2x4", "dgx2x1", "dgx2x2", "dgx-a100x2", "dgx-a100x4", "dgx-h100x4")
COLLECTIVES = ("allgather", "reduce_scatter", "allreduce", "alltoall")
KB, MB, GB = 2**10, 2**20, 2**30
SIZES = (KB, 64 * KB, 512 * KB, MB, 2 * MB, 8 * MB, 16 * MB, 64 * MB, 256 * MB, GB)
#: published measurements (us) and where they come from
PUBLISHED = {
    ("ndv2x2", "allgather", GB): (53.8e3, "TACCL (NSDI'23), 2 x NDv2, allgather, 1 GB output"),
    ("ndv2x2", "allgather", MB): (62.2, "TACCL (NSDI'23), 2 x NDv2, allgather, 1 MB output"),
}
#: the goal for a published figure: within this fraction of it
PUBLISHED_WITHIN = 0.15
LEGEND = {
    "synthesized_us": "simulated: the synthesizer's schedule, every message priced by the price list "
    "(costs.comm.message_s at route_alpha_beta's figures), contention included",
    "baselines": "simulated: baseline algorithms (library rings and trees, rhd, hierarchical, ...) as schedules "
    "under the same simulator",
    "library_closed_form_us": "closed form: the price list's library prices (costs.comm.CommPrices.algorithms: "
    "ring, NCCL tree, PAT), the library's per-call overhead included",
    "lower_bound_us": "closed form: the lower bound at the same figures (passes.collectives.bounds)",
    "published_us": "published: a measured figure, with its source",
}


def _parse_size(text: str) -> int:
    t = text.strip().upper()
    for unit, f in (("GB", GB), ("MB", MB), ("KB", KB), ("B", 1)):
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * f)
    return int(t)


def summarize(rows: list[dict], wall_s: float) -> dict:
    """The goals, checked over ``rows`` (see the module docstring)."""
    slower = [r for r in rows if r["speedup"] < 1 - 1e-9]
    big = [r for r in rows if r["size_bytes"] >= 64 * MB]
    far = [r for r in big if r["bound_ratio"] > 1.15]
    searched = [r for r in rows if not r["source"].startswith("baseline")]
    published = []
    for r in rows:
        if r.get("published_us") is not None:
            ref = r["published_us"]
            published.append({"case": f"{r['cluster']} {r['collective']} {r['size_bytes']}B", "published_us": ref,
                              "source": r["published_source"], "ours_us_simulated": r["synthesized_us"],
                              "bound_us": r["lower_bound_us"], "ratio": r["synthesized_us"] / ref,
                              "at_or_below": r["synthesized_us"] <= ref,
                              "within_15pct": abs(r["synthesized_us"] / ref - 1) <= PUBLISHED_WITHIN})  # fmt: skip
    closed = [r for r in rows if r.get("library_closed_form_us")]
    slower_closed = [
        r for r in closed if r["synthesized_us"] > min(r["library_closed_form_us"].values()) + 1e-6
    ]
    computed = [r for r in rows if not r["cached"]]
    return {
        "cases": len(rows),
        "bench_wall_s": wall_s,
        "never_slower_than_best_baseline": not slower,
        "slower_cases": [f"{r['cluster']} {r['collective']} {r['size_bytes']}" for r in slower],
        "never_slower_than_library_closed_form": not slower_closed,
        "slower_than_library_closed_form": [
            f"{r['cluster']} {r['collective']} {r['size_bytes']}: {r['synthesized_us']:.1f} us simulated vs "
            f"{min(r['library_closed_form_us'].values()):.1f} us closed form"
            for r in slower_closed
        ],
        "search_won": len(searched),
        "baseline_kept": len(rows) - len(searched),
        "within_15pct_of_bound_at_64MB_plus": f"{len(big) - len(far)}/{len(big)}",
        "far_from_bound": [
            f"{r['cluster']} {r['collective']} {r['size_bytes'] // MB}MB: {r['bound_ratio']:.3f}" for r in far
        ],
        "published_reference": published,
        "max_synthesis_s": max((r["synthesis_s"] for r in rows), default=0.0),
        "max_synthesis_cpu_s": max((r["synthesis_cpu_s"] for r in rows), default=0.0),
        "over_60s_wall": [
            f"{r['cluster']} {r['collective']} {r['size_bytes']}: {r['synthesis_s']:.0f}s"
            for r in rows
            if r["synthesis_s"] > 60
        ],
        "over_60s_cpu": [
            f"{r['cluster']} {r['collective']} {r['size_bytes']}: {r['synthesis_cpu_s']:.0f}s"
            for r in rows
            if r["synthesis_cpu_s"] > 60
        ],
        "computed_this_run": len(computed),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_at_end": os.getloadavg()},
        "legend": LEGEND,
    }


def annotate(rows: list[dict]) -> list[dict]:
    """Each row with its published figure (``published_us``, ``published_source``; None when there is none)."""
    out = []
    for r in rows:
        ref = PUBLISHED.get((r["cluster"], r["collective"], r["size_bytes"]))
        out.append(
            {**r, "published_us": ref[0] if ref else None, "published_source": ref[1] if ref else None}
        )
    return out


def _size(n: int) -> str:
    for unit, f in (("GB", GB), ("MB", MB), ("KB", KB)):
        if n >= f and n % f == 0:
            return f"{n // f}{unit}"
    return f"{n}B"


def table(rows: list[dict]) -> str:
    """The rows as text; every time column says what it is: [sim] simulated, [closed] closed form, [pub]
    published."""
    head = (
        f"{'collective':<15}{'size':>7}{'synth us [sim]':>16}{'best baseline [sim]':>28}"
        f"{'library [closed]':>24}{'bound [closed]':>16}{'/bound':>7}{'[pub] us':>10}{'synth s':>8}  source"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        bb = r["best_baseline"]
        base = f"{bb} {r['baselines'].get(bb, float('nan')):.1f}" if bb != "-" else "-"
        lib = r.get("library_closed_form_us") or {}
        name = min(lib, key=lib.get) if lib else "-"
        libtxt = f"{name} {lib[name]:.1f}" if lib else "-"
        pub = f"{r['published_us']:.1f}" if r.get("published_us") is not None else "-"
        lines.append(
            f"{r['collective']:<15}{_size(r['size_bytes']):>7}{r['synthesized_us']:>16.1f}{base:>28}{libtxt:>24}"
            f"{r['lower_bound_us']:>16.1f}{r['bound_ratio']:>7.3f}{pub:>10}{r['synthesis_s']:>8.1f}  {r['source']}"
        )
    return "\n".join(lines)


def merge(paths: list[str], out: str) -> int:
    """Join the rows of several partial runs (e.g. clusters run side by side) and check the goals."""
    rows: list[dict] = []
    wall = 0.0
    for path in paths:
        part = json.loads(Path(path).read_text())
        rows.extend(part["rows"])
        wall = max(wall, part["summary"]["bench_wall_s"])
    summary = summarize(rows, wall)
    summary["merged_from"] = [Path(p).name for p in paths]
    print(json.dumps(summary, indent=1))
    Path(out).write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    return 0


def from_cache(
    dirs: list[str], clusters: list[str], collectives: list[str], sizes: list[int], out: str
) -> int:
    """Rows of the cases that runs sharing these cache directories (``$SHARDWISE_CACHE_DIR``) completed, as
    one table: for a bench split over processes, or stopped before the end (the summary lists what is
    missing). Only this bench's clusters, collectives and sizes are taken."""
    from shardwise.passes.collectives.api import CACHE_VERSION, table_row

    found: dict[tuple[str, str, int], dict] = {}
    for d in dirs:
        for path in sorted((Path(d) / "collectives").glob("*.json")):
            rec = json.loads(path.read_text())
            key = (rec.get("cluster"), rec.get("collective"), rec.get("size_bytes"))
            if rec.get("version") == CACHE_VERSION and key[0] in clusters and key[1] in collectives:
                found.setdefault(key, {**rec, "cached": False})
    rows, missing = [], []
    for cluster in clusters:
        for coll in collectives:
            part = annotate(
                [table_row(found[(cluster, coll, n)]) for n in sizes if (cluster, coll, n) in found]
            )
            missing += [f"{cluster} {coll} {n}" for n in sizes if (cluster, coll, n) not in found]
            if part:
                print(f"\n== {cluster} {coll}")
                print(table(part))
            rows.extend(part)
    summary = summarize(rows, 0.0)
    summary["complete"] = not missing
    summary["missing_cases"] = missing
    print("\n== summary")
    print(json.dumps(summary, indent=1))
    Path(out).write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clusters", default=",".join(CLUSTERS))
    ap.add_argument("--collectives", default=",".join(COLLECTIVES))
    ap.add_argument("--sizes", default=",".join(f"{s // KB}KB" for s in SIZES))
    ap.add_argument("--time-limit", type=float, default=10.0, help="solver budget per case (deterministic s)")
    ap.add_argument("--no-cache", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "collectives.json"))
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="join partial runs' JSON files into --out")
    ap.add_argument("--from-cache", nargs="+", metavar="DIR", help="tabulate what runs cached in these dirs")
    args = ap.parse_args()
    if args.merge:
        return merge(args.merge, args.out)
    sizes = [_parse_size(s) for s in args.sizes.split(",")]
    if args.from_cache:
        clusters, colls = args.clusters.split(","), args.collectives.split(",")
        return from_cache(args.from_cache, clusters, colls, sizes, args.out)

    from shardwise.passes.collectives import synth_table

    cache = "off" if args.no_cache else "auto"
    rows = []
    load_at_start = os.getloadavg()
    t0 = time.perf_counter()
    for cluster in args.clusters.split(","):
        for coll in args.collectives.split(","):
            t = time.perf_counter()
            part = annotate(synth_table(cluster, coll, sizes, time_limit_s=args.time_limit, cache=cache))
            print(f"\n== {cluster} {coll} ({time.perf_counter() - t:.1f}s, load {os.getloadavg()[0]:.2f})")
            print(table(part), flush=True)
            rows.extend(part)
    total = time.perf_counter() - t0
    summary = summarize(rows, total)
    summary["machine"]["load_at_start"] = load_at_start
    print("\n== summary")
    print(json.dumps(summary, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
