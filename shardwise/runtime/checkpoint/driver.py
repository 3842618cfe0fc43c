"""Saving, loading and resharding checkpoints from the parent process (the side that holds the WorkerPool).

* :func:`save` — every rank writes its own pieces into a temporary directory, the parent writes the manifest
  (checksums, pieces, optimizer) and renames the directory into place.
* :func:`load` — the parent verifies the manifest and every checksum and checks that the checkpoint holds
  the tensors the program needs (same shapes and dtypes, whatever plan saved them) *before* any worker reads;
  then each rank reads exactly its pieces.
* :func:`reshard` — offline, no processes: rewrite a checkpoint for another layout (another plan, or one
  device), piece by piece.
* :func:`gather` — the whole parameters and optimizer state, assembled in the parent from every rank's pieces.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from shardwise.errors import CheckpointError
from shardwise.runtime.checkpoint import worker
from shardwise.runtime.checkpoint.files import (
    FORMAT,
    VERSION,
    Reader,
    commit,
    new_temporary,
    read_manifest,
    write_manifest,
)
from shardwise.runtime.checkpoint.layout import Box, ProgramLayout, TensorLayout, program_layout
from shardwise.runtime.checkpoint.pieces import collect_pieces, rank_record

__all__ = [
    "check_compatible",
    "from_state_dict",
    "gather",
    "load",
    "reshard",
    "save",
    "single_device_layout",
    "to_state_dict",
]


def _merge_headers(
    records: list[dict[str, Any]], tensors_field: str
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The logical tensors and the optimizer (class, param groups) over every rank's record."""
    tensors: dict[str, Any] = {}
    optimizer: dict[str, Any] | None = None
    for r in records:
        for key, info in r[tensors_field].items():
            tensors.setdefault(key, info)
        described = r.get("optimizer")
        if described is None:
            continue
        if optimizer is None:
            optimizer = {
                "class": described["class"],
                "param_groups": [dict(g) for g in described["param_groups"]],
            }
            continue
        for i, group in enumerate(described["param_groups"]):
            if i >= len(optimizer["param_groups"]):
                optimizer["param_groups"].append(dict(group))
            else:
                merged = optimizer["param_groups"][i]
                merged["params"] = list(dict.fromkeys([*merged["params"], *group["params"]]))
    return tensors, optimizer


def _manifest(records: list[dict[str, Any]], meta: Mapping[str, Any]) -> dict[str, Any]:
    logical, described = _merge_headers(records, "tensors")
    files: dict[str, Any] = {}
    entries: list[dict[str, Any]] = []
    whole: list[dict[str, Any]] = []
    values: dict[str, dict[str, Any]] = {}
    for r in records:
        if r["file"] is not None:
            files[r["file"]["name"]] = {"sha256": r["file"]["sha256"], "bytes": r["file"]["bytes"]}
        entries += r["entries"]
        whole += r["whole_states"]
        for key, states in r["values"].items():
            values.setdefault(key, {}).update(states)
    optimizer = None if described is None else {**described, "whole_states": whole, "values": values}
    return {
        "format": FORMAT, "version": VERSION, "meta": dict(meta), "tensors": logical, "files": files,
        "entries": entries, "optimizer": optimizer,
    }  # fmt: skip


