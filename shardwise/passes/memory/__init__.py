"""Memory mapping: byte offsets for each rank's buffers in one arena (independent of the IR).

``assign_offsets(buffers)`` is the entry point: XLA-style greedy best-fit (by size and by lifetime), then
an exact search over canonical solutions (after MiniMalloc) when greedy misses the lower bound or the
capacity. ``verify_assignment`` checks any assignment independently.
"""

from __future__ import annotations

from shardwise.passes.memory.assign import assign_offsets
from shardwise.passes.memory.buffers import Assignment, Buffer, lower_bound
from shardwise.passes.memory.greedy import best_fit
from shardwise.passes.memory.verify import verify_assignment

__all__ = ["Assignment", "Buffer", "assign_offsets", "best_fit", "lower_bound", "verify_assignment"]
