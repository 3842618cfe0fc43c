"""What went wrong in a worker pool, as data plus a readable message.

``WorkerFault`` is the ``shardwise.errors.RuntimeFault`` the local pool raises. Its message names the
rank(s), the method and the step (``call #n``) and carries the workers' traceback text; the same facts are
available as attributes for programs (the fuzzer) that classify failures.
"""

from __future__ import annotations

from dataclasses import dataclass

from shardwise.errors import RuntimeFault

__all__ = ["FaultKind", "RankFailure", "WorkerFault"]

_MAX_SECTIONS = 4  # distinct tracebacks/stacks quoted in one message; the rest stay in .failures

FaultKind = str  # "raised" | "died" | "hung" | "stuck" — see RankFailure.kind


@dataclass(frozen=True)
class RankFailure:
    """One rank's part in a fault.

    ``kind`` is ``"raised"`` (the method raised; ``error`` and ``traceback`` hold what it said), ``"died"``
    (the process exited; ``exitcode`` is negative for a signal), ``"hung"`` (no answer within the timeout and
    not waiting inside torch.distributed) or ``"stuck"`` (no answer, but blocked in a collective — a victim of
    another rank's fault). ``stack`` is the Python stack dumped from a hung/stuck worker, when available.
    """

    rank: int
    kind: FaultKind
    error: str = ""
    traceback: str = ""
    exitcode: int | None = None
    stack: str = ""

    def what(self) -> str:
        """What happened to this rank, without naming it (``"raised ValueError: ..."``)."""
        if self.kind == "raised":
            return f"raised {self.error}"
        if self.kind == "died":
            if self.exitcode is not None and self.exitcode < 0:
                return f"died (killed by signal {-self.exitcode})"
            return f"died (exit code {self.exitcode})"
        if self.kind == "hung":
            return "hung (no answer, not inside a collective)"
        if self.stack:
            return "did not answer (blocked in a collective)"
        return "was stopped before it answered"

    def describe(self) -> str:
        return f"rank {self.rank} {self.what()}"


class WorkerFault(RuntimeFault):
    """A worker raised, died or hung during ``step`` (``"call #n <method>"`` or ``"load #n <dir>"``).

    ``culprits`` are the ranks that caused the fault (raised, died or hung); ``failures`` holds every rank's
    part, victims included. ``pool_usable`` says whether the pool kept its workers (``True`` only when every
    rank answered and a probe collective afterwards succeeded) — otherwise the workers were terminated.
    """

    def __init__(
        self,
        *,
        step: str,
        method: str,
        failures: tuple[RankFailure, ...],
        pool_usable: bool,
        note: str = "",
    ) -> None:
        self.step = step
        self.method = method
        self.failures = failures
        self.pool_usable = pool_usable
        self.culprits = tuple(f.rank for f in _culprits(failures))
        super().__init__(self._message(note))

    def _message(self, note: str) -> str:
        culprits = _culprits(self.failures)
        head = _describe(culprits)
        where = self.step if self.method in self.step else f"{self.step} ({self.method})"
        lines = [f"{head} during {where}"]
        victims = [f for f in self.failures if f not in culprits]
        if victims:
            lines.append("other ranks: " + _describe(victims))
        if note:
            lines.append(note)
        lines.append(
            "the worker pool is still usable"
            if self.pool_usable
            else "the workers were terminated; the next load() starts fresh ones"
        )
        for title, attr in (
            ("traceback of {}", "traceback"),
            ("Python stack of {} when it was stopped", "stack"),
        ):
            texts: dict[str, list[int]] = {}
            for f in culprits:
                if getattr(f, attr):
                    texts.setdefault(getattr(f, attr).rstrip(), []).append(f.rank)
            for shown, (text, ranks) in enumerate(texts.items()):
                if shown == _MAX_SECTIONS:
                    lines.append(
                        f"--- {len(texts) - shown} more different {attr}s: see WorkerFault.failures ---"
                    )
                    break
                lines.append(f"--- {title.format(_ranks(ranks))} ---\n{text}")
        return "\n".join(lines)


def _ranks(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))


def _describe(failures: list[RankFailure]) -> str:
    """``"ranks 0, 1 raised X; rank 3 died (exit code 7)"``: ranks with the same fate are grouped."""
    groups: dict[str, list[int]] = {}
    for f in failures:
        groups.setdefault(f.what(), []).append(f.rank)
    return "; ".join(f"{_ranks(ranks)} {what}" for what, ranks in groups.items())


def _culprits(failures: tuple[RankFailure, ...]) -> list[RankFailure]:
    """The ranks to blame: the dead if any died (the others' errors follow from it), else the hung and
    the raising ones; every listed rank when none of those is present."""
    died = [f for f in failures if f.kind == "died"]
    if died:
        return died
    return [f for f in failures if f.kind in ("raised", "hung")] or list(failures)
