"""Pipeline-parallel plan data: model chunks (stages), the values they pass, and the schedule each device runs.

A pipeline plan splits the model into ``pp * virtual`` contiguous *chunks* in model order. Chunk ``c`` runs on
pipeline rank (device stage) ``c % pp``; with ``virtual > 1`` each device stage holds several chunks
(interleaved 1F1B). The global rank of (device stage ``p``, data-parallel replica ``d``, context-parallel index
``c``, tensor-parallel index ``t``) is ``((p * dp + d) * cp + c) * tp + t`` (``cp = 1``: ``(p * dp + d) * tp + t``).

Invariants (checked by :func:`check_pipeline`):
- ``stages[c].chunk == c``; every chunk's ``plan`` is an intra-op plan over a ``(dp=1, tp)`` mesh whose graph
  is the chunk's subgraph traced at the micro-batch size (``microbatch_size`` rows per replica); with expert
  parallelism (``ep > 1``) the mesh is ``(ep, tp)``, its ``ep`` axis the ``ep`` neighbouring data-parallel
  replicas of the chunk's stage (replicas ``o * ep .. o * ep + ep - 1``): each runs the chunk on its own rows
  (the graph is one replica's), and only the experts ops, whose experts are split over that axis, exchange
  rows over it; with context parallelism (``cp > 1``) it is ``(cp, tp)``: the replica's ``cp x tp`` ranks, the
  sequence of the chunk's inputs split over ``cp`` (each rank cuts its piece of the values it receives whole,
  and makes its outputs whole again before they are sent on);
- every transfer goes from an earlier chunk to a later one, names a value that is an output of its source
  chunk's graph and an input of its destination chunk's graph;
- ``actions[p]`` lists, for device stage ``p``, every (kind, chunk, micro-batch) it runs, each forward
  ``"F"`` and backward ``"B"`` (training) of each of its chunks exactly once per micro-batch; the order is
  deadlock-free when sends never block (the schedule simulator checks it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from shardwise.ir.tensor import TensorSpec

if TYPE_CHECKING:
    from shardwise.ir.plan import ExecutionPlan

__all__ = ["SCHEDULES", "RECOMPUTE", "Transfer", "PipelineStage", "PipelineSpec", "check_pipeline"]

SCHEDULES = ("gpipe", "1f1b", "interleaved")
RECOMPUTE = ("none", "full")


@dataclass(frozen=True)
class Transfer:
    """A value one chunk makes and a later chunk reads: sent forward per micro-batch, its gradient back."""

    value: str
    src: int  # producing chunk
    dst: int  # consuming chunk
    spec: TensorSpec  # per micro-batch (per data-parallel replica)
    grad: bool  # the gradient flows back (the value is floating point and depends on trainable parameters)

    def __str__(self) -> str:
        return f"{self.value}: chunk {self.src} -> {self.dst} {self.spec}{' (+grad)' if self.grad else ''}"


@dataclass(frozen=True)
class PipelineStage:
    """One model chunk: its layer units, its intra-op plan and its predicted cost per micro-batch."""

    chunk: int
    device_stage: int
    units: tuple[str, ...]  # the layer units it holds, e.g. ("pre", "transformer.h.0")
    plan: ExecutionPlan
    forward_s: float = 0.0  # predicted time of one micro-batch's forward
    backward_s: float = 0.0  # and backward (including the recomputed forward when recompute is "full")
    memory_bytes: int = 0  # predicted peak bytes of the chunk on its device (parameters, state, activations)


@dataclass(frozen=True)
class PipelineSpec:
    """How the pipeline runs: degrees, micro-batching, recomputation, chunks, transfers and the schedule."""

    schedule: str  # one of SCHEDULES
    pp: int
    virtual: int  # chunks per device stage (1 unless interleaved)
    dp: int
    tp: int
    sequence_parallel: bool
    microbatches: int  # per step, per data-parallel replica
    microbatch_size: int  # rows of the batch dimension per micro-batch (per replica)
    recompute: str  # one of RECOMPUTE
    stages: tuple[PipelineStage, ...]
    transfers: tuple[Transfer, ...]
    tied: tuple[tuple[str, tuple[int, ...]], ...]  # (state_dict key, chunks holding a copy): gradients summed
    actions: tuple[tuple[tuple[str, int, int], ...], ...]  # per device stage: (kind, chunk, micro-batch)
    batch_inputs: tuple[int, ...]  # graph inputs split along dim 0 (data parallel, then micro-batches)
    # ZeRO stage over the data-parallel replicas: 0 none, 1 optimizer state sharded, 2 gradients too (tied
    # weights are never sharded); 3 is not offered with pipelines
    zero: int = 0
    # expert parallelism: the experts of each stage split over ``ep`` neighbouring replicas (a divisor of dp)
    ep: int = 1
    # context parallelism: the sequence split over ``cp`` ranks of each replica (an axis of its own)
    cp: int = 1

    @property
    def chunks(self) -> int:
        return len(self.stages)

    def rank(self, device_stage: int, replica: int, tp_index: int, cp_index: int = 0) -> int:
        return ((device_stage * self.dp + replica) * self.cp + cp_index) * self.tp + tp_index

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.cp * self.tp

    def __str__(self) -> str:
        v = f" x {self.virtual} virtual" if self.virtual > 1 else ""
        return (
            f"{self.schedule}: pp={self.pp}{v}, dp={self.dp}{f' (ep={self.ep})' if self.ep > 1 else ''}, "
            f"{f'cp={self.cp}, ' if self.cp > 1 else ''}tp={self.tp}{' +sp' if self.sequence_parallel else ''}, "
            f"{self.microbatches} micro-batches of {self.microbatch_size}, recompute={self.recompute}"
        )


def check_pipeline(spec: PipelineSpec, *, train: bool) -> None:
    """Raise ValueError when ``spec`` breaks an invariant of the module docstring."""
    if spec.schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {spec.schedule!r}")
    if spec.recompute not in RECOMPUTE:
        raise ValueError(f"unknown recompute mode {spec.recompute!r}")
    if len(spec.stages) != spec.pp * spec.virtual:
        raise ValueError(f"{len(spec.stages)} chunks for pp={spec.pp} x virtual={spec.virtual}")
    for c, stage in enumerate(spec.stages):
        if stage.chunk != c or stage.device_stage != c % spec.pp:
            raise ValueError(f"chunk {c} is numbered {stage.chunk} on device stage {stage.device_stage}")
    for t in spec.transfers:
        if not 0 <= t.src < t.dst < spec.chunks:
            raise ValueError(f"transfer {t} does not go forward")
        outs = {v for v in spec.stages[t.src].plan.graph.output_names}
        ins = {i.name for i in spec.stages[t.dst].plan.graph.inputs}
        if t.value not in outs or t.value not in ins:
            raise ValueError(f"transfer {t}: not an output of chunk {t.src} and an input of chunk {t.dst}")
    if spec.ep < 1 or spec.dp % spec.ep:
        raise ValueError(f"ep={spec.ep} does not divide dp={spec.dp}")
    if spec.cp < 1 or (spec.cp > 1 and spec.ep > 1):
        raise ValueError(f"cp={spec.cp} with ep={spec.ep}: pipelines split the sequence or the experts, not both")
    if spec.zero not in (0, 1, 2):
        raise ValueError(f"ZeRO stage {spec.zero} is not run with pipelines (0, 1 or 2)")
    if len(spec.actions) != spec.pp:
        raise ValueError(f"{len(spec.actions)} action lists for pp={spec.pp}")
    kinds = ("F", "B") if train else ("F",)
    for p, acts in enumerate(spec.actions):
        want = sorted(
            (k, c, i) for k in kinds for c in range(p, spec.chunks, spec.pp) for i in range(spec.microbatches)
        )
        if sorted(acts) != want:
            raise ValueError(f"device stage {p} does not run each of its forwards/backwards exactly once")
