"""This rank's view of the device mesh, and the pieces a tensor is cut into along a mesh axis.

Pieces follow ``torch.chunk``: a dimension of ``size`` split ``n`` ways gives ``ceil(size / n)`` elements to
each rank in order, the remainder to the last ones (planned only where every piece is non-empty).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["Mesh", "local_piece", "piece_index", "piece_size", "piece_sizes"]


def _coordinate(index: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    coord = []
    for size in reversed(shape):
        coord.append(index % size)
        index //= size
    return tuple(reversed(coord))


class Mesh:
    """This rank's view of the device mesh: one process group per mesh axis it belongs to.

    ``ranks`` lists the global ranks of the mesh in row-major order of ``shape``. Every rank creates every
    group of every axis, in the same order (torch.distributed requires it); a rank keeps the groups it is in.
    Without an initialised process group (or with one rank) the groups are ``None`` and nothing communicates.
    """

    def __init__(
        self, rank: int, shape: tuple[int, ...], axes: tuple[str, ...], ranks: tuple[int, ...]
    ) -> None:
        self.rank = rank
        self.shape = tuple(shape)
        self.axes = tuple(axes)
        self.groups: dict[str, object] = {}
        self.group_ranks: dict[str, tuple[int, ...]] = {}
        distributed = dist.is_available() and dist.is_initialized() and len(ranks) > 1
        self.coord = _coordinate(ranks.index(rank), self.shape)
        for a, axis in enumerate(self.axes):
            members_of: dict[tuple[int, ...], list[int]] = {}
            for r in ranks:
                c = _coordinate(ranks.index(r), self.shape)
                members_of.setdefault(c[:a] + c[a + 1 :], []).append(r)
            for key in sorted(members_of):
                members = tuple(members_of[key])
                group = dist.new_group(list(members)) if distributed and self.shape[a] > 1 else None
                if rank in members:
                    self.groups[axis] = group
                    self.group_ranks[axis] = members

    def size(self, axis: str) -> int:
        """How many ranks the axis has (1 for an axis the mesh does not have)."""
        return self.shape[self.axes.index(axis)] if axis in self.axes else 1

    def index(self, axis: str) -> int:
        """This rank's position along the axis."""
        return self.coord[self.axes.index(axis)] if axis in self.axes else 0

    def group(self, axis: str) -> object:
        """The process group of this rank's line along the axis (None when it has one rank)."""
        return self.groups.get(axis)


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
        full = full.chunk(mesh.size(axis), dim=dim)[mesh.index(axis)]
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
        step = -(-size[dim] // mesh.size(axis))
        start[dim] += mesh.index(axis) * step
        size[dim] = piece_size(size[dim], mesh, axis)
    return tuple(slice(a, a + n) for a, n in zip(start, size))
