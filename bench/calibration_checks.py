"""Does ``shardwise calibrate`` measure what a 2-worker program sees? Same-run checks of its probes:
``python bench/calibration_checks.py``.

Two gloo processes with one intra-op thread each (the runtime's budget on 2 cores), as ``calibrate`` and a
``cpu:2`` program run. Each check is an A/B pair measured in the same run, interleaved round by round, so that
the machine's load affects both sides alike; the load average is recorded with the results:

* **clock**: calibrate's compute probes (per-op dispatch of tiny ops, a 256x256 matmul, ``a + b`` on 128 KiB
  vectors) in samples of about 1 ms, each sample read on both the thread's CPU clock (``time.thread_time``,
  what calibrate uses with one thread) and the wall clock (``time.perf_counter``);
* **alone / pair**: the same probes with rank 0 measuring alone (rank 1 blocked in a barrier) and with both
  ranks measuring at once (as calibrate does, and as a 2-worker program runs);
* **hot / after a stream**: tiny ops (calibrate's per-op probe) repeated back to back, as calibrate times
  them, against each one run right after ``a + b`` streamed as many bytes as the core's private (L2) cache
  holds, as in a program, where every op follows a kernel on real tensors (the stream's own time, measured
  alone in the same round, is subtracted);
* **collective**: the runtime library's all-reduce (``shardwise.runtime.lib.comm.reduce``) timed right after a
  barrier (as calibrate times it) and right after ~0.6 ms of matmuls on both ranks (as a program reaches its
  collectives; the time of the all-reduce alone is counted).

Each figure is given as the least and the median over its samples: calibrate keeps the least (the machine
undisturbed). Writes bench/results/calibration_checks.json.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
ROUNDS, SAMPLES, SAMPLE_S = 4, 15, 1e-3
COLLECTIVE_BYTES = (4096, 65536, 2**20)


def _both_clocks(fn, samples: int) -> tuple[list[float], list[float]]:
    """Seconds per call of ``fn`` in ``samples`` samples of about SAMPLE_S, on the wall and the thread's CPU clock."""
    fn()
    start = time.perf_counter()
    fn()
    calls = max(1, min(2000, int(SAMPLE_S / max(time.perf_counter() - start, 1e-7))))
    wall, cpu = [], []
    for _ in range(samples):
        w0, c0 = time.perf_counter(), time.thread_time()
        for _ in range(calls):
            fn()
        c1, w1 = time.thread_time(), time.perf_counter()
        wall.append((w1 - w0) / calls)
        cpu.append((c1 - c0) / calls)
    return wall, cpu


def _probes() -> dict[str, tuple[list[float], list[float]]]:
    import torch

    from shardwise.cluster.calibrate import _KERNEL_OPS, _kernel_ops

    x, w, emb = torch.rand(4, 4) + 0.5, torch.randn(4, 4), torch.randn(4, 4)
    idx, mask = torch.tensor([0, 1]), torch.rand(4, 4) > 0.5
    with torch.no_grad():
        wall, cpu = _both_clocks(lambda: _kernel_ops(x, w, idx, emb, mask), SAMPLES)
    out = {"dispatch per op": ([t / _KERNEL_OPS for t in wall], [t / _KERNEL_OPS for t in cpu])}
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    out["matmul 256"] = _both_clocks(lambda: torch.mm(a, b), SAMPLES)
    u, v = torch.rand(2**15), torch.rand(2**15)
    out["a + b 128 KiB"] = _both_clocks(lambda: u + v, SAMPLES)
    return out


def _private_cache_bytes() -> int:
    """The size of CPU 0's L2 cache (Linux sysfs; 1 MiB when unknown)."""
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index2/size").read_text().strip().upper()
        return int(text[:-1]) * 1024 if text.endswith("K") else int(text)
    except (OSError, ValueError):
        return 2**20


def _tiny_ops() -> list:
    import torch
    import torch.nn.functional as F

    x, w = torch.rand(4, 4) + 0.5, torch.randn(4, 4)
    return [lambda: x + w, lambda: x * 0.5, lambda: torch.tanh(x), lambda: torch.softmax(x, -1),
            lambda: torch.matmul(x, w), lambda: x.sum(-1), lambda: torch.rsqrt(x), lambda: F.gelu(x),
            lambda: torch.exp(x), lambda: torch.cat([x, w])]  # fmt: skip


def _cold_ops() -> dict[str, float]:
    """Per-op seconds (least of samples, thread CPU clock) of tiny ops back to back and right after a stream."""
    import torch

    ops = _tiny_ops()
    numel = _private_cache_bytes() // 12
    a, b, c = torch.rand(numel), torch.rand(numel), torch.empty(numel)

    def stream() -> None:
        torch.add(a, b, out=c)

    def interleaved() -> None:
        for f in ops:
            stream()
            f()

    def least(fn, calls: int) -> float:  # noqa: ANN001
        fn()
        times = []
        for _ in range(SAMPLES):
            start = time.thread_time()
            for _ in range(calls):
                fn()
            times.append((time.thread_time() - start) / calls)
        return min(times)

    with torch.no_grad():
        hot = least(lambda: [f() for f in ops], 20) / len(ops)
        alone = least(stream, 20)
        after = (least(interleaved, 5) - len(ops) * alone) / len(ops)
    return {"hot": hot, "after stream": after, "stream": alone}


