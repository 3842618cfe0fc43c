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

from collections.abc import Callable, Sequence
from dataclasses import dataclass

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

Action = tuple[str, int, int]


class ScheduleDeadlock(RuntimeError):
    """The action lists wait on each other: no order of execution completes them (a shardwise bug)."""


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


@dataclass(frozen=True)
class SimResult:
    step_s: float
    device_busy_s: tuple[float, ...]  # compute time of each device stage
    device_end_s: tuple[float, ...]  # when each device stage finished its last action
    bubble_s: float  # idle time of the busiest device stage before its last action
    comm_exposed_s: float  # the step's tail spent in gradient reduction and the optimizer


def simulate(
    actions: Sequence[Sequence[Action]],
    forward_s: Sequence[float],
    backward_s: Sequence[float],
    transfer_s: Callable[[int, int], float] | Sequence[float],
    tail_s: Sequence[float] = (),
) -> SimResult:
    """Time ``actions`` (see the module docstring).

    ``forward_s[c]``/``backward_s[c]``: one micro-batch of chunk ``c``; ``transfer_s``: seconds to send
    chunk ``c``'s output to chunk ``c + 1`` (the same time is used for the gradient back), as a function
    ``(c, microbatch)`` or a sequence by chunk; ``tail_s[p]``: gradient reduction plus optimizer of device ``p``.
    """
    pp = len(actions)
    chunks = len(forward_s)
    xfer = transfer_s if callable(transfer_s) else (lambda c, _i, t=transfer_s: t[c] if c < len(t) else 0.0)
    f_done: dict[tuple[int, int], float] = {}
    b_done: dict[tuple[int, int], float] = {}
    pos = [0] * pp
    free = [0.0] * pp
    busy = [0.0] * pp
    remaining = sum(len(a) for a in actions)
    while remaining:
        progressed = False
        for p in range(pp):
            while pos[p] < len(actions[p]):
                kind, c, i = actions[p][pos[p]]
                if kind == "F":
                    if c == 0:
                        ready = 0.0
                    elif (c - 1, i) in f_done:
                        ready = f_done[(c - 1, i)] + (xfer(c - 1, i) if (c - 1) % pp != c % pp else 0.0)
                    else:
                        break
                    dur = forward_s[c]
                else:
                    if (c, i) not in f_done:
                        break
                    if c == chunks - 1:
                        ready = f_done[(c, i)]
                    elif (c + 1, i) in b_done:
                        ready = max(
                            f_done[(c, i)],
                            b_done[(c + 1, i)] + (xfer(c, i) if (c + 1) % pp != c % pp else 0.0),
                        )
                    else:
                        break
                    dur = backward_s[c]
                start = max(free[p], ready)
                end = start + dur
                (f_done if kind == "F" else b_done)[(c, i)] = end
                free[p] = end
                busy[p] += dur
                pos[p] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = {p: actions[p][pos[p]] for p in range(pp) if pos[p] < len(actions[p])}
            raise ScheduleDeadlock(f"pipeline schedule deadlocks: next actions {stuck}")
    tails = [tail_s[p] if p < len(tail_s) else 0.0 for p in range(pp)]
    ends = [free[p] + tails[p] for p in range(pp)]
    step = max(ends) if ends else 0.0
    worst = max(range(pp), key=lambda p: busy[p]) if pp else 0
    bubble = free[worst] - busy[worst] if pp else 0.0
    exposed = step - max(free) if pp else 0.0
    return SimResult(step, tuple(busy), tuple(free), bubble, exposed)


def analytic_step(
    pp: int,
    virtual: int,
    microbatches: int,
    device_work_s: Sequence[float],
    chunk_work_s: Sequence[float],
    transfer_s: float,
    tail_s: Sequence[float],
) -> float:
    """A closed-form estimate of :func:`simulate` for ranking many candidates: the busiest device's work over
    all micro-batches, plus the fill-and-drain bubble of ``pp - 1`` chunk steps (``/ virtual`` when
    interleaved: each step is a chunk, ``1/virtual`` of a device's work) and its transfers."""
    m = microbatches
    busiest = max(device_work_s) if device_work_s else 0.0
    bubble = (pp - 1) * (max(chunk_work_s) + 2 * transfer_s) if pp > 1 else 0.0
    return m * busiest + bubble + (max(tail_s) if tail_s else 0.0)
