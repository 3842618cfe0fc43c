"""The ``shardwise`` command. ``shardwise demo`` is what ``make demo`` runs.

Exit codes: 0 success, 1 failure (a worker died, a solver failed, a check did not pass), 2 bad input
(arguments, files, models or plans shardwise cannot accept). Errors users can cause are printed as one
``error: ...`` line without a traceback; ``--json`` commands also print ``{"error": ...}`` on stdout.
"""

from __future__ import annotations

import os
import sys
import warnings
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from shardwise.cli.console import Steps, err, out, print_json, to_jsonable
from shardwise.cli.reshard import reshard as reshard_command
from shardwise.cli.serve import serve_plan as serve_plan_command
from shardwise.errors import ShardwiseError, UserInputError

__all__ = ["app", "main"]

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="Plan, inspect and run parallel PyTorch programs.",
)

MODEL_HELP = (
    "a built-in model: gpt2, llama, bert, vit, mlp, convnet, with a size (tiny, small, base) and options, "
    "e.g. gpt2:small,layers=6; or path/to/file.py:factory returning (model, example_inputs)"
)
CLUSTER_HELP = "a preset (cpu:N, dgx-a100xN, dgx-h100xN, dgx2xN, ndv2xN) or a cluster YAML file"
JSON_HELP = "print the result as JSON (for scripts)"


class Mode(str, Enum):
    inference = "inference"
    train = "train"


class Precision(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"
    fp8 = "fp8"  # bf16 with float8 matmuls: priced, not generated


class Collectives(str, Enum):
    library = "library"
    synthesize = "synthesize"


def _version(value: bool) -> None:
    if value:
        from shardwise import __version__

        print(f"shardwise {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="print the version")
    ] = False,
) -> None:
    """shardwise: compile a PyTorch model and a cluster into a parallel plan and readable programs."""


# -- plan ---------------------------------------------------------------------------------------------


@app.command()
def plan(
    model: Annotated[str, typer.Argument(help=MODEL_HELP)],
    cluster: Annotated[str, typer.Option("--cluster", "-c", help=CLUSTER_HELP)] = "cpu:2",
    mode: Annotated[Mode, typer.Option(help="plan for inference or for training steps")] = Mode.inference,
    batch: Annotated[
        int | None, typer.Option(help="batch size of the example inputs (default: the model's own)")
    ] = None,
    precision: Annotated[
        Precision, typer.Option(help="compute precision the cost model assumes")
    ] = Precision.fp32,
    constraint: Annotated[
        list[str] | None,
        typer.Option(
            "--constraint", "-C",
            help="pin a choice of the search (repeatable): pp=4, dp=2, tp=8, sp=1 (off), zero=0..3, "
            "microbatches=8, schedule=1f1b|gpipe|interleaved, virtual=2, recompute=none|selective|full, "
            "offload=none|optimizer|activations, collectives=library|synthesize",
        ),
    ] = None,
    meta: Annotated[
        bool,
        typer.Option("--meta", help="build the model on the meta device: plan without allocating weights"),
    ] = False,
    collectives: Annotated[
        Collectives,
        typer.Option(
            help="library: torch.distributed's collectives; synthesize: a topology-aware schedule for each "
            "collective where one is predicted faster (see `shardwise synth`)"
        ),
    ] = Collectives.library,
    output: Annotated[Path, typer.Option("--output", "-o", help="where to write the plan")] = Path(
        "plan.json"
    ),
    json_out: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress display")] = False,
) -> None:
    """Trace MODEL and plan it for CLUSTER.

    Writes the plan (JSON) and prints its summary; a spinner shows tracing and planning.
    """
    from shardwise.cli.planning import make_plan, parse_constraints
    from shardwise.cli.summary import overview, prediction

    steps = Steps(quiet or json_out)
    planned = make_plan(
        model, cluster, mode=mode.value, batch=batch, precision=precision.value,
        constraints=parse_constraints(constraint), meta=meta, collectives=collectives.value, steps=steps,
    )  # fmt: skip
    with steps.step(f"writing {output}"):
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = output.with_name(f".{output.name}.tmp")
        tmp.write_text(planned.plan.to_json(), encoding="utf-8")
        tmp.replace(output)
    planned.compiled.close()
    if json_out:
        print_json(
            {"plan": str(output), "overview": overview(planned.plan), "predicted": prediction(planned.plan)}
        )
        return
    out.print(planned.plan.summary())
    out.print(
        f"wrote {output}: next, `shardwise show {output}` or `shardwise report {output} -o report.html`"
    )


# -- show / explain / diff ---------------------------------------------------------------------------


