"""Values of rematerialization: the problem (units a rank may recompute, with what each costs and saves) and
the choice (which units are recomputed, the predicted peak and the recompute time).

The peak model (``model_peak``), for units ``1..n`` in program order and a choice ``c`` (``c_i = 1``: unit
``i`` runs under checkpoint, keeping only its inputs and outputs, and is recomputed in the backward):

    peak(c) = max( fixed_bytes,
                   max_i ( sum_{j<i} kept_j(c_j) + phase_i(c_i) ),
                   tail_bytes + sum_j kept_j(c_j) )

* ``kept_i(c)``: bytes unit ``i`` made in its forward that are still live when the forward ends (the
  activations its ops save for backward, or only its outputs when recomputed);
* ``phase_i(c)``: the largest live total during unit ``i``'s own steps (its forward, its recompute, its
  backward, and the steps between the previous unit and it) minus what earlier units keep;
* ``tail_bytes``: the same for the steps after the last unit (head, loss, their backward) beyond what all
  units keep; ``fixed_bytes``: the largest live total at steps no unit's activations reach (gradient
  reduction, optimizer step).

``shardwise.passes.remat.build`` measures these numbers on the memory pass's buffers (so they count what
``program.step_buffers`` counts), and ``shardwise.passes.remat.peak`` checks a choice on those buffers.
Invariants: every byte figure is ``>= 0``; ``recompute_s >= 0``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["RematUnit", "RematProblem", "RematChoice", "model_peak"]


@dataclass(frozen=True)
class RematUnit:
    """One run of forward ops that may be recomputed: graph nodes ``[start, stop)`` (program order)."""

    name: str
    start: int
    stop: int
    recompute_s: float  # predicted time of re-running the unit's forward (its ops and collectives)
    kept_bytes: tuple[int, int]  # (kept, recomputed): bytes this unit keeps from its forward into backward
    phase_bytes: tuple[int, int]  # (kept, recomputed): its phase's peak beyond what earlier units keep

    def __post_init__(self) -> None:
        if self.stop <= self.start:
            raise ValueError(f"unit {self.name!r}: stop ({self.stop}) must be after start ({self.start})")
        if self.recompute_s < 0 or min(self.kept_bytes + self.phase_bytes) < 0:
            raise ValueError(f"unit {self.name!r}: times and bytes must be >= 0")


@dataclass(frozen=True)
class RematProblem:
    """Units in program order (disjoint node ranges) and the parts of the peak no choice changes."""

    units: tuple[RematUnit, ...]
    fixed_bytes: int
    tail_bytes: int
    step_time_s: float = 0.0  # the plan's predicted step time, to state recompute as an overhead

    def __post_init__(self) -> None:
        for a, b in zip(self.units, self.units[1:]):
            if b.start < a.stop:
                raise ValueError(f"units {a.name!r} and {b.name!r} overlap or are out of order")

    @property
    def baseline_bytes(self) -> int:
        """The model's peak with nothing recomputed."""
        return model_peak(self, (0,) * len(self.units))


@dataclass(frozen=True)
class RematChoice:
    """Which units are recomputed (by name and node range), and what that is predicted to give.

    ``peak_bytes``: the predicted peak (the exact check on the rank's buffers when the choice came from a
    plan, else the model's); ``baseline_bytes``: the same with nothing recomputed; ``recompute_s``: the
    extra forward time per step; ``method``: "dp", "ilp", "all" or "none"."""

    units: tuple[str, ...]
    ranges: tuple[tuple[int, int], ...]
    peak_bytes: int
    baseline_bytes: int
    recompute_s: float
    budget_bytes: int
    method: str

    @property
    def saved_bytes(self) -> int:
        return self.baseline_bytes - self.peak_bytes


def model_peak(problem: RematProblem, choice: Sequence[int]) -> int:
    """The peak model of the module docstring for ``choice`` (one 0/1 per unit)."""
    if len(choice) != len(problem.units):
        raise ValueError(f"{len(choice)} decisions for {len(problem.units)} units")
    prefix = 0
    peak = problem.fixed_bytes
    for u, c in zip(problem.units, choice, strict=True):
        peak = max(peak, prefix + u.phase_bytes[c])
        prefix += u.kept_bytes[c]
    return max(peak, problem.tail_bytes + prefix)
