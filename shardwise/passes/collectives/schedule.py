"""Schedules: chunk transfers between ranks, with data dependencies and an order per resource.

A ``Transfer`` moves the chunks ``chunks`` from rank ``src`` to rank ``dst`` in one message. With
``reduce`` the receiver adds them into what it holds; otherwise it overwrites. ``deps`` are indices of
transfers that must have *completed* before this one starts (the writes this one reads, and earlier
writes to the slots it writes). ``prio`` orders transfers that share a resource: each resource carries its
transfers one at a time in increasing ``(prio, index)`` order. A send reads its value when it is posted:
a later write to the same slot that is not among its (transitive) deps does not change what it sends.

Invariants (checked by ``Schedule.__post_init__``): ranks and chunks in range, ``src != dst``, deps refer
to other transfers of the same schedule, a transfer carries each chunk at most once.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from shardwise.passes.collectives.chunks import CollectiveSpec

__all__ = ["Transfer", "Schedule", "ScheduleError", "order_deps", "make_schedule"]


class ScheduleError(ValueError):
    """A schedule breaks an invariant (a bug in whatever produced it, not a user error)."""


@dataclass(frozen=True)
class Transfer:
    src: int
    dst: int
    chunks: tuple[int, ...]
    reduce: bool = False
    deps: tuple[int, ...] = ()
    prio: float = 0.0


@dataclass(frozen=True, eq=False)
class Schedule:
    """A collective schedule over the local ranks ``0..spec.nranks-1`` of a topology view."""

    spec: CollectiveSpec
    transfers: tuple[Transfer, ...]
    algorithm: str
    params: str = ""
    _digest: list[str] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        p, n = self.spec.nranks, self.spec.nchunks
        count = len(self.transfers)
        for i, t in enumerate(self.transfers):
            if not (0 <= t.src < p and 0 <= t.dst < p) or t.src == t.dst:
                raise ScheduleError(f"transfer {i}: bad ranks {t.src}->{t.dst} for {p} ranks")
            if not t.chunks or len(set(t.chunks)) != len(t.chunks) or any(not 0 <= g < n for g in t.chunks):
                raise ScheduleError(f"transfer {i}: bad chunks {t.chunks} (0..{n - 1}, each once)")
            if any(not 0 <= d < count or d == i for d in t.deps):
                raise ScheduleError(f"transfer {i}: bad deps {t.deps}")

    def digest(self) -> str:
        """sha256 (16 hex) of the schedule's content: equal schedules, equal digests."""
        if not self._digest:
            h = hashlib.sha256(f"{self.spec}".encode())
            for t in self.transfers:
                h.update(f"{t.src},{t.dst},{t.chunks},{int(t.reduce)},{t.deps},{t.prio!r};".encode())
            self._digest.append(h.hexdigest()[:16])
        return self._digest[0]

    def __len__(self) -> int:
        return len(self.transfers)


def order_deps(spec: CollectiveSpec, transfers: Sequence[Transfer]) -> list[Transfer]:
    """Fill in ``deps`` from ``prio`` read as logical time, slot by slot (slot = (rank, chunk)).

    A send at time t depends on every write to its slots at times < t (reads see earlier writes, not
    writes of the same time); a write at time t depends on every earlier write to the same slot. Writes
    that are not a send's deps happen after it (the send reads the old value). Existing deps are kept.
    """
    writes: dict[tuple[int, int], list[tuple[float, int]]] = defaultdict(list)
    for i, t in enumerate(transfers):
        for g in t.chunks:
            writes[(t.dst, g)].append((t.prio, i))
    for lst in writes.values():
        lst.sort()
    out = []
    for i, t in enumerate(transfers):
        deps = set(t.deps)
        for g in t.chunks:
            for prio, j in writes.get((t.src, g), ()):
                if prio >= t.prio:
                    break
                deps.add(j)
            for prio, j in writes.get((t.dst, g), ()):
                if prio >= t.prio:
                    break
                deps.add(j)
        deps.discard(i)
        out.append(Transfer(t.src, t.dst, t.chunks, t.reduce, tuple(sorted(deps)), t.prio))
    return out


def make_schedule(
    spec: CollectiveSpec, transfers: Iterable[Transfer], algorithm: str, params: str = ""
) -> Schedule:
    """A Schedule whose deps are completed from prio (see ``order_deps``)."""
    return Schedule(spec, tuple(order_deps(spec, list(transfers))), algorithm, params)
