"""shardwise: compile a PyTorch model and a cluster description into a parallel plan and readable
per-rank programs that run on torch.distributed.

    cm = shardwise.compile(model, "cpu:2", example_inputs=(x,))
    cm.plan        # the inspectable ExecutionPlan
    cm.run(x)      # runs the generated programs on 2 local processes
    cm.save("out") # a drop-in package that needs torch alone
"""

from __future__ import annotations

from shardwise import errors
from shardwise.api import CompiledModel, compile
from shardwise.cluster import ClusterSpec, get_cluster
from shardwise.ir.plan import ExecutionPlan

__version__ = "0.1.0"

__all__ = ["ClusterSpec", "CompiledModel", "ExecutionPlan", "compile", "errors", "get_cluster", "__version__"]
