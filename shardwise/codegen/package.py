"""Write a drop-in package: program.py, __init__.py, __main__.py, plan.json, README.md and ``_runtime/``,
the runtime library (``shardwise.runtime.lib`` copied verbatim, see ``codegen.library``).

Plans whose collectives use synthesized (or other non-library) schedules also get ``_schedules.json`` (each
schedule's point-to-point program, ``plan.collective_programs``), which the library's ``schedule_exec``
runs. The package imports nothing from shardwise and embeds no absolute path or environment value.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from shardwise.codegen.emit import render_program, template_env
from shardwise.codegen.kernels import render_kernels
from shardwise.codegen.library import library_files
from shardwise.codegen.staging import staged_directory, write_files
from shardwise.ir.plan import ExecutionPlan
from shardwise.ir.safety import check_plan_text
from shardwise.ir.tensor import TensorSpec

__all__ = ["write_package", "plan_id"]

VERSION = "0.1.0"


def plan_id(plan: ExecutionPlan) -> str:
    return hashlib.sha256(plan.to_json(indent=None).encode()).hexdigest()[:12]


def _package_name(path: Path) -> str:
    name = path.name.replace("-", "_")
    if not name.isidentifier():
        name = "shardwise_program"
    return name


def schedule_files(plan: ExecutionPlan) -> dict[str, str]:
    """``_schedules.json`` for a plan with synthesized collectives, else nothing."""
    if not plan.collective_programs:
        return {}
    programs = {name: json.loads(text) for name, text in plan.collective_programs}
    return {"_schedules.json": json.dumps(programs, separators=(",", ":"))}


def write_package(plan: ExecutionPlan, directory: str | os.PathLike[str], *, shared: bool = False) -> Path:
    """Write the package into ``directory`` atomically (a temporary sibling, then a rename); ``shared``: its
    program may take its tensors from another program of the model (``emit.render_program``)."""
    check_plan_text(plan)  # no text of the plan may turn into code (shardwise.ir.safety)
    if plan.pipeline is not None:  # one program per model chunk plus the schedule runtime
        from shardwise.codegen.pipeline import write_pipeline_package

        return write_pipeline_package(plan, directory)
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    package = _package_name(target)
    pid = plan_id(plan)
    env = template_env()
    degrees = ", ".join(f"{k}={v}" for k, v in plan.degrees.items())
    inputs = {
        i.name: (tuple(i.spec.shape), i.spec.dtype) for i in plan.graph.inputs if isinstance(i.spec, TensorSpec)
    }
    context = {
        "package": package,
        "model_name": plan.model_name,
        "cluster_name": plan.cluster_name,
        "version": VERSION,
        "world_size": plan.world_size,
        "degrees": degrees,
        "mode": plan.mode,
        "precision": plan.precision,
        "inputs": repr(inputs),
        "triton": False,
    }
    files = {
        "program.py": render_program(plan, version=VERSION, plan_id=pid, shared=shared),
        "__init__.py": env.get_template("__init__.py.j2").render(**context),
        "__main__.py": env.get_template("__main__.py.j2").render(**context),
        "README.md": env.get_template("README.md.j2").render(**context),
        "plan.json": plan.to_json(),
    }
    if plan.fused_groups:
        files["kernels.py"] = render_kernels(plan, version=VERSION, plan_id=pid)
    files.update(schedule_files(plan))
    files.update(library_files())
    with staged_directory(target) as tmp:
        write_files(tmp, files)
    return target
