"""The on-disk form of a sharded checkpoint: a directory with ``manifest.json`` and per-rank safetensors files.

::

    ckpt/
      manifest.json          format, version, the logical tensors, the optimizer (class, param groups,
                             non-tensor state), every file's SHA-256 and size, and every stored piece
      rank0.safetensors      the pieces rank 0 writes (params and optimizer state), named t0, t1, ...
      rank1.safetensors      ...

An entry ``{"file", "name", "key", "state", "offset", "shape"}`` says that tensor ``name`` of ``file`` is the
box ``offset``/``shape`` of logical tensor ``key`` (``state`` = None) or of its optimizer state ``state``.

Writing is atomic: everything goes into a hidden temporary sibling directory, the manifest last, and the
directory is renamed into place (:func:`commit`); a crash leaves the previous checkpoint (or nothing) behind.
Reading verifies the format, the version, every file's size and SHA-256 and that the pieces of each tensor
cover it exactly, before any tensor is used (:func:`read_manifest`). Tensors are read with safetensors only
(never pickle), one slice at a time (:class:`Reader`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from shardwise.errors import CheckpointError
from shardwise.runtime.checkpoint.layout import Box, intersect

__all__ = [
    "FORMAT",
    "VERSION",
    "MANIFEST",
    "Reader",
    "commit",
    "file_digest",
    "new_temporary",
    "read_manifest",
    "write_manifest",
    "write_tensors",
]

FORMAT = "shardwise-checkpoint"
VERSION = 1
MANIFEST = "manifest.json"
_CHUNK = 1 << 20


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform/file system can open a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_tensors(path: Path, tensors: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``tensors`` (name -> CPU tensor) as safetensors at ``path`` (a temporary name, then a rename);
    returns ``{"sha256", "bytes"}``."""
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    tmp.replace(path)
    return {"sha256": file_digest(path), "bytes": path.stat().st_size}


def write_manifest(directory: Path, manifest: Mapping[str, Any]) -> None:
    path = directory / MANIFEST
    tmp = directory / f".{MANIFEST}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    _fsync_dir(directory)


