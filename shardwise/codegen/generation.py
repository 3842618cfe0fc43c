"""Write a generation package: a prefill program, a decode program and the loop that runs them.

Layout::

    <package>/__init__.py      build(rank, world_size) -> Generator
    <package>/generate.py      the Generator: both programs over one set of tensors, and the cache's sizes
    <package>/_runtime/        the runtime library (its generation.py runs the loop; codegen.library)
    <package>/__main__.py      torchrun entry point (``--generate``)
    <package>/decode/          the decode step: a complete single-program package (program.py, plan.json, ...)
    <package>/prefill/         the prefill step, written alike
    <package>/plan.json, README.md

Requires: two flat plans of the same model's steps (``frontend.generation.StepModule``) on the same mesh
whose tensors are stored alike (the prefill planned with the decode plan's placements fixed). Guarantees:
each program is written by the ordinary package writer (read and checked like any other program); the
package imports nothing from shardwise and is written atomically (a temporary sibling, then a rename).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from shardwise.codegen.emit import template_env
from shardwise.codegen.layout import tensor_tables
from shardwise.codegen.library import library_files
from shardwise.codegen.pysource import wrap_lines
from shardwise.codegen.staging import staged_directory, write_files
from shardwise.ir.plan import ExecutionPlan
from shardwise.ir.safety import check_plan_text

__all__ = ["GenerationSettings", "write_generation_package"]


@dataclass(frozen=True)
class GenerationSettings:
    """The sizes a generation package is made for, and the model's end-of-sequence tokens."""

    max_batch: int  # rows of the KV cache
    max_seq: int  # slots of the KV cache (prompt window + new tokens)
    prompt_len: int  # the prefill's window (prompts are left padded to it)
    eos_token_id: int | tuple[int, ...] | None = None  # one end-of-sequence token or several
    pad_token_id: int | None = None


def write_generation_package(
    decode: ExecutionPlan, prefill: ExecutionPlan, settings: GenerationSettings, directory: str | os.PathLike[str]
) -> Path:
    """Write the package into ``directory`` (see the module docstring)."""
    from shardwise.codegen.package import VERSION, write_package

    check_plan_text(decode)  # no text of a plan may turn into code (shardwise.ir.safety)
    check_plan_text(prefill)
    if decode.pipeline is not None or prefill.pipeline is not None:
        raise ValueError("generation packages are written from flat plans (pp=1)")
    if tensor_tables(decode) != tensor_tables(prefill):
        raise ValueError("the prefill and decode plans store the model's tensors differently; plan the prefill "
                         "with the decode plan's placements fixed (PlanOptions.fixed_params)")  # fmt: skip
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    name = target.name.replace("-", "_")
    package = name if name.isidentifier() else "shardwise_program"
    context = {
        "package": package,
        "model_name": decode.model_name,
        "cluster_name": decode.cluster_name,
        "version": VERSION,
        "world_size": decode.world_size,
        "degrees": ", ".join(f"{k}={v}" for k, v in decode.degrees.items()),
        "precision": decode.precision,
        "max_batch": settings.max_batch,
        "max_seq": settings.max_seq,
        "prompt_len": settings.prompt_len,
        "eos_token_id": repr(settings.eos_token_id),
        "pad_token_id": repr(settings.pad_token_id),
    }
    env = template_env()

    def render(template: str) -> str:
        return "\n".join(wrap_lines(env.get_template(template).render(**context).split("\n")))

    files = {
        "__init__.py": render("generate_init.py.j2"),
        "generate.py": render("generate.py.j2"),
        "__main__.py": render("generate_main.py.j2"),
        "README.md": env.get_template("generate_README.md.j2").render(**context),
        "plan.json": decode.to_json(),
        **library_files(),
    }
    with staged_directory(target) as tmp:
        write_files(tmp, files)
        write_package(decode, tmp / "decode", shared=True)
        write_package(prefill, tmp / "prefill", shared=True)
    return target
