"""Collectives on plain tensors over one mesh axis (no autograd): gather, split, reduce, reduce-scatter,
exchange. ``collectives`` wraps them for autograd.

Each call returns when the collective is done and its input and output tensors are free again. A call
given ``schedule="<name>"`` runs the plan's topology-aware schedule of that name (a point-to-point program
in the package's ``_schedules.json``, run by ``schedule_exec``) instead of the backend's algorithm, where
the program can move the tensor (it cuts buffers into equal chunks); the result is the same.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from .mesh import Mesh, join, piece_sizes, pieces
from .schedule_exec import run_collective

__all__ = [
    "SCHEDULES_FILE",
    "exchange",
    "gather",
    "let_go",
    "reduce",
    "reduce_scatter",
    "run",
    "schedule_runs",
    "split",
    "use_counts",
]

# the plan's point-to-point programs: beside this library's directory in a generated package
SCHEDULES_FILE = Path(__file__).resolve().parent.parent / "_schedules.json"
_SCHEDULES: dict | None = None


def _program(name: str) -> dict:
    """The point-to-point program of schedule ``name`` (read from ``SCHEDULES_FILE`` once)."""
    global _SCHEDULES
    if _SCHEDULES is None:
        _SCHEDULES = json.loads(SCHEDULES_FILE.read_text())
    return _SCHEDULES[name]


def schedule_runs(schedule: str | None, x: torch.Tensor) -> bool:
    """Whether schedule ``schedule`` (if any) can move ``x``: its program cuts the buffer in equal chunks."""
    return schedule is not None and x.numel() % _program(schedule)["in_chunks"] == 0


def _run_schedule(name: str, flat: torch.Tensor, mesh: Mesh, axis: str, op: str = "sum") -> torch.Tensor:
    """Run schedule ``name`` over the group of ``axis`` on the flat buffer ``flat`` (chunks in rank order)."""
    ranks = mesh.group_ranks[axis]
    return run_collective(_program(name), flat.contiguous(), rank=ranks.index(mesh.rank), ranks=ranks, op=op)


def use_counts(tensors: list[torch.Tensor]) -> list[int] | None:
    """The reference counts of ``tensors`` (for ``let_go``), where this torch exposes them."""
    return [t._use_count() for t in tensors] if hasattr(torch.Tensor, "_use_count") else None


def let_go(tensors: list[torch.Tensor], counts: list[int] | None, group: object) -> None:
    """Return once gloo's worker thread holds none of ``tensors`` (their reference counts are ``counts``
    again; at most 20 ms). The worker drops its references a moment after ``wait()`` returns, but on a busy
    CPU (more threads than cores) that moment can last milliseconds, and a buffer the program has dropped
    meanwhile stays allocated. The memory plan frees each buffer where the program drops it, so yield the
    CPU to the worker (a few microseconds, usually). Other backends are left alone."""
    if counts is None or dist.get_backend(group) != "gloo":
        return
    deadline = time.monotonic() + 0.02
    while any(t._use_count() > c for t, c in zip(tensors, counts)) and time.monotonic() < deadline:
        os.sched_yield()


def run(start, tensors: list[torch.Tensor], group: object) -> None:
    """``start()`` starts a torch.distributed collective over ``group`` on ``tensors`` (``async_op=True``);
    return when it is done and gloo has let go of the tensors (``let_go``)."""
    counts = use_counts(tensors)
    work = start()
    work.wait()
    del work  # the Work holds the tensors until it is dropped
    let_go(tensors, counts, group)


def gather(
    x: torch.Tensor, dim: int, mesh: Mesh, axis: str, size: int | None = None, schedule: str | None = None
) -> torch.Tensor:
    """All-gather along ``dim``; ``size`` is the whole dimension when the pieces are uneven (torch.chunk
    pieces: gloo gathers equal buffers only, so each piece is padded to the first one's size and cut back)."""
    n = mesh.size(axis)
    if size is None and schedule_runs(schedule, x):
        received = _run_schedule(schedule, x.reshape(-1), mesh, axis).view(n, *x.shape)
        return join(list(received.unbind(0)), dim, mesh, axis)
    x, group = x.contiguous(), mesh.group(axis)
    if axis in mesh.paired:  # chunk pairs: received whole, then put in place
        parts = [torch.empty_like(x) for _ in range(n)]
        run(lambda: dist.all_gather(parts, x, group=group, async_op=True), [*parts, x], group)
        return join(parts, dim, mesh, axis)
    if size is None or size == x.shape[dim] * n:  # the pieces are received straight into the result
        out = x.new_empty(x.shape[:dim] + (x.shape[dim] * n,) + x.shape[dim + 1 :])
        slots = list(out.chunk(n, dim=dim))
        run(lambda: dist.all_gather(slots, x, group=group, async_op=True), [*slots, x], group)
        return out
    sizes = piece_sizes(size, n)
    pad = sizes[0] - x.shape[dim]
    if pad:
        x = torch.cat([x, x.new_zeros(x.shape[:dim] + (pad,) + x.shape[dim + 1 :])], dim=dim)
    parts = [torch.empty_like(x) for _ in range(n)]
    run(lambda: dist.all_gather(parts, x, group=group, async_op=True), [*parts, x], group)
    return torch.cat([part.narrow(dim, 0, k) for part, k in zip(parts, sizes)], dim=dim)


def split(x: torch.Tensor, dim: int, mesh: Mesh, axis: str) -> torch.Tensor:
    """This rank's piece of ``x`` along ``dim`` (a copy, no communication; chunk pairs on a paired axis)."""
    return pieces(x, dim, mesh, axis)[mesh.index(axis)].contiguous()


def reduce(x: torch.Tensor, mesh: Mesh, axis: str, op: str, schedule: str | None = None) -> torch.Tensor:
    """All-reduce (``op``: "sum", "avg" or "max") into a new tensor; ``x`` is left as it was."""
    if schedule_runs(schedule, x):
        return _run_schedule(schedule, x.reshape(-1), mesh, axis, op).view(x.shape)
    x = x.contiguous().clone()
    group, reduce_op = mesh.group(axis), dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM
    run(lambda: dist.all_reduce(x, op=reduce_op, group=group, async_op=True), [x], group)
    if op == "avg":
        x = x / mesh.size(axis)
    return x


def reduce_scatter(
    x: torch.Tensor, dim: int, mesh: Mesh, axis: str, op: str, schedule: str | None = None
) -> torch.Tensor:
    """Sum over the axis, keep this rank's piece along ``dim`` (a true reduce-scatter on NCCL; gloo has
    none, so there it is an all-reduce and a slice)."""
    n = mesh.size(axis)
    if x.shape[dim] % n == 0 and schedule_runs(schedule, x):
        cut = pieces(x, dim, mesh, axis)
        flat = torch.cat([piece.reshape(-1) for piece in cut])
        return _run_schedule(schedule, flat, mesh, axis, op).view(cut[0].shape)
    group = mesh.group(axis)
    if op == "sum" and dist.get_backend(group) == "nccl" and x.shape[dim] % n == 0:
        parts = [p.contiguous() for p in pieces(x, dim, mesh, axis)]
        out = torch.empty_like(parts[0])
        dist.reduce_scatter(out, parts, group=group)
        return out
    return split(reduce(x, mesh, axis, op), dim, mesh, axis)


def exchange(
    x: torch.Tensor, src_dim: int, dst_dim: int, mesh: Mesh, axis: str, schedule: str
) -> torch.Tensor:
    """All-to-all by schedule: piece j of ``x`` along ``dst_dim`` goes to rank j; the pieces received are
    joined along ``src_dim`` in rank order."""
    n = mesh.size(axis)
    cut = pieces(x, dst_dim, mesh, axis)
    flat = torch.cat([piece.reshape(-1) for piece in cut])
    received = _run_schedule(schedule, flat, mesh, axis).view(n, *cut[0].shape)
    return join(list(received.unbind(0)), src_dim, mesh, axis)