def new_temporary(target: Path) -> Path:
    """A fresh hidden directory beside ``target`` to write a checkpoint into before :func:`commit`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    return tmp


def commit(tmp: Path, target: Path) -> None:
    """Move the finished checkpoint ``tmp`` to ``target`` (replacing an older one there)."""
    _fsync_dir(tmp)
    if target.exists():
        if not (target / MANIFEST).is_file() and any(target.iterdir()):
            raise CheckpointError(
                f"{target} exists and is not a shardwise checkpoint: choose an empty or new directory"
            )
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:12]}"
        target.rename(old)
        try:
            tmp.rename(target)
        except BaseException:
            old.rename(target)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(target)
    _fsync_dir(target.parent)


def _bad(directory: Path, what: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {directory}: {what}")


def read_manifest(directory: str | os.PathLike[str], *, verify: bool = True) -> dict[str, Any]:
    """The manifest of the checkpoint at ``directory``; with ``verify``, every file's size and SHA-256 and the
    coverage of every tensor are checked first. Any problem is a ``CheckpointError`` saying what is wrong."""
    d = Path(directory)
    if not d.is_dir():
        raise _bad(d, "not found (expected a directory written by save_checkpoint)")
    path = d / MANIFEST
    if not path.is_file():
        raise _bad(d, f"no {MANIFEST}: the directory is not a checkpoint, or saving it did not finish")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad(d, f"{MANIFEST} is unreadable or truncated ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _bad(d, f"{MANIFEST} is not a shardwise checkpoint manifest")
    if manifest.get("version") != VERSION:
        raise _bad(d, f"format version {manifest.get('version')!r}; this shardwise reads version {VERSION}")
    for field in ("tensors", "files", "entries"):
        if not isinstance(manifest.get(field), dict if field != "entries" else list):
            raise _bad(d, f"{MANIFEST} lacks a valid {field!r} section: the file is corrupt")
    if verify:
        _verify_files(d, manifest)
        _verify_coverage(d, manifest)
    return manifest


def _verify_files(d: Path, manifest: Mapping[str, Any]) -> None:
    for name, info in manifest["files"].items():
        if Path(name).name != name or name.startswith("."):
            raise _bad(d, f"{MANIFEST} names a file outside the checkpoint ({name!r})")
        path = d / name
        if not path.is_file():
            raise _bad(d, f"{name} is missing")
        size = path.stat().st_size
        if size != info.get("bytes"):
            raise _bad(d, f"{name} has {size} bytes, the manifest says {info.get('bytes')}: the file is truncated "
                          "or was changed after saving")  # fmt: skip
        if file_digest(path) != info.get("sha256"):
            raise _bad(d, f"{name} does not match its SHA-256 checksum: the file is corrupt")


def _verify_coverage(d: Path, manifest: Mapping[str, Any]) -> None:
    """Every logical tensor (and each optimizer state that is stored in pieces) is covered exactly once."""
    covered: dict[tuple[str, str | None], int] = {}
    for e in manifest["entries"]:
        try:
            key, state, shape, offset = e["key"], e["state"], e["shape"], e["offset"]
            whole = manifest["tensors"][key]["shape"]
            if e["file"] not in manifest["files"] or len(shape) != len(whole) or len(offset) != len(whole):
                raise KeyError
            if any(o < 0 or o + n > w for o, n, w in zip(offset, shape, whole)):
                raise KeyError
        except (KeyError, TypeError):
            raise _bad(d, f"{MANIFEST} has a malformed entry {e!r}: the file is corrupt") from None
        covered[(key, state)] = covered.get((key, state), 0) + math.prod(shape)
    for (key, state), n in covered.items():
        want = math.prod(manifest["tensors"][key]["shape"])
        if n != want:
            what = key if state is None else f"optimizer state {state!r} of {key}"
            raise _bad(
                d, f"the pieces of {what} hold {n} of its {want} elements: the checkpoint is incomplete"
            )
    for key in manifest["tensors"]:
        if (key, None) not in covered and math.prod(manifest["tensors"][key]["shape"]):
            raise _bad(d, f"no piece of {key} is stored: the checkpoint is incomplete")


class Reader:
    """Cuts boxes of logical tensors (or of their optimizer state) out of a verified checkpoint."""

    def __init__(self, directory: str | os.PathLike[str], manifest: Mapping[str, Any]) -> None:
        self.directory = Path(directory)
        self.manifest = manifest
        self._by_key: dict[tuple[str, str | None], list[Mapping[str, Any]]] = {}
        for e in manifest["entries"]:
            self._by_key.setdefault((e["key"], e["state"]), []).append(e)
        self._files: dict[str, Any] = {}
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()
        self._files.clear()

    def has(self, key: str, state: str | None = None) -> bool:
        return (key, state) in self._by_key

    def _open(self, name: str) -> Any:
        if name not in self._files:
            from safetensors import safe_open

            self._files[name] = self._stack.enter_context(
                safe_open(str(self.directory / name), framework="pt", device="cpu")
            )
        return self._files[name]

    def read(self, key: str, box: Box, state: str | None = None) -> Any:
        """The ``box`` of logical tensor ``key`` (or of its optimizer state ``state``), as a new CPU tensor."""
        import torch

        entries = self._by_key.get((key, state))
        if not entries:
            what = key if state is None else f"optimizer state {state!r} of {key}"
            raise CheckpointError(f"checkpoint {self.directory} holds no {what}")
        dtype = None
        out = None
        filled = 0
        for e in entries:
            stored = Box(tuple(e["offset"]), tuple(e["shape"]))
            common = intersect(stored, box)
            if common is None:
                continue
            index = tuple(
                slice(c - s, c - s + n) for c, s, n in zip(common.offset, stored.offset, common.shape)
            )
            f = self._open(e["file"])
            values = f.get_slice(e["name"])[index] if index else f.get_tensor(e["name"])
            if out is None:
                dtype = values.dtype
                out = torch.empty(box.shape, dtype=dtype)
            target = tuple(
                slice(c - b, c - b + n) for c, b, n in zip(common.offset, box.offset, common.shape)
            )
            out[target] = values
            filled += common.numel
        if out is None or filled != box.numel:
            if box.numel == 0 and entries:
                return torch.empty(box.shape, dtype=_dtype(self.manifest["tensors"][key]["dtype"]))
            raise CheckpointError(
                f"checkpoint {self.directory}: the stored pieces of {key} do not cover {box}"
            )
        return out


def _dtype(name: str) -> Any:
    import torch

    return getattr(torch, name)
