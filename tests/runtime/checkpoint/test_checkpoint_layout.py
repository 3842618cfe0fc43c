"""Checkpoint layouts and files without processes: pieces tile every tensor, exactly one writer per piece,
offline writing/reading/resharding round trips, and every kind of damage is a clear CheckpointError."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch

from shardwise.errors import CheckpointError
from shardwise.runtime.checkpoint import (
    ProgramLayout,
    from_state_dict,
    program_layout,
    read_manifest,
    reshard,
    single_device_layout,
    to_state_dict,
)
from shardwise.runtime.checkpoint.layout import chunk_box


def _layout(
    mesh_shape: tuple[int, ...], axes: tuple[str, ...], splits: dict[str, tuple], parts=None
) -> ProgramLayout:
    tensors = {
        "emb.weight": ("a", (12, 8), "float32", "parameter", splits.get("emb.weight", ())),
        "qkv.weight.part0": ("b", (4, 8), "float32", "parameter", splits.get("qkv.weight.part0", ())),
        "qkv.weight.part1": ("c", (8, 8), "float32", "parameter", splits.get("qkv.weight.part1", ())),
        "norm.running_mean": ("d", (8,), "float32", "buffer", splits.get("norm.running_mean", ())),
        "scale": ("e", (), "float32", "parameter", ()),
    }
    parts = parts or {
        "qkv.weight.part0": ("qkv.weight", 0, 0, 4),
        "qkv.weight.part1": ("qkv.weight", 0, 4, 12),
    }
    ranks = tuple(range(math.prod(mesh_shape)))
    return program_layout(tensors, {"emb.weight": ("head.weight",)}, parts, mesh_shape, axes, ranks)


LAYOUTS = {
    "one device": ((1,), ("dp",), {}),
    "dp=2": ((2, 1), ("dp", "tp"), {}),
    "tp=2": ((1, 2), ("dp", "tp"), {"emb.weight": (("tp", 0),), "qkv.weight.part0": (("tp", 0),),
                                    "qkv.weight.part1": (("tp", 0),), "norm.running_mean": (("tp", 0),)}),
    "dp=2 x tp=2, zero-3": ((2, 2), ("dp", "tp"), {"emb.weight": (("tp", 1), ("dp", 0)),
                                                   "qkv.weight.part1": (("dp", 1), ("tp", 0))}),
    "tp=4 uneven": ((1, 4), ("dp", "tp"), {"emb.weight": (("tp", 1),), "norm.running_mean": (("tp", 0),)}),
}  # fmt: skip


@pytest.mark.parametrize("name", LAYOUTS)
def test_writer_pieces_tile_every_logical_tensor_exactly_once(name: str) -> None:
    layout = _layout(*LAYOUTS[name])
    logical = layout.logical_tensors()
    assert logical["qkv.weight"]["shape"] == [12, 8]
    assert logical["emb.weight"]["aliases"] == ["head.weight"]
    for key, info in logical.items():
        count = torch.zeros(info["shape"], dtype=torch.int64)
        for t in (t for t in layout.tensors if t.logical == key):
            for rank in layout.mesh_ranks:
                box = layout.box(t, rank)
                if layout.writes(t, rank):
                    count[tuple(slice(o, o + n) for o, n in zip(box.offset, box.shape))] += 1
        assert torch.equal(count, torch.ones_like(count)), (name, key)


def test_chunk_box_follows_torch_chunk() -> None:
    for size, parts in itertools.product(range(1, 11), range(1, 5)):
        pieces = torch.arange(size).chunk(parts)
        for index in range(parts):
            box = chunk_box((size,), [(0, parts, index)])
            want = pieces[index].tolist() if index < len(pieces) else []
            assert list(range(box.offset[0], box.offset[0] + box.shape[0])) == want


def _state(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "emb.weight": torch.randn(12, 8, generator=g),
        "qkv.weight": torch.randn(12, 8, generator=g),
        "norm.running_mean": torch.randn(8, generator=g),
        "scale": torch.randn((), generator=g),
    }
    state = {
        key: {"step": torch.tensor(3.0), "exp_avg": torch.randn(t.shape, generator=g), "note": None}
        for key, t in tensors.items()
        if key != "norm.running_mean"
    }
    groups = [{"lr": 0.01, "betas": [0.9, 0.999], "params": ["emb.weight", "qkv.weight", "scale"]}]
    return {"tensors": tensors, "optimizer": {"class": "AdamW", "param_groups": groups, "state": state}}


def _equal(a: dict, b: dict) -> None:
    assert a["tensors"].keys() == b["tensors"].keys()
    for k in a["tensors"]:
        assert torch.equal(a["tensors"][k], b["tensors"][k]), k
    assert a["optimizer"]["class"] == b["optimizer"]["class"]
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    for key, states in a["optimizer"]["state"].items():
        for name, value in states.items():
            other = b["optimizer"]["state"][key][name]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other, (key, name)


@pytest.mark.parametrize("first", ["tp=2", "dp=2 x tp=2, zero-3"])
@pytest.mark.parametrize("second", ["one device", "tp=4 uneven", "dp=2"])
def test_offline_reshard_between_layouts_is_bit_identical(tmp_path: Path, first: str, second: str) -> None:
    state = _state()
    a, b = _layout(*LAYOUTS[first]), _layout(*LAYOUTS[second])
    from_state_dict(state, tmp_path / "a", a)
    manifest = read_manifest(tmp_path / "a")
    assert sorted(manifest["files"]) == [
        f"rank{r}.safetensors" for r in a.mesh_ranks if any(a.writes(t, r) for t in a.tensors)
    ]
    reshard(tmp_path / "a", tmp_path / "b", b)
    _equal(state, to_state_dict(tmp_path / "b"))
    reshard(tmp_path / "b", tmp_path / "c")  # consolidate: one file
    assert list(read_manifest(tmp_path / "c")["files"]) == ["rank0.safetensors"]
    _equal(state, to_state_dict(tmp_path / "c"))


def _saved(tmp_path: Path) -> Path:
    path = tmp_path / "ckpt"
    from_state_dict(_state(), path, _layout(*LAYOUTS["tp=2"]))
    return path


def test_flipped_byte_is_a_checksum_error(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    f = path / "rank1.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"rank1.safetensors does not match its SHA-256 checksum"):
        read_manifest(path)
    with pytest.raises(CheckpointError, match="checksum"):
        to_state_dict(path)


def test_truncated_file_and_manifest(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    f = path / "rank0.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(
        CheckpointError,
        match=r"rank0.safetensors has 100 bytes, the manifest says \d+: the file is truncated",
    ):
        read_manifest(path)
    m = path / "manifest.json"
    m.write_text(m.read_text()[:50])
    with pytest.raises(CheckpointError, match="manifest.json is unreadable or truncated"):
        read_manifest(path)


def test_missing_pieces_files_and_foreign_directories(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["entries"] = [
        e
        for e in manifest["entries"]
        if not (e["key"] == "qkv.weight" and e["state"] is None and e["offset"][0] > 0)
    ]
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        CheckpointError,
        match="the pieces of qkv.weight hold .* of its 96 elements: the checkpoint is incomplete",
    ):
        read_manifest(path)
    path = _saved(tmp_path / "2")
    (path / "rank1.safetensors").unlink()
    with pytest.raises(CheckpointError, match="rank1.safetensors is missing"):
        read_manifest(path)
    with pytest.raises(CheckpointError, match="no manifest.json"):
        read_manifest(tmp_path)
    with pytest.raises(CheckpointError, match="not found"):
        read_manifest(tmp_path / "nothing")
    manifest["version"] = 99
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="format version 99; this shardwise reads version 1"):
        read_manifest(path)
    manifest["version"], manifest["files"] = 1, {"../../etc/passwd": {"bytes": 1, "sha256": "x"}}
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="names a file outside the checkpoint"):
        read_manifest(path)


def test_checkpoint_of_another_model_is_refused(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    other = program_layout(
        {"emb.weight": ("a", (12, 4), "float32", "parameter", ()), "extra": ("b", (3,), "float32", "parameter", ())},
        {}, {}, (1,), ("dp",), (0,),
    )  # fmt: skip
    with pytest.raises(
        CheckpointError,
        match=r"does not match the model: 'emb.weight' is \(12, 8\) float32 there, \(12, 4\) float32 in the model; it has no 'extra'",
    ):
        reshard(path, tmp_path / "out", other)
    assert not (tmp_path / "out").exists()


def test_writing_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A save that fails half way leaves the previous checkpoint whole and no temporary directory."""
    path = _saved(tmp_path)
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    from shardwise.runtime.checkpoint import driver

    def broken(directory: Path, manifest: dict) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(driver, "write_manifest", broken)
    with pytest.raises(OSError, match="disk full"):
        from_state_dict(_state(1), path, _layout(*LAYOUTS["dp=2"]))
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    monkeypatch.undo()
    from_state_dict(_state(1), path, single_device_layout(read_manifest(path)))  # replaces it
    _equal(_state(1), to_state_dict(path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    (tmp_path / "not-a-checkpoint").mkdir()
    (tmp_path / "not-a-checkpoint" / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="exists and is not a shardwise checkpoint"):
        from_state_dict(_state(), tmp_path / "not-a-checkpoint", _layout(*LAYOUTS["dp=2"]))
    assert (tmp_path / "not-a-checkpoint" / "notes.txt").read_text() == "mine"
