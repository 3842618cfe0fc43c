"""The per-rank schedule of one step, for the report's timeline: the price list's events, drawn.

Nothing here computes a time. A flat plan's step is ``costs.step.price_flat``'s events in order (forward op by
op, backward in reverse with recomputation, the exposed gradient reduction, the optimizer step, host offload),
the same on every rank; consecutive pieces of one kind and layer are drawn as one segment. A pipeline plan's
step is ``costs.step.price_pipeline``'s event simulation: each device stage's actions at the times the
simulation ran them (a chunk's forward or backward on one micro-batch, split into compute and the chunk's
collectives as its prices say), the waits between them as bubbles (they include the point-to-point transfers
between stages, which overlap the sender's compute), and each stage's tail (gradient reduction and optimizer
step). The drawn makespan is the plan's predicted step time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shardwise.cli.summary import layer_key
from shardwise.costs.prices import price_list
from shardwise.costs.step import Event, chunk_times, price_flat, price_pipeline
from shardwise.ir.plan import ExecutionPlan

__all__ = ["Segment", "Timeline", "build_timeline", "MAX_RANKS_SHOWN"]

MAX_RANKS_SHOWN = 32
MAX_SEGMENTS = 4000  # per rank before a flat plan's layers are drawn as one compute and one comm segment


@dataclass(frozen=True)
class Segment:
    rank: int
    start_s: float
    duration_s: float
    kind: str  # "compute" | "comm" | "bubble"
    label: str
    microbatch: int  # -1 for work that is not per micro-batch (gradient reduction, idle tail)
    phase: str  # "forward" | "backward" | "recompute" | "gradients" | "optimizer" | "offload" | "idle"


@dataclass
class Timeline:
    ranks: list[int]
    segments: list[Segment]
    makespan_s: float
    micro_batches: int
    stages: int
    schedule: str
    notes: list[str] = field(default_factory=list)

    def totals(self) -> dict[int, dict[str, float]]:
        """Per rank: seconds of compute, communication and bubbles."""
        out: dict[int, dict[str, float]] = {
            r: {"compute": 0.0, "comm": 0.0, "bubble": 0.0} for r in self.ranks
        }
        for s in self.segments:
            out[s.rank][s.kind] += s.duration_s
        return out


def _merged(events: tuple[Event, ...]) -> list[tuple[str, str, str, float]]:
    """(phase, kind, label, seconds): consecutive events of one phase, kind and layer as one piece."""
    out: list[tuple[str, str, str, float]] = []
    for e in events:
        label = layer_key(e.label) if e.node else e.label
        if out and out[-1][:3] == (e.phase, e.kind, label):
            out[-1] = (e.phase, e.kind, label, out[-1][3] + e.seconds)
        else:
            out.append((e.phase, e.kind, label, e.seconds))
    return out


def _coarse(pieces: list[tuple[str, str, str, float]]) -> list[tuple[str, str, str, float]]:
    out: dict[tuple[str, str], float] = {}
    for phase, kind, _, seconds in pieces:
        out[(phase, kind)] = out.get((phase, kind), 0.0) + seconds
    return [(phase, kind, f"{phase} {kind}", s) for (phase, kind), s in out.items()]


def _flat_timeline(plan: ExecutionPlan, cluster: Any) -> Timeline:
    step = price_flat(plan, price_list(cluster, plan.precision))
    pieces = _merged(step.events)
    notes: list[str] = []
    if len(pieces) > MAX_SEGMENTS:
        pieces = _coarse(pieces)
        notes.append("too many ops to draw one by one: each phase's compute and communication are shown whole")
    ranks = list(plan.mesh.ranks)
    if len(ranks) > MAX_RANKS_SHOWN:
        notes.append(f"{len(ranks)} ranks: showing the first {MAX_RANKS_SHOWN} (every rank runs the same step)")
        ranks = ranks[:MAX_RANKS_SHOWN]
    segments = []
    for r in ranks:
        t = 0.0
        for phase, kind, label, seconds in pieces:
            if seconds <= 0:
                continue
            segments.append(Segment(r, t, seconds, kind, label, -1 if phase not in ("forward", "backward") else 0, phase))
            t += seconds
    return Timeline(ranks, segments, step.step_s, 1, 1, "single stage", notes)


def _pipeline_timeline(plan: ExecutionPlan, cluster: Any) -> Timeline:
    spec = plan.pipeline
    assert spec is not None
    prices = price_list(cluster, plan.precision)
    priced = price_pipeline(plan, prices)
    recompute = spec.recompute == "full"
    shares = []  # per chunk: the forward's and the backward's share of collectives
    for st in spec.stages:
        fwd, bwd, cf, cb = chunk_times(st.plan, prices, recompute)
        shares.append((cf / fwd if fwd else 0.0, cb / bwd if bwd else 0.0))

    def label(c: int) -> str:
        units = list(spec.stages[c].units)
        what = units[0] if len(units) == 1 else f"{units[0]} .. {units[-1]}" if units else ""
        return f"chunk {c}: {what}" if what else f"chunk {c}"

    per_device: dict[int, list[Segment]] = {p: [] for p in range(spec.pp)}
    for p, acts in enumerate(spec.actions):
        for (kind, c, i), (start, end) in zip(acts, priced.sim.actions[p], strict=True):
            phase = "forward" if kind == "F" else "backward"
            share = shares[c][0 if kind == "F" else 1]
            dur = end - start
            t = start
            for k, d in (("compute", dur * (1 - share)), ("comm", dur * share)):
                if d > 0:
                    per_device[p].append(Segment(-1, t, d, k, label(c), i, phase))
                    t += d
        tail = priced.tail_s[p]
        if tail > 0:
            per_device[p].append(
                Segment(-1, priced.sim.device_end_s[p], tail, "comm", "gradient reduction and optimizer step", -1,
                        "gradients")  # fmt: skip
            )
    makespan = priced.step.step_s
    if priced.end_s > 0:  # every rank: the loss all-reduce (training) or the outputs' gather (inference)
        train = plan.mode == "train"
        what = "the step's loss all-reduced" if train else "outputs gathered to rank 0"
        for p in range(spec.pp):
            per_device[p].append(Segment(-1, makespan - priced.end_s, priced.end_s, "comm", what, -1,
                                         "gradients" if train else "forward"))  # fmt: skip
    notes = ["waits include the point-to-point transfers between stages (they overlap the sender's compute)"]
    ranks = list(plan.mesh.ranks)[:MAX_RANKS_SHOWN]
    if len(plan.mesh.ranks) > MAX_RANKS_SHOWN:
        notes.append(f"{len(plan.mesh.ranks)} ranks: showing the first {MAX_RANKS_SHOWN}")
    width = max(1, spec.dp * spec.cp * spec.tp)
    rows = {r: per_device.get(min(r // width, spec.pp - 1), []) for r in ranks}
    schedule = spec.schedule + (f" ({spec.virtual} chunks per device)" if spec.virtual > 1 else "")
    return Timeline(ranks, _fill(ranks, rows, makespan), makespan, spec.microbatches, spec.pp, schedule, notes)


def _fill(ranks: list[int], rows: dict[int, list[Segment]], makespan: float) -> list[Segment]:
    """Each rank's segments, with the gaps (and the idle tail) as bubbles."""
    out: list[Segment] = []
    for r in ranks:
        t = 0.0
        for seg in sorted(rows[r], key=lambda s: s.start_s):
            if seg.start_s > t + 1e-15:
                out.append(Segment(r, t, seg.start_s - t, "bubble", "waiting for another stage", seg.microbatch, "idle"))
            out.append(Segment(r, seg.start_s, seg.duration_s, seg.kind, seg.label, seg.microbatch, seg.phase))
            t = seg.start_s + seg.duration_s
        if makespan - t > 1e-15:
            out.append(Segment(r, t, makespan - t, "bubble", "idle until the step ends", -1, "idle"))
    return out


def build_timeline(plan: ExecutionPlan, cluster: Any) -> Timeline:
    """The schedule of one step on every rank (at most MAX_RANKS_SHOWN ranks; see the module docstring);
    ``cluster`` is the plan's ClusterSpec (``cli.planning.resolve_cluster``)."""
    if plan.pipeline is not None:
        return _pipeline_timeline(plan, cluster)
    return _flat_timeline(plan, cluster)
