"""Sharded, atomic, checksummed checkpoints that load under any plan of the same model.

``save``/``load``/``gather`` run against a WorkerPool holding a generated program; ``reshard`` rewrites a
checkpoint for another layout offline. See ``files`` for the on-disk format and ``layout`` for how pieces
map between plans.
"""

from __future__ import annotations

from shardwise.runtime.checkpoint.driver import (
    check_compatible,
    from_state_dict,
    gather,
    load,
    reshard,
    save,
    single_device_layout,
    to_state_dict,
)
from shardwise.runtime.checkpoint.files import read_manifest
from shardwise.runtime.checkpoint.layout import (
    Box,
    ProgramLayout,
    TensorLayout,
    layout_from_tables,
    pipeline_layout,
    program_layout,
)

__all__ = [
    "Box",
    "ProgramLayout",
    "TensorLayout",
    "check_compatible",
    "from_state_dict",
    "gather",
    "layout_from_tables",
    "load",
    "pipeline_layout",
    "program_layout",
    "read_manifest",
    "reshard",
    "save",
    "single_device_layout",
    "to_state_dict",
]
