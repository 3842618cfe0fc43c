"""Where each piece of each tensor lives under a plan: boxes in the coordinates of the whole tensor.

A generated program describes its tensors with three tables (``TENSORS``, ``ALIASES``, ``PARTS``, see the
program template) and its mesh (``MESH_SHAPE``, ``MESH_AXES``, ``MESH_RANKS``). :func:`program_layout` turns
them into a :class:`ProgramLayout`; the compiler side builds the same tables from a plan
(``shardwise.codegen.layout``), so a layout is known with or without running processes.

A checkpoint stores *logical* tensors: the model's own state_dict entries. A program tensor that is a part
of a fused projection (``PARTS``) is stored inside its whole tensor, at its offset; tied weights are stored
once under one key, their other names listed as aliases. A piece of a logical tensor is a box
``(offset, shape)``; pieces from any plan can be cut from pieces saved under any other plan.

Invariants: the boxes of one program tensor over all ranks tile it exactly (torch.chunk semantics along each
split, in the order of the splits); exactly one rank — the *writer*, index 0 on every mesh axis the tensor is
replicated over — stores each distinct box.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Box",
    "ProgramLayout",
    "TensorLayout",
    "chunk_box",
    "intersect",
    "layout_from_tables",
    "pipeline_layout",
    "program_layout",
]


@dataclass(frozen=True)
class Box:
    """A block of a tensor: ``offset`` and ``shape`` per dimension."""

    offset: tuple[int, ...]
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def shifted(self, dim: int, by: int) -> Box:
        offset = list(self.offset)
        offset[dim] += by
        return Box(tuple(offset), self.shape)


def intersect(a: Box, b: Box) -> Box | None:
    """The common part of two boxes of the same tensor (``None`` if empty)."""
    lo = tuple(max(x, y) for x, y in zip(a.offset, b.offset, strict=True))
    hi = tuple(min(x + n, y + m) for x, n, y, m in zip(a.offset, a.shape, b.offset, b.shape, strict=True))
    if any(h <= low for low, h in zip(lo, hi)):
        return None
    return Box(lo, tuple(h - low for low, h in zip(lo, hi)))


def chunk_box(shape: Sequence[int], splits: Sequence[tuple[int, int, int]]) -> Box:
    """The piece ``torch.chunk`` leaves after splitting ``shape`` by ``(dim, parts, index)`` in order."""
    offset = [0] * len(shape)
    size = list(shape)
    for dim, parts, index in splits:
        step = -(-size[dim] // parts) if size[dim] else 0
        start = min(index * step, size[dim])
        offset[dim] += start
        size[dim] = max(0, min(step, size[dim] - start))
    return Box(tuple(offset), tuple(size))


@dataclass(frozen=True)
class TensorLayout:
    """One program tensor: its key in the program, the logical tensor it belongs to, and how it is split."""

    key: str  # the program's TENSORS key
    logical: str  # the state_dict key the checkpoint stores it under
    shape: tuple[int, ...]  # the program tensor's whole shape
    logical_shape: tuple[int, ...]  # the logical tensor's shape (bigger than ``shape`` for a part)
    dtype: str
    kind: str  # parameter | buffer
    splits: tuple[tuple[str, int], ...]  # (mesh axis, dim), applied in order
    part: tuple[int, int] | None  # (dim, start) of this part inside the logical tensor
    aliases: tuple[str, ...]
    holder: tuple[tuple[str, int], ...] = ()  # mesh coordinates of the ranks holding it (pipeline stage)
    chunk: int | None = None  # the pipeline chunk (program) holding it; None for a single program
    copy: bool = False  # another chunk's copy of a tied weight: held and loaded, never written


@dataclass(frozen=True)
class ProgramLayout:
    mesh_shape: tuple[int, ...]
    mesh_axes: tuple[str, ...]
    mesh_ranks: tuple[int, ...]
    tensors: tuple[TensorLayout, ...]

    @property
    def world_size(self) -> int:
        return len(self.mesh_ranks)

    def coord(self, rank: int) -> tuple[int, ...]:
        index = self.mesh_ranks.index(rank)
        out = []
        for size in reversed(self.mesh_shape):
            out.append(index % size)
            index //= size
        return tuple(reversed(out))

    def holds(self, t: TensorLayout, rank: int) -> bool:
        """Whether ``rank`` holds a piece of ``t`` (every rank, except for pipeline stages)."""
        coord = self.coord(rank)
        return all(coord[self.mesh_axes.index(axis)] == value for axis, value in t.holder)

    def box(self, t: TensorLayout, rank: int) -> Box:
        """Rank ``rank``'s piece of ``t``, in the coordinates of the logical tensor."""
        coord = self.coord(rank)
        splits = [
            (dim, self.mesh_shape[self.mesh_axes.index(axis)], coord[self.mesh_axes.index(axis)])
            for axis, dim in t.splits
        ]
        box = chunk_box(t.shape, splits)
        return box.shifted(t.part[0], t.part[1]) if t.part is not None else box

    def writes(self, t: TensorLayout, rank: int) -> bool:
        """Whether ``rank`` is the one that stores its piece of ``t`` (index 0 on every replicated axis)."""
        if t.copy or not self.holds(t, rank):
            return False
        coord = self.coord(rank)
        fixed = {axis for axis, _ in t.splits} | {axis for axis, _ in t.holder}
        return all(c == 0 for axis, c in zip(self.mesh_axes, coord, strict=True) if axis not in fixed)

    def logical_tensors(self) -> dict[str, dict[str, Any]]:
        """logical key -> {"shape", "dtype", "kind", "aliases"}, as stored in a checkpoint manifest."""
        out: dict[str, dict[str, Any]] = {}
        for t in self.tensors:
            entry = out.setdefault(
                t.logical,
                {"shape": list(t.logical_shape), "dtype": t.dtype, "kind": t.kind, "aliases": []},
            )
            for alias in t.aliases:
                if alias not in entry["aliases"]:
                    entry["aliases"].append(alias)
        return out


