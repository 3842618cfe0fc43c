"""A recompute choice applied to one rank's buffers (``passes.memory.program.step_buffers``): the buffers of
the step as the generated program runs it with ``torch.utils.checkpoint`` (non-reentrant) on some ranges of
forward ops, and so its peak by the memory pass's own counting.

For a recomputed range of ops ``[s, e)`` (N ops in the graph; forward op k at step k, its backward at
``2N - k``; see ``program.StepSchedule``):

* ``e - s`` recompute steps are inserted just before the range's first backward step ``2N - (e - 1)``: op
  ``s + j`` reruns at the ``j``-th of them (checkpoint reruns the range when the backward first needs one of
  its saved tensors);
* a buffer the range makes (activations, dropout masks, collective outputs) and no op after the range
  reads is live in the forward only until its last forward use (as in inference); if the backward needs it,
  its recomputed copy lives from its recompute step to its old end; if not, the copy lives from its
  recompute step to its last use in the rerun (transients of the recomputation);
* buffers read after the range (its outputs) are kept as before; the range's inputs stay live until the
  range's backward is done (checkpoint holds them);
* every other buffer keeps its lifetime, moved onto the longer timeline.

Requires the step's buffers for training and for inference of the same plan (the latter gives each
activation's last forward use). Guarantees: with no ranges, the buffers are unchanged.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence

from shardwise.ir.graph import Graph
from shardwise.ir.registry import tensor_operands
from shardwise.passes.memory.buffers import Buffer, lower_bound
from shardwise.passes.memory.program import buffer_kind

__all__ = ["recompute_buffers", "recompute_peak", "Timeline"]

_MADE_BY_OPS = ("act", "mask", "coll")


class Timeline:
    """Old step -> step on the timeline with recompute steps inserted, and where each range reruns."""

    def __init__(self, nodes: int, ranges: Sequence[tuple[int, int]]) -> None:
        self.nodes = nodes
        inserts = sorted((2 * nodes - (e - 1), e - s) for s, e in ranges)  # (before old step, how many)
        self._at = [a for a, _ in inserts]
        self._cum: list[int] = []
        total = 0
        for _, n in inserts:
            total += n
            self._cum.append(total)

    def map(self, step: int) -> int:
        """Where old step ``step`` lands (the inserted steps come before the step they precede)."""
        i = bisect.bisect_right(self._at, step)
        return step + (self._cum[i - 1] if i else 0)

    def map_end(self, end: int) -> int:
        """Where an exclusive end lands: one past its last live step (a buffer dead before a rerun stays
        dead during it; one live on both sides of it is live through it)."""
        return self.map(end - 1) + 1

    def rerun(self, start: int, stop: int, k: int) -> int:
        """The step at which op ``k`` of the range ``[start, stop)`` reruns."""
        first_backward = self.map(2 * self.nodes - (stop - 1))
        return first_backward - (stop - start) + (k - start)


def _storage_of(graph: Graph, ids: set[str]) -> dict[str, str]:
    """Value name -> the id of the buffer holding it (views resolve to their base), where one exists."""
    out: dict[str, str] = {}
    for i in graph.inputs:
        for sid in (f"act:{i.name}", f"input:{i.name}"):
            if sid in ids:
                out[i.name] = sid
                break
    for n in graph.nodes:
        if f"act:{n.name}" in ids:
            out[n.name] = f"act:{n.name}"
            continue
        operands = tensor_operands(n)
        if operands and operands[0] in out:
            out[n.name] = out[operands[0]]  # a view (or getitem of a split) shares its operand's storage
    return out


def recompute_buffers(
    graph: Graph, train: Sequence[Buffer], inference: Sequence[Buffer], ranges: Sequence[tuple[int, int]]
) -> list[Buffer]:
    """The step's buffers with the op ranges ``ranges`` (``[start, stop)`` node indices, disjoint) recomputed
    (see the module docstring)."""
    n = len(graph.nodes)
    ranges = sorted(ranges)
    for (a, b), (c, _) in zip(ranges, ranges[1:]):
        if c < b:
            raise ValueError(f"recompute ranges {a}:{b} and overlap the next one at {c}")
    if not ranges:
        return list(train)
    tl = Timeline(n, ranges)
    fwd_end: Mapping[str, int] = {b.id: b.end for b in inference}
    starts = [s for s, _ in ranges]
    storage = _storage_of(graph, {b.id for b in train})
    # a range's inputs: storages made before it that its ops read; held until its backward is done
    made_at = {b.id: b.start for b in train if buffer_kind(b.id) in _MADE_BY_OPS}
    inputs = {f"act:{i.name}" for i in graph.inputs}
    held: dict[str, int] = {}
    for s, e in ranges:
        done = tl.map(2 * n - s) + 1
        for k in range(s, e):
            for v in tensor_operands(graph.nodes[k]):
                sid = storage.get(v)
                if sid is not None and not (sid in made_at and sid not in inputs and s <= made_at[sid] < e):
                    held[sid] = max(held.get(sid, 0), done)
    out: list[Buffer] = []
    for b in train:
        start, end = tl.map(b.start), tl.map_end(b.end)
        if b.id in held:
            end = max(end, held[b.id])
        r = bisect.bisect_right(starts, b.start) - 1
        s, e = ranges[r] if r >= 0 else (0, 0)
        inside = r >= 0 and s <= b.start < e and b.id in made_at and b.id not in inputs
        last_fwd = fwd_end.get(b.id, b.start + 1)
        if not inside or last_fwd > e:  # not made by a recomputed op, or read after the range: kept
            out.append(Buffer(b.id, start, end, b.size))
            continue
        forward_end = min(b.end, last_fwd)
        out.append(Buffer(b.id, start, tl.map_end(forward_end), b.size))
        again = tl.rerun(s, e, b.start)
        if b.end > forward_end:  # the backward reads it: the recomputed copy lives until then
            out.append(Buffer(f"re{b.id}", again, end, b.size))
        else:  # only the rerun's later ops read it
            out.append(Buffer(f"re{b.id}", again, tl.rerun(s, e, forward_end - 1) + 1, b.size))
    return out


def recompute_peak(
    graph: Graph, train: Sequence[Buffer], inference: Sequence[Buffer], ranges: Sequence[tuple[int, int]]
) -> int:
    """The lower bound (largest live total) of the step's buffers with ``ranges`` recomputed; the memory
    pass's arena reaches it on every zoo model (docs/memory.md)."""
    return lower_bound(recompute_buffers(graph, train, inference, ranges))
