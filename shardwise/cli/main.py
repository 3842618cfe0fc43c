"""The ``shardwise`` command. ``shardwise demo`` is what ``make demo`` runs."""

from __future__ import annotations

import sys

import typer

from shardwise.errors import ShardwiseError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Plan, inspect and run parallel PyTorch programs.")


@app.callback()
def _root() -> None:
    """shardwise: compile a PyTorch model and a cluster into a parallel plan and readable programs."""


@app.command()
def demo(
    model: str = typer.Option("gpt2:small", help="built-in model (gpt2, llama, bert, vit, mlp, convnet)"),
    cluster: str = typer.Option("cpu:2", help="cluster preset or YAML file to run on"),
) -> None:
    """Compile a built-in model, print the plan, run it on local processes, compare with eager PyTorch."""
    import torch
    import torch.utils._pytree as pytree

    import shardwise
    from shardwise.zoo import build_model

    typer.echo(f"building {model} (random weights, no download) ...")
    net, inputs = build_model(model)
    typer.echo(f"tracing and planning for {cluster} ...")
    with shardwise.compile(net, cluster, example_inputs=inputs) as cm:
        typer.echo(cm.plan.summary())
        typer.echo(f"running the generated program on {cm.plan.world_size} local process(es) ...")
        outputs = cm.run(*inputs)
    with torch.no_grad():
        expected = net(*inputs)
    got = [t for t in pytree.tree_leaves(outputs) if isinstance(t, torch.Tensor)]
    want = [t for t in pytree.tree_leaves(expected) if isinstance(t, torch.Tensor)]
    diff = max((a - b).abs().max().item() for a, b in zip(got, want, strict=True))
    typer.echo(f"largest absolute difference from eager PyTorch: {diff:.3e}")


def main(argv: list[str] | None = None) -> int:
    try:
        app(args=argv, standalone_mode=False)
    except ShardwiseError as exc:
        typer.echo(f"error: {exc}", err=True)
        return exc.exit_code
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("aborted", err=True)
        return 1
    except Exception as exc:  # click usage errors carry their own exit code
        code = getattr(exc, "exit_code", None)
        if code is not None and hasattr(exc, "show"):
            exc.show()
            return int(code)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
