"""Weights in and out of a program: this rank's pieces from a whole state_dict or a file, the whole tensors
back from every rank's pieces.

A program describes its tensors by three tables (module constants of the generated ``program.py``):
``tensors``: state_dict key -> (attribute, whole shape, dtype, kind, ((mesh axis, dim it is split on), ...));
kind ``"state"`` is a program's own state (a KV cache): zeros at first, neither loaded nor returned;
``aliases``: key -> other state_dict names of the same tensor (tied weights); ``parts``: key -> (whole
tensor's key, dim, start, stop) for a tensor that is a slice of another state_dict tensor.
"""

from __future__ import annotations

import torch

from . import comm
from .mesh import Mesh, local_piece, piece_index, piece_size

__all__ = ["full_state_dict", "load_full_state_dict", "load_weights", "whole"]


def whole(piece: torch.Tensor, placements, mesh: Mesh, shape=None) -> torch.Tensor:
    """The whole tensor from every rank's piece (the inverse of ``local_piece``); ``shape`` (the whole
    shape) is needed when a piece is uneven (a dimension not a multiple of its axis size)."""
    sizes = []  # the size of each split dimension before each split, in split order
    current = list(shape) if shape is not None else None
    for axis, dim in placements:
        sizes.append(current[dim] if current is not None else None)
        if current is not None:
            current[dim] = piece_size(current[dim], mesh, axis)
    for (axis, dim), size in reversed(list(zip(placements, sizes))):
        piece = comm.gather(piece, dim, mesh, axis, size)
    return piece


def load_full_state_dict(program, state_dict: dict[str, torch.Tensor], tensors, aliases, parts) -> None:
    """Copy this rank's piece of every tensor of ``program`` from a whole (unsharded) state_dict."""
    for key, (attr, shape, _, kind, placements) in tensors.items():
        if kind == "state":
            continue
        full = state_dict.get(key)
        if full is None and key in parts:
            source, dim, start, stop = parts[key]
            full = state_dict[source].narrow(dim, start, stop - start) if source in state_dict else None
        if full is None:
            full = next((state_dict[a] for a in aliases.get(key, ()) if a in state_dict), None)
        if full is None:
            raise KeyError(f"the weights have no tensor {key!r} (or an alias of it)")
        if tuple(full.shape) != tuple(shape):
            raise ValueError(
                f"{key}: the weights hold shape {tuple(full.shape)}, the plan needs {tuple(shape)}"
            )
        with torch.no_grad():
            getattr(program, attr).copy_(local_piece(full, placements, program.mesh))


def load_weights(program, path: str, tensors, aliases, parts) -> None:
    """Load this rank's pieces from a safetensors file (reading only this rank's slice of each tensor) or
    from a torch state_dict file (weights only)."""
    if not str(path).endswith(".safetensors"):
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        load_full_state_dict(program, state, tensors, aliases, parts)
        return
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        stored = set(f.keys())
        for key, (attr, shape, _, kind, placements) in tensors.items():
            if kind == "state":
                continue
            name, part = key, None
            if key not in stored and key in parts:
                name, part = parts[key][0], parts[key][1:]
            if name not in stored:
                name = next((a for a in aliases.get(key, ()) if a in stored), name)
            if name not in stored:
                raise KeyError(f"{path} has no tensor {key!r} (or an alias of it)")
            local = getattr(program, attr)
            if not placements and part is None:
                piece = f.get_tensor(name)
            elif any(axis in program.mesh.paired for axis, _ in placements):
                # chunk pairs (a weight ZeRO-3 splits over the context-parallel axis): two slices, read whole
                full = f.get_tensor(name)
                if part is not None:
                    full = full.narrow(part[0], part[1], part[2] - part[1])
                piece = local_piece(full, placements, program.mesh)
            else:
                source = f.get_slice(name)
                piece = source[piece_index(source.get_shape(), placements, program.mesh, part)]
            if tuple(piece.shape) != tuple(local.shape):
                raise ValueError(f"{key}: {path} holds another shape than the plan's {shape}")
            with torch.no_grad():
                local.copy_(piece)


def full_state_dict(program, tensors, aliases, parts) -> dict[str, torch.Tensor]:
    """Every tensor of ``program``, whole (gathered from the other ranks), keyed by its state_dict name and
    aliases; tensors that are slices of one state_dict tensor are joined again."""
    out = {}
    pieces: dict[str, list] = {}
    for key, (attr, shape, dtype, kind, placements) in tensors.items():
        if kind == "state":
            continue
        value = whole(getattr(program, attr).detach(), placements, program.mesh, shape).to(
            getattr(torch, dtype)
        )
        if key in parts:
            source, dim, start, _ = parts[key]
            pieces.setdefault(source, []).append((start, dim, value))
            continue
        out[key] = value
        for alias in aliases.get(key, ()):
            out[alias] = value
    for source, found in pieces.items():
        found.sort(key=lambda part: part[0])
        out[source] = torch.cat([part[2] for part in found], dim=found[0][1])
    return out
