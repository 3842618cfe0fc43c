"""Checkpoint steps that run inside each worker, on the loaded program (``WorkerPool.call_function``).

They read the program's own tables (``TENSORS``, ``ALIASES``, ``PARTS``, ``MESH_*`` of its module), its
tensors and its optimizer; the generated code needs no checkpoint method of its own.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from shardwise.errors import CheckpointError
from shardwise.runtime.checkpoint.files import Reader
from shardwise.runtime.checkpoint.layout import (
    Box,
    ProgramLayout,
    TensorLayout,
    pipeline_layout,
    program_layout,
)
from shardwise.runtime.checkpoint.pieces import Pieces, collect_pieces, json_value, rank_record

__all__ = [
    "layout_of",
    "save_rank",
    "rank_pieces",
    "load_rank",
    "optimizer_info",
    "resolve_key",
    "states_for",
]


def _module_of(program: Any) -> Any:
    module = sys.modules.get(type(program).__module__)
    if module is None or not hasattr(module, "TENSORS"):
        raise CheckpointError("the loaded package is not a shardwise program (it has no TENSORS table)")
    return module


def _chunks(module: Any) -> dict[int, tuple[Any, Any]] | None:
    """A pipeline package's chunks (chunk -> (program module, program)); None for a single program."""
    chunks = getattr(module, "chunks", None)
    return chunks if isinstance(chunks, dict) else None


def _tables(program_module: Any) -> dict[str, Any]:
    m = program_module
    return {
        "tensors": m.TENSORS, "aliases": getattr(m, "ALIASES", {}), "parts": getattr(m, "PARTS", {}),
        "mesh_shape": m.MESH_SHAPE, "mesh_axes": m.MESH_AXES, "mesh_ranks": m.MESH_RANKS,
    }  # fmt: skip


def layout_of(module: Any) -> ProgramLayout:
    """The layout of the loaded program (a single program, or a pipeline package's chunks)."""
    chunks = _chunks(module)
    if chunks is None:
        return program_layout(**_tables(_module_of(module)))
    pipeline = sys.modules[type(module).__module__]
    tables = {c: _tables(program_module) for c, (program_module, _) in chunks.items()}
    return pipeline_layout(pipeline.PP, pipeline.DP, pipeline.TP, tables, getattr(pipeline, "TIED", ()))


def _tensor(module: Any, t: TensorLayout) -> Any:
    if t.chunk is not None:
        program_module, program = module.chunks[t.chunk]
        return getattr(program, program_module.TENSORS[t.key][0])
    return getattr(module, _module_of(module).TENSORS[t.key][0])


def _held(module: Any, layout: ProgramLayout) -> list[TensorLayout]:
    return [t for t in layout.tensors if layout.holds(t, module.rank)]


def _optimizer_states(module: Any, layout: ProgramLayout) -> dict[tuple[str, int | None], Mapping[str, Any]]:
    optimizer = getattr(module, "optimizer", None)
    if optimizer is None:
        return {}
    key_of = {id(_tensor(module, t)): (t.key, t.chunk) for t in _held(module, layout)}
    return {key_of[id(p)]: state for p, state in optimizer.state.items() if id(p) in key_of}


def _pieces(module: Any) -> tuple[ProgramLayout, Pieces]:
    layout = layout_of(module)
    states = _optimizer_states(module, layout)
    pieces = collect_pieces(
        layout,
        module.rank,
        lambda t, box: _tensor(module, t).detach().cpu(),
        lambda t, box: {
            k: (v.detach().cpu() if hasattr(v, "detach") else v)
            for k, v in states.get((t.key, t.chunk), {}).items()
        },
    )
    return layout, pieces


def optimizer_info(module: Any) -> dict[str, Any] | None:
    """The optimizer's class and param groups (hyperparameters, logical keys of their parameters)."""
    optimizer = getattr(module, "optimizer", None)
    if optimizer is None:
        return None
    layout = layout_of(module)
    logical_of = {id(_tensor(module, t)): t.logical for t in _held(module, layout)}
    groups = []
    for group in optimizer.param_groups:
        keys = list(dict.fromkeys(logical_of[id(p)] for p in group["params"] if id(p) in logical_of))
        hyper = {k: json_value(v, f"optimizer setting {k!r}") for k, v in group.items() if k != "params"}
        groups.append({**hyper, "params": keys})
    return {"class": type(optimizer).__name__, "param_groups": groups}


def save_rank(module: Any, directory: str) -> dict[str, Any]:
    """Write this rank's pieces to ``<directory>/rank<r>.safetensors``; returns its manifest record."""
    layout, pieces = _pieces(module)
    info = optimizer_info(module)
    return rank_record(Path(directory), module.rank, layout, pieces, info)