def program_layout(
    tensors: Mapping[str, tuple[Any, ...]],
    aliases: Mapping[str, Sequence[str]],
    parts: Mapping[str, tuple[str, int, int, int]],
    mesh_shape: Sequence[int],
    mesh_axes: Sequence[str],
    mesh_ranks: Sequence[int],
) -> ProgramLayout:
    """The layout described by a program's tables (``TENSORS``: key -> (attr, shape, dtype, kind,
    ((axis, dim), ...)); ``ALIASES``: key -> other names; ``PARTS``: key -> (whole key, dim, start, stop))."""
    whole_shapes: dict[str, list[int]] = {}
    for key, (whole, dim, _start, stop) in parts.items():
        shape = list(tensors[key][1])
        current = whole_shapes.setdefault(whole, shape)
        current[dim] = max(current[dim], stop)
    out = []
    for key, (_attr, shape, dtype, kind, splits) in tensors.items():
        part = parts.get(key)
        logical, logical_shape, where = key, tuple(shape), None
        if part is not None:
            logical, where = part[0], (int(part[1]), int(part[2]))
            logical_shape = tuple(whole_shapes[logical])
        out.append(
            TensorLayout(
                key=key,
                logical=logical,
                shape=tuple(shape),
                logical_shape=logical_shape,
                dtype=str(dtype),
                kind="parameter" if kind == "parameter" else "buffer",
                splits=tuple((str(a), int(d)) for a, d in splits),
                part=where,
                aliases=tuple(aliases.get(key, ())),
            )  # fmt: skip
        )
    return ProgramLayout(tuple(mesh_shape), tuple(mesh_axes), tuple(mesh_ranks), tuple(out))


def pipeline_layout(
    pp: int,
    dp: int,
    tp: int,
    chunks: Mapping[int, Mapping[str, Any]],
    tied: Sequence[tuple[str, Sequence[int]]],
) -> ProgramLayout:
    """The layout of a pipeline package: chunk ``c`` (tables as for :func:`program_layout`) lives on device stage
    ``c % pp``, replicated over ``dp``, split over its ``tp`` group; rank = (p * dp + d) * tp + t. Copies of a
    tied weight in later chunks are marked ``copy`` (loaded, never written)."""
    del tied  # copies are found by key below: a logical tensor is written by the first chunk holding it
    out: list[TensorLayout] = []
    seen: set[tuple[str, tuple[int, int] | None]] = set()
    for c in sorted(chunks):
        inner = program_layout(**chunks[c])
        spanning = [a for a, n in zip(inner.mesh_axes, inner.mesh_shape, strict=True) if n > 1]
        for t in inner.tensors:
            splits = tuple(("tp", dim) for axis, dim in t.splits if axis in spanning)
            key = (t.logical, t.part)
            out.append(
                TensorLayout(
                    key=t.key,
                    logical=t.logical,
                    shape=t.shape,
                    logical_shape=t.logical_shape,
                    dtype=t.dtype,
                    kind=t.kind,
                    splits=splits,
                    part=t.part,
                    aliases=t.aliases,
                    holder=(("pp", c % pp),),
                    chunk=c,
                    copy=key in seen,
                )  # fmt: skip
            )
            seen.add(key)
    return ProgramLayout((pp, dp, tp), ("pp", "dp", "tp"), tuple(range(pp * dp * tp)), tuple(out))


def layout_from_tables(tables: Mapping[str, Any]) -> ProgramLayout:
    """A layout from the data ``shardwise.codegen.layout.tensor_tables`` gives for a plan."""
    if tables.get("pipeline"):
        p = tables["pipeline"]
        return pipeline_layout(p["pp"], p["dp"], p["tp"], p["chunks"], p["tied"])
    return program_layout(**{k: v for k, v in tables.items() if k != "pipeline"})
