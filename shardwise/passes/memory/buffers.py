"""Values of memory mapping: a buffer's lifetime and size, an assignment of byte offsets, the lower bound.

Invariants: a ``Buffer`` is live over the half-open step interval ``[start, end)`` with ``end > start`` and
``size > 0`` (checked at construction). An ``Assignment`` lists every buffer once, sorted by id; its
``arena_bytes`` is the largest ``offset + size`` and never less than its ``lower_bound_bytes``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from shardwise.errors import UserInputError

__all__ = ["Buffer", "Assignment", "lower_bound", "check_buffers"]


@dataclass(frozen=True)
class Buffer:
    """One tensor's lifetime in a rank's program: live over steps ``[start, end)``, ``size`` bytes."""

    id: str
    start: int  # first step it is live (inclusive)
    end: int  # first step it is dead (exclusive)
    size: int  # bytes (> 0)

    def __post_init__(self) -> None:
        start, end, size = self.start, self.end, self.size
        if type(start) is int and type(end) is int and type(size) is int and size > 0 and end > start:
            return  # valid (the common case, checked quickly: pipeline maps make a million buffers)
        for name in ("start", "end", "size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise UserInputError(f"buffer {self.id!r}: {name} must be an int, got {value!r}")
        if self.size <= 0:
            raise UserInputError(
                f"buffer {self.id!r}: size must be > 0 bytes, got {self.size}; drop empty tensors first"
            )
        if self.end <= self.start:
            raise UserInputError(
                f"buffer {self.id!r}: end ({self.end}) must be after start ({self.start}); "
                "a buffer is live over [start, end), so end is the first step it is dead"
            )

    def overlaps(self, other: Buffer) -> bool:
        """True when the two buffers are live at a common step (they then need disjoint bytes)."""
        return self.start < other.end and other.start < self.end


@dataclass(frozen=True)
class Assignment:
    """Byte offsets of every buffer in one arena, with how good they are and how they were found."""

    offsets: tuple[tuple[str, int], ...]  # (buffer id, byte offset), sorted by id
    arena_bytes: int  # max over buffers of offset + size
    lower_bound_bytes: int  # largest total of simultaneously live bytes
    method: str  # "best-fit-size" | "best-fit-lifetime" | "exact" (canonical search) | "cp-sat"
    optimal: bool  # arena == lower bound, or proven optimal by the exact search
    solve_s: float
    _index: dict[str, int] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", dict(self.offsets))

    def offset(self, buffer_id: str) -> int:
        """The byte offset of ``buffer_id`` (KeyError names the id when it was not assigned)."""
        try:
            return self._index[buffer_id]
        except KeyError:
            raise KeyError(f"no buffer {buffer_id!r} in this assignment") from None

    def __len__(self) -> int:
        return len(self.offsets)


def check_buffers(buffers: Iterable[Buffer]) -> list[Buffer]:
    """The buffers as a list, after checking their types and that their ids are unique."""
    out = list(buffers)
    seen: set[str] = set()
    for b in out:
        if not isinstance(b, Buffer):
            raise UserInputError(f"expected Buffer values, got {type(b).__name__}: {b!r}")
        if b.id in seen:
            raise UserInputError(f"buffer id {b.id!r} appears twice; give every buffer a unique id")
        seen.add(b.id)
    return out


def lower_bound(buffers: Sequence[Buffer] | Iterable[Buffer]) -> int:
    """The largest total of bytes live at one step: no assignment can use a smaller arena."""
    events: list[tuple[int, int]] = []
    for b in buffers:
        events.append((b.start, b.size))
        events.append((b.end, -b.size))
    events.sort()  # at equal steps the (negative) frees come first: end is exclusive
    live = best = 0
    for _, delta in events:
        live += delta
        best = max(best, live)
    return best
