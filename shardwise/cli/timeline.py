"""The per-rank schedule of one step, derived from a plan's per-op costs, for the report's timeline.

Each op contributes its ``compute_s`` and each of its redistributions its ``time_s``; consecutive ops of
one layer merge into one compute piece. A micro-batch runs the pieces of its stage divided by the number of
micro-batches; in training a backward pass follows (compute x2, the same collectives, in reverse), then
the gradient reduction. Stages run GPipe (all forwards, then all backwards) or 1F1B when the plan says so;
a stage waits for the previous stage's micro-batch, and the waits are the bubbles. Every rank of a stage
runs the same schedule.

Plans of today have one stage and one micro-batch; stage, micro-batch and schedule fields are read with
``getattr`` so the timeline follows plans that gain them (``NodeStrategy.stage``, ``plan.micro_batches``,
``plan.schedule``). Without per-op stages a pipelined plan's layers are split into stages by compute.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shardwise.cli.summary import FREE_COLLECTIVES, collective_rows, layer_key
from shardwise.ir.plan import ExecutionPlan

__all__ = ["Segment", "Timeline", "build_timeline", "MAX_RANKS_SHOWN"]

MAX_RANKS_SHOWN = 32
MAX_PIECES = 4000  # per stage and micro-batch before layers are coarsened to one compute + one comm piece


@dataclass(frozen=True)
class Segment:
    rank: int
    start_s: float
    duration_s: float
    kind: str  # "compute" | "comm" | "bubble"
    label: str
    microbatch: int  # -1 for work that is not per micro-batch (gradient reduction, idle tail)
    phase: str  # "forward" | "backward" | "gradients" | "idle"


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


@dataclass(frozen=True)
class _Piece:
    kind: str
    label: str
    duration_s: float


def _int_attr(obj: Any, *names: str) -> int | None:
    for name in names:
        value = getattr(obj, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
    return None


def _forward_pieces(plan: ExecutionPlan) -> list[tuple[int | None, str, _Piece]]:
    """(stage or None, layer, piece) in program order, consecutive compute of one layer merged."""
    nodes = {n.name: n for n in plan.graph.nodes}
    out: list[tuple[int | None, str, _Piece]] = []
    for s in plan.strategies:
        node = nodes.get(s.node)
        layer = layer_key(node.module_path) if node is not None else "(outputs)"
        stage = getattr(s, "stage", None)
        stage = stage if isinstance(stage, int) else None
        for r in s.redistributes:
            if r.collective in FREE_COLLECTIVES or not r.time_s:
                continue
            out.append((stage, layer, _Piece("comm", f"{r.collective}@{r.axis} {layer}", float(r.time_s))))
        compute = float(s.compute_s or 0.0)
        if compute <= 0:
            continue
        if out and out[-1][2].kind == "compute" and out[-1][1] == layer and out[-1][0] == stage:
            prev = out[-1]
            out[-1] = (stage, layer, _Piece("compute", layer, prev[2].duration_s + compute))
        else:
            out.append((stage, layer, _Piece("compute", layer, compute)))
    return out


def _assign_stages(items: list[tuple[int | None, str, _Piece]], pp: int) -> tuple[list[list[_Piece]], bool]:
    """Pieces per stage; True when the stages were guessed (split by compute) rather than read."""
    if pp <= 1:
        return [[p for _, _, p in items]], False
    if all(s is not None for s, _, _ in items):
        per: list[list[_Piece]] = [[] for _ in range(max(pp, max(s for s, _, _ in items) + 1))]  # type: ignore[type-var]
        for s, _, p in items:
            per[s].append(p)  # type: ignore[index]
        return per, False
    # runs of one layer stay together; a run goes to the stage its compute midpoint falls in
    runs: list[tuple[str, list[_Piece]]] = []
    for _, layer, p in items:
        if runs and runs[-1][0] == layer:
            runs[-1][1].append(p)
        else:
            runs.append((layer, [p]))
    total = sum(p.duration_s for _, _, p in items if p.kind == "compute") or 1.0
    per = [[] for _ in range(pp)]
    done = 0.0
    for _, pieces in runs:
        work = sum(p.duration_s for p in pieces if p.kind == "compute")
        stage = min(pp - 1, int((done + work / 2) / total * pp))
        per[stage].extend(pieces)
        done += work
    return per, True


def _coarsen(pieces: list[_Piece]) -> list[_Piece]:
    compute = sum(p.duration_s for p in pieces if p.kind == "compute")
    comm = sum(p.duration_s for p in pieces if p.kind == "comm")
    return [_Piece("compute", "all layers", compute)] + (
        [_Piece("comm", "collectives", comm)] if comm else []
    )


def _order(schedule: str, stage: int, stages: int, m: int, train: bool) -> list[tuple[str, int]]:
    if not train:
        return [("F", j) for j in range(m)]
    if "1f1b" in schedule.lower():
        warm = min(stages - stage - 1, m)
        order = [("F", j) for j in range(warm)]
        for i in range(m - warm):
            order += [("F", warm + i), ("B", i)]
        order += [("B", j) for j in range(m - warm, m)]
        return order
    return [("F", j) for j in range(m)] + [("B", j) for j in range(m)]


def _pipeline_timeline(plan: ExecutionPlan, pipe: Any) -> Timeline:
    """A pipelined plan (``plan.pipeline``): each device stage runs its recorded actions; an action takes its
    chunk's predicted forward/backward time per micro-batch, split into compute and communication as the
    chunk's own plan predicts. Forward of chunk c waits for forward of c - 1, backward of c for its forward and
    backward of c + 1 (the planner's simulator rules; point-to-point transfers are not drawn)."""
    chunks = list(pipe.stages)
    n = len(chunks)
    notes = ["point-to-point transfers between stages are not drawn (they overlap compute)"]

    def comm_share(c: int) -> float:
        pred = getattr(getattr(chunks[c], "plan", None), "predicted", None)
        total = float(getattr(pred, "compute_s", 0.0) + getattr(pred, "comm_s", 0.0)) if pred else 0.0
        return float(pred.comm_s) / total if pred is not None and total > 0 else 0.0

    def label(c: int) -> str:
        units = list(getattr(chunks[c], "units", ()) or ())
        what = units[0] if len(units) == 1 else f"{units[0]} .. {units[-1]}" if units else ""
        return f"chunk {c}: {what}" if what else f"chunk {c}"

    per_device: dict[int, list[Segment]] = {p: [] for p in range(len(pipe.actions))}
    f_done: dict[tuple[int, int], float] = {}
    b_done: dict[tuple[int, int], float] = {}
    free = dict.fromkeys(per_device, 0.0)
    pos = dict.fromkeys(per_device, 0)
    remaining = sum(len(a) for a in pipe.actions)
    while remaining:
        progressed = False
        for p, acts in enumerate(pipe.actions):
            while pos[p] < len(acts):
                kind, c, i = acts[pos[p]]
                if kind == "F":
                    if c > 0 and (c - 1, i) not in f_done:
                        break
                    ready = f_done.get((c - 1, i), 0.0)
                    dur = float(chunks[c].forward_s)
                else:
                    if (c, i) not in f_done or (c < n - 1 and (c + 1, i) not in b_done):
                        break
                    ready = max(f_done[(c, i)], b_done.get((c + 1, i), 0.0))
                    dur = float(chunks[c].backward_s)
                t = max(free[p], ready)
                comm = dur * comm_share(c)
                phase = "forward" if kind == "F" else "backward"
                for k, d in (("compute", dur - comm), ("comm", comm)):
                    if d > 0:
                        per_device[p].append(Segment(-1, t, d, k, label(c), i, phase))
                        t += d
                (f_done if kind == "F" else b_done)[(c, i)] = t
                free[p] = t
                pos[p] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            notes.append("the recorded schedule could not be simulated completely")
            break
    makespan = max(free.values(), default=0.0)
    predicted = float(plan.predicted.step_time_s)
    if plan.mode == "train" and predicted > makespan:
        tail = predicted - makespan
        for p in per_device:
            per_device[p].append(
                Segment(-1, free[p], tail, "comm", "gradient reduction and optimizer step", -1, "gradients")
            )
        makespan = max(free[p] + tail for p in per_device)
    ranks = list(plan.mesh.ranks)[:MAX_RANKS_SHOWN]
    if len(plan.mesh.ranks) > MAX_RANKS_SHOWN:
        notes.append(f"{len(plan.mesh.ranks)} ranks: showing the first {MAX_RANKS_SHOWN}")
    width = max(1, int(pipe.dp) * int(pipe.tp))
    rows = {r: per_device.get(min(r // width, len(per_device) - 1), []) for r in ranks}
    if predicted > 0 and abs(makespan - predicted) > 0.02 * predicted:
        notes.append(f"drawn: {makespan * 1e3:.3f} ms; the plan predicts {predicted * 1e3:.3f} ms per step")
    v = int(getattr(pipe, "virtual", 1) or 1)
    schedule = str(pipe.schedule) + (f" ({v} chunks per device)" if v > 1 else "")
    return Timeline(
        ranks, _fill(ranks, rows, makespan), makespan, int(pipe.microbatches), int(pipe.pp), schedule, notes
    )


def _fill(ranks: list[int], rows: dict[int, list[Segment]], makespan: float) -> list[Segment]:
    """Each rank's segments, with the gaps (and the idle tail) as bubbles."""
    out: list[Segment] = []
    for r in ranks:
        t = 0.0
        for seg in sorted(rows[r], key=lambda s: s.start_s):
            if seg.start_s > t + 1e-15:
                out.append(
                    Segment(
                        r, t, seg.start_s - t, "bubble", "waiting for another stage", seg.microbatch, "idle"
                    )
                )
            out.append(
                Segment(r, seg.start_s, seg.duration_s, seg.kind, seg.label, seg.microbatch, seg.phase)
            )
            t = seg.start_s + seg.duration_s
        if makespan - t > 1e-15:
            out.append(Segment(r, t, makespan - t, "bubble", "idle until the step ends", -1, "idle"))
    return out


def build_timeline(plan: ExecutionPlan) -> Timeline:
    """The schedule of one step on every rank (at most MAX_RANKS_SHOWN ranks; see the module docstring)."""
    pipe = getattr(plan, "pipeline", None)
    if pipe is not None and getattr(pipe, "actions", None) and getattr(pipe, "stages", None):
        return _pipeline_timeline(plan, pipe)
    train = plan.mode == "train"
    pp = max(1, int(plan.degrees.get("pp", 1)))
    m = _int_attr(plan, "micro_batches", "num_micro_batches", "microbatches") or int(
        plan.degrees.get("mb", 1) or 1
    )
    schedule = str(getattr(plan, "schedule", "") or ("gpipe" if pp > 1 else "single stage"))
    notes: list[str] = []
    per_stage, guessed = _assign_stages(_forward_pieces(plan), pp)
    if guessed:
        notes.append(f"the plan records no stage per op: its layers were split into {pp} stages by compute")
    if any(len(p) > MAX_PIECES for p in per_stage):
        per_stage = [_coarsen(p) for p in per_stage]
        notes.append(
            "too many ops to draw one by one: each stage's compute and communication are shown whole"
        )
    n_stages = len(per_stage)

    # forward / backward work of one micro-batch on each stage
    def fwd(stage: int) -> list[_Piece]:
        return [_Piece(p.kind, p.label, p.duration_s / m) for p in per_stage[stage]]

    def bwd(stage: int) -> list[_Piece]:
        return [_Piece(p.kind, p.label, p.duration_s * (2 if p.kind == "compute" else 1) / m)
                for p in reversed(per_stage[stage])]  # fmt: skip

    timeline: dict[int, list[Segment]] = {s: [] for s in range(n_stages)}
    orders = {s: _order(schedule, s, n_stages, m, train) for s in range(n_stages)}
    done: dict[tuple[str, int, int], float] = {}  # (F|B, stage, mb) -> end time
    free = dict.fromkeys(range(n_stages), 0.0)
    pos = dict.fromkeys(range(n_stages), 0)
    remaining = sum(len(o) for o in orders.values())
    while remaining:
        progressed = False
        for s in range(n_stages):
            if pos[s] >= len(orders[s]):
                continue
            kind, j = orders[s][pos[s]]
            dep = (
                ("F", s - 1, j)
                if kind == "F" and s > 0
                else ("B", s + 1, j)
                if kind == "B" and s < n_stages - 1
                else None
            )
            if kind == "B" and s == n_stages - 1:
                dep = ("F", s, j)
            if dep is not None and dep not in done:
                continue
            t = max(free[s], done.get(dep, 0.0)) if dep else free[s]
            for p in fwd(s) if kind == "F" else bwd(s):
                if p.duration_s <= 0:
                    continue
                timeline[s].append(
                    Segment(-1, t, p.duration_s, p.kind, p.label, j, "forward" if kind == "F" else "backward")
                )
                t += p.duration_s
            done[(kind, s, j)] = t
            free[s] = t
            pos[s] += 1
            remaining -= 1
            progressed = True
        if not progressed:  # an order that cannot be met: never expected, but never loop forever
            notes.append("the schedule could not be simulated completely")
            break

    # gradient reduction after backward, on every stage
    if train:
        grads = [r for r in collective_rows(plan) if r.phase == "gradients" and r.time_s > 0]
        for s in range(n_stages):
            t = free[s]
            for r in grads:
                share = r.time_s / n_stages
                timeline[s].append(
                    Segment(-1, t, share, "comm", f"gradient {r.collective}@{r.axis}", -1, "gradients")
                )
                t += share
            free[s] = t

    makespan = max(free.values(), default=0.0)
    mesh = plan.mesh
    names = tuple(mesh.axis_names)
    ranks = list(mesh.ranks)
    if len(ranks) > MAX_RANKS_SHOWN:
        notes.append(
            f"{len(ranks)} ranks: showing the first {MAX_RANKS_SHOWN} (ranks of one stage run the same schedule)"
        )
        ranks = ranks[:MAX_RANKS_SHOWN]
    rows = {}
    for r in ranks:
        stage = mesh.coordinate(r)[names.index("pp")] if "pp" in names else 0
        rows[r] = timeline[min(stage, n_stages - 1)]
    segments = _fill(ranks, rows, makespan)
    predicted = float(plan.predicted.step_time_s)
    if predicted > 0 and abs(makespan - predicted) > 0.02 * predicted:
        notes.append(
            f"drawn from per-op costs: {makespan * 1e3:.3f} ms; the plan predicts {predicted * 1e3:.3f} ms per step"
        )
    return Timeline(ranks, segments, makespan, m, n_stages, schedule, notes)
