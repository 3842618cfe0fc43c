"""The tensor tables of a plan's program (``TENSORS``, ``ALIASES``, ``PARTS`` and the mesh), as data.

The same tables ``render_program`` writes into program.py, built without generating code: checkpoints use
them to map pieces between plans (``shardwise.runtime.checkpoint.program_layout``). A test checks that they
equal the generated program's own tables.
"""

from __future__ import annotations

from typing import Any

from shardwise.ir.placement import Shard
from shardwise.ir.plan import ExecutionPlan

__all__ = ["tensor_tables"]


def tensor_tables(plan: ExecutionPlan) -> dict[str, Any]:
    """The tables of ``plan``'s program; for a pipeline plan, ``{"pipeline": {"pp", "dp", "tp", "tied",
    "chunks": {chunk: tables of that chunk's program}}}`` (see ``checkpoint.layout.layout_from_tables``)."""
    spec = getattr(plan, "pipeline", None)
    if spec is not None:
        chunks = {s.chunk: _program_tables(s.plan) for s in spec.stages}
        tied = tuple((key, tuple(chunks_)) for key, chunks_ in spec.tied)
        return {"pipeline": {"pp": spec.pp, "dp": spec.dp, "tp": spec.tp, "tied": tied, "chunks": chunks}}
    return _program_tables(plan)


def _program_tables(plan: ExecutionPlan) -> dict[str, Any]:
    """``{"tensors", "aliases", "parts", "mesh_shape", "mesh_axes", "mesh_ranks"}`` of ``plan``'s program;
    ``tensors`` maps each state_dict key to (attribute, whole shape, dtype, kind, ((mesh axis, dim), ...)),
    where the attribute is left empty (it is a name inside the program, not data about the tensor)."""
    mesh = plan.mesh
    placements = dict(plan.param_placements)
    tensors: dict[str, tuple[Any, ...]] = {}
    for p in plan.graph.params:
        spec = placements.get(p.key)
        splits = []
        if spec is not None:
            for axis, placement in zip(mesh.axis_names, spec.placements, strict=True):
                if isinstance(placement, Shard):
                    splits.append((axis, placement.dim))
        kind = p.kind if p.kind in ("parameter", "state") else "buffer"
        tensors[p.key] = ("", tuple(p.spec.shape), p.spec.dtype, kind, tuple(splits))
    return {
        "tensors": tensors,  # checkpoint.program_layout(**tables) takes these names
        "aliases": {p.key: tuple(p.aliases) for p in plan.graph.params if p.aliases},
        "parts": {p.key: (p.part_of, *p.part) for p in plan.graph.params if p.part_of},
        "mesh_shape": tuple(mesh.shape),
        "mesh_axes": tuple(mesh.axis_names),
        "mesh_ranks": tuple(mesh.ranks),
    }
