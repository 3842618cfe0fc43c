"""Operator fusion on the zoo models: ``python bench/fusion.py``.

Per model, for one rank of its cpu:1 plan: kernels launched and bytes moved (reads + writes, rank-local)
without and with fusion, peak live bytes, the groups by kind, and the CPU step time of the generated
unfused and fused programs (inference forward, and a training step), measured in this run, interleaved
(unfused, fused, unfused, ...), fastest call of each. On CPU a fused group runs its ops eagerly (Triton is
for CUDA), so the CPU times show the cost of the dispatch layer, not the kernels' gain: the kernel and byte
counts are what fusion buys on a GPU. Writes bench/results/fusion.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
sys.path.insert(0, str(ROOT.parent))


def _load(plan, directory: Path, key: str, tensors):
    from shardwise.codegen.package import write_package
    from shardwise.runtime.package import build_module, import_package

    package = import_package(write_package(plan, directory / key), f"bench_fusion_{key}")
    program = build_module(package, 0, 1)
    program.load_full_state_dict(tensors)
    return program


def _time(fns: dict, repeat: int) -> dict[str, float]:
    """Fastest and median seconds of each callable, calls interleaved so that load changes hit all alike."""
    for fn in fns.values():  # warm up
        fn()
        fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for key, fn in fns.items():
            t = time.perf_counter()
            fn()
            samples[key].append(time.perf_counter() - t)
    # the minimum: on a shared machine other processes only ever add time
    return {k: min(v) for k, v in samples.items()} | {
        f"{k}_median": statistics.median(v) for k, v in samples.items()
    }


def _model(name: str, repeat: int, workdir: Path) -> dict:
    import torch

    import shardwise
    from shardwise.frontend.trace import model_tensors
    from shardwise.passes.fusion import fusion_stats
    from shardwise.zoo import build_model

    model, inputs = build_model(name)
    t = time.perf_counter()
    cm = shardwise.compile(model, "cpu:1", example_inputs=inputs, fusion=False)
    plan_s = time.perf_counter() - t
    from shardwise.passes.fusion import fuse_plan

    t = time.perf_counter()
    fused_plan = fuse_plan(cm.plan)
    fusion_s = time.perf_counter() - t
    stats = fusion_stats(fused_plan)
    tensors = model_tensors(model)
    programs = {
        "unfused": _load(cm.plan, workdir, f"{name}_unfused", tensors),
        "fused": _load(fused_plan, workdir, f"{name}_fused", tensors),
    }
    with torch.no_grad():
        outs = {k: p.infer(*inputs) for k, p in programs.items()}
    leaves = {
        k: [x for x in torch.utils._pytree.tree_leaves(v) if isinstance(x, torch.Tensor)]
        for k, v in outs.items()
    }
    equal = all(torch.equal(a, b) for a, b in zip(leaves["fused"], leaves["unfused"], strict=True))
    infer = _time({k: (lambda p=p: p.infer(*inputs)) for k, p in programs.items()}, repeat)

    def loss_fn(out):
        first = next(t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor))
        return first.float().pow(2).mean()

    train: dict[str, float | None] = {"unfused": None, "fused": None}
    train_groups = None
    try:
        train_cm = shardwise.compile(
            model, "cpu:1", example_inputs=inputs, mode="train", loss_fn=loss_fn, fusion=False
        )
    except shardwise.errors.ShardwiseError as exc:  # e.g. BatchNorm's in-place statistics in training
        print(f"{name}: no training step ({str(exc).splitlines()[0]})")
    else:
        train_fused = fuse_plan(train_cm.plan)
        train_groups = len(train_fused.fused_groups)
        train_programs = {
            "unfused": _load(train_cm.plan, workdir, f"{name}_train_unfused", tensors),
            "fused": _load(train_fused, workdir, f"{name}_train_fused", tensors),
        }
        for p in train_programs.values():
            p.configure_optimizer(lambda params: torch.optim.SGD(params, lr=0.0))  # lr 0: every step the same
        train = _time({k: (lambda p=p: p.train_step(*inputs)) for k, p in train_programs.items()}, repeat)
    model.eval()
    return {
        "model": name,
        "groups": stats.groups,
        "kinds": dict(Counter(g.kind for g in fused_plan.fused_groups)),
        "fused_ops": stats.fused_ops,
        "kernels_before": stats.kernels_before,
        "kernels_after": stats.kernels_after,
        "bytes_before": stats.bytes_before,
        "bytes_after": stats.bytes_after,
        "peak_before": stats.peak_before,
        "peak_after": stats.peak_after,
        "train_groups": train_groups,
        "outputs_equal": equal,
        "plan_s": plan_s,
        "fusion_pass_s": fusion_s,
        "infer_unfused_s": infer["unfused"],
        "infer_fused_s": infer["fused"],
        "train_unfused_s": train["unfused"],
        "train_fused_s": train["fused"],
        "infer_median_s": {"unfused": infer["unfused_median"], "fused": infer["fused_median"]},
        "train_median_s": {"unfused": train.get("unfused_median"), "fused": train.get("fused_median")},
    }


def _train_cells(r: dict) -> str:
    if r["train_unfused_s"] is None:
        return f"{'-':>14s} {'-':>6s}"
    u, f = r["train_unfused_s"], r["train_fused_s"]
    return f"{u * 1e3:6.2f}/{f * 1e3:<7.2f} {f / u:6.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="gpt2,llama,bert,vit,mlp,convnet")
    parser.add_argument("--repeat", type=int, default=30, help="timed calls of each program")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--output", type=Path, default=RESULTS / "fusion.json")
    args = parser.parse_args(argv)
    os.environ.setdefault("SHARDWISE_KERNELS", "auto")
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-fusion-") as tmp:
        for name in args.models.split(","):
            rows.append(_model(name, args.repeat, Path(tmp)))
    header = (
        f"{'model':8s} {'groups':>6s} {'kernels':>11s} {'bytes moved (KiB)':>19s} {'ratio':>6s} "
        f"{'peak KiB':>11s} {'infer ms u/f':>14s} {'ratio':>6s} {'train ms u/f':>14s} {'ratio':>6s} {'equal':>5s}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['model']:8s} {r['groups']:6d} {r['kernels_before']:5d}->{r['kernels_after']:<4d} "
            f"{r['bytes_before'] / 1024:8.0f}->{r['bytes_after'] / 1024:<8.0f} "
            f"{r['bytes_after'] / r['bytes_before']:6.2f} "
            f"{r['peak_before'] / 1024:5.0f}->{r['peak_after'] / 1024:<5.0f} "
            f"{r['infer_unfused_s'] * 1e3:6.2f}/{r['infer_fused_s'] * 1e3:<7.2f} "
            f"{r['infer_fused_s'] / r['infer_unfused_s']:6.2f} "
            f"{_train_cells(r)} {str(r['outputs_equal']):>5s}"
        )
    kinds = Counter()
    for r in rows:
        kinds.update(r["kinds"])
    print(f"groups by kind: {dict(kinds)}")
    doc = {
        "bench": "fusion",
        "cluster": "cpu:1",
        "repeat": args.repeat,
        "threads": args.threads,
        "timing": "fastest of `repeat` interleaved calls (medians under *_median_s)",
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "load_average": os.getloadavg(),
        },
        "note": "CPU times run each group's eager code (Triton kernels are for CUDA); counts are per rank",
        "models": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