def save(pool: Any, directory: str | os.PathLike[str], meta: Mapping[str, Any]) -> Path:
    """Save the program loaded in ``pool`` as a sharded checkpoint at ``directory`` (atomically)."""
    target = Path(directory)
    tmp = new_temporary(target)
    try:
        records = pool.call_function(worker.save_rank, str(tmp))
        write_manifest(tmp, _manifest(records, meta))
        commit(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def check_compatible(manifest: Mapping[str, Any], layout: ProgramLayout, where: str) -> None:
    """Raise ``CheckpointError`` unless the checkpoint holds every tensor of ``layout`` with its shape and
    dtype (parameters the program does not have are an error too: the checkpoint is of another model)."""
    problems: list[str] = []
    used: set[str] = set()
    for logical, info in layout.logical_tensors().items():
        t = next(t for t in layout.tensors if t.logical == logical)
        key = worker.resolve_key(manifest, t)
        if key is None:
            problems.append(f"it has no {logical!r}")
            continue
        used.add(key)
        stored = manifest["tensors"][key]
        if list(stored["shape"]) != list(info["shape"]) or stored["dtype"] != info["dtype"]:
            problems.append(
                f"{logical!r} is {tuple(stored['shape'])} {stored['dtype']} there, {tuple(info['shape'])} "
                f"{info['dtype']} in the model"
            )
    known = {name for key, info in layout.logical_tensors().items() for name in (key, *info["aliases"])}
    extra = [
        k for k, v in manifest["tensors"].items() if k not in used | known and v.get("kind") == "parameter"
    ]
    if extra:
        problems.append(f"it holds parameters the model does not have: {', '.join(extra[:5])}")
    if problems:
        shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
        raise CheckpointError(f"checkpoint {where} does not match the model: {shown}")


def load(
    pool: Any, directory: str | os.PathLike[str], layout: ProgramLayout, *, optimizer: bool | None = None
) -> dict[str, Any]:
    """Load the checkpoint at ``directory`` into the program loaded in ``pool`` (whatever plan saved it).

    ``optimizer``: None loads the optimizer state when both the checkpoint and the program have one; True
    requires it; False loads parameters and buffers only. Returns the manifest."""
    manifest = read_manifest(directory, verify=True)
    check_compatible(manifest, layout, str(directory))
    info = pool.call_function(worker.optimizer_info, ranks="rank0")
    saved = manifest.get("optimizer")
    if optimizer is True and (saved is None or info is None):
        missing = (
            "the checkpoint has no optimizer state" if saved is None else "this program has no optimizer"
        )
        raise CheckpointError(f"cannot load the optimizer state of {directory}: {missing}")
    load_optimizer = bool(saved is not None and info is not None and optimizer is not False)
    if load_optimizer and saved["class"] != info["class"]:
        raise CheckpointError(
            f"checkpoint {directory} holds {saved['class']} state, but this program's optimizer is {info['class']}: "
            "compile with the same optimizer, or load with optimizer=False"
        )
    pool.call_function(worker.load_rank, str(directory), manifest, load_optimizer)
    return manifest


def _assemble(shape: list[int], pieces: list[tuple[Box, Any]]) -> Any:
    import torch

    out = torch.empty(shape, dtype=pieces[0][1].dtype)
    for box, value in pieces:
        out[tuple(slice(o, o + n) for o, n in zip(box.offset, box.shape))] = value
    return out


def gather(pool: Any) -> dict[str, Any]:
    """The whole state from every rank's pieces: ``{"tensors": {key: tensor}, "optimizer": None | {"class",
    "param_groups", "state": {key: {state: tensor or value}}}}`` — keyed by logical state_dict names."""
    records = pool.call_function(worker.rank_pieces)
    logical, described = _merge_headers(records, "logical")
    by_key: dict[tuple[str, str | None], list[tuple[Box, Any]]] = {}
    state: dict[str, dict[str, Any]] = {}
    for r in records:
        for e in r["entries"]:
            by_key.setdefault((e["key"], e["state"]), []).append(
                (Box(tuple(e["offset"]), tuple(e["shape"])), r["tensors"][e["name"]])
            )
        for e in r["whole_states"]:
            state.setdefault(e["key"], {})[e["state"]] = r["tensors"][e["name"]]
        for key, values in r["values"].items():
            state.setdefault(key, {}).update(values)
    tensors = {}
    for (key, name), pieces in sorted(by_key.items(), key=lambda kv: (kv[0][0], kv[0][1] or "")):
        whole = _assemble(logical[key]["shape"], pieces)
        if name is None:
            tensors[key] = whole
        else:
            state.setdefault(key, {})[name] = whole
    optimizer = None if described is None else {**described, "state": state}
    return {"tensors": tensors, "optimizer": optimizer}


def single_device_layout(manifest: Mapping[str, Any]) -> ProgramLayout:
    """The layout of a one-device plan holding every tensor of ``manifest`` whole."""
    tensors = {
        key: (key, tuple(info["shape"]), info["dtype"], info.get("kind", "parameter"), ())
        for key, info in manifest["tensors"].items()
    }
    aliases = {key: tuple(info.get("aliases", ())) for key, info in manifest["tensors"].items()}
    return program_layout(tensors, aliases, {}, (1,), ("dp",), (0,))


def _write_offline(
    target: Path,
    layout: ProgramLayout,
    piece_of: Callable[[TensorLayout, Box], Any],
    states_of: Callable[[TensorLayout, Box], Mapping[str, Any]],
    optimizer: Mapping[str, Any] | None,
    meta: Mapping[str, Any],
) -> Path:
    """Write a checkpoint for ``layout`` rank by rank in this process (atomically, like :func:`save`)."""
    tmp = new_temporary(target)
    try:
        records = [
            rank_record(tmp, rank, layout, collect_pieces(layout, rank, piece_of, states_of), optimizer)
            for rank in layout.mesh_ranks
        ]
        write_manifest(tmp, _manifest(records, meta))
        commit(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def reshard(
    source: str | os.PathLike[str],
    destination: str | os.PathLike[str],
    layout: ProgramLayout | None = None,
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Rewrite the checkpoint at ``source`` for ``layout`` (one device when None) at ``destination``: each
    rank of the new layout gets a file holding exactly its pieces. No processes are started; every piece is
    read from the source one slice at a time."""
    manifest = read_manifest(source, verify=True)
    layout = layout or single_device_layout(manifest)
    check_compatible(manifest, layout, str(source))
    src, target = Path(source), Path(destination)
    if target.resolve() == src.resolve():
        raise CheckpointError("reshard writes a new checkpoint: give a destination other than the source")
    saved = manifest.get("optimizer")
    old_meta = {k: v for k, v in (manifest.get("meta") or {}).items() if k != "resharded_from"}
    with Reader(src, manifest) as reader:
        return _write_offline(
            target, layout,
            lambda t, box: reader.read(_key(manifest, t), box),
            lambda t, box: worker.states_for(reader, manifest, _key(manifest, t), box) if saved else {},
            saved, {**old_meta, **(meta or {}), "resharded_from": old_meta},
        )  # fmt: skip


def from_state_dict(
    state: Mapping[str, Any],
    destination: str | os.PathLike[str],
    layout: ProgramLayout,
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write whole tensors as a checkpoint for ``layout``. ``state`` is what :func:`gather` and
    :func:`to_state_dict` return: ``{"tensors": {key: tensor}, "optimizer": None | {"class",
    "param_groups", "state": {key: {name: tensor or value}}}}``."""
    tensors, optimizer = state["tensors"], state.get("optimizer")
    fake = {"tensors": {k: {"shape": list(v.shape), "aliases": []} for k, v in tensors.items()}}
    for t in layout.tensors:
        key = worker.resolve_key(fake, t)
        if key is None or tuple(tensors[key].shape) != t.logical_shape:
            raise CheckpointError(f"the state holds no tensor {t.logical!r} of shape {t.logical_shape}")

    def cut(value: Any, box: Box) -> Any:
        return value[tuple(slice(o, o + n) for o, n in zip(box.offset, box.shape))].clone()

    def states_of(t: TensorLayout, box: Box) -> dict[str, Any]:
        out = {}
        for name, value in (
            ((optimizer or {}).get("state") or {}).get(worker.resolve_key(fake, t), {}).items()
        ):
            sliced = hasattr(value, "shape") and value.dim() > 0 and tuple(value.shape) == t.logical_shape
            out[name] = cut(value, box) if sliced else value
        return out

    return _write_offline(
        Path(destination), layout, lambda t, box: cut(tensors[worker.resolve_key(fake, t)], box), states_of,
        optimizer, dict(meta or {}),
    )  # fmt: skip


def to_state_dict(source: str | os.PathLike[str]) -> dict[str, Any]:
    """The whole tensors and optimizer state of the checkpoint at ``source`` (verified first), in the form
    :func:`gather` returns."""
    manifest = read_manifest(source, verify=True)
    layout = single_device_layout(manifest)
    tensors: dict[str, Any] = {}
    state: dict[str, dict[str, Any]] = {}
    saved = manifest.get("optimizer")
    with Reader(source, manifest) as reader:
        for t in layout.tensors:
            box = layout.box(t, 0)
            tensors[t.logical] = reader.read(t.logical, box)
            if saved:
                states = worker.states_for(reader, manifest, t.logical, box)
                if states:
                    state[t.logical] = states
    optimizer = (
        None
        if saved is None
        else {"class": saved["class"], "param_groups": saved["param_groups"], "state": state}
    )
    return {"tensors": tensors, "optimizer": optimizer}


def _key(manifest: Mapping[str, Any], t: Any) -> str:
    key = worker.resolve_key(manifest, t)
    if key is None:  # check_compatible ran first
        raise CheckpointError(f"the checkpoint holds no tensor {t.logical!r}")
    return key
