"""Tiers applied to one rank's buffers, and the host-link traffic they cause, laid on the step's layers.

Works on the step's buffers *after* a recompute choice (``passes.remat.peak.recompute_buffers``, whose
``Timeline`` maps the memory pass's steps onto the step with reruns inserted). Segments: ``-1`` the ops
before the first layer, ``0..n-1`` the layers (``passes.remat.layer_segments``), ``n`` the ops after the
last (head, loss). With ``tiers``:

* optimizer on the host: the ``opt:`` buffers and the optimizer's scratch leave the device; a gradient the
  optimizer reads whole (not ZeRO's flattened slice) is copied to the host after the gradient reduction,
  so its device buffer ends there. Host: the state, the fp32 master parameters and gradients.
* parameters on the host (a trainable parameter read by the ops of one layer only; none under ZeRO-3):
  its device buffer lives from the start of the previous segment's forward (prefetched one layer ahead)
  to the end of its layer's forward, and again from the backward of the next segment (or its rerun) to
  the end of its own layer's backward.
* activations on the host (layers not recomputed): a buffer the layer's forward makes (activations, masks,
  collective outputs) that is still live after the forward stays on the device until its last forward use
  or the end of the next segment's forward (the copy out overlaps it), leaves, and comes back at the start
  of the next segment's backward (one segment ahead of its own); unchanged when the two pieces would meet.

Traffic: bytes per (phase, segment, direction) whose compute hides them (see ``cost``): a layer's
parameters come in during the previous segment's forward (and, streamed, during the next segment's
backward), its gradients go out during the previous segment's backward, its activations go out during the
next segment's forward and come back during the next segment's backward. Tensors outside the layers move
in the ``("step", -2, ...)`` slot, which no compute hides. Guarantees: buffer ids stay unique, every buffer
has ``end > start``; with no tier on the host the buffers are returned unchanged.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field

from shardwise.ir.registry import tensor_operands
from shardwise.passes.memory.buffers import Buffer
from shardwise.passes.memory.program import buffer_kind
from shardwise.passes.offload.tiers import Tiers
from shardwise.passes.remat.build import RankStep
from shardwise.passes.remat.peak import Timeline

__all__ = ["Offloaded", "offload_buffers", "layer_params"]

_MADE_BY_OPS = ("act", "mask", "coll")
H2D, D2H = "h2d", "d2h"
EXPOSED = ("step", -2)


@dataclass
class Offloaded:
    """The rewritten buffers, the host bytes, and the host-link bytes per (phase, segment, direction)."""

    buffers: list[Buffer]
    host_bytes: int = 0
    host_optimizer_bytes: int = 0  # host DRAM traffic of one optimizer step
    traffic: dict[tuple[str, int, str], int] = field(default_factory=dict)
    streamed: tuple[str, ...] = ()
    offloaded_units: tuple[str, ...] = ()

    def move(self, phase: str, segment: int, direction: str, nbytes: int) -> None:
        key = (phase, segment, direction)
        self.traffic[key] = self.traffic.get(key, 0) + nbytes

    @property
    def transfer_bytes(self) -> int:
        return sum(self.traffic.values())


def layer_params(step: RankStep, units: Sequence[tuple[str, int, int]]) -> dict[str, int]:
    """state_dict key -> the layer (unit index) whose ops alone read the parameter; other parameters
    (embeddings, head, tied or shared weights) are absent."""
    names = {p.name: p.key for p in step.graph.params}
    owner: dict[str, int] = {}
    unit_of = [-1] * len(step.graph.nodes)
    for i, (_, s, e) in enumerate(units):
        for k in range(s, e):
            unit_of[k] = i
    for k, node in enumerate(step.graph.nodes):
        for v in tensor_operands(node):
            if v in names:
                key = names[v]
                owner[key] = unit_of[k] if owner.get(key, unit_of[k]) == unit_of[k] else -1
    return {k: u for k, u in owner.items() if u >= 0}


def offload_buffers(
    step: RankStep,
    units: Sequence[tuple[str, int, int]],
    ranges: Sequence[tuple[int, int]],
    buffers: Sequence[Buffer],
    tiers: Tiers,
    *,
    zero_stage: int = 0,
) -> Offloaded:
    """``buffers`` (the step with ``ranges`` recomputed) with ``tiers`` applied (see the module docstring)."""
    out = Offloaded(list(buffers))
    if not tiers.any:
        return out
    n = len(step.graph.nodes)
    tl = Timeline(n, ranges)
    recomputed = {(s, e) for s, e in ranges}
    starts = [s for _, s, _ in units]
    stops = [e for _, _, e in units]

    def seg_start(j: int) -> int:  # forward start of segment j (-1 head .. len(units) tail)
        return 0 if j < 0 else (starts[j] if j < len(units) else stops[-1])

    def seg_stop(j: int) -> int:
        return starts[0] if j < 0 else (stops[j] if j < len(units) else n)

    def backward_begin(j: int) -> int:  # first step of segment j's backward (its rerun when recomputed)
        first = tl.map(2 * n - (seg_stop(j) - 1))
        if 0 <= j < len(units) and (starts[j], stops[j]) in recomputed:
            first -= stops[j] - starts[j]
        return first

    by_id = {b.id: b for b in out.buffers}
    owner = layer_params(step, units)
    trainable = {b.id.split(":", 1)[1] for b in buffers if buffer_kind(b.id) == "grad"}
    param_size = {b.id.split(":", 1)[1]: b.size for b in buffers if buffer_kind(b.id) == "param"}
    streamed: set[str] = set()
    if tiers.parameters and zero_stage < 3:
        streamed = {k for k in trainable if k in owner and f"param:{k}" in by_id}
    rewritten: list[Buffer] = []
    if tiers.optimizer:
        whole = {b.id.split(":", 1)[1] for b in buffers if b.id.startswith("opt:") and not b.id.startswith("opt:zero-")}
        reduce_end = tl.map(2 * n + 1) + 1
        for b in out.buffers:
            kind = buffer_kind(b.id)
            if kind == "opt":
                out.host_bytes += b.size
                out.host_optimizer_bytes += 2 * b.size  # read and written once
                continue
            if b.id == "scratch:optimizer":
                continue
            key = b.id.split(":", 1)[1]
            if kind == "grad" and key in whole:
                out.host_bytes += b.size + param_size.get(key, b.size)  # the gradient and the fp32 master
                out.host_optimizer_bytes += b.size + 2 * param_size.get(key, b.size)
                unit = owner.get(key)
                slot = ("bwd", unit - 1) if unit is not None else EXPOSED
                out.move(*slot, D2H, b.size)
                if key not in streamed:  # streamed parameters come in ahead of their layer anyway
                    slot = ("fwd", unit - 1) if unit is not None else EXPOSED
                    out.move(*slot, H2D, param_size.get(key, b.size))
                b = Buffer(b.id, b.start, max(b.start + 1, min(b.end, reduce_end)), b.size)
            if b.id == "zero:chunk-grad":  # ZeRO: this rank's slice goes out, its updated master comes back
                out.host_bytes += b.size
                out.host_optimizer_bytes += b.size
                out.move(*EXPOSED, D2H, b.size)
                out.move(*EXPOSED, H2D, b.size)
            rewritten.append(b)
        out.buffers = rewritten
    if streamed:
        rewritten = []
        for b in out.buffers:
            key = b.id.split(":", 1)[1]
            if buffer_kind(b.id) != "param" or key not in streamed:
                rewritten.append(b)
                continue
            i = owner[key]
            fwd = Buffer(b.id, seg_start(i - 1), seg_stop(i), b.size)
            bwd = Buffer(f"{b.id}#backward", backward_begin(i + 1), tl.map(2 * n - starts[i]) + 1, b.size)
            rewritten += [fwd, bwd]
            out.move("fwd", i - 1, H2D, b.size)
            out.move("bwd", i + 1, H2D, b.size)
        out.buffers = rewritten
        out.streamed = tuple(sorted(streamed))
    if tiers.activations:
        fwd_end = {b.id: b.end for b in step.inference}
        made = {b.id: b.start for b in step.train if buffer_kind(b.id) in _MADE_BY_OPS}
        moved_units: list[str] = []
        rewritten = []
        for b in out.buffers:
            j = _unit_of(made.get(b.id, -1), starts, stops)
            if j is None or (starts[j], stops[j]) in recomputed or b.end <= n + 1:
                rewritten.append(b)
                continue
            first_end = min(b.end, max(fwd_end.get(b.id, b.start + 1), seg_stop(j + 1)))
            again = backward_begin(j + 1)
            if again <= first_end:
                rewritten.append(b)
                continue
            rewritten += [Buffer(b.id, b.start, first_end, b.size), Buffer(f"{b.id}#host", again, b.end, b.size)]
            out.host_bytes += b.size
            out.move("fwd", j + 1, D2H, b.size)
            out.move("bwd", j + 1, H2D, b.size)
            if units[j][0] not in moved_units:
                moved_units.append(units[j][0])
        out.buffers = rewritten
        out.offloaded_units = tuple(moved_units)
    return out


def _unit_of(step: int, starts: Sequence[int], stops: Sequence[int]) -> int | None:
    j = bisect.bisect_right(starts, step) - 1
    return j if j >= 0 and step < stops[j] else None
