"""Run a lowered collective schedule (plain data) with torch.distributed point-to-point messages.

The program format is ``shardwise.collective.v1`` (written by the compiler's collective lowering; this
module depends on no compiler layer)::

    {"format": "shardwise.collective.v1", "collective": str, "nranks": p, "in_chunks": int,
     "out_chunks": int, "programs": [{"nslots": k, "inputs": [[in_index, slot], ...],
                                      "outputs": [[slot, out_index], ...],
                                      "steps": [[op, peer, [slot, ...], seq], ...]}, ...], ...}

with ``op`` one of ``"send"``, ``"recv"`` (overwrite) and ``"recv_reduce"`` (combine). Peers are indices
into the group (``ranks``). Semantics, which ``run_collective`` implements with ``isend``/``irecv``:

* each rank runs its steps in order; a send takes a snapshot of its slots when posted (later writes do
  not change what it sends), so sends never block the rank;
* a receive is posted at once and completes before any later step touches one of its slots (and at the
  end); so independent steps overlap, while every step sees the data the program order promises;
* the k-th message from a to b carries tag ``tag_base + k`` and matches the k-th receive from a at b.

Buffers: the input is split into ``in_chunks`` equal chunks and the output into ``out_chunks``; the rank
works in a buffer of ``nslots`` chunks. ``op`` chooses the reduction ("sum", "avg", "max", "min",
"prod"); "avg" sums and divides the outputs of a reduction by the group size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["FORMAT", "check_program", "run_collective", "REDUCE_OPS"]

FORMAT = "shardwise.collective.v1"
REDUCE_OPS = ("sum", "avg", "max", "min", "prod")
_STEP_OPS = ("send", "recv", "recv_reduce")


def check_program(program: Mapping[str, Any]) -> None:
    """ValueError naming the first problem if ``program`` is not a well-formed v1 collective program."""
    if not isinstance(program, Mapping) or program.get("format") != FORMAT:
        raise ValueError(
            f"not a {FORMAT} program (format={program.get('format') if isinstance(program, Mapping) else None!r})"
        )
    p = program.get("nranks")
    progs = program.get("programs")
    if not isinstance(p, int) or p < 1 or not isinstance(progs, list) or len(progs) != p:
        raise ValueError(
            f"program: nranks={p!r} does not match {len(progs) if isinstance(progs, list) else '?'} programs"
        )
    for key in ("in_chunks", "out_chunks"):
        if not isinstance(program.get(key), int) or program[key] < 1:
            raise ValueError(f"program: {key} must be a positive integer, got {program.get(key)!r}")
    for r, pr in enumerate(progs):
        k = pr.get("nslots")
        if not isinstance(k, int) or k < 0:
            raise ValueError(f"rank {r}: nslots must be an integer >= 0")
        for a, b in pr.get("inputs", []):
            if not (0 <= a < program["in_chunks"] and 0 <= b < k):
                raise ValueError(f"rank {r}: input [{a}, {b}] out of range")
        for a, b in pr.get("outputs", []):
            if not (0 <= a < k and 0 <= b < program["out_chunks"]):
                raise ValueError(f"rank {r}: output [{a}, {b}] out of range")
        for i, step in enumerate(pr.get("steps", [])):
            if len(step) != 4 or step[0] not in _STEP_OPS:
                raise ValueError(f"rank {r} step {i}: {step!r} is not [op, peer, slots, seq]")
            _, peer, slots, seq = step
            if not (0 <= peer < p) or peer == r or not slots or any(not 0 <= s < k for s in slots) or seq < 0:
                raise ValueError(f"rank {r} step {i}: {step!r} has a bad peer, slot or sequence number")


def _reducer(op: str):  # noqa: ANN202 - returns a torch in-place binary op
    import torch

    if op in ("sum", "avg"):
        return lambda dst, src: dst.add_(src)
    if op == "max":
        return lambda dst, src: torch.maximum(dst, src, out=dst)
    if op == "min":
        return lambda dst, src: torch.minimum(dst, src, out=dst)
    if op == "prod":
        return lambda dst, src: dst.mul_(src)
    raise ValueError(f"reduce op {op!r} is not supported: use one of {', '.join(REDUCE_OPS)}")


def run_collective(
    program: Mapping[str, Any],
    inp: Any,
    out: Any = None,
    *,
    rank: int | None = None,
    ranks: Sequence[int] | None = None,
    group: Any = None,
    op: str = "sum",
    tag_base: int = 0,
    check: bool = True,
) -> Any:
    """Run this process's part of ``program`` on tensor ``inp``; returns the output tensor.

    ``rank``: this process's index in the program (default: its rank in ``group``); ``ranks``: global
    ranks of the program's indices (default: the group's ranks in order). ``out`` may be given (its
    numel must be ``out_chunks`` chunks) or is allocated like ``inp``.
    """
    import torch
    import torch.distributed as dist

    if check:
        check_program(program)
    reduce = _reducer(op)
    p = program["nranks"]
    if rank is None:
        rank = dist.get_rank(group)
    if ranks is None:
        ranks = [dist.get_global_rank(group, i) if group is not None else i for i in range(p)]
    if len(ranks) != p or not 0 <= rank < p:
        raise ValueError(f"rank {rank} / ranks {list(ranks)} do not fit a program of {p} ranks")
    flat_in = inp.reshape(-1)
    if flat_in.numel() % program["in_chunks"]:
        raise ValueError(
            f"input of {flat_in.numel()} elements does not split into {program['in_chunks']} equal chunks: pad it"
        )
    chunk = flat_in.numel() // program["in_chunks"]
    if out is None:
        out = torch.empty(program["out_chunks"] * chunk, dtype=inp.dtype, device=inp.device)
    flat_out = out.reshape(-1)
    if flat_out.numel() != program["out_chunks"] * chunk:
        raise ValueError(
            f"output has {flat_out.numel()} elements, the program needs {program['out_chunks'] * chunk}"
        )
    me = program["programs"][rank]
    work = torch.empty(me["nslots"] * chunk, dtype=inp.dtype, device=inp.device)

    def view(slot: int) -> Any:
        return work[slot * chunk : (slot + 1) * chunk]

    for k, slot in me["inputs"]:
        view(slot).copy_(flat_in[k * chunk : (k + 1) * chunk])
    pending: dict[int, list[Any]] = {}  # slot -> [handle, buffer, slots, reduce?, done?]
    sends: list[tuple[Any, Any]] = []

    def settle(slot: int) -> None:
        rec = pending.get(slot)
        if rec is None:
            return
        handle, buf, slots, is_reduce = rec[:4]
        handle.wait()
        for i, s in enumerate(slots):
            src = buf[i * chunk : (i + 1) * chunk]
            if is_reduce:
                reduce(view(s), src)
            else:
                view(s).copy_(src)
            pending.pop(s, None)

    for step_op, peer, slots, seq in me["steps"]:
        for s in slots:
            settle(s)
        tag = tag_base + seq
        if step_op == "send":
            buf = torch.cat([view(s) for s in slots]) if len(slots) > 1 else view(slots[0]).clone()
            sends.append((dist.isend(buf, ranks[peer], tag=tag), buf))
        else:
            buf = torch.empty(len(slots) * chunk, dtype=inp.dtype, device=inp.device)
            rec = [dist.irecv(buf, ranks[peer], tag=tag), buf, list(slots), step_op == "recv_reduce"]
            for s in slots:
                pending[s] = rec
    for s in list(pending):
        settle(s)
    for handle, _ in sends:
        handle.wait()
    for slot, k in me["outputs"]:
        flat_out[k * chunk : (k + 1) * chunk].copy_(view(slot))
    if op == "avg" and program["collective"] in ("reduce_scatter", "allreduce"):
        flat_out.div_(p)
    return out
