"""Training-step time of shardwise's generated programs against what a user would write: ``python bench/runtime.py``.

A small GPT-2 (4 layers, hidden 256, 4 heads, vocabulary 50257, batch 8 x 128 tokens, next-token cross
entropy, AdamW) is trained on 2 local CPU processes (gloo, one intra-op thread each) by

- shardwise dp=2 and shardwise tp=2 (``shardwise.compile(..., constraints=...)``, ``cm.train_step``: the
  time includes handing the batch to the worker pool);
- torch DDP (``DistributedDataParallel``, half the batch per process);
- DTensor tensor parallelism (``parallelize_module``: q/k/v and the first MLP projection column-parallel,
  attention output and second MLP projection row-parallel, the LM head column-parallel with a vocab-parallel
  loss, as torchtitan does);

and by one eager process using both cores. All five train the same model (the module below, in plain
nn.Linear layers so that DTensor's parallel styles apply) from the same weights. Steps are timed after
warm-up; the table shows the median step time and the speed relative to the eager process, measured in
this run. Goal: shardwise dp=2 no slower than DDP, shardwise tp=2 no slower than DTensor.
Writes bench/results/runtime.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
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
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

# --vocab (default GPT-2's 50257) reaches the spawned workers through the environment
CONFIG = dict(layers=4, hidden=256, heads=4, vocab=int(os.environ.get("RUNTIME_BENCH_VOCAB", "50257")), seq=128, batch=8)
LR = 3e-4


class Block(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.head_dim = hidden // heads
        self.ln_1 = nn.LayerNorm(hidden)
        self.q = nn.Linear(hidden, hidden)
        self.k = nn.Linear(hidden, hidden)
        self.v = nn.Linear(hidden, hidden)
        self.o = nn.Linear(hidden, hidden)
        self.ln_2 = nn.LayerNorm(hidden)
        self.fc = nn.Linear(hidden, 4 * hidden)
        self.proj = nn.Linear(4 * hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h = self.ln_1(x)
        # -1 heads: under DTensor tensor parallelism each rank holds heads / tp of them
        q, k, v = (p(h).view(b, t, -1, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, -1))
        return x + self.proj(F.gelu(self.fc(self.ln_2(x))))


class GPT(nn.Module):
    """GPT-2's architecture in plain nn.Linear layers (untied LM head)."""

    def __init__(self, layers: int, hidden: int, heads: int, vocab: int, seq: int) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, hidden)
        self.wpe = nn.Embedding(seq, hidden)
        self.blocks = nn.ModuleList(Block(hidden, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.wte(ids) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten())


def make_model() -> GPT:
    torch.manual_seed(0)
    c = CONFIG
    return GPT(c["layers"], c["hidden"], c["heads"], c["vocab"], c["seq"])


def make_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, CONFIG["vocab"], (CONFIG["batch"], CONFIG["seq"] + 1), generator=g)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def _timed(step, warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        step()
    out = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        out.append(time.perf_counter() - t)
    return out


# -- eager, one process --------------------------------------------------------------------------------------


def run_eager(warmup: int, steps: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    model = make_model()
    ids, labels = make_batch()
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    losses = []

    def step() -> None:
        loss = model(ids, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())

    times = _timed(step, warmup, steps)
    return {"times": times, "first_loss": losses[0]}


# -- DDP and DTensor, two processes ------------------------------------------------------------------------


def _worker(rank: int, kind: str, port: int, warmup: int, steps: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    model = make_model()
    ids, labels = make_batch()
    losses: list[float] = []
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(model)
        opt = torch.optim.AdamW(ddp.parameters(), lr=LR)
        half = CONFIG["batch"] // 2
        my_ids, my_labels = ids[rank * half : (rank + 1) * half], labels[rank * half : (rank + 1) * half]

        def step() -> None:
            loss = ddp(my_ids, my_labels)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())

    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Replicate, Shard
        from torch.distributed.tensor.parallel import (
            ColwiseParallel,
            RowwiseParallel,
            loss_parallel,
            parallelize_module,
        )

        mesh = init_device_mesh("cpu", (2,))
        plan = {
            "lm_head": ColwiseParallel(
                input_layouts=Replicate(), output_layouts=Shard(-1), use_local_output=False
            )
        }
        for i in range(CONFIG["layers"]):
            for name in ("q", "k", "v", "fc"):
                plan[f"blocks.{i}.{name}"] = ColwiseParallel()
            for name in ("o", "proj"):
                plan[f"blocks.{i}.{name}"] = RowwiseParallel()
        parallelize_module(model, mesh, plan)
        opt = torch.optim.AdamW(model.parameters(), lr=LR)

        def step() -> None:
            with loss_parallel():
                loss = model(ids, labels)
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.full_tensor() if hasattr(loss, "full_tensor") else loss))

    times = _timed(step, warmup, steps)
    if rank == 0:
        Path(out).write_text(json.dumps({"times": times, "first_loss": losses[0]}))
    dist.barrier()
    dist.destroy_process_group()


