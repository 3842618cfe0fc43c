"""``shardwise run``: run a plan's generated program on local processes, or on this rank under torchrun.

Local: the plan's model is rebuilt (same spec and seed, so the same weights), its program written and
started on ``world_size`` local worker processes (``shardwise.compile``'s CompiledModel on the runtime's
WorkerPool). Under torchrun (``RANK``/``WORLD_SIZE`` set, on one machine or many) every rank rebuilds the
model, writes the program into a private temporary directory, joins the process group torchrun set up and
runs its own part; rank 0 reports. Either way the result is compared with eager PyTorch on the same inputs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shardwise.cli.console import Steps
from shardwise.cli.models import default_loss, flat_tensors
from shardwise.cli.planning import Rebuilt
from shardwise.errors import ShapeMismatchError, UserInputError
from shardwise.ir.plan import ExecutionPlan

__all__ = ["RunResult", "under_torchrun", "run_local", "run_torchrun", "max_abs_diff", "load_inputs"]


@dataclass
class RunResult:
    world_size: int
    where: str  # "local processes" | "torchrun"
    rank: int = 0
    outputs: Any = None  # rank 0's outputs (inference)
    losses: list[float] = field(default_factory=list)  # per step (training)
    eager_loss: float | None = None
    max_abs_diff: float | None = None  # against eager PyTorch (inference outputs, or the first loss)
    output_shapes: list[list[int]] = field(default_factory=list)


def under_torchrun(env: dict[str, str] | None = None) -> bool:
    e = os.environ if env is None else env
    return "TORCHELASTIC_RUN_ID" in e or ("RANK" in e and "WORLD_SIZE" in e and "MASTER_ADDR" in e)


def load_inputs(path: str | None, default: tuple[Any, ...]) -> tuple[Any, ...]:
    """Inputs from a torch file holding a tuple (or one tensor), else the model's example inputs."""
    if path is None:
        return default
    import torch

    p = Path(path)
    if not p.is_file():
        raise UserInputError(f"--inputs {path}: no such file (save a tuple of tensors with torch.save)")
    try:
        value = torch.load(p, weights_only=True)
    except Exception as exc:
        raise UserInputError(
            f"--inputs {path}: not a torch file of tensors ({type(exc).__name__}: {exc})"
        ) from None
    if isinstance(value, torch.Tensor):
        return (value,)
    if not isinstance(value, tuple | list):
        raise ShapeMismatchError(
            f"--inputs {path} holds a {type(value).__name__}; save a tuple of input tensors"
        )
    return tuple(value)


def max_abs_diff(got: Any, want: Any) -> float:
    """Largest absolute difference between the tensors of two outputs (same structure)."""
    a, b = flat_tensors(got), flat_tensors(want)
    if len(a) != len(b):
        raise ShapeMismatchError(f"the program returned {len(a)} tensors, eager PyTorch {len(b)}")
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        if tuple(x.shape) != tuple(y.shape):
            raise ShapeMismatchError(f"output shape {tuple(x.shape)} differs from eager {tuple(y.shape)}")
        if x.numel():
            worst = max(worst, (x.double() - y.double()).abs().max().item())
    return worst


def _eager(rebuilt: Rebuilt, plan: ExecutionPlan, inputs: tuple[Any, ...]) -> Any:
    import torch

    model = rebuilt.loaded.model
    if plan.mode == "train":
        loss_fn = rebuilt.loaded.loss_fn or default_loss
        with torch.no_grad():
            return float(loss_fn(model(*inputs)))
    with torch.no_grad():
        return model(*inputs)


def _finish(
    result: RunResult, plan: ExecutionPlan, rebuilt: Rebuilt, inputs: tuple[Any, ...], compare: bool
) -> RunResult:
    if plan.mode == "train":
        if compare and result.losses:
            result.eager_loss = _eager(rebuilt, plan, inputs)
            result.max_abs_diff = abs(result.losses[0] - result.eager_loss)
    else:
        result.output_shapes = [list(t.shape) for t in flat_tensors(result.outputs)]
        if compare:
            result.max_abs_diff = max_abs_diff(result.outputs, _eager(rebuilt, plan, inputs))
    return result


