"""This rank's view of the device mesh, and the pieces a tensor is cut into along a mesh axis.

Pieces follow ``torch.chunk``: a dimension of ``size`` split ``n`` ways gives ``ceil(size / n)`` elements to
each rank in order, the remainder to the last ones (planned only where every piece is non-empty). On a *paired*
axis (context parallelism's, for causal load balance) a dimension is cut into ``2n`` equal chunks and rank ``i``
holds chunks ``i`` and ``2n - 1 - i`` (planned only where ``2n`` divides the dimension): every split and join
along that axis (``pieces``, ``join``) keeps to it, so each rank's rows of a causal attention cost the same.

An *axis* argument is one axis name, or a tuple of names in mesh order for the axes *combined*: the ranks that
differ only along those axes, numbered row-major over them (rank ``i`` of ``("dp", "cp")`` with ``cp`` = 2 is
``dp`` index ``i // 2``, ``cp`` index ``i % 2``), one process group over all of them (ZeRO over ``dp x cp``:
one reduce-scatter over the combined group rather than one per axis). The mesh makes the groups of the
combinations it is given (``combined``), every rank the same, when it is made.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["Mesh", "local_piece", "piece_index", "piece_size", "piece_sizes", "pieces", "join", "chunk_ids"]


def _coordinate(index: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    coord = []
    for size in reversed(shape):
        coord.append(index % size)
        index //= size
    return tuple(reversed(coord))


class Mesh:
    """This rank's view of the device mesh: one process group per mesh axis it belongs to, and one per
    combination of axes in ``combined`` (tuples of axis names in mesh order; see the module docstring).

    ``ranks`` lists the global ranks of the mesh in row-major order of ``shape``. Every rank creates every
    group of every axis (then of every combination), in the same order (torch.distributed requires it); a rank
    keeps the groups it is in. Without an initialised process group (or with one rank) the groups are ``None``
    and nothing communicates.
    """

    def __init__(
        self, rank: int, shape: tuple[int, ...], axes: tuple[str, ...], ranks: tuple[int, ...],
        paired: tuple[str, ...] = (), combined: tuple[tuple[str, ...], ...] = (),
    ) -> None:  # fmt: skip
        self.rank = rank
        self.paired = tuple(paired)
        self.shape = tuple(shape)
        self.axes = tuple(axes)
        self.groups: dict[str | tuple[str, ...], object] = {}
        self.group_ranks: dict[str | tuple[str, ...], tuple[int, ...]] = {}
        distributed = dist.is_available() and dist.is_initialized() and len(ranks) > 1
        self.coord = _coordinate(ranks.index(rank), self.shape)
        keys: list[str | tuple[str, ...]] = list(self.axes)
        for combo in combined:
            combo = tuple(combo)
            if any(a not in self.axes for a in combo) or list(combo) != sorted(combo, key=self.axes.index):
                raise ValueError(f"combined axes {combo} are not axes of {self.axes} in mesh order")
            keys.append(combo)
        for key in keys:
            along = [self.axes.index(a) for a in ((key,) if isinstance(key, str) else key)]
            members_of: dict[tuple[int, ...], list[int]] = {}
            for r in ranks:
                c = _coordinate(ranks.index(r), self.shape)
                members_of.setdefault(tuple(x for i, x in enumerate(c) if i not in along), []).append(r)
            for line in sorted(members_of):
                members = tuple(members_of[line])
                group = dist.new_group(list(members)) if distributed and len(members) > 1 else None
                if rank in members:
                    self.groups[key] = group
                    self.group_ranks[key] = members

    def size(self, axis: str | tuple[str, ...]) -> int:
        """How many ranks the axis (or the combined axes) has (1 for an axis the mesh does not have)."""
        if not isinstance(axis, str):
            n = 1
            for a in axis:
                n *= self.size(a)
            return n
        return self.shape[self.axes.index(axis)] if axis in self.axes else 1

    def index(self, axis: str | tuple[str, ...]) -> int:
        """This rank's position along the axis (combined axes: row-major over them)."""
        if not isinstance(axis, str):
            i = 0
            for a in axis:
                i = i * self.size(a) + self.index(a)
            return i
        return self.coord[self.axes.index(axis)] if axis in self.axes else 0

    def has_group(self, axis: str | tuple[str, ...]) -> bool:
        """Whether the mesh made the group of ``axis`` (every single axis; the combinations it was given)."""
        return axis in self.group_ranks

    def group(self, axis: str | tuple[str, ...]) -> object:
        """The process group of this rank's line along the axis or the combined axes (None when it has one
        rank)."""
        if not isinstance(axis, str) and axis not in self.group_ranks:
            raise KeyError(f"the mesh made no group of the combined axes {axis}: pass them as combined=")
        return self.groups.get(axis)