@app.command()
def show(
    plan_file: Annotated[
        Path, typer.Argument(metavar="PLAN", help="a plan file (or a generated package directory)")
    ],
    by_layer: Annotated[
        bool, typer.Option("--by-layer", help="group strategies by layer instead of by module")
    ] = False,
    every: Annotated[bool, typer.Option("--all", help="also list every collective")] = False,
    json_out: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """Show a plan as tables.

    The mesh, stages, strategies grouped by module, collectives and their algorithms, memory per rank and
    the predicted step-time breakdown.
    """
    from shardwise.cli.planning import load_plan
    from shardwise.cli.views import render_show, show_data

    p = load_plan(plan_file)
    if json_out:
        print_json(show_data(p, by_layer=by_layer))
        return
    render_show(out, p, by_layer=by_layer, every_collective=every)


@app.command()
def explain(
    plan_file: Annotated[Path, typer.Argument(metavar="PLAN", help="a plan file")],
    op: Annotated[str | None, typer.Option("--op", help="an op name, a module path, or part of one")] = None,
    json_out: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """Explain why this plan, or (--op) an op's strategy.

    Without --op: the ranked alternatives the planner scored, with predicted times and memory. With --op:
    each matching op's chosen split and its candidate splits, ranked by predicted time.
    """
    from shardwise.cli.explain import explain_ops, explain_plan, render_explain
    from shardwise.cli.planning import load_plan, resolve_cluster

    p = load_plan(plan_file)
    try:
        cluster = resolve_cluster(p, plan_file)
    except UserInputError as exc:
        err.print(f"[yellow]warning:[/yellow] {exc}; per-step prices need the cluster (forward times shown)")
        cluster = None
    data = explain_plan(p, cluster)
    ops, note = None, ""
    if op is not None:
        ops, note = explain_ops(p, op, cluster)
    if json_out:
        print_json({**data, "ops": ops, "note": note} if ops is not None else data)
        return
    render_explain(out, p, data, ops, note)


@app.command()
def diff(
    a: Annotated[Path, typer.Argument(help="the first plan")],
    b: Annotated[Path, typer.Argument(help="the second plan")],
    by_layer: Annotated[bool, typer.Option("--by-layer", help="compare layers instead of modules")] = False,
    json_out: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """Show what changed between two plans.

    Header fields, predictions, collectives, and every module whose sharding differs.
    """
    from shardwise.cli.diff import diff_plans, render_diff
    from shardwise.cli.planning import load_plan

    d = diff_plans(load_plan(a), load_plan(b), by_layer=by_layer)
    if json_out:
        print_json(d)
        return
    render_diff(out, d, (str(a), str(b)))


# -- report / codegen ---------------------------------------------------------------------------------


@app.command()
def report(
    plan_file: Annotated[Path, typer.Argument(metavar="PLAN", help="a plan file")],
    output: Annotated[Path, typer.Option("--output", "-o", help="the HTML file to write")] = Path(
        "report.html"
    ),
    json_out: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """Write a self-contained HTML report.

    A timeline per rank, memory against capacity, communication by collective and sharding per layer; one
    file with no network access.
    """
    from shardwise.cli.planning import load_plan, resolve_cluster
    from shardwise.cli.report import write_report

    p = load_plan(plan_file)
    path = write_report(p, output, resolve_cluster(p, plan_file))
    if json_out:
        print_json({"report": str(path), "bytes": path.stat().st_size})
        return
    out.print(
        f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB): open it in any browser, no network needed"
    )


@app.command()
def codegen(
    plan_file: Annotated[Path, typer.Argument(metavar="PLAN", help="a plan file")],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="package directory to write (its name is the module)")
    ],
    weights: Annotated[
        bool, typer.Option("--weights/--no-weights", help="also write model.safetensors")
    ] = True,
    verify: Annotated[
        bool, typer.Option("--verify/--no-verify", help="check the rebuilt model's fingerprint")
    ] = True,
    json_out: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress display")] = False,
) -> None:
    """Write the drop-in package of a plan.

    The per-rank program, plan.json, a README and the model's weights (model.safetensors); it needs only
    torch: torchrun --nproc-per-node N -m PKG --weights PKG/model.safetensors
    """
    from shardwise.cli.planning import load_plan, rebuild, source_of
    from shardwise.codegen.package import write_package

    steps = Steps(quiet or json_out)
    p = load_plan(plan_file)
    wrote_weights = False
    if weights and "model" in source_of(p) and not p.graph.meta_device:
        from shardwise.api import CompiledModel

        rebuilt = rebuild(p, plan_file, verify=verify, steps=steps)
        with steps.step(f"writing {output} and its weights"):
            CompiledModel(
                p, model=rebuilt.loaded.model, out_spec=rebuilt.out_spec, cluster=rebuilt.cluster
            ).save(output)
        wrote_weights = (output / "model.safetensors").is_file()
    else:
        if weights:
            steps.info(
                "[yellow]note:[/yellow] the plan records no model with weights: writing the program only"
            )
        with steps.step(f"writing {output}"):
            write_package(p, output)
    files = sorted(f.name for f in output.iterdir())
    pkg = output.resolve().name
    weights_arg = f" --weights {pkg}/model.safetensors" if wrote_weights else ""
    command = f"torchrun --nproc-per-node {p.world_size} -m {pkg}{weights_arg}"
    if json_out:
        print_json(
            {"package": str(output), "module": pkg, "files": files, "weights": wrote_weights, "run": command}
        )
        return
    out.print(f"wrote {output}: {', '.join(files)}")
    out.print(f"run it (needs only torch), from {output.resolve().parent}:\n  {command}")


# -- run ----------------------------------------------------------------------------------------------


@app.command()
def run(
    plan_file: Annotated[Path, typer.Argument(metavar="PLAN", help="a plan file made by `shardwise plan`")],
    inputs: Annotated[
        str | None, typer.Option(help="a torch file with a tuple of inputs (default: the example inputs)")
    ] = None,
    steps_n: Annotated[int, typer.Option("--steps", min=1, help="training steps to run (train plans)")] = 1,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="save rank 0's outputs (torch file)")
    ] = None,
    compare: Annotated[
        bool, typer.Option("--compare/--no-compare", help="compare with eager PyTorch")
    ] = True,
    atol: Annotated[
        float | None, typer.Option(help="fail (exit 1) when the difference from eager exceeds this")
    ] = None,
    verify: Annotated[
        bool, typer.Option("--verify/--no-verify", help="check the rebuilt model's fingerprint")
    ] = True,
    backend: Annotated[str, typer.Option(help="under torchrun: auto, gloo or nccl")] = "auto",
    json_out: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress display")] = False,
) -> None:
    """Run a plan and compare it with eager PyTorch.

    On local processes, or, started by torchrun (one machine or many), as this rank.
    """
    from shardwise.cli.planning import check_runnable, load_plan, rebuild
    from shardwise.cli.runner import load_inputs, run_local, run_torchrun, under_torchrun

    distributed = under_torchrun()
    rank = int(os.environ.get("RANK", "0")) if distributed else 0
    steps = Steps(quiet or json_out or rank != 0)
    p = load_plan(plan_file)
    check_runnable(p, local=not distributed, plan_path=plan_file)
    rebuilt = rebuild(p, plan_file, verify=verify, steps=steps)
    args = load_inputs(inputs, rebuilt.loaded.inputs)
    if distributed:
        result = run_torchrun(
            p, rebuilt, args, steps_n=steps_n, compare=compare, steps=steps, backend=backend
        )
    else:
        result = run_local(p, rebuilt, args, steps_n=steps_n, compare=compare, steps=steps)
    if result.rank != 0:
        return
    if output is not None and result.outputs is not None:
        import torch

        torch.save(result.outputs, output)
    failed = atol is not None and result.max_abs_diff is not None and result.max_abs_diff > atol
    if json_out:
        data = to_jsonable(result)
        data.pop("outputs", None)
        print_json({**data, "within_atol": None if atol is None else not failed})
    else:
        where = (
            f"{result.world_size} {result.where}"
            if result.where != "torchrun"
            else f"{result.world_size} ranks (torchrun)"
        )
        if p.mode == "train":
            losses = ", ".join(f"{x:.6f}" for x in result.losses)
            out.print(f"ran {len(result.losses)} training step(s) on {where}: loss {losses}")
            if result.eager_loss is not None:
                out.print(f"eager PyTorch loss before the first step: {result.eager_loss:.6f}")
        else:
            shapes = ", ".join("x".join(map(str, s)) for s in result.output_shapes)
            out.print(f"ran on {where}: outputs {shapes}" + (f", saved to {output}" if output else ""))
        if result.max_abs_diff is not None:
            out.print(f"largest absolute difference from eager PyTorch: {result.max_abs_diff:.3e}")
    if failed:
        raise ShardwiseError(
            f"the difference from eager PyTorch ({result.max_abs_diff:.3e}) exceeds --atol {atol}"
        )


