"""``shardwise reshard SRC DST [--plan PLAN]``: rewrite a checkpoint for another plan, offline.

Reads the checkpoint at SRC (manifest and every checksum verified first), and writes at DST one file per
rank of PLAN's mesh holding exactly that rank's pieces (parameters, buffers and optimizer state); without
``--plan`` it consolidates everything into one file for one device. No worker processes are started.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

__all__ = ["reshard"]


def reshard(
    source: Annotated[Path, typer.Argument(metavar="SRC", help="a checkpoint directory (save_checkpoint)")],
    destination: Annotated[Path, typer.Argument(metavar="DST", help="where to write the new checkpoint")],
    plan_file: Annotated[
        Path | None,
        typer.Option("--plan", "-p", help="the plan to reshard for (default: one device, whole tensors)"),
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="print the result as JSON (for scripts)")] = False,
) -> None:
    """Reshard a checkpoint for another plan (or one device), without starting processes."""
    from shardwise.cli.console import Steps, out, print_json
    from shardwise.runtime.checkpoint import layout_from_tables, read_manifest
    from shardwise.runtime.checkpoint import reshard as run_reshard

    steps = Steps(json_out)
    with steps.step(f"verifying {source}"):
        before = read_manifest(source, verify=True)
    layout, target = None, "one device"
    meta = {}
    if plan_file is not None:
        from shardwise.cli.planning import load_plan
        from shardwise.codegen.layout import tensor_tables

        plan = load_plan(plan_file)
        layout = layout_from_tables(tensor_tables(plan))
        degrees = ", ".join(f"{k}={v}" for k, v in plan.degrees.items())
        target = f"{plan.model_name} on {plan.cluster_name} ({degrees})"
        meta = {"model_name": plan.model_name, "model_fingerprint": plan.model_fingerprint,
                "cluster_name": plan.cluster_name, "degrees": plan.degrees, "mode": plan.mode}  # fmt: skip
    with steps.step(f"writing {destination} for {target}"):
        run_reshard(source, destination, layout, meta)
    after = read_manifest(destination, verify=False)
    summary = {
        "source": str(source),
        "destination": str(destination),
        "plan": None if plan_file is None else str(plan_file),
        "tensors": len(after["tensors"]),
        "files_before": len(before["files"]),
        "files_after": len(after["files"]),
        "optimizer": None if after.get("optimizer") is None else after["optimizer"]["class"],
    }
    if json_out:
        print_json(summary)
        return
    opt = f", {summary['optimizer']} optimizer state" if summary["optimizer"] else ", no optimizer state"
    out.print(
        f"resharded {source} ({summary['files_before']} file(s)) for {target}: wrote {destination} with "
        f"{summary['files_after']} file(s), {summary['tensors']} tensors{opt}"
    )
