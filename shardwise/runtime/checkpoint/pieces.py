"""What one rank stores: its distinct pieces of every logical tensor and of the optimizer state beside it.

Used by the workers (pieces of live tensors) and by offline resharding (pieces cut from another checkpoint),
so both write exactly the same structure.

Optimizer state of a parameter is split three ways: a tensor shaped like the rank's piece of the parameter
(``exp_avg``, ``momentum_buffer``) is a piece of the same box; any other tensor (Adam's 0-dim ``step``) and
any plain value (``None``, numbers) belongs to the whole logical tensor and is stored once, by the rank whose
piece starts at offset 0.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shardwise.errors import CheckpointError
from shardwise.runtime.checkpoint.files import write_tensors
from shardwise.runtime.checkpoint.layout import Box, ProgramLayout, TensorLayout

__all__ = ["Pieces", "collect_pieces", "json_value", "rank_record"]

_PLAIN = (bool, int, float, str, type(None))


@dataclass
class Pieces:
    """One rank's share: ``tensors`` (name -> tensor) and what each name is."""

    tensors: dict[str, Any] = field(default_factory=dict)
    entries: list[dict[str, Any]] = field(default_factory=list)  # box pieces: key, state, offset, shape
    whole_states: list[dict[str, Any]] = field(default_factory=list)  # {key, state, name}: stored whole
    values: dict[str, dict[str, Any]] = field(default_factory=dict)  # logical key -> state -> plain value

    def add(self, tensor: Any) -> str:
        name = f"t{len(self.tensors)}"
        self.tensors[name] = tensor
        return name


def json_value(value: Any, what: str) -> Any:
    """``value`` as JSON data (tuples become lists; a one-element tensor its number)."""
    import torch

    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, tuple | list):
        return [json_value(v, what) for v in value]
    if isinstance(value, _PLAIN):
        return value
    raise CheckpointError(f"{what} is a {type(value).__name__}, which a checkpoint cannot store")


def collect_pieces(
    layout: ProgramLayout,
    rank: int,
    piece_of: Callable[[TensorLayout, Box], Any],
    states_of: Callable[[TensorLayout, Box], Mapping[str, Any]],
) -> Pieces:
    """The pieces ``rank`` writes under ``layout``: ``piece_of(t, box)`` gives its piece of tensor ``t`` and
    ``states_of(t, box)`` the optimizer state of that piece (state name -> tensor or plain value)."""
    import torch

    out = Pieces()
    for t in layout.tensors:
        if not layout.writes(t, rank):
            continue
        box = layout.box(t, rank)
        piece = piece_of(t, box)
        name = out.add(piece)
        out.entries.append(
            {
                "name": name,
                "key": t.logical,
                "state": None,
                "offset": list(box.offset),
                "shape": list(box.shape),
            }
        )
        origin = all(o == 0 for o in box.offset)
        for state, value in states_of(t, box).items():
            is_tensor = isinstance(value, torch.Tensor)
            if is_tensor and value.dim() > 0 and tuple(value.shape) == tuple(box.shape):
                name = out.add(value)
                out.entries.append(
                    {"name": name, "key": t.logical, "state": state, "offset": list(box.offset),
                     "shape": list(box.shape)}
                )  # fmt: skip
            elif not origin:
                if is_tensor and value.dim() > 0:
                    raise CheckpointError(
                        f"optimizer state {state!r} of {t.key} has shape {tuple(value.shape)}, unlike the "
                        f"parameter's piece {box.shape}: it cannot be split or resharded"
                    )
            elif is_tensor:
                name = out.add(value)
                out.whole_states.append({"name": name, "key": t.logical, "state": state})
            else:
                out.values.setdefault(t.logical, {})[state] = json_value(value, f"optimizer state {state!r}")
    return out


def rank_record(
    directory: Path, rank: int, layout: ProgramLayout, pieces: Pieces, optimizer: Mapping[str, Any] | None
) -> dict[str, Any]:
    """Write ``pieces`` to ``<directory>/rank<r>.safetensors`` (if any) and return what the manifest needs
    to know of them, with the logical tensors and the ``optimizer`` (class, param groups) as this rank knows
    them (a pipeline rank knows its own stage's: the parent merges every rank's)."""
    record: dict[str, Any] = {
        "rank": rank,
        "file": None,
        "entries": [],
        "whole_states": [],
        "values": pieces.values,
        "tensors": layout.logical_tensors(),
        "optimizer": None if optimizer is None else {
            "class": optimizer["class"], "param_groups": optimizer["param_groups"]
        },
    }  # fmt: skip
    if pieces.tensors:
        name = f"rank{rank}.safetensors"
        record["file"] = {"name": name, **write_tensors(Path(directory) / name, pieces.tensors)}
        record["entries"] = [{**e, "file": name} for e in pieces.entries]
        record["whole_states"] = [{**e, "file": name} for e in pieces.whole_states]
    return record
