"""``shardwise.compile``: model + cluster → plan → generated programs → running processes."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import shutil
import tempfile
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree

from shardwise.cluster import ClusterSpec, get_cluster
from shardwise.cluster.machine import calibration_note
from shardwise.codegen.generation import GenerationSettings, write_generation_package
from shardwise.codegen.package import write_package
from shardwise.errors import (
    CheckpointError,
    DeviceUnavailableError,
    DoesNotFitError,
    RuntimeFault,
    ShapeMismatchError,
    UserInputError,
)
from shardwise.frontend.trace import model_tensors, trace
from shardwise.ir.graph import Graph
from shardwise.ir.plan import ExecutionPlan
from shardwise.ir.tensor import TensorSpec
from shardwise.planner.plan import PlanOptions
from shardwise.planner.plan import plan as plan_model
from shardwise.runtime import WorkerPool
from shardwise.runtime.seeded import call_seeded

__all__ = ["compile", "CompiledModel", "MODES", "PRECISIONS"]

MODES = ("inference", "train", "generate")
PRECISIONS = ("fp32", "bf16", "fp16", "fp8")  # fp8: bf16 with float8 matmuls, priced only (see _no_fp8)
COLLECTIVES = ("library", "synthesize")  # who chooses each collective's algorithm (see compile)
MAX_LOCAL_PROCESSES = 64
FIT_BUDGET_S = 60.0  # wall seconds to look for a preset cluster a model that fits nowhere would fit on
# which CompiledModel's program a shared pool holds now (pools given with ``workers=`` change hands)
_POOL_OWNER: weakref.WeakKeyDictionary[WorkerPool, int] = weakref.WeakKeyDictionary()


def _describe_optimizer(optimizer: Callable[..., Any] | None) -> str:
    if optimizer is None:
        return "adamw"
    func = optimizer.func if isinstance(optimizer, functools.partial) else optimizer
    return getattr(func, "__name__", type(func).__name__).lower()


class CompiledModel:
    """A model compiled for a cluster: ``plan`` to inspect, ``save`` to export, ``run``/``train_step`` to
    execute on real local processes (started on first use, kept for later calls; ``close()`` stops them)."""

    def __init__(
        self,
        plan: ExecutionPlan,
        *,
        model: torch.nn.Module | None,
        out_spec: Any,
        cluster: ClusterSpec,
        optimizer: Callable[..., Any] | None = None,
        workers: WorkerPool | None = None,
        prefill_plan: ExecutionPlan | None = None,
        generation: GenerationSettings | None = None,
    ) -> None:
        note = calibration_note(cluster)  # a measured machine says so in its plans (cluster.machine)
        self.plan = plan.replace(notes=(*plan.notes, note)) if note and note not in plan.notes else plan
        self.cluster = cluster
        self._out_spec = out_spec
        self._optimizer = optimizer
        self._tensors = None if plan.graph.meta_device or model is None else model_tensors(model)
        # mode="generate": the plan is the decode step's; the prefill step's plan stores its tensors alike
        self.prefill_plan = prefill_plan
        self.generation = generation
        self._pool: WorkerPool | None = None
        self._shared_pool = workers  # a pool owned by the caller: loaded with this program, never closed here
        self._workdir: Path | None = None
        self._finalizer = weakref.finalize(self, CompiledModel._cleanup, [None], [None])

    # -- inspection -----------------------------------------------------------------------------------

    @property
    def graph(self) -> Graph:
        return self.plan.graph

    def __repr__(self) -> str:
        degrees = ", ".join(f"{k}={v}" for k, v in self.plan.degrees.items())
        return f"<CompiledModel {self.plan.model_name} on {self.plan.cluster_name} ({degrees}, {self.plan.mode})>"

    # -- export ----------------------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike[str], *, weights: bool = True) -> Path:
        """Write the drop-in package (plan.json, per-rank program, README) and, if the model has weights,
        ``model.safetensors`` beside it."""
        _no_fp8(self.plan.precision, "write a program")
        path = self._write(Path(directory))
        if weights and self._tensors is not None:
            _save_weights(self._tensors, path / "model.safetensors")
        return path

    # -- execution -------------------------------------------------------------------------------------

    def run(self, *inputs: Any) -> Any:
        """Run the generated programs on the plan's processes; returns rank 0's outputs, structured like the
        model's own output."""
        if self.generation is not None:
            raise UserInputError("this model was compiled with mode='generate': call cm.generate(input_ids, ...)")
        self._check_inputs(inputs)
        pool = self._ensure_pool()
        # from this process' generator state, on to the state after it: random ops draw what eager would
        flat, state = pool.call_function(
            call_seeded, "infer", torch.get_rng_state(), *inputs, ranks="rank0", label="infer"
        )
        torch.set_rng_state(state)
        return self._restructure(flat)

    def generate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *, max_new_tokens: int = 32,
        eos_token_id: int | tuple[int, ...] | None | str = "model", pad_token_id: int | None | str = "model",
        return_timings: bool = False,
    ) -> Any:  # fmt: skip
        """Greedy generation on the worker processes (``mode="generate"``), as transformers'
        ``generate(do_sample=False)``: returns ``input_ids`` followed by the new tokens (a finished row continues
        with the pad token; generation stops early when every row has finished). ``attention_mask`` marks the
        real tokens (1); prompts may be padded on either side: the program left pads them into the prefill's
        window. ``eos_token_id`` (one token or several) / ``pad_token_id``: the model's generation config's by
        default; ``eos_token_id=None`` never stops early. ``return_timings``: also return ``{"prefill_s": seconds, "decode_s": [seconds per decode
        step]}``, each step timed on the workers from a barrier to its return (the slowest rank's time)."""
        settings = self.generation
        if settings is None:
            raise UserInputError(
                f"generate() needs a model compiled with mode='generate' (this one is mode={self.plan.mode!r}): "
                "shardwise.compile(model, cluster, mode='generate', max_batch=..., max_seq=...)"
            )
        input_ids, attention_mask = self._check_prompts(input_ids, attention_mask, max_new_tokens)
        eos = settings.eos_token_id if eos_token_id == "model" else eos_token_id
        pad = settings.pad_token_id if pad_token_id == "model" else pad_token_id
        pool = self._ensure_pool()
        new, timings = pool.call(
            "generate", input_ids, attention_mask, max_new_tokens, eos, pad, ranks="rank0", label="generate"
        )
        out = torch.cat([input_ids, new.to(input_ids.dtype)], dim=1)
        return (out, timings) if return_timings else out

    def _check_prompts(
        self, input_ids: Any, attention_mask: Any, max_new_tokens: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        settings = self.generation
        assert settings is not None
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
            raise ShapeMismatchError("input_ids: expected integer token ids [batch, length]")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
            raise ShapeMismatchError(
                f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)} (1 on real tokens)"
            )
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise UserInputError(f"max_new_tokens must be a positive number, got {max_new_tokens!r}")
        rows = input_ids.shape[0]
        if rows > settings.max_batch:
            raise ShapeMismatchError(
                f"{rows} prompts, but the program was compiled for max_batch={settings.max_batch}: compile with "
                f"max_batch={rows} or more, or generate in batches of {settings.max_batch}"
            )
        longest = int(attention_mask.sum(-1).max()) if rows else 0
        if longest > settings.prompt_len:
            raise ShapeMismatchError(
                f"a prompt of {longest} tokens, but the prefill was compiled for prompts of at most "
                f"{settings.prompt_len} tokens: compile with max_prompt={longest} or more (and max_seq >= "
                f"max_prompt + max_new_tokens)"
            )
        if settings.prompt_len + max_new_tokens > settings.max_seq:
            raise ShapeMismatchError(
                f"max_new_tokens={max_new_tokens} does not fit the KV cache: the prompt window takes "
                f"{settings.prompt_len} of its max_seq={settings.max_seq} slots, leaving "
                f"{settings.max_seq - settings.prompt_len}. Compile with max_seq={settings.prompt_len + max_new_tokens} "
                "or more, or ask for fewer tokens"
            )
        return input_ids.long(), attention_mask.long()

    def train_step(self, *inputs: Any) -> float:
        """One training step (forward, backward, gradient reduction, optimizer step); returns the loss."""
        if self.plan.mode != "train":
            raise UserInputError("this model was compiled with mode='inference': compile with mode='train'")
        self._check_inputs(inputs)
        pool = self._ensure_pool()
        loss, state = pool.call_function(
            call_seeded, "train_step", torch.get_rng_state(), *inputs, ranks="rank0", label="train_step"
        )
        torch.set_rng_state(state)
        return float(loss)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The full, unsharded parameters and buffers as they are now on the workers."""
        if self._pool is None:
            if self._tensors is None:
                raise UserInputError("this model has no weights (it was planned on the meta device)")
            return {k: v.clone() for k, v in self._tensors.items()}
        return self._pool.call("full_state_dict", ranks="rank0")

    # -- checkpoints (shardwise.runtime.checkpoint) ---------------------------------------------------

    def save_checkpoint(self, directory: str | os.PathLike[str]) -> Path:
        """Save parameters, buffers and optimizer state as a sharded checkpoint: each rank writes its own
        pieces, a manifest holds their checksums; written atomically (a temporary directory, then a rename)."""
        from shardwise.runtime import checkpoint

        self._check_optimizer_state_readable("save_checkpoint")
        meta = {"model_name": self.plan.model_name, "model_fingerprint": self.plan.model_fingerprint,
                "cluster_name": self.plan.cluster_name, "degrees": self.plan.degrees, "mode": self.plan.mode}  # fmt: skip
        return checkpoint.save(self._ensure_pool(), directory, meta)

    def load_checkpoint(self, directory: str | os.PathLike[str], *, optimizer: bool | None = None) -> None:
        """Load a checkpoint saved under any plan of this model (checksums verified first). ``optimizer``:
        None loads the optimizer state when both sides have one, True requires it, False skips it."""
        from shardwise.runtime import checkpoint

        if optimizer is not False:
            self._check_optimizer_state_readable("load_checkpoint (optimizer=False loads the weights alone)")
        checkpoint.load(self._ensure_pool(restart=True), directory, self.checkpoint_layout(), optimizer=optimizer)

    def optimizer_state_dict(self) -> dict[str, Any] | None:
        """The whole optimizer state keyed by parameter name (``{"class", "param_groups", "state"}``), gathered
        from every rank; None when the program has no optimizer."""
        from shardwise.runtime import checkpoint

        self._check_optimizer_state_readable("optimizer_state_dict")
        return checkpoint.gather(self._ensure_pool())["optimizer"]

    def _check_optimizer_state_readable(self, what: str) -> None:
        """ZeRO stages 1 and 2 keep the optimizer state as slices of flat gradient buckets
        (``runtime.lib.optim.ShardedOptimizer``), which checkpoints do not map to parameters yet: refuse rather
        than save or return a state without them."""
        if self.generation is not None:
            raise UserInputError(
                f"{what.split(' ')[0]}: a model compiled with mode='generate' has no state to checkpoint (its weights "
                "are the model's: cm.state_dict(); cm.save(directory) writes them with the package)"
            )
        plan = self.plan
        stage = plan.pipeline.zero if plan.pipeline is not None else plan.zero_stage
        if plan.mode == "train" and stage in (1, 2) and plan.degrees.get("dp", 1) > 1:
            raise CheckpointError(
                f"{what}: this plan shards the optimizer state by ZeRO stage {stage} (slices of flat gradient "
                "buckets), which checkpoints cannot read yet, so it would be lost. Compile with "
                "constraints={'zero': 0} (or 3) to checkpoint the optimizer state"
            )

    def checkpoint_layout(self) -> Any:
        """Where each piece of each tensor lives under this plan (a ``checkpoint.ProgramLayout``)."""
        from shardwise.codegen.layout import tensor_tables
        from shardwise.runtime.checkpoint import layout_from_tables

        return layout_from_tables(tensor_tables(self.plan))

    def close(self) -> None:
        """Stop the worker processes (also done at exit and when the object is collected); a pool given
        with ``workers=`` is left running for its owner."""
        if self._pool is not None:
            if self._pool is not self._shared_pool:
                self._pool.close()
            self._pool = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> CompiledModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------------------------

    @staticmethod
    def _cleanup(pool_box: list[WorkerPool | None], dir_box: list[Path | None]) -> None:
        if pool_box[0] is not None:
            pool_box[0].close()
        if dir_box[0] is not None:
            shutil.rmtree(dir_box[0], ignore_errors=True)

    def _ensure_pool(self, restart: bool = False) -> WorkerPool:
        """The pool running this program, loaded on first use. After a fault stopped the workers, an inference
        program is loaded again on fresh ones; a training program only when ``restart`` (its trained state
        was lost with the workers: load_checkpoint restarts it)."""
        _no_fp8(self.plan.precision, "run")
        if self.plan.graph.meta_device or self._tensors is None:
            raise UserInputError(
                "this model was planned on the meta device: it has no weights to run. Build it on the CPU "
                "(or load its weights) and compile again to run it; the plan (cm.plan) is complete as is."
            )
        reuse = None
        if self._pool is not None:
            if _POOL_OWNER.get(self._pool) == id(self):
                if self._pool.alive:
                    return self._pool
                if self.plan.mode == "train" and not restart:
                    raise RuntimeFault(
                        "the workers of this model were stopped after a fault, and its trained state with them: "
                        "load a checkpoint (cm.load_checkpoint(directory)) to continue on fresh workers"
                    )
                reuse, self._pool = self._pool, None
            elif self.plan.mode == "train":
                raise UserInputError(
                    "the shared worker pool now runs another program, and this one's trained state was on it: "
                    "give each training model its own pool"
                )
            self._pool = None
        self._check_devices()
        package, weights = self._write_program()
        shared = self._shared_pool
        if shared is not None and shared.world_size != self.plan.world_size:
            raise UserInputError(
                f"the given worker pool has {shared.world_size} processes; this plan needs {self.plan.world_size}"
            )
        pool = shared or reuse or WorkerPool(self.plan.world_size, backend="gloo")
        try:
            pool.load(package, init="load_weights", init_kwargs={"path": str(weights)})
            if self.plan.mode == "train":
                pool.call("configure_optimizer", self._optimizer)
        except BaseException:
            if shared is None:
                pool.close()
            raise
        self._pool = pool
        _POOL_OWNER[pool] = id(self)
        self._finalizer.detach()
        owned = None if shared is not None else pool
        self._finalizer = weakref.finalize(self, CompiledModel._cleanup, [owned], [self._workdir])
        return pool

    def _write(self, directory: Path) -> Path:
        if self.generation is not None and self.prefill_plan is not None:
            return write_generation_package(self.plan, self.prefill_plan, self.generation, directory)
        return write_package(self.plan, directory)

    def _write_program(self) -> tuple[Path, Path]:
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix="shardwise-"))
            self._write(self._workdir / "program")
            assert self._tensors is not None
            _save_weights(self._tensors, self._workdir / "model.safetensors")
        return self._workdir / "program", self._workdir / "model.safetensors"

    def _check_devices(self) -> None:
        kind = self.cluster.device.kind
        n = self.plan.world_size
        if kind != "cpu":
            have = torch.cuda.device_count() if torch.cuda.is_available() else 0
            raise DeviceUnavailableError(
                f"this plan runs on {n} {kind} devices of {self.plan.cluster_name}; this machine has {have} CUDA "
                f"devices and runs plans for local CPU processes only. Compile for 'cpu:{min(n, 4)}' to run here, "
                "or save the package (cm.save) and start it with torchrun on the cluster."
            )
        if n > MAX_LOCAL_PROCESSES:
            raise DeviceUnavailableError(
                f"this plan needs {n} local processes; at most {MAX_LOCAL_PROCESSES} are started on one machine"
            )

    def _check_inputs(self, inputs: Sequence[Any]) -> None:
        graph = self.plan.graph
        if len(inputs) != len(graph.inputs):
            raise ShapeMismatchError(
                f"the plan takes {len(graph.inputs)} input(s) ({', '.join(i.name for i in graph.inputs)}), "
                f"got {len(inputs)}"
            )
        dp = self.plan.degrees.get("dp", 1)
        for given, expected, placement in zip(inputs, graph.inputs, self.plan.input_placements, strict=True):
            if not isinstance(expected.spec, TensorSpec):
                continue
            if not isinstance(given, torch.Tensor):
                raise ShapeMismatchError(f"input {expected.name}: expected a tensor, got {type(given).__name__}")
            spec = expected.spec
            if str(given.dtype).removeprefix("torch.") != spec.dtype:
                raise ShapeMismatchError(f"input {expected.name}: dtype {given.dtype} but the plan is for {spec.dtype}")
            if given.dim() != spec.rank:
                raise ShapeMismatchError(
                    f"input {expected.name}: {given.dim()} dimensions but the plan is for {spec.rank} ({spec})"
                )
            dynamic = {d.dim: d for d in expected.dynamic}
            for dim, (have, want) in enumerate(zip(given.shape, spec.shape, strict=True)):
                if dim in dynamic:
                    d = dynamic[dim]
                    if not d.min <= have <= d.max:
                        raise ShapeMismatchError(
                            f"input {expected.name} dimension {dim} ({d.name}) is {have}; the plan covers "
                            f"{d.min}..{d.max}"
                        )
                    if dim == 0 and placement.placements and str(placement.placements[0]) == "S(0)" and have % dp:
                        raise ShapeMismatchError(
                            f"input {expected.name} dimension {dim} ({d.name}) is {have}: the plan splits it "
                            f"over dp={dp}, so it must be a multiple of {dp}"
                        )
                elif have != want:
                    raise ShapeMismatchError(
                        f"input {expected.name} dimension {dim} is {have} but the plan was made for {want}; "
                        "compile with dynamic_shapes=... to let this dimension vary"
                    )

    def _restructure(self, flat: Any) -> Any:
        leaves = list(flat) if isinstance(flat, tuple | list) else [flat]
        if self._out_spec is None:
            return flat
        try:
            return pytree.tree_unflatten(leaves, self._out_spec)
        except Exception:  # a structure we cannot rebuild: give the flat outputs
            return flat


def _no_fp8(precision: str, what: str) -> None:
    """precision="fp8" (bf16 with float8 matmuls) is priced by the planner, and shardwise generates no float8
    kernels yet: a plan made with it cannot run or be written as a program."""
    if precision == "fp8":
        raise UserInputError(
            f"this plan was made with precision='fp8' (bf16 with float8 matmuls), which the planner prices but "
            f"for which shardwise generates no float8 kernels yet, so it cannot {what}: compile with "
            "precision='bf16' to get a program; the plan (cm.plan) is complete as is"
        )


def _check_optimizer(optimizer: Callable[..., Any] | None) -> None:
    """The optimizer factory travels to every worker by pickling: refuse one that cannot, up front."""
    if optimizer is None:
        return
    if not callable(optimizer):
        raise UserInputError(f"optimizer must be a factory from parameters to an optimizer, got {optimizer!r}")
    import pickle

    try:
        pickle.dumps(optimizer)
    except Exception as exc:
        raise UserInputError(
            f"optimizer={optimizer!r} cannot be sent to the worker processes ({type(exc).__name__}): give a "
            "module-level function or a functools.partial, e.g. functools.partial(torch.optim.SGD, lr=0.1), "
            "not a lambda or a nested function"
        ) from None


def _save_weights(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    seen: dict[int, str] = {}
    unique: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if id(t) in seen or t.data_ptr() in seen:
            continue  # tied weights: the program loads them through ALIASES
        seen[t.data_ptr()] = key
        unique[key] = t.detach().contiguous().cpu()
    tmp = path.with_suffix(".tmp")
    save_file(unique, str(tmp))
    tmp.rename(path)


def compile(  # noqa: A001 - the public name mirrors torch.compile
    model: torch.nn.Module,
    cluster: str | ClusterSpec = "cpu:2",
    *,
    example_inputs: Sequence[Any] | None = None,
    example_kwargs: dict[str, Any] | None = None,
    mode: str = "inference",
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    optimizer: Callable[..., torch.optim.Optimizer] | None = None,
    precision: str = "fp32",
    constraints: Mapping[str, int] | None = None,
    dynamic_shapes: Any = None,
    workers: WorkerPool | None = None,
    fusion: bool = True,
    solver: str = "cbc",
    time_limit_s: float = 60.0,
    recompute: str | int | None = None,
    collectives: str = "library",
    offload: str | None = None,
    max_batch: int | None = None,
    max_seq: int | None = None,
    max_prompt: int | None = None,
    progress: bool = True,
) -> CompiledModel:
    """Trace ``model`` with ``example_inputs``, plan it for ``cluster`` and return a CompiledModel.

    Planning is one search (``shardwise.planner.plan``) over pipeline, data and tensor parallelism, sequence
    parallelism, ZeRO stages 0-3, micro-batching and schedule, recomputation and host offload, every layout
    priced by the price list (``shardwise.costs``); the fastest plan that fits the devices wins (of those within
    1% of it, the one with the least memory per device). ``plan.alternatives`` lists the others and
    ``shardwise explain`` says why.

    ``mode="train"`` needs ``loss_fn(output) -> scalar``; ``optimizer`` is a factory from parameters to a
    torch.optim.Optimizer (AdamW by default). ``constraints`` pins any choice of the search, with the same names
    as the CLI's ``-C``: ``pp``, ``dp``, ``tp``, ``sp`` (1: off), ``zero`` (0-3), ``microbatches`` or
    ``microbatch_size``, ``schedule`` ("1f1b", "gpipe", "interleaved"), ``virtual``, ``recompute``,
    ``offload``, ``collectives`` (see ``shardwise.planner.constraints``). ``recompute`` ("auto" by default:
    searched; "none", "selective": the fewest layers that make the plan fit, "full"/"all": every layer, or a
    number of bytes per rank that selective recomputation must bring the peak within), ``offload`` ("auto" by
    default: host memory for optimizer state and/or activations only when nothing fits otherwise; "none";
    "optimizer", "activations", "optimizer+activations": always, flat plans) and ``collectives`` ("library", or
    "synthesize": a topology-aware schedule for each collective of a flat plan where one is predicted faster)
    may be given as keywords too. ``dynamic_shapes`` follows torch.export's convention. ``workers`` runs the
    program on an existing WorkerPool (its processes take the new program without restarting) instead of
    starting new ones. ``fusion`` groups each rank's elementwise chains and normalization/softmax epilogues into
    fused kernels (Triton on CUDA, the same ops eagerly on CPU); ``fusion=False`` runs one statement per op.
    ``solver`` ("cbc" or "cpsat") solves the placement ILP within ``time_limit_s`` seconds per mesh.

    ``mode="generate"`` (a HuggingFace causal LM; no ``example_inputs``): the model with a static KV cache of
    ``max_batch`` rows and ``max_seq`` slots per layer is traced as two steps, a prefill of a window of
    ``max_prompt`` tokens per row (``max_seq // 2`` by default; prompts are left padded into it) and one
    decode step of one token per row. The decode step is planned (tensor parallelism splits the cache by
    key/value heads where they divide), then the prefill with the decode plan's placements of the weights and
    the cache, so that both programs share them; ``cm.generate(input_ids, attention_mask, max_new_tokens=...)``
    runs greedy generation on the workers (``frontend.generation``, ``runtime.lib.generation``).

    ``progress``: planning that lasts longer than a few seconds reports each layout it realizes on stderr
    (``shardwise.planner.plan``); ``False`` keeps it quiet.
    """
    if mode == "generate":
        return _compile_generate(
            model, cluster, example_inputs=example_inputs, max_batch=max_batch, max_seq=max_seq,
            max_prompt=max_prompt, precision=precision, constraints=constraints, workers=workers, fusion=fusion,
            solver=solver, time_limit_s=time_limit_s, collectives=collectives,
        )  # fmt: skip
    if max_batch is not None or max_seq is not None or max_prompt is not None:
        raise UserInputError("max_batch, max_seq and max_prompt size the KV cache of mode='generate'")
    if example_inputs is None:
        raise UserInputError(f"mode={mode!r} needs example_inputs: a tuple of the model's positional inputs")
    if mode not in MODES:
        raise UserInputError(f"mode={mode!r} is not allowed: choose one of {', '.join(MODES)}")
    if precision not in PRECISIONS:
        raise UserInputError(f"precision={precision!r} is not allowed: choose one of {', '.join(PRECISIONS)}")
    if mode == "train" and loss_fn is None:
        raise UserInputError("mode='train' needs loss_fn: a function from the model's output to a scalar loss")
    _check_optimizer(optimizer)
    spec = get_cluster(cluster)
    pinned = _settings(constraints, recompute=recompute, offload=offload, collectives=collectives, mode=mode)
    if mode == "train":
        model.train()
        with contextlib.suppress(Exception):  # keep dropout off so every rank computes the same values
            for m in model.modules():
                if isinstance(m, torch.nn.Dropout):
                    m.p = 0.0
    inputs = example_inputs if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    graph, out_spec = trace(
        model, inputs, example_kwargs=example_kwargs, dynamic_shapes=dynamic_shapes,
        loss_fn=loss_fn if mode == "train" else None,
    )  # fmt: skip
    if mode == "train" and not any(p.requires_grad and p.kind == "parameter" for p in graph.params):
        raise UserInputError(f"mode='train' needs trainable parameters, and {graph.model_name} has none: use mode='inference'")
    options = PlanOptions(
        mode=mode, precision=precision, optimizer=_describe_optimizer(optimizer), solver=solver,
        time_limit_s=time_limit_s, fusion=fusion, progress=progress,
    )  # fmt: skip
    micro = functools.partial(_micro_graph, model, inputs, example_kwargs, loss_fn if mode == "train" else None)
    try:
        plan = plan_model(graph, spec, pinned, options, micro_graph=micro)  # fused and priced by the planner
    except DoesNotFitError as exc:
        raise DoesNotFitError(f"{exc}. {_where_it_fits(graph, mode, precision, optimizer, solver)}") from None
    return CompiledModel(plan, model=model, out_spec=out_spec, cluster=spec, optimizer=optimizer, workers=workers)


def _where_it_fits(graph: Graph, mode: str, precision: str, optimizer: Any, solver: str) -> str:
    """A sentence naming the smallest preset cluster the model fits on (flat plans, no constraints), looked
    for within ``FIT_BUDGET_S`` seconds of wall time."""
    from shardwise.fit import FAMILIES, NODES, smallest_fitting_preset
    from shardwise.planner.auto import plan_auto

    def plan(g: Graph, spec: ClusterSpec) -> ExecutionPlan:
        return plan_auto(g, spec, mode=mode, precision=precision, optimizer=_describe_optimizer(optimizer),
                         solver=solver)  # fmt: skip

    found = smallest_fitting_preset(graph, mode, plan, budget_s=FIT_BUDGET_S)
    fit = found.fit
    if fit is None and found.out_of_time:
        where = f" (planning it for {found.tried[-1]!r} took longer)" if found.tried else ""
        return (
            f"Looking for a preset cluster it fits on was stopped after {FIT_BUDGET_S:.0f} s{where}: describe a "
            "cluster with more or bigger devices in YAML, or pin a layout that fits with constraints"
        )
    if fit is None:
        return f"No preset cluster up to {FAMILIES[1]}x{NODES[-1]} fits it either: describe a bigger cluster in YAML"
    degrees = ", ".join(f"{k}={v}" for k, v in fit.plan.degrees.items() if v > 1) or "one device"
    peak = max(fit.plan.predicted.memory_bytes or (0,)) / 2**30
    return (
        f"The smallest preset cluster it fits on is {fit.cluster!r} ({fit.world_size} devices with "
        f"{fit.device_memory_bytes / 2**30:.0f} GiB each; {degrees}, {peak:.2f} GiB per device): compile for it"
    )


def _settings(
    constraints: Mapping[str, object] | None, *, recompute: object, offload: object, collectives: str, mode: str
) -> dict[str, object]:
    """``constraints`` with the keyword settings folded in (the same names as the constraints'); a setting given
    both ways must agree."""
    pinned = dict(constraints or {})
    for key, value, default in (("recompute", recompute, None), ("offload", offload, None),
                                ("collectives", collectives, "library")):  # fmt: skip
        if value is None or value == default and key in pinned:
            continue
        if key == "recompute" and value == "all":
            value = "full"
        if key in pinned and pinned[key] != value:
            raise UserInputError(
                f"{key}={value!r} and constraints {{{key!r}: {pinned[key]!r}}} disagree: give it once"
            )
        pinned[key] = value
    if mode != "train":
        for key in ("recompute", "offload"):
            if pinned.get(key) not in (None, "none", "auto"):
                raise UserInputError(f"{key}={pinned[key]!r} applies to training: compile with mode='train'")
    if pinned.get("collectives", "library") not in COLLECTIVES:
        raise UserInputError(
            f"collectives={pinned['collectives']!r} is not allowed: choose one of {', '.join(COLLECTIVES)}"
        )
    return pinned


def _micro_graph(model: torch.nn.Module, inputs: Any, example_kwargs: Any, loss_fn: Any, n: int) -> Graph:
    """The model traced at ``n`` rows of its batch inputs (repeated when ``n`` exceeds the traced batch: only
    traced): what a pipeline's chunks run at."""
    rows = next((x.shape[0] for x in (inputs if isinstance(inputs, tuple) else (inputs,))
                 if isinstance(x, torch.Tensor) and x.dim()), 1)  # fmt: skip

    def cut(x: Any) -> Any:
        if not (isinstance(x, torch.Tensor) and x.dim() and x.shape[0] == rows):
            return x
        return x[:n] if n <= rows else torch.cat([x] * -(-n // rows))[:n]

    small = cut(inputs) if isinstance(inputs, torch.Tensor) else tuple(cut(x) for x in inputs)
    kwargs = {k: cut(v) for k, v in (example_kwargs or {}).items()}
    return trace(model, small, example_kwargs=kwargs, loss_fn=loss_fn)[0]


def _compile_generate(
    model: torch.nn.Module, cluster: str | ClusterSpec, *, example_inputs: Any, max_batch: int | None,
    max_seq: int | None, max_prompt: int | None, precision: str, constraints: Mapping[str, object] | None,
    workers: WorkerPool | None, fusion: bool, solver: str, time_limit_s: float, collectives: str,
) -> CompiledModel:  # fmt: skip
    """``compile(mode="generate")``: the decode step planned, then the prefill step with the decode plan's
    mesh and tensor placements fixed (see ``compile``)."""
    from shardwise.frontend.generation import (
        CACHE_PREFIX,
        MODEL_PREFIX,
        StepModule,
        check_causal_lm,
        example_step,
        in_place_writes,
    )

    check_causal_lm(model)
    if example_inputs is not None:
        raise UserInputError("mode='generate' makes its own example inputs: give max_batch and max_seq instead")
    for name, value in (("max_batch", max_batch), ("max_seq", max_seq)):
        if not isinstance(value, int) or value < 1:
            raise UserInputError(f"mode='generate' needs {name}, a positive number (got {value!r})")
    assert max_batch is not None and max_seq is not None
    positions = _max_positions(model)
    if positions is not None and max_seq > positions:
        raise UserInputError(
            f"max_seq={max_seq} exceeds the {positions} positions {type(model).__name__} was made for "
            f"(its config's max_position_embeddings / n_positions): compile with max_seq <= {positions}"
        )
    window = _sliding_window(model)
    if window is not None and window < max_seq:
        raise UserInputError(
            f"{type(model).__name__} attends over a sliding window of {window} tokens, which the generation "
            f"program's static KV cache does not apply: compile with max_seq <= {window}, or a model without "
            "sliding-window attention"
        )
    prompt = max_prompt if max_prompt is not None else max(1, max_seq // 2)
    if not isinstance(prompt, int) or not 1 <= prompt < max_seq:
        raise UserInputError(
            f"max_prompt={prompt!r}: the prefill's window must hold at least one token and leave room in the "
            f"KV cache for new ones (1 <= max_prompt < max_seq={max_seq})"
        )
    if precision not in PRECISIONS:
        raise UserInputError(f"precision={precision!r} is not allowed: choose one of {', '.join(PRECISIONS)}")
    pinned = _settings(constraints, recompute=None, offload=None, collectives=collectives, mode="generate")
    for key in ("pp", "dp", "cp"):
        if pinned.get(key, 1) != 1:
            raise UserInputError(
                f"mode='generate' runs tensor parallelism within one program ({key}={pinned[key]} is not "
                f"supported yet): drop {key}, or run several compiled models as replicas"
            )
    pinned.update(pp=1, dp=1, cp=1)
    spec = get_cluster(cluster)
    step = StepModule(model, max_batch, max_seq).eval()
    with torch.no_grad():
        decode_graph = trace(step, example_step(max_batch, max_seq, 1), prefix=MODEL_PREFIX,
                             model_name=type(model).__name__)[0]  # fmt: skip
        prefill_graph = trace(step, example_step(max_batch, max_seq, prompt), prefix=MODEL_PREFIX,
                              model_name=type(model).__name__)[0]  # fmt: skip
    decode_graph, prefill_graph = (
        in_place_writes(_cache_as_state(g, CACHE_PREFIX)) for g in (decode_graph, prefill_graph)
    )
    options = PlanOptions(mode="inference", precision=precision, solver=solver, time_limit_s=time_limit_s,
                          fusion=fusion)  # fmt: skip
    try:
        decode = plan_model(decode_graph, spec, pinned, options)
        fixed = {**pinned, "tp": decode.degrees.get("tp", 1)}
        prefill = plan_model(
            prefill_graph, spec, fixed, dataclasses.replace(options, fixed_params=decode.param_placements)
        )
    except DoesNotFitError as exc:
        raise DoesNotFitError(
            f"{exc}. The KV cache takes {_cache_bytes(decode_graph) / 2**20:.1f} MiB: a smaller max_batch or "
            "max_seq shrinks it"
        ) from None
    config = getattr(model, "generation_config", None)
    settings = GenerationSettings(
        max_batch=max_batch, max_seq=max_seq, prompt_len=prompt,
        eos_token_id=_token_ids(getattr(config, "eos_token_id", None)),
        pad_token_id=_first(_token_ids(getattr(config, "pad_token_id", None))),
    )  # fmt: skip
    compiled = CompiledModel(
        decode, model=model, out_spec=None, cluster=spec, workers=workers, prefill_plan=prefill,
        generation=settings,
    )  # fmt: skip
    if compiled._tensors is not None:  # the model's weights under its own names (the step module's, unwrapped)
        compiled._tensors = {
            key.removeprefix(MODEL_PREFIX): t for key, t in model_tensors(step).items() if not key.startswith(CACHE_PREFIX)
        }
    return compiled


def _sliding_window(model: torch.nn.Module) -> int | None:
    """The model's attention window when some of its layers attend over one (transformers' config names)."""
    config = model.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(config, "sliding_window", None)
    if not isinstance(window, int) or getattr(config, "use_sliding_window", True) is False:
        return None
    types = getattr(config, "layer_types", None)
    if isinstance(types, list | tuple) and not any("sliding" in str(t) for t in types):
        return None
    return window


def _max_positions(model: torch.nn.Module) -> int | None:
    config = model.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    value = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) else None


def _cache_as_state(graph: Graph, prefix: str) -> Graph:
    """The step's cache buffers marked as state: zeros at first, neither loaded with the weights nor saved."""
    params = tuple(
        dataclasses.replace(p, kind="state", persistent=False) if p.key.startswith(prefix) else p for p in graph.params
    )
    return graph.replace(params=params)


def _first(value: int | tuple[int, ...] | None) -> int | None:
    return value[0] if isinstance(value, tuple) else value


def _cache_bytes(graph: Graph) -> int:
    return sum(p.spec.nbytes for p in graph.params if p.kind == "state")


def _token_ids(value: Any) -> int | tuple[int, ...] | None:
    """A generation config's token id, or ids (transformers allows several end-of-sequence tokens)."""
    if isinstance(value, list | tuple):
        return tuple(int(v) for v in value) or None
    return int(value) if value is not None else None
