"""Write a pipeline-parallel drop-in package: one program per model chunk plus the schedule runtime.

Layout::

    <package>/__init__.py      build(rank, world_size) -> PipelineRank
    <package>/_pipeline.py     the plan the runtime runs (degrees, schedule, transfers) as constants
    <package>/_runtime/        the runtime library (schedule loop, gradient reduction, ZeRO; codegen.library)
    <package>/__main__.py      torchrun entry point
    <package>/chunk<c>/        chunk c: a complete single-chunk package (program.py, _runtime/, ...)
    <package>/plan.json, README.md

Each chunk program is written by the ordinary package writer from the chunk's intra-op plan, so it is read
and checked like any other program; the runtime builds it on this rank's tensor-parallel group and feeds it
the values received from earlier chunks. The package imports nothing from shardwise.

Requires: ``plan.pipeline`` (see ``shardwise.ir.pipeline``). Guarantees: the schedule the runtime runs is
``plan.pipeline.actions`` verbatim; the package is written atomically (a temporary sibling, then a rename).
"""

from __future__ import annotations

import os
from pathlib import Path

from shardwise.codegen.emit import template_env
from shardwise.codegen.library import library_files
from shardwise.codegen.pysource import wrap_lines
from shardwise.codegen.staging import staged_directory, write_files
from shardwise.ir.plan import ExecutionPlan
from shardwise.ir.tensor import TensorSpec

__all__ = ["write_pipeline_package"]


def _forward_actions(pp: int, chunks: int, microbatches: int) -> list[list[tuple[str, int, int]]]:
    # chunk by chunk on each device: every micro-batch of its first chunk, then of its next one
    return [[("F", c, i) for c in range(p, chunks, pp) for i in range(microbatches)] for p in range(pp)]


def write_pipeline_package(plan: ExecutionPlan, directory: str | os.PathLike[str]) -> Path:
    """Write the package for a pipeline plan into ``directory`` (see the module docstring)."""
    from shardwise.codegen.package import VERSION, plan_id, write_package

    spec = plan.pipeline
    if spec is None:
        raise ValueError("write_pipeline_package needs a plan with a pipeline (plan.pipeline)")
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    package = (
        target.name.replace("-", "_") if target.name.replace("-", "_").isidentifier() else "shardwise_program"
    )
    pid = plan_id(plan)
    env = template_env()
    degrees = ", ".join(f"{k}={v}" for k, v in plan.degrees.items())
    chunk_inputs = tuple(tuple(i.name for i in s.plan.graph.inputs) for s in spec.stages)
    chunk_outputs = tuple(tuple(s.plan.graph.output_names) for s in spec.stages)
    transfers = tuple(
        (t.value, t.src, t.dst, tuple(t.spec.shape), t.spec.dtype, t.grad) for t in spec.transfers
    )
    train = plan.mode == "train"
    context = {
        "package": package,
        "model_name": plan.model_name,
        "cluster_name": plan.cluster_name,
        "version": VERSION,
        "plan_id": pid,
        "world_size": plan.world_size,
        "degrees": degrees,
        "mode": plan.mode,
        "precision": plan.precision,
        "summary": str(spec),
        "pp": spec.pp,
        "dp": spec.dp,
        "tp": spec.tp,
        "ep": spec.ep,
        "cp": spec.cp,
        "virtual": spec.virtual,
        "schedule": spec.schedule,
        "microbatches": spec.microbatches,
        "microbatch_size": spec.microbatch_size,
        "recompute": spec.recompute,
        "zero_stage": spec.zero,
        "training": repr(train),
        "graph_inputs": repr(tuple(i.name for i in plan.graph.inputs)),
        "batch_inputs": repr(tuple(spec.batch_inputs)),
        "chunk_inputs": repr(chunk_inputs),
        "chunk_outputs": repr(chunk_outputs),
        "transfers": repr(transfers),
        "tied": repr(tuple(spec.tied)),
        "actions": repr(tuple(tuple(a) for a in spec.actions)),
        "forward_actions": repr(
            tuple(tuple(a) for a in _forward_actions(spec.pp, spec.chunks, spec.microbatches))
        ),
        "inputs": repr(
            {
                i.name: (tuple(i.spec.shape), i.spec.dtype)
                for i in plan.graph.inputs
                if isinstance(i.spec, TensorSpec)
            }
        ),
        "chunks": [
            f"chunk{s.chunk}/ (device stage {s.device_stage}): {s.units[0]} .. {s.units[-1]}, "
            f"{len(s.plan.graph.nodes)} ops"
            for s in spec.stages
        ],
    }
    files = {
        "__init__.py": env.get_template("pipeline_init.py.j2").render(**context),
        "_pipeline.py": "\n".join(wrap_lines(env.get_template("pipeline.py.j2").render(**context).split("\n"))),
        "__main__.py": env.get_template("pipeline_main.py.j2").render(**context),
        "README.md": env.get_template("pipeline_README.md.j2").render(**context),
        "plan.json": plan.to_json(),
        **library_files(),
    }
    with staged_directory(target) as tmp:
        write_files(tmp, files)
        for stage in spec.stages:
            write_package(stage.plan, tmp / f"chunk{stage.chunk}")
    return target
