"""Pipeline schedules (GPipe, 1F1B, interleaved 1F1B) and an event simulator that times them.

A schedule is, for each device stage ``p`` (pipeline rank), the ordered list of its actions
``(kind, chunk, microbatch)`` with ``kind`` ``"F"`` (forward) or ``"B"`` (backward). Chunk ``c`` lives on
device stage ``c % pp``; ``pp * virtual`` chunks in all.

- **GPipe**: all forwards, then all backwards. Every micro-batch's activations are held at once.
- **1F1B** (PipeDream-Flush): device ``p`` runs ``pp - p - 1`` warm-up forwards, then alternates one forward
  and one backward, then drains the backwards; at most ``pp - p`` micro-batches are in flight on ``p``.
- **Interleaved 1F1B** (Narayanan et al., 2021): ``virtual`` chunks per device; forwards visit the device's
  chunks in groups of ``pp`` micro-batches, with ``2 (pp - p - 1) + (virtual - 1) pp`` warm-up forwards;
  the bubble shrinks by ``virtual``. Needs ``microbatches % pp == 0``.

The same lists are emitted into the generated package (its runtime executes them) and timed here.

:func:`simulate` runs the lists as a discrete-event simulation: an action starts when its device is free and
its inputs have arrived (forward of chunk ``c`` needs forward ``c - 1`` of the same micro-batch plus the
point-to-point transfer; backward of ``c`` needs backward ``c + 1`` plus the transfer, and its own forward).
Sends never block the sender, so communication overlaps compute. After its last action each device reduces
its gradients (data-parallel all-reduce, tied weights) and steps the optimizer; the step ends when the last
device is done. A schedule whose lists cannot all complete raises ``ScheduleDeadlock``.
"""

from __future__ import annotations

from collections.abc import Sequence

# the schedules' timing is the price list's (costs.step); re-exported here beside the schedules it times
from shardwise.costs.step import Action, ScheduleDeadlock, SimResult, analytic_step, simulate

__all__ = [
    "Action",
    "ScheduleDeadlock",
    "schedule_actions",
    "in_flight",
    "peak_live",
    "peak_live_count",
    "SimResult",
    "simulate",
    "analytic_step",
]

def _gpipe(pp: int, m: int, train: bool) -> list[list[Action]]:
    out = []
    for p in range(pp):
        acts = [("F", p, i) for i in range(m)]
        if train:
            acts += [("B", p, i) for i in range(m)]
        out.append(acts)
    return out


def _one_f_one_b(pp: int, m: int) -> list[list[Action]]:
    out = []
    for p in range(pp):
        warm = min(pp - p - 1, m)
        acts: list[Action] = [("F", p, i) for i in range(warm)]
        for j in range(m - warm):
            acts.append(("F", p, warm + j))
            acts.append(("B", p, j))
        acts += [("B", p, i) for i in range(m - warm, m)]
        out.append(acts)
    return out


def _interleaved(pp: int, v: int, m: int) -> list[list[Action]]:
    total = m * v

    def which(k: int, forward: bool) -> tuple[int, int]:
        in_group = k % (pp * v)
        local = in_group // pp
        if not forward:
            local = v - 1 - local
        mb = (k // (pp * v)) * pp + in_group % pp
        return local, mb

    out = []
    for p in range(pp):
        warm = min((pp - p - 1) * 2 + (v - 1) * pp, total)
        acts: list[Action] = []
        f = b = 0
        for _ in range(warm):
            local, mb = which(f, True)
            acts.append(("F", local * pp + p, mb))
            f += 1
        while f < total:
            local, mb = which(f, True)
            acts.append(("F", local * pp + p, mb))
            f += 1
            local, mb = which(b, False)
            acts.append(("B", local * pp + p, mb))
            b += 1
        while b < total:
            local, mb = which(b, False)
            acts.append(("B", local * pp + p, mb))
            b += 1
        out.append(acts)
    return out


def schedule_actions(
    schedule: str, pp: int, microbatches: int, virtual: int = 1, *, train: bool = True
) -> list[list[Action]]:
    """The per-device action lists of ``schedule`` (see the module docstring)."""
    if pp < 1 or microbatches < 1 or virtual < 1:
        raise ValueError(f"pp={pp}, microbatches={microbatches}, virtual={virtual}: all must be >= 1")
    if not train or schedule == "gpipe":
        if virtual != 1 and train:
            raise ValueError("GPipe runs one chunk per device stage (virtual=1)")
        if virtual == 1:
            return _gpipe(pp, microbatches, train)
        # forward only, several chunks per device: chunk by chunk, every micro-batch of each
        return [
            [("F", c, i) for c in range(p, pp * virtual, pp) for i in range(microbatches)] for p in range(pp)
        ]
    if schedule == "1f1b":
        if virtual != 1:
            raise ValueError("1F1B runs one chunk per device stage (virtual=1); use 'interleaved'")
        return _one_f_one_b(pp, microbatches)
    if schedule == "interleaved":
        if virtual == 1:
            return _one_f_one_b(pp, microbatches)
        if microbatches % pp:
            raise ValueError(
                f"the interleaved schedule needs the micro-batch count ({microbatches}) to be a multiple of pp={pp}"
            )
        return _interleaved(pp, virtual, microbatches)
    raise ValueError(f"unknown schedule {schedule!r}: use gpipe, 1f1b or interleaved")


def in_flight(actions: Sequence[Sequence[Action]], chunks: int) -> list[int]:
    """Per chunk, the most micro-batches whose forward ran and whose backward has not (activations held)."""
    peak = [0] * chunks
    for acts in actions:
        live = [0] * chunks
        for kind, c, _ in acts:
            live[c] += 1 if kind == "F" else -1
            peak[c] = max(peak[c], live[c])
    return peak


def peak_live(actions: Sequence[Sequence[Action]]) -> list[int]:
    """Per device stage, the most (chunk, micro-batch) activations held at once (forwards whose backward has
    not run yet)."""
    out = []
    for acts in actions:
        live = peak = 0
        for kind, _, _ in acts:
            live += 1 if kind == "F" else -1
            peak = max(peak, live)
        out.append(peak)
    return out


def peak_live_count(schedule: str, pp: int, microbatches: int, virtual: int = 1) -> list[int]:
    """:func:`peak_live` of :func:`schedule_actions` in closed form (training): GPipe holds every micro-batch
    of every chunk; 1F1B ``min(m, pp - p)``; interleaved ``min(m v, 2 (pp - p - 1) + (v - 1) pp + 1)`` (its
    warm-up forwards plus the first steady one)."""
    m, v = microbatches, virtual
    if schedule == "gpipe":
        return [m * v] * pp
    if v == 1:
        return [min(m, pp - p) for p in range(pp)]
    return [min(m * v, 2 * (pp - p - 1) + (v - 1) * pp + 1) for p in range(pp)]