def _worker(rank: int, port: int, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    from shardwise.runtime.lib import comm
    from shardwise.runtime.lib.mesh import Mesh

    mesh = Mesh(rank, (2,), ("x",), (0, 1))
    result: dict = {"alone": [], "pair": [], "collective": {}}
    a, b = torch.randn(192, 192), torch.randn(192, 192)

    def compute() -> None:
        for _ in range(4):
            torch.mm(a, b)

    for _ in range(ROUNDS):
        dist.barrier()
        if rank == 0:
            result["alone"].append(_probes())
        dist.barrier()
        result["pair"].append(_probes())
        result.setdefault("cold", []).append(_cold_ops())
        for nbytes in COLLECTIVE_BYTES:
            buf = torch.zeros(1, nbytes // 64, 16)
            comm.reduce(buf, mesh, "x", "sum")
            after_barrier, after_compute = [], []
            for _ in range(SAMPLES):
                dist.barrier()
                start = time.perf_counter()
                comm.reduce(buf, mesh, "x", "sum")
                after_barrier.append(time.perf_counter() - start)
                dist.barrier()
                compute()
                start = time.perf_counter()
                comm.reduce(buf, mesh, "x", "sum")
                after_compute.append(time.perf_counter() - start)
            got = result["collective"].setdefault(str(nbytes), {"after barrier": [], "after compute": []})
            got["after barrier"] += after_barrier
            got["after compute"] += after_compute
    dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


def _stats(xs: list[float]) -> dict[str, float]:
    return {"min": min(xs), "median": statistics.median(xs)}


def main() -> int:
    import tempfile

    import torch.multiprocessing as mp

    from shardwise.runtime.process_group import find_free_port

    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="calibration-checks-") as tmp:
        mp.spawn(_worker, args=(find_free_port(), tmp), nprocs=2, join=True)
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(2)]
    load_end = os.getloadavg()[0]
    table = []
    for probe in ranks[0]["pair"][0]:
        row = {"probe": probe}
        for setting, rank in (("alone", 0), ("pair", 0), ("pair", 1)):
            rounds = ranks[rank][setting]
            wall = [t for r in rounds for t in r[probe][0]]
            cpu = [t for r in rounds for t in r[probe][1]]
            row[f"{setting} rank {rank}"] = {"wall": _stats(wall), "cpu": _stats(cpu)}
        table.append(row)
    collectives = {
        nbytes: {
            kind: _stats(ranks[0]["collective"][nbytes][kind]) for kind in ("after barrier", "after compute")
        }
        for nbytes in ranks[0]["collective"]
    }
    cold = {
        kind: _stats([r[kind] for rank in ranks for r in rank["cold"]]) for kind in ("hot", "after stream")
    }
    print(f"load average {load_start:.2f} at the start, {load_end:.2f} at the end")
    print(
        f"{'probe':16} {'setting':14} {'cpu min':>10} {'wall min':>10} {'cpu med':>10} {'wall med':>10}  (us)"
    )
    for row in table:
        for setting in ("alone rank 0", "pair rank 0", "pair rank 1"):
            f = row[setting]
            print(f"{row['probe']:16} {setting:14} {f['cpu']['min'] * 1e6:>10.3f} {f['wall']['min'] * 1e6:>10.3f} "
                  f"{f['cpu']['median'] * 1e6:>10.3f} {f['wall']['median'] * 1e6:>10.3f}")  # fmt: skip
    print(f"tiny op, per op (both ranks): hot {cold['hot']['min'] * 1e6:.2f} us (median {cold['hot']['median'] * 1e6:.2f}), "
          f"right after a {_private_cache_bytes() // 1024} KiB stream {cold['after stream']['min'] * 1e6:.2f} us "
          f"(median {cold['after stream']['median'] * 1e6:.2f})")  # fmt: skip
    print(f"{'all-reduce':16} {'when':14} {'min us':>10} {'median us':>10}")
    for nbytes, kinds in collectives.items():
        for kind, f in kinds.items():
            print(f"{nbytes + ' B':16} {kind:14} {f['min'] * 1e6:>10.1f} {f['median'] * 1e6:>10.1f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "calibration_checks.json"
    out.write_text(json.dumps({"load_average": {"start": load_start, "end": load_end}, "rounds": ROUNDS,
                               "samples": SAMPLES, "probes": table, "tiny_ops": cold, "stream_bytes": _private_cache_bytes(),
                               "collectives": collectives}, indent=1))  # fmt: skip
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