def rank_pieces(module: Any) -> dict[str, Any]:
    """This rank's pieces in memory (for assembling whole tensors in the parent)."""
    layout, pieces = _pieces(module)
    out: dict[str, Any] = {
        "tensors": pieces.tensors, "entries": pieces.entries, "whole_states": pieces.whole_states,
        "values": pieces.values,
    }  # fmt: skip
    out["logical"] = layout.logical_tensors()
    out["optimizer"] = optimizer_info(module)
    return out


def resolve_key(manifest: Mapping[str, Any], t: TensorLayout) -> str | None:
    """The checkpoint's name for program tensor ``t``: its logical key, or a tied name for it."""
    tensors = manifest["tensors"]
    if t.logical in tensors:
        return t.logical
    names = {t.logical, *t.aliases}
    for key, info in tensors.items():
        if names & {key, *info.get("aliases", ())}:
            return key
    return None


def states_for(reader: Reader, manifest: Mapping[str, Any], key: str, box: Box) -> dict[str, Any]:
    """The optimizer state of ``box`` of parameter ``key``: pieces cut to the box, whole tensors, values."""
    states: dict[str, Any] = {}
    for e in manifest["entries"]:
        if e["key"] == key and e["state"] is not None and e["state"] not in states:
            states[e["state"]] = reader.read(key, box, e["state"])
    optimizer = manifest.get("optimizer") or {}
    for e in optimizer.get("whole_states", ()):
        if e["key"] == key:
            from safetensors import safe_open

            with safe_open(str(reader.directory / e["file"]), framework="pt", device="cpu") as f:
                states[e["state"]] = f.get_tensor(e["name"])
    for state, value in (optimizer.get("values") or {}).get(key, {}).items():
        states[state] = value
    return states


def load_rank(module: Any, directory: str, manifest: Mapping[str, Any], load_optimizer: bool) -> None:
    """Read this rank's pieces (of another plan's checkpoint, possibly) and install them; all reading happens
    before anything is changed, so a failure leaves the program as it was."""
    import torch

    layout = layout_of(module)
    new: dict[str, Any] = {}
    states: dict[str, dict[str, Any]] = {}
    with Reader(directory, manifest) as reader:
        for t in _held(module, layout):
            key = resolve_key(manifest, t)
            if key is None:
                raise CheckpointError(f"the checkpoint holds no tensor {t.logical!r}")
            box = layout.box(t, module.rank)
            current = _tensor(module, t)
            value = reader.read(key, box)
            if tuple(value.shape) != tuple(current.shape) or value.dtype != current.dtype:
                raise CheckpointError(
                    f"{t.logical}: the checkpoint gives {tuple(value.shape)} {value.dtype} for this rank's piece, "
                    f"the program holds {tuple(current.shape)} {current.dtype}"
                )
            new[(t.key, t.chunk)] = (t, value)
            if load_optimizer:
                states[(t.key, t.chunk)] = states_for(reader, manifest, key, box)
    optimizer_state = _optimizer_state_dict(module, manifest, states, layout) if load_optimizer else None
    with torch.no_grad():
        for t, value in new.values():
            _tensor(module, t).copy_(value)
    if optimizer_state is not None:
        module.optimizer.load_state_dict(optimizer_state)


def _optimizer_state_dict(
    module: Any,
    manifest: Mapping[str, Any],
    states: Mapping[tuple[str, int | None], dict[str, Any]],
    layout: ProgramLayout,
) -> dict[str, Any] | None:
    optimizer = module.optimizer
    if optimizer is None and not any(p.requires_grad for p in module.parameters()):
        return None  # nothing trainable on this rank: no optimizer state to load
    if optimizer is None:
        raise CheckpointError("this program has no optimizer to load the checkpoint's optimizer state into")
    current = optimizer.state_dict()
    key_of = {id(_tensor(module, t)): t for t in _held(module, layout)}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    indices = [i for group in current["param_groups"] for i in group["params"]]
    state: dict[int, dict[str, Any]] = {}
    for index, p in zip(indices, params, strict=True):
        t = key_of.get(id(p))
        if t is not None and states.get((t.key, t.chunk)):
            state[index] = dict(states[(t.key, t.chunk)])
    saved_groups = (manifest.get("optimizer") or {}).get("param_groups") or []
    groups = []
    for live, described in zip(optimizer.param_groups, current["param_groups"], strict=True):
        first = key_of.get(id(live["params"][0])) if live["params"] else None
        match = next(
            (g for g in saved_groups if first is not None and first.logical in g.get("params", ())), None
        )
        group = dict(described)
        if match is not None:
            for k, v in match.items():
                if k != "params" and k in group:
                    group[k] = tuple(v) if isinstance(group[k], tuple) and isinstance(v, list) else v
        groups.append(group)
    return {"state": state, "param_groups": groups}
