"""Placements of a tensor on one mesh axis, sharding specs and logical device meshes."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["Shard", "Replicate", "Partial", "Placement", "ShardingSpec", "DeviceMesh", "chunks_cleanly", "PAIRED_AXIS",
           "pairs_chunks", "DATA_AXES", "zero_group", "CONTEXT_AXIS"]

#: the mesh axis whose pieces are chunk pairs where every dimension it splits allows (context parallelism's:
#: rank i of cp holds chunks i and 2cp-1-i of the sequence, so that a causal attention's work is balanced)
PAIRED_AXIS = "cp"
#: the context-parallel axis: the only one that may split an op's context labels (``dimops.OpDims.context``)
CONTEXT_AXIS = "cp"

#: the data-parallel axes of a flat plan's mesh: ``dp``, ``ep`` (expert parallelism below dp: an inner data
#: axis) and ``cp`` (context parallelism). Every rank along them holds the same dense weights (torchtitan's
#: ``dp_shard_cp``), so a gradient summed over several of them is summed over their combined group at once,
#: and ZeRO shards a parameter's state (and at stage 3 the parameter) over them together.
DATA_AXES = ("dp", "ep", "cp")


def pairs_chunks(size: int, ways: int) -> bool:
    """Whether a dimension of ``size`` split ``ways`` ways is cut into chunk pairs: ``2 ways`` equal chunks."""
    return ways > 1 and size % (2 * ways) == 0


def chunks_cleanly(size: int, ways: int) -> bool:
    """Whether ``torch.chunk`` cuts ``size`` into exactly ``ways`` non-empty pieces (ceil(size / ways) each,
    the remainder last): always for a multiple of ``ways``; e.g. not for 5 in 4 ways (2, 2, 1)."""
    return size >= ways and (ways - 1) * -(-size // ways) < size


@dataclass(frozen=True)
class Shard:
    """Split along tensor dimension ``dim`` across the mesh axis."""

    dim: int

    def __str__(self) -> str:
        return f"S({self.dim})"


@dataclass(frozen=True)
class Replicate:
    """Every device of the mesh axis holds the whole tensor."""

    def __str__(self) -> str:
        return "R"


@dataclass(frozen=True)
class Partial:
    """Every device holds a partial result; the full value is their reduction with ``op``."""

    op: str = "sum"

    def __str__(self) -> str:
        return "P" if self.op == "sum" else f"P({self.op})"


Placement = Shard | Replicate | Partial


@dataclass(frozen=True)
class ShardingSpec:
    """One placement per mesh axis, in the mesh's axis order."""

    placements: tuple[Placement, ...]

    def __str__(self) -> str:
        return "[" + ", ".join(str(p) for p in self.placements) + "]"

    @property
    def is_replicated(self) -> bool:
        return all(isinstance(p, Replicate) for p in self.placements)

    def local_shape(self, shape: tuple[int, ...], mesh: DeviceMesh) -> tuple[int, ...]:
        """The shape of the biggest device's piece: pieces are torch.chunk's, ceil(size / ways) for the first
        devices and the remainder on the last when a size is not a multiple of its axis (the planner splits
        such a dimension only where that is exact, see ``passes.sharding.strategy.split_is_valid``)."""
        out = list(shape)
        for size, placement in zip(mesh.shape, self.placements, strict=True):
            if isinstance(placement, Shard):
                out[placement.dim] = -(-out[placement.dim] // size)
        return tuple(out)

    def uneven_dims(self, shape: tuple[int, ...], mesh: DeviceMesh) -> tuple[int, ...]:
        """The dimensions of ``shape`` split in pieces of different sizes (not a multiple of the ways)."""
        ways: dict[int, int] = {}
        for size, placement in zip(mesh.shape, self.placements, strict=True):
            if isinstance(placement, Shard):
                ways[placement.dim] = ways.get(placement.dim, 1) * size
        return tuple(d for d, w in sorted(ways.items()) if d < len(shape) and shape[d] % w)


@dataclass(frozen=True)
class DeviceMesh:
    """A logical n-dimensional arrangement of global ranks, with one name per axis (e.g. ("dp", "tp"))."""

    shape: tuple[int, ...]
    axis_names: tuple[str, ...]
    ranks: tuple[int, ...]  # row-major over ``shape``

    def __post_init__(self) -> None:
        if len(self.shape) != len(self.axis_names):
            raise ValueError(f"mesh shape {self.shape} and axis names {self.axis_names} differ in length")
        if math.prod(self.shape) != len(self.ranks):
            raise ValueError(
                f"mesh shape {self.shape} needs {math.prod(self.shape)} ranks, got {len(self.ranks)}"
            )

    @property
    def size(self) -> int:
        return len(self.ranks)

    def axis_size(self, name: str) -> int:
        return self.shape[self.axis_names.index(name)] if name in self.axis_names else 1

    def coordinate(self, rank: int) -> tuple[int, ...]:
        index = self.ranks.index(rank)
        coord = []
        for size in reversed(self.shape):
            coord.append(index % size)
            index //= size
        return tuple(reversed(coord))

    def groups(self, axis: str | tuple[str, ...]) -> list[tuple[int, ...]]:
        """The groups of ranks that vary only along ``axis`` (one group per position of the other axes); a
        tuple of axes: along all of them (their combined group, row-major over them)."""
        along = {self.axis_names.index(a) for a in ((axis,) if isinstance(axis, str) else axis)}
        groups: dict[tuple[int, ...], list[int]] = {}
        for r in self.ranks:
            c = self.coordinate(r)
            key = tuple(x for i, x in enumerate(c) if i not in along)
            groups.setdefault(key, []).append(r)
        return [tuple(g) for _, g in sorted(groups.items())]

    def group_size(self, axes: str | tuple[str, ...]) -> int:
        """Ranks along ``axes`` (one axis or several combined; 1 for axes the mesh does not have)."""
        return math.prod(self.axis_size(a) for a in ((axes,) if isinstance(axes, str) else axes))

    def __str__(self) -> str:
        return " x ".join(f"{n}={s}" for n, s in zip(self.axis_names, self.shape, strict=True))


def zero_group(mesh: DeviceMesh, axes) -> tuple[str, ...]:
    """The data axes (``DATA_AXES``) among ``axes`` (a parameter's gradient-reduction axes; every data axis of
    the mesh when None) that have more than one rank, in mesh order: the group a gradient over ``axes`` is summed
    over at once, and the group ZeRO shards that parameter over (``runtime.lib.gradients.reduction_axes``)."""
    names = mesh.axis_names if axes is None else tuple(axes)
    return tuple(a for a in mesh.axis_names if a in DATA_AXES and a in names and mesh.axis_size(a) > 1)
