"""shardwise: compile a PyTorch model and a cluster description into a parallel plan and readable
per-rank programs that run on torch.distributed.

    cm = shardwise.compile(model, "cpu:2", example_inputs=(x,))
    cm.plan        # the inspectable ExecutionPlan
    cm.run(x)      # runs the generated programs on 2 local processes
    cm.save("out") # a drop-in package that needs torch alone

The names below are imported lazily, so that worker processes (which import only shardwise.runtime)
do not load the compiler.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "compile": "shardwise.api",
    "CompiledModel": "shardwise.api",
    "from_plan": "shardwise.planfile",
    "ClusterSpec": "shardwise.cluster",
    "get_cluster": "shardwise.cluster",
    "ExecutionPlan": "shardwise.ir.plan",
    "errors": None,
}

__all__ = [
    "ClusterSpec",
    "CompiledModel",
    "ExecutionPlan",
    "compile",
    "errors",
    "from_plan",
    "get_cluster",
    "__version__",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'shardwise' has no attribute {name!r}")
    module = _LAZY[name]
    if module is None:
        value: Any = importlib.import_module(f"shardwise.{name}")
    else:
        value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