# -- calibrate / synth --------------------------------------------------------------------------------


@app.command()
def calibrate(
    output: Annotated[Path, typer.Option("--output", "-o", help="the cluster YAML file to write")] = Path(
        "cluster.yaml"
    ),
    processes: Annotated[
        int, typer.Option("--processes", "-n", min=1, help="local processes to measure with")
    ] = 2,
    full: Annotated[bool, typer.Option("--full", help="measure longer and with larger sizes")] = False,
    json_out: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """Measure this machine into a cluster YAML (and into the cache `cpu:N` plans read).

    Matmul rate and fixed cost, memory and cache bandwidth, per-op dispatch and backward overheads, the
    per-element cost of math ops, the optimizer step, gloo's latency, bandwidth and per-collective overhead
    between local processes, and whether collectives overlap compute.
    """
    import dataclasses

    from shardwise.cluster import calibrate as measure
    from shardwise.cluster.machine import write_cached
    from shardwise.cluster.schema import spec_to_dict, write_yaml

    steps = Steps(json_out)
    with steps.step(f"measuring with {processes} local process(es)"):
        spec = measure(processes, quick=not full)
    write_yaml(spec, output)
    cached = write_cached(processes, dataclasses.replace(spec, name=f"cpu:{processes}"))
    if json_out:
        print_json({"cluster": str(output), "cache": str(cached), "spec": spec_to_dict(spec)})
        return
    out.print(spec.summary())
    out.print(f"wrote {output}: plan with `shardwise plan MODEL --cluster {output}`")
    out.print(f"cpu:{processes} now plans with these figures (cached in {cached})")


@app.command()
def synth(
    cluster_arg: Annotated[str | None, typer.Argument(metavar="[CLUSTER]", help=CLUSTER_HELP)] = None,
    collective_arg: Annotated[
        str | None,
        typer.Argument(
            metavar="[COLLECTIVE]", help="allgather, reduce_scatter, allreduce, alltoall or broadcast"
        ),
    ] = None,
    cluster: Annotated[str | None, typer.Option("--cluster", help=CLUSTER_HELP)] = None,
    collective: Annotated[str | None, typer.Option("--collective", help="the collective (as above)")] = None,
    sizes: Annotated[
        str, typer.Option(help="comma-separated buffer sizes; KB/MB/GB are binary (2**10...), as in TACCL")
    ] = "1KB,1MB,64MB",
    json_out: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """Synthesize schedules for a collective.

    Topology-aware schedules for each buffer size, against the library's algorithms and the lower bound:
    `shardwise synth --cluster ndv2x2 --collective allgather --sizes 1KB,1MB,1GB`.
    """
    from shardwise.cli.synth import pick, render_synth, run_synth

    cluster = pick("cluster", cluster_arg, cluster)
    collective = pick("collective", collective_arg, collective)
    rows = run_synth(cluster, collective, sizes, steps=Steps(json_out))
    if json_out:
        print_json(rows)
        return
    render_synth(out, rows, cluster, collective)


# -- demo ---------------------------------------------------------------------------------------------


@app.command()
def demo(
    model: Annotated[str, typer.Option(help=MODEL_HELP)] = "gpt2:small",
    cluster: Annotated[str, typer.Option(help="cluster preset or YAML file to run on")] = "cpu:2",
    json_out: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """Plan, run and check a built-in model.

    Compiles it (GPT-2 by default) for local processes, prints the plan, runs the generated program and
    prints the largest difference from eager PyTorch.
    """
    import torch

    from shardwise.cli.planning import make_plan
    from shardwise.cli.runner import max_abs_diff

    steps = Steps(json_out)
    planned = make_plan(model, cluster, steps=steps)
    if not json_out:
        out.print(planned.plan.summary())
    inputs = planned.loaded.inputs
    with (
        planned.compiled as cm,
        steps.step(f"running the generated program on {cm.plan.world_size} local process(es)"),
    ):
        outputs = cm.run(*inputs)
    with torch.no_grad():
        expected = planned.loaded.model(*inputs)
    diff_value = max_abs_diff(outputs, expected)
    if json_out:
        print_json(
            {
                "model": model,
                "cluster": cluster,
                "world_size": planned.plan.world_size,
                "max_abs_diff": diff_value,
            }
        )
        return
    out.print(f"largest absolute difference from eager PyTorch: {diff_value:.3e}")


app.command()(reshard_command)  # shardwise.cli.reshard
app.command("serve-plan")(serve_plan_command)  # shardwise.cli.serve

# -- entry point --------------------------------------------------------------------------------------


def _quiet_warnings() -> None:
    """Library deprecation chatter is not for CLI users; real problems arrive as exceptions."""
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 failure, 2 bad input)."""
    args = sys.argv[1:] if argv is None else list(argv)
    json_mode = "--json" in args
    _quiet_warnings()
    try:
        rv = app(args=args, prog_name="shardwise", standalone_mode=False)
    except ShardwiseError as exc:
        err.print(f"[bold red]error:[/bold red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        if json_mode:
            print_json({"error": str(exc), "type": type(exc).__name__, "exit_code": exc.exit_code})
        return exc.exit_code
    except (typer.Abort, KeyboardInterrupt):
        err.print("aborted")
        return 1
    except Exception as exc:
        code = getattr(exc, "exit_code", None)
        if code is not None and hasattr(exc, "show"):  # click usage errors: exit code 2
            exc.show()
            return int(code)
        raise
    return int(rv) if isinstance(rv, int) else 0


def _run() -> None:  # pragma: no cover - `python -m shardwise.cli.main`
    sys.exit(main())


if __name__ == "__main__":
    _run()