def chunk_ids(mesh: Mesh, axis: str, index: int | None = None) -> tuple[int, ...]:
    """The chunks rank ``index`` of the axis (this rank by default) holds, in order: ``(i,)`` of ``n`` chunks, or
    on a paired axis ``(i, 2n - 1 - i)`` of ``2n``."""
    n = mesh.size(axis)
    i = mesh.index(axis) if index is None else index
    return (i, 2 * n - 1 - i) if axis in mesh.paired else (i,)


def pieces(x: torch.Tensor, dim: int, mesh: Mesh, axis: str) -> list[torch.Tensor]:
    """Every rank's piece of ``x`` along ``dim``, in rank order (torch.chunk's, or the chunk pairs of a paired
    axis)."""
    n = mesh.size(axis)
    if axis not in mesh.paired:
        return list(x.chunk(n, dim=dim))
    if x.shape[dim] % (2 * n):
        raise ValueError(f"dimension {dim} ({x.shape[dim]}) does not split into {2 * n} chunks on axis {axis!r}")
    chunks = x.chunk(2 * n, dim=dim)
    return [torch.cat([chunks[i], chunks[2 * n - 1 - i]], dim=dim) for i in range(n)]


def join(parts: list[torch.Tensor], dim: int, mesh: Mesh, axis: str) -> torch.Tensor:
    """The whole tensor from every rank's piece in rank order (the inverse of :func:`pieces`)."""
    if axis not in mesh.paired:
        return torch.cat(parts, dim=dim)
    n = len(parts)
    chunks: list[torch.Tensor | None] = [None] * (2 * n)
    for i, part in enumerate(parts):
        chunks[i], chunks[2 * n - 1 - i] = part.chunk(2, dim=dim)
    return torch.cat(chunks, dim=dim)  # type: ignore[arg-type]


def piece_sizes(size: int, parts: int) -> list[int]:
    """The sizes ``torch.chunk`` cuts ``size`` into: ceil(size / parts) each, the remainder last. Uneven
    splits are planned only where every part is non-empty (exactly ``parts`` pieces)."""
    step = -(-size // parts)
    return [max(0, min(step, size - i * step)) for i in range(parts)]


def piece_size(size: int, mesh: Mesh, axis: str) -> int:
    """This rank's share of a dimension of ``size`` split over ``axis`` (torch.chunk semantics)."""
    return piece_sizes(size, mesh.size(axis))[mesh.index(axis)]


def local_piece(full: torch.Tensor, placements, mesh: Mesh) -> torch.Tensor:
    """This rank's piece of a whole tensor: ``placements`` is ((axis, dim), ...) for the sharded axes."""
    for axis, dim in placements:
        full = pieces(full, dim, mesh, axis)[mesh.index(axis)]
    return full.contiguous()


def piece_index(shape, placements, mesh: Mesh, part=None) -> tuple[slice, ...]:
    """The index of this rank's piece in a whole tensor of ``shape`` (what ``local_piece`` keeps), for
    reading only that slice from a file; ``part`` = (dim, start, stop) narrows the tensor first."""
    start = [0] * len(shape)
    size = list(shape)
    if part is not None:
        dim, lo, hi = part
        start[dim], size[dim] = lo, hi - lo
    for axis, dim in placements:
        if axis in mesh.paired:
            raise ValueError(f"a piece on the paired axis {axis!r} is two slices: read the tensor whole")
        step = -(-size[dim] // mesh.size(axis))
        start[dim] += mesh.index(axis) * step
        size[dim] = piece_size(size[dim], mesh, axis)
    return tuple(slice(a, a + n) for a, n in zip(start, size))
