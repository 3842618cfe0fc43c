"""Memory mapping: byte offsets for each rank's buffers in one arena.

``map_memory`` (``mapping``) is the planners' pass: each rank's scheduled step as buffers (``program``,
from the IR), packed into one arena per rank, recorded as ``plan.memory``. ``assign_offsets(buffers)``
packs any buffers (independent of the IR): XLA-style greedy best-fit (by size and by lifetime), then an
exact search over canonical solutions (after MiniMalloc) when greedy misses the lower bound or the
capacity. ``verify_assignment`` checks any assignment independently.
"""

from __future__ import annotations

from shardwise.passes.memory.assign import assign_offsets
from shardwise.passes.memory.buffers import Assignment, Buffer, lower_bound
from shardwise.passes.memory.greedy import best_fit
from shardwise.passes.memory.mapping import MemoryMap, map_memory
from shardwise.passes.memory.program import step_buffers
from shardwise.passes.memory.verify import verify_assignment

__all__ = [
    "Assignment", "Buffer", "MemoryMap", "assign_offsets", "best_fit", "lower_bound", "map_memory",
    "step_buffers", "verify_assignment",
]  # fmt: skip
