"""Supervised entry point for one rank under torchrun (one or many machines).

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-endpoint host:29500 \\
        -m shardwise.runtime.torchrun out/pkg train_step --init load_shard --init-kwargs '{"path": "w"}'

Reads ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (set by torchrun), initialises the default process group (nccl
when this rank has its own CUDA device, else gloo), imports the generated package, ``build(rank, world)``s
it, optionally calls an init method, then calls the given method. Supervision: a failure prints the rank and
traceback and exits with code 1 (torchrun then stops the other ranks); a method that runs past
``--timeout-s`` dumps every thread's stack and exits (a hung collective must not hold the job forever).
The generated package's own ``__main__`` does the same work without shardwise; this is the variant with
those guards.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from shardwise.errors import UserInputError

__all__ = ["main", "rank_environment"]


def rank_environment(env: dict[str, str] | None = None) -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from the variables torchrun sets; a clear error outside torchrun."""
    source = os.environ if env is None else env
    missing = [name for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if name not in source]
    if missing:
        raise UserInputError(
            f"{', '.join(missing)} not set: run this under torchrun "
            "(torchrun --nproc-per-node N -m shardwise.runtime.torchrun PACKAGE METHOD)"
        )
    rank, world = int(source["RANK"]), int(source["WORLD_SIZE"])
    return rank, world, int(source.get("LOCAL_RANK", rank))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardwise.runtime.torchrun", description=__doc__.split("\n\n")[0])
    parser.add_argument("package", type=Path, help="generated package directory")
    parser.add_argument("method", help="method of the built module to call on every rank")
    parser.add_argument("--kwargs", default="{}", help="JSON object of keyword arguments for the method")
    parser.add_argument(
        "--inputs", type=Path, help="torch.save'd tuple of positional arguments for the method"
    )
    parser.add_argument("--init", help="method to call once after build (e.g. load_shard)")
    parser.add_argument("--init-kwargs", default="{}", help="JSON object of keyword arguments for --init")
    parser.add_argument("--backend", default="auto", choices=("auto", "gloo", "nccl"))
    parser.add_argument("--timeout-s", type=float, default=1800.0, help="per-collective and per-method limit")
    parser.add_argument("--out", type=Path, help="directory to torch.save each rank's result into (rankN.pt)")
    return parser


def _json_object(text: str, flag: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserInputError(
            f"{flag} is not valid JSON ({exc}); pass an object like '{{\"n\": 2}}'"
        ) from None
    if not isinstance(value, dict):
        raise UserInputError(f"{flag} must be a JSON object, got {type(value).__name__}")
    return value


def main(argv: list[str] | None = None) -> int:
    """Run one rank; returns the process exit code (0 ok, 1 failure, 2 bad input)."""
    args = _parser().parse_args(argv)
    try:
        rank, world, local_rank = rank_environment()
        kwargs = _json_object(args.kwargs, "--kwargs")
        init_kwargs = _json_object(args.init_kwargs, "--init-kwargs")
    except UserInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code

    from shardwise.runtime.package import (
        build_module,
        import_package,
        rank_device,
        to_cpu_detached,
        to_device,
    )
    from shardwise.runtime.process_group import destroy_process_group, init_process_group

    step = "init_process_group"
    try:
        backend = init_process_group(
            rank, world, backend=args.backend, local_rank=local_rank, timeout_s=args.timeout_s
        )
        import torch

        step = "build"
        device = rank_device(backend)
        module = build_module(import_package(args.package, "shardwise_generated"), rank, world, device)
        if args.init:
            step = args.init
            getattr(module, args.init)(**init_kwargs)
        positional = to_device(tuple(torch.load(args.inputs, weights_only=True)) if args.inputs else (), device)
        step = args.method
        faulthandler.dump_traceback_later(args.timeout_s, exit=True)
        try:
            result = to_cpu_detached(getattr(module, args.method)(*positional, **kwargs))
        finally:
            faulthandler.cancel_dump_traceback_later()
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            torch.save(result, args.out / f"rank{rank}.pt")
        if rank == 0:
            print(f"[shardwise rank 0/{world}] {args.method} -> {_summary(result)}")
        return 0
    except Exception as exc:
        code = exc.exit_code if isinstance(exc, UserInputError) else 1
        print(f"[shardwise rank {rank}/{world}] {step} failed:\n{traceback.format_exc()}", file=sys.stderr)
        return code
    finally:
        destroy_process_group()


def _summary(value: Any, limit: int = 300) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


if __name__ == "__main__":
    sys.exit(main())