def run_distributed(kind: str, warmup: int, steps: int) -> dict:
    import torch.multiprocessing as mp

    from shardwise.runtime.process_group import find_free_port

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.spawn(_worker, args=(kind, find_free_port(), warmup, steps, out), nprocs=2, join=True)
        return json.loads(Path(out).read_text())


# -- shardwise ------------------------------------------------------------------------------------------------


def run_shardwise(constraints: dict, warmup: int, steps: int) -> dict:
    import shardwise

    model = make_model()
    ids, labels = make_batch()
    optimizer = functools.partial(torch.optim.AdamW, lr=LR)
    with shardwise.compile(
        model, "cpu:2", example_inputs=(ids, labels), mode="train", loss_fn=lambda loss: loss,
        optimizer=optimizer, constraints=constraints,
    ) as cm:  # fmt: skip
        losses: list[float] = []
        times = _timed(lambda: losses.append(cm.train_step(ids, labels)), warmup, steps)
        collectives = sum(len(s.redistributes) for s in cm.plan.strategies)
        sharded = sum(1 for _, spec in cm.plan.param_placements if not spec.is_replicated)
        return {
            "times": times,
            "first_loss": losses[0],
            "plan": cm.plan.summary(),
            "collectives": collectives,
            "sharded_params": sharded,
            "predicted_step_s": cm.plan.predicted.step_time_s,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--vocab", type=int, default=CONFIG["vocab"],
        help="vocabulary size (50257: GPT-2's; 50304: padded to a multiple of 64, as nanoGPT and Megatron-LM do, "
        "which shardwise needs to split the LM head: it splits dimensions evenly only)",
    )  # fmt: skip
    parser.add_argument("--output", default=str(RESULTS / "runtime.json"))
    args = parser.parse_args()
    os.environ["RUNTIME_BENCH_VOCAB"] = str(args.vocab)
    CONFIG["vocab"] = args.vocab
    cores = os.cpu_count() or 2
    runs: dict[str, dict] = {}
    order = [
        ("eager (1 process, 2 threads)", lambda: run_eager(args.warmup, args.steps, min(2, cores))),
        ("torch DDP (2 processes)", lambda: run_distributed("ddp", args.warmup, args.steps)),
        ("DTensor TP (2 processes)", lambda: run_distributed("dtensor", args.warmup, args.steps)),
        ("shardwise dp=2", lambda: run_shardwise({"dp": 2}, args.warmup, args.steps)),
        ("shardwise tp=2", lambda: run_shardwise({"tp": 2}, args.warmup, args.steps)),
    ]
    for name, fn in order:
        runs[name] = fn()
        runs[name]["median_s"] = statistics.median(runs[name]["times"])
        runs[name]["min_s"] = min(runs[name]["times"])
        print(f"  {name}: median {runs[name]['median_s'] * 1e3:.1f} ms", flush=True)
    eager = runs[order[0][0]]["median_s"]
    print()
    print(f"{'':32} {'median ms':>10} {'min ms':>8} {'x eager speed':>14} {'first loss':>10}")
    for name, r in runs.items():
        print(
            f"{name:32} {r['median_s'] * 1e3:>10.1f} {r['min_s'] * 1e3:>8.1f} {eager / r['median_s']:>14.2f} "
            f"{r['first_loss']:>10.4f}"
        )
    ddp, dtensor = runs["torch DDP (2 processes)"]["median_s"], runs["DTensor TP (2 processes)"]["median_s"]
    sw_dp, sw_tp = runs["shardwise dp=2"]["median_s"], runs["shardwise tp=2"]["median_s"]
    print()
    print(
        f"shardwise dp=2 vs DDP:     {ddp / sw_dp:.2f}x the speed ({'met' if sw_dp <= ddp else 'missed'}: goal >= 1)"
    )
    print(
        f"shardwise tp=2 vs DTensor: {dtensor / sw_tp:.2f}x the speed ({'met' if sw_tp <= dtensor else 'missed'}: goal >= 1)"
    )
    assert all(math.isfinite(r["first_loss"]) for r in runs.values())
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {
        "machine": {"cpus": cores, "python": platform.python_version(), "torch": torch.__version__},
        "config": CONFIG,
        "runs": runs,
    }
    Path(args.output).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
