"""A GPU check: ``python bench/gpu_check.py`` on a machine with CUDA.

For GPT-2 and Llama (zoo configs, ``--size small`` by default), on one GPU and on all local GPUs (nccl):

* compile in bf16 and run the generated program twice: with its fused groups on Triton kernels, and without
  fusion (``fusion=False``, plain PyTorch); inference outputs and the losses of 3 SGD training steps are
  compared with eager PyTorch under bf16 autocast on one GPU, and every run is timed against eager;
* measure what ``shardwise calibrate`` needs to describe this machine: GEMM throughput (bf16 and fp32) and
  copy bandwidth of GPU 0, their efficiency against the device's published peak where the presets know the
  device, and the copy bandwidth between GPU 0 and GPU 1. The plans are made for a cluster built from these
  figures (``local_cluster``).

Writes ``bench/results/gpu_check.json`` and prints a table (``triton``: fused-group calls that ran their
Triton kernel / all fused-group calls of one forward or training step; a call whose inputs are not of the
planned dtypes falls back to the group's eager code, and the row is not ok); exits 1 when a row is not ok. Without CUDA it
says so and exits 0. ``--cpu-interpret`` runs the same steps on CPU processes (gloo) with the Triton kernels
under Triton's interpreter (``TRITON_INTERPRET=1`` is set in the workers before they import triton); that is
what ``tests/bench/test_gpu_check.py`` runs here.

Tolerance (bf16): both sides compute in bf16 (8 significant bits, eps 2**-8), with other kernels and
summation orders, so an output element is close when ``|got - want| <= 1.6e-2 |want| + 1e-2 max|want|``
(torch's bf16 rtol; the absolute term relative to the output's scale); losses within rtol 1.6e-2.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))  # gpu_worker: imported by name in the worker processes too

RTOL, ATOL_SCALE, LOSS_RTOL = 1.6e-2, 1e-2, 1.6e-2
LINK_LATENCY_S = 10e-6  # our choice for GPU-to-GPU messages inside one machine (not measured here)
MODELS = ("gpt2", "llama")


# -- what the machine is ----------------------------------------------------------------------------------


def published_peak(device_name: str) -> tuple[Any, str]:
    """The preset's DeviceSpec (published peak figures) of a CUDA device named ``device_name``, and the name
    of the spec; (None, "") for a device the presets do not describe."""
    from shardwise.cluster import presets

    name = device_name.upper()
    for marker, spec in (("H100", presets.H100_SXM5_80GB), ("A100", presets.A100_SXM4_80GB)):
        if marker in name:
            return spec, spec.kind
    if "V100" in name:
        spec = presets.V100_SXM3_32GB if "SXM3" in name else presets.V100_SXM2_32GB
        return spec, spec.kind
    return None, ""


def _best_rate(run, work: float, device: Any, min_seconds: float) -> float:
    """Best rate (work per second) of ``run()`` over repetitions lasting ``min_seconds`` in all."""
    import torch

    def sync() -> None:
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)

    run()
    sync()
    best, start, reps = 0.0, time.perf_counter(), 0
    while reps < 3 or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        run()
        sync()
        dt = time.perf_counter() - t0
        best = max(best, work / dt) if dt > 0 else best
        reps += 1
    return best


def measure_gemm(device: Any, dtype: str, n: int, min_seconds: float) -> float:
    """FLOP/s of an ``n x n`` by ``n x n`` matmul in ``dtype`` on ``device`` (best of the repetitions)."""
    import torch

    a = torch.randn(n, n, device=device).to(getattr(torch, dtype))
    b = torch.randn(n, n, device=device).to(getattr(torch, dtype))
    out = torch.empty(n, n, device=device, dtype=a.dtype)
    return _best_rate(lambda: torch.mm(a, b, out=out), 2.0 * n**3, device, min_seconds)


def measure_copy(src_device: Any, dst_device: Any, nbytes: int, min_seconds: float) -> float:
    """Bytes/s of copying ``nbytes`` from one device to another (the same one: read + write bytes count)."""
    import torch

    src = torch.ones(nbytes // 4, device=src_device)
    dst = torch.empty(nbytes // 4, device=dst_device)
    same = torch.device(src_device) == torch.device(dst_device)
    return _best_rate(lambda: dst.copy_(src), (2.0 if same else 1.0) * nbytes, dst_device, min_seconds)


def calibration(device: Any, device_name: str, devices: int, quick: bool) -> dict:
    """GEMM and copy figures of ``device`` (and the peer copy to a second GPU), with efficiencies against
    the published peak where it is known."""
    spec, source = published_peak(device_name)
    n, nbytes, seconds = (256, 16 * 2**20, 0.05) if quick else (8192, 2**30, 0.5)
    out: dict[str, Any] = {"device": device_name, "peak_source": source or None, "gemm": {}}
    peaks = dict(spec.peak_flops) if spec is not None else {}
    for dtype in ("bfloat16", "float32"):
        rate = measure_gemm(device, dtype, n, seconds)
        peak = peaks.get(dtype)
        out["gemm"][dtype] = {
            "tflops": rate / 1e12, "peak_tflops": peak / 1e12 if peak else None,
            "efficiency": rate / peak if peak else None, "n": n,
        }  # fmt: skip
    bandwidth = measure_copy(device, device, nbytes, seconds)
    peak_bw = spec.memory_bandwidth if spec is not None else None
    out["memory"] = {
        "gbps": bandwidth / 1e9, "peak_gbps": peak_bw / 1e9 if peak_bw else None,
        "efficiency": bandwidth / peak_bw if peak_bw else None, "bytes": nbytes,
    }  # fmt: skip
    out["peer_copy_gbps"] = None
    if devices > 1 and str(device).startswith("cuda"):
        out["peer_copy_gbps"] = measure_copy("cuda:0", "cuda:1", nbytes, seconds) / 1e9
    return out


def local_cluster(n: int, device_name: str, memory_bytes: int, measured: dict) -> Any:
    """One node of ``n`` local GPUs: the published peaks when the presets know the device, else the measured
    GEMM and copy rates; GPUs joined by one switch at the measured peer copy bandwidth (PCIe x16 when not
    measured) and ``LINK_LATENCY_S``."""
    from shardwise.cluster.presets import PCIE4_X16
    from shardwise.cluster.spec import ClusterSpec, DeviceSpec, SwitchSpec

    spec, _ = published_peak(device_name)
    if spec is not None:
        peak_flops, bandwidth = spec.peak_flops, spec.memory_bandwidth
    else:
        peak_flops = tuple((d, g["tflops"] * 1e12) for d, g in measured["gemm"].items())
        bandwidth = measured["memory"]["gbps"] * 1e9
    link = (measured.get("peer_copy_gbps") or PCIE4_X16 / 1e9) * 1e9
    kind = re.sub(r"[^A-Za-z0-9._-]+", "-", device_name).strip("-") or "gpu"
    return ClusterSpec(
        name=f"local-{kind}x{n}".lower(),
        num_nodes=1,
        devices_per_node=n,
        device=DeviceSpec(kind=kind, peak_flops=peak_flops, memory_bytes=memory_bytes, memory_bandwidth=bandwidth),
        links=(),
        switches=(
            SwitchSpec(name="n0.local", kind="nvswitch" if link > 100e9 else "pcie", port_bandwidth=link,
                       latency=LINK_LATENCY_S, members=tuple(f"g{r}" for r in range(n))),
        ),  # fmt: skip
        nics=(),
        host_memory_bytes=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        host_link_bandwidth=PCIE4_X16,
    )


# -- the checks -----------------------------------------------------------------------------------------------


def _loss(out):
    return out.logits.float().sin().mean()


def compare(got, want) -> dict:
    """How close ``got`` is to ``want`` under the bf16 tolerance of the module docstring."""
    import torch

    got, want = got.float().cpu(), want.float().cpu()
    if got.shape != want.shape:
        return {"close": False, "max_abs_err": None, "rel_err": None, "why": f"shape {tuple(got.shape)}"}
    scale = want.abs().max().item()
    err = (got - want).abs()
    close = bool((err <= RTOL * want.abs() + ATOL_SCALE * scale).all()) and bool(torch.isfinite(got).all())
    return {"close": close, "max_abs_err": err.max().item(), "rel_err": err.max().item() / max(scale, 1e-30)}


def eager_reference(model, inputs, device: Any, repeats: int, steps: int, bf16: bool = True) -> dict:
    """Eager PyTorch on one device (under bf16 autocast when ``bf16``): the first output, its time (ms,
    median), and the losses of ``steps`` SGD steps from the same weights."""
    import torch

    dev = torch.device(device)
    net = copy.deepcopy(model).to(dev)
    args = tuple(x.to(dev) if isinstance(x, torch.Tensor) else x for x in inputs)

    def forward():
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            return net(*args)

    out = forward()
    ms = []
    for _ in range(repeats):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        forward()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        ms.append((time.perf_counter() - t0) * 1e3)
    net.train()
    sgd = torch.optim.SGD(net.parameters(), lr=0.1)
    losses = []
    for _ in range(steps):
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            loss = _loss(net(*args))
        loss.backward()
        sgd.step()
        sgd.zero_grad()
        losses.append(loss.item())
    logits = out.logits if hasattr(out, "logits") else out
    return {"output": logits.float().cpu(), "ms": statistics.median(ms), "losses": losses}


def check_model(pool, name: str, n: int, cluster: Any, args: argparse.Namespace, device: Any, work: Path) -> list:
    """Rows of one model on ``pool`` (``n`` processes): inference and training, fused and not."""
    import torch

    import shardwise
    from shardwise.runtime import WorkerFault
    from shardwise.zoo import build_model

    model, inputs = build_model(name, args.size)
    ref = eager_reference(model, inputs, device, args.repeats, args.steps, args.precision == "bf16")
    sgd = functools.partial(torch.optim.SGD, lr=0.1)
    rows = []
    for mode in [m for m in args.modes.split(",") if m]:
        for fusion in (True, False):
            with shardwise.compile(
                model, cluster, example_inputs=inputs, mode=mode, precision=args.precision, fusion=fusion,
                loss_fn=_loss if mode == "train" else None, optimizer=sgd,
            ) as cm:  # fmt: skip
                plan = cm.plan
                package = cm.save(work / f"{name}-{n}-{mode}-{'fused' if fusion else 'plain'}")
            row = {
                "model": name, "size": args.size, "processes": n, "mode": mode, "fusion": fusion,
                "degrees": plan.degrees, "fused_groups": len(plan.fused_groups),
                "eager_ms": ref["ms"] if mode == "inference" else None,
            }  # fmt: skip
            try:
                got = _run(pool, package, mode, inputs, args, sgd)
            except WorkerFault as fault:  # a program that fails is a result too: the row says why
                row.update(ok=False, error=str(fault).splitlines()[0], program_ms=None, triton_launches=0,
                           groups_on_triton=0, group_calls=0)  # fmt: skip
                rows.append(row)
                continue
            if mode == "inference":
                check = compare(got["output"], ref["output"])
            else:
                close = all(
                    abs(a - b) <= LOSS_RTOL * abs(b) + 1e-6 for a, b in zip(got["losses"], ref["losses"], strict=True)
                )
                check = {"close": close, "losses": got["losses"], "eager_losses": ref["losses"]}
            # with fusion every fused-group call ran its Triton kernel (none fell back to eager code); without
            # fusion nothing ran on Triton
            if fusion and plan.fused_groups:
                watched = got["group_calls"] > 0
                kernels_ok = got["groups_on_triton"] == got["group_calls"] if watched else got["triton_launches"] > 0
            else:
                kernels_ok = got["triton_launches"] == 0
            row.update(check)
            row.update(
                program_ms=statistics.median(got["ms"]), triton_launches=got["triton_launches"],
                groups_on_triton=got["groups_on_triton"], group_calls=got["group_calls"], kernels_ok=kernels_ok,
                ok=bool(check["close"] and kernels_ok),
            )  # fmt: skip
            rows.append(row)
    return rows


def _run(pool, package: Path, mode: str, inputs: tuple, args: argparse.Namespace, sgd) -> dict:
    """Load ``package`` on the pool and run it (the worker-side steps of ``gpu_worker``)."""
    import gpu_worker

    pool.load(package, init="load_weights", init_kwargs={"path": str(package / "model.safetensors")})
    if mode == "inference":
        return pool.call_function(gpu_worker.infer_timed, inputs, args.repeats, ranks="rank0")
    pool.call("configure_optimizer", sgd)
    return pool.call_function(gpu_worker.train_timed, inputs, args.steps, ranks="rank0")


def _table(rows: list[dict]) -> str:
    head = f"{'model':6s} {'n':>2s} {'mode':9s} {'fusion':6s} {'degrees':22s} {'groups':>6s} {'triton':>7s} "
    head += f"{'rel err':>9s} {'ms':>9s} {'eager ms':>9s} ok"
    lines = [head]
    for r in rows:
        if r.get("error"):
            lines.append(f"{r['model']:6s} {r['processes']:>2d} {r['mode']:9s} {'on' if r['fusion'] else 'off':6s} "
                         f"failed: {r['error'][:80]}")  # fmt: skip
            continue
        degrees = ",".join(f"{k}={v}" for k, v in r["degrees"].items())
        err = f"{r['rel_err']:.2e}" if r.get("rel_err") is not None else "losses"
        eager = f"{r['eager_ms']:.3f}" if r["eager_ms"] is not None else "-"
        triton = f"{r['groups_on_triton']}/{r['group_calls']}" if r["group_calls"] else str(r["triton_launches"])
        lines.append(
            f"{r['model']:6s} {r['processes']:>2d} {r['mode']:9s} {'on' if r['fusion'] else 'off':6s} "
            f"{degrees:22s} {r['fused_groups']:>6d} {triton:>7s} {err:>9s} {r['program_ms']:>9.3f} "
            f"{eager:>9s} {'yes' if r['ok'] else 'NO'}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--size", default="small", help="zoo size (tiny, small, base)")
    parser.add_argument("--repeats", type=int, default=20, help="timed forward calls per run")
    parser.add_argument("--steps", type=int, default=3, help="training steps per run")
    parser.add_argument("--modes", default="inference,train", help="inference, train or both")
    parser.add_argument("--precision", default="bf16", help="bf16 (the check) or fp32 (the same steps)")
    parser.add_argument("--cpu-interpret", action="store_true", help="CPU processes, Triton interpreter")
    parser.add_argument("--processes", default="", help="process counts (default: 1 and every local GPU)")
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu_check.json")
    args = parser.parse_args(argv)
    import torch

    cuda = torch.cuda.is_available() and not args.cpu_interpret
    if not cuda and not args.cpu_interpret:
        print("gpu_check: this machine has no CUDA device, so there is no GPU to check (nothing was run). "
              "Run it on a machine with GPUs; --cpu-interpret runs its CPU parts here.")  # fmt: skip
        return 0
    from shardwise.runtime import WorkerPool

    available = torch.cuda.device_count() if cuda else 2
    counts = sorted({int(c) for c in args.processes.split(",") if c} or {1, available})
    device = "cuda:0" if cuda else "cpu"
    device_name = torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu"
    measured = calibration(device, device_name, available, quick=not cuda)
    memory = torch.cuda.get_device_properties(0).total_memory if cuda else 0
    # the Triton kernels run everywhere: compiled on CUDA, interpreted on CPU tensors (set before import)
    env = {"SHARDWISE_KERNELS": "triton"} if cuda else {"SHARDWISE_KERNELS": "triton", "TRITON_INTERPRET": "1"}
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        for n in counts:
            cluster = local_cluster(n, device_name, memory, measured) if cuda else f"cpu:{n}"
            with WorkerPool(n, backend="nccl" if cuda else "gloo", env=env, timeout_s=900) as pool:
                for name in [m for m in args.models.split(",") if m]:
                    rows += check_model(pool, name, n, cluster, args, device, Path(tmp))
    print(json.dumps({"calibration": measured}, indent=1))
    print(_table(rows))
    result = {
        "precision": args.precision,
        "machine": {
            "cuda": cuda, "device": device_name, "devices": available, "torch": torch.__version__,
            "triton": _version("triton"), "load": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        },
        "calibration": measured,
        "rows": [{k: v for k, v in r.items() if k != "output"} for r in rows],
        "ok": all(r["ok"] for r in rows),
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0 if result["ok"] else 1


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    raise SystemExit(main())
