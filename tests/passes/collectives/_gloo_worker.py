"""Worker for test_gloo_exec: imports only torch and the runtime, so spawned children start fast."""

from __future__ import annotations

import traceback

import torch

WORLD = 16
GROUPS = {16: list(range(16)), 8: list(range(1, 16, 2)), 4: [2, 5, 11, 12]}
ELEMS_PER_CHUNK = 3


def _input(kind: str, prog: dict, local: int) -> torch.Tensor:
    n = prog["in_chunks"] * ELEMS_PER_CHUNK
    return torch.arange(n, dtype=torch.float64) + 10000.0 * (local + 1)


def _reference(kind: str, prog: dict, x: torch.Tensor, group, ranks: list[int]) -> torch.Tensor:
    import torch.distributed as dist

    p = prog["nranks"]
    if kind == "allgather":
        out = torch.empty(p * x.numel(), dtype=x.dtype)
        dist.all_gather_into_tensor(out, x, group=group)
    elif kind == "reduce_scatter":
        out = torch.empty(x.numel() // p, dtype=x.dtype)
        dist.reduce_scatter_tensor(out, x.clone(), group=group)
    elif kind == "allreduce":
        out = x.clone()
        dist.all_reduce(out, group=group)
    elif kind == "alltoall":
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group)
    else:
        out = x.clone()
        dist.broadcast(out, ranks[prog.get("root", 0)], group=group)
    return out


def worker(rank: int, init: str, cases: list, results) -> None:  # noqa: ANN001
    import torch.distributed as dist

    from shardwise.runtime.lib.schedule_exec import run_collective

    try:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
        groups = {size: (dist.new_group(ranks) if size != WORLD else None) for size, ranks in GROUPS.items()}
        failures = []
        for tag, (name, size, prog) in enumerate(cases):
            ranks = GROUPS[size]
            if rank not in ranks:
                continue
            local = ranks.index(rank)
            kind = prog["collective"]
            x = _input(kind, prog, local)
            got = run_collective(prog, x, rank=local, ranks=ranks, tag_base=1000 * tag)
            want = _reference(kind, prog, x, groups[size], ranks)
            if not torch.equal(got, want):
                failures.append(f"{name} rank {rank}: got {got.tolist()[:8]} want {want.tolist()[:8]}")
        dist.barrier()
        results.put((rank, failures))
        dist.destroy_process_group()
    except Exception:  # report instead of hanging the parent
        results.put((rank, [traceback.format_exc()]))
