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
nn.Linear layers so that DTensor's parallel styles apply) from the same weights. The five runs are
interleaved: ``--rounds`` rounds, each running every one of them (the order rotating from round to round:
warm-up steps, then ``--steps`` timed steps; DDP and DTensor start their two processes each round, the
shardwise programs stay on their worker pools), so that drift of the machine's load hits all alike. The
table shows the median step time with its spread (min, quartiles, max) and the speed relative to the eager
process; the load average is recorded at the start, after each round and at the end. Goal: shardwise dp=2
no slower than DDP, shardwise tp=2 no slower than DTensor.
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


class ShardwiseRunner:
    """A compiled program kept on its own worker pool across rounds (compiled once, warmed up each round)."""

    def __init__(self, constraints: dict) -> None:
        import shardwise

        self.ids, self.labels = make_batch()
        optimizer = functools.partial(torch.optim.AdamW, lr=LR)
        self.cm = shardwise.compile(
            make_model(), "cpu:2", example_inputs=(self.ids, self.labels), mode="train", loss_fn=lambda loss: loss,
            optimizer=optimizer, constraints=constraints,
        )  # fmt: skip

    def __call__(self, warmup: int, steps: int) -> dict:
        losses: list[float] = []
        times = _timed(lambda: losses.append(self.cm.train_step(self.ids, self.labels)), warmup, steps)
        plan = self.cm.plan
        return {
            "times": times,
            "first_loss": losses[0],
            "plan": plan.summary(),
            "collectives": sum(len(s.redistributes) for s in plan.strategies),
            "sharded_params": sum(1 for _, spec in plan.param_placements if not spec.is_replicated),
            "predicted_step_s": plan.predicted.step_time_s,
        }

    def close(self) -> None:
        self.cm.close()


def _load() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all five runs (interleaved)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per run and round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per run and round")
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
    loads = {"start": _load(), "rounds": []}
    runners = {"shardwise dp=2": ShardwiseRunner({"dp": 2}), "shardwise tp=2": ShardwiseRunner({"tp": 2})}
    order = [
        ("eager (1 process, 2 threads)", lambda w, s: run_eager(w, s, min(2, cores))),
        ("torch DDP (2 processes)", lambda w, s: run_distributed("ddp", w, s)),
        ("DTensor TP (2 processes)", lambda w, s: run_distributed("dtensor", w, s)),
        ("shardwise dp=2", runners["shardwise dp=2"]),
        ("shardwise tp=2", runners["shardwise tp=2"]),
    ]
    runs: dict[str, dict] = {}
    try:
        # rounds interleave the runs (the order rotates each round), so that drift of the machine's load hits
        # all of them alike
        for r in range(args.rounds):
            for name, fn in order[r % len(order) :] + order[: r % len(order)]:
                result = fn(args.warmup, args.steps)
                if name not in runs:
                    runs[name] = result
                else:
                    runs[name]["times"] += result["times"]
            loads["rounds"].append(_load())
            print(f"  round {r + 1}/{args.rounds} done (load {loads['rounds'][-1]:.2f})", flush=True)
    finally:
        for runner in runners.values():
            runner.close()
    loads["end"] = _load()
    for name, _ in order:
        ts = sorted(runs[name]["times"])
        q = statistics.quantiles(ts, n=4, method="inclusive")
        runs[name].update(median_s=statistics.median(ts), min_s=ts[0], max_s=ts[-1], q1_s=q[0], q3_s=q[2])
    eager = runs[order[0][0]]["median_s"]
    print()
    print(f"load average {loads['start']:.2f} at the start, {loads['end']:.2f} at the end")
    print(f"{'':32} {'median ms':>10} {'min ms':>8} {'q1 ms':>8} {'q3 ms':>8} {'max ms':>8} {'x eager speed':>14} "
          f"{'first loss':>10}")  # fmt: skip
    for name, _ in order:
        r = runs[name]
        print(
            f"{name:32} {r['median_s'] * 1e3:>10.1f} {r['min_s'] * 1e3:>8.1f} {r['q1_s'] * 1e3:>8.1f} "
            f"{r['q3_s'] * 1e3:>8.1f} {r['max_s'] * 1e3:>8.1f} {eager / r['median_s']:>14.2f} {r['first_loss']:>10.4f}"
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
        "settings": {"rounds": args.rounds, "steps": args.steps, "warmup": args.warmup},
        "load_average": loads,
        "runs": runs,
    }
    Path(args.output).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
