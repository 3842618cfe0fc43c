"""Runtime: launch, supervise and feed generated packages on torch.distributed.

Depends on no compiler layer (it never traces or plans). Importing it does not import torch.
"""

from __future__ import annotations

from shardwise.runtime.faults import RankFailure, WorkerFault
from shardwise.runtime.local import WorkerPool

__all__ = ["RankFailure", "WorkerFault", "WorkerPool"]