def run_local(
    plan: ExecutionPlan,
    rebuilt: Rebuilt,
    inputs: tuple[Any, ...],
    *,
    steps_n: int,
    compare: bool,
    steps: Steps,
) -> RunResult:
    from shardwise.api import CompiledModel

    cm = CompiledModel(plan, model=rebuilt.loaded.model, out_spec=rebuilt.out_spec, cluster=rebuilt.cluster)
    result = RunResult(world_size=plan.world_size, where="local processes")
    try:
        if plan.mode == "train":
            # the eager loss is taken before the program's optimizer steps change the weights it shares
            eager = _eager(rebuilt, plan, inputs) if compare else None
            with steps.step(f"running {steps_n} training step(s) on {plan.world_size} local process(es)"):
                result.losses = [cm.train_step(*inputs) for _ in range(steps_n)]
            result.eager_loss = eager
            if eager is not None and result.losses:
                result.max_abs_diff = abs(result.losses[0] - eager)
            return result
        with steps.step(f"running the program on {plan.world_size} local process(es)"):
            result.outputs = cm.run(*inputs)
    finally:
        cm.close()
    return _finish(result, plan, rebuilt, inputs, compare)


def run_torchrun(
    plan: ExecutionPlan, rebuilt: Rebuilt, inputs: tuple[Any, ...], *, steps_n: int, compare: bool, steps: Steps,
    backend: str = "auto",
) -> RunResult:  # fmt: skip
    """This process's rank of the plan, in the process group torchrun describes in the environment."""
    import torch

    from shardwise.codegen.package import write_package
    from shardwise.frontend.trace import model_tensors
    from shardwise.runtime.package import build_module, import_package, to_cpu_detached, unload_package
    from shardwise.runtime.process_group import destroy_process_group, init_process_group
    from shardwise.runtime.torchrun import rank_environment

    rank, world, local_rank = rank_environment()
    if world != plan.world_size:
        raise UserInputError(
            f"this plan needs {plan.world_size} processes; torchrun started {world}. Use --nnodes x "
            f"--nproc-per-node = {plan.world_size}"
        )
    result = RunResult(world_size=world, where="torchrun", rank=rank)
    # cloned before the program's optimizer can touch the weights the eager check needs
    tensors = {k: v.detach().clone() for k, v in model_tensors(rebuilt.loaded.model).items()}
    eager = _eager(rebuilt, plan, inputs) if compare and rank == 0 and plan.mode == "train" else None
    workdir = Path(tempfile.mkdtemp(prefix=f"shardwise-rank{rank}-"))
    module_name = f"_shardwise_run_rank{rank}"
    try:
        package = write_package(plan, workdir / "program")
        init_process_group(rank, world, backend=backend, local_rank=local_rank)
        module = build_module(import_package(package, module_name), rank, world)
        module.load_full_state_dict(tensors)
        device = getattr(module, "device", torch.device("cpu"))
        args = tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in inputs)
        with steps.step(f"rank {rank}/{world}: running"):
            if plan.mode == "train":
                module.configure_optimizer()
                result.losses = [float(module.train_step(*args)) for _ in range(steps_n)]
            else:
                result.outputs = to_cpu_detached(module.infer(*args))
    finally:
        destroy_process_group()
        unload_package(module_name)
        shutil.rmtree(workdir, ignore_errors=True)
    if rank != 0:
        return result
    if plan.mode == "train":
        result.eager_loss = eager
        if eager is not None and result.losses:
            result.max_abs_diff = abs(result.losses[0] - eager)
        return result
    if rebuilt.out_spec is not None:
        import torch.utils._pytree as pytree

        leaves = list(result.outputs) if isinstance(result.outputs, tuple | list) else [result.outputs]
        with contextlib.suppress(Exception):  # keep the flat outputs: the comparison works on leaves anyway
            result.outputs = pytree.tree_unflatten(leaves, rebuilt.out_spec)
    return _finish(result, plan, rebuilt, inputs, compare)
