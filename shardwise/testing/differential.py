"""Differential testing: compile a generated case, run it on real worker processes, compare with eager PyTorch.

A :class:`Fuzzer` owns one ``WorkerPool`` per world size and runs every case on them (the workers take each
new program without restarting, so a case costs a trace, a plan and a load, not a process start-up). Each
case is compiled twice — for inference (compared output by output) and for training (the loss of one SGD
step and the whole state_dict after it, against the same step in eager PyTorch).

A case ends in one status:

* ``ok`` — both comparisons agree within the dtype's tolerance;
* ``mismatch`` — it ran, but a value differs (``detail`` says which and by how much);
* ``crash`` — anything but a clear error: an exception that is not a ``shardwise.errors.ShardwiseError``
  while compiling, or any failure while running what shardwise accepted (a worker fault included);
* ``unsupported`` — shardwise refused the model or mesh with a clear ``ShardwiseError`` (not a crash);
* ``invalid`` — eager PyTorch itself failed: a generator bug (expected never).
"""

from __future__ import annotations

import functools
import math
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree

from shardwise.errors import RuntimeFault, ShardwiseError
from shardwise.runtime import WorkerPool
from shardwise.testing.fuzz import LR, FuzzCase, generate, load_case, reproducer

__all__ = ["CaseResult", "Fuzzer", "compare", "supported_degrees", "tolerance", "STATUSES"]

STATUSES = ("ok", "mismatch", "crash", "unsupported", "invalid")


@dataclass(frozen=True)
class CaseResult:
    seed: int
    status: str
    stage: str  # where it ended: eager | compile-inference | run-inference | compile-train | train | done
    detail: str
    world_size: int
    constraints: tuple[tuple[str, int], ...]
    dtype: str
    ops: tuple[str, ...]
    seconds: float
    max_diff: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed, "status": self.status, "stage": self.stage, "detail": self.detail,
            "world_size": self.world_size, "constraints": dict(self.constraints), "dtype": self.dtype,
            "ops": list(self.ops), "seconds": round(self.seconds, 3), "max_diff": self.max_diff,
        }  # fmt: skip


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol relative to the largest magnitude of the expected tensor) for comparing ``dtype``."""
    if dtype == torch.float64:
        return 1e-9, 1e-10
    if dtype in (torch.bfloat16, torch.float16):
        return 3e-2, 3e-2
    return 2e-4, 2e-5


def _leaves(x: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(x) if isinstance(t, torch.Tensor)]


def compare(what: str, got: Any, want: Any) -> tuple[bool, str, float]:
    """Compare structures of tensors; returns (equal within tolerance, what differs, largest scaled diff)."""
    g_leaves, w_leaves = _leaves(got), _leaves(want)
    if len(g_leaves) != len(w_leaves):
        return False, f"{what}: {len(g_leaves)} tensors, eager PyTorch gives {len(w_leaves)}", math.inf
    worst = 0.0
    for i, (g, w) in enumerate(zip(g_leaves, w_leaves, strict=True)):
        ok, detail, diff = _compare_tensor(f"{what}[{i}]", g, w)
        worst = max(worst, diff)
        if not ok:
            return False, detail, diff
    return True, "", worst


def _compare_tensor(what: str, g: torch.Tensor, w: torch.Tensor) -> tuple[bool, str, float]:
    if tuple(g.shape) != tuple(w.shape) or g.dtype != w.dtype:
        return False, f"{what}: {tuple(g.shape)} {g.dtype}, eager gives {tuple(w.shape)} {w.dtype}", math.inf
    if w.numel() == 0:
        return True, "", 0.0
    if not w.is_floating_point():
        differ = int((g != w).sum())
        return differ == 0, f"{what}: {differ} of {w.numel()} elements differ", float(differ)
    rtol, atol = tolerance(w.dtype)
    gd, wd = g.double(), w.double()
    nan_g, nan_w = torch.isnan(gd), torch.isnan(wd)
    if not torch.equal(nan_g, nan_w):
        return False, f"{what}: NaN in different places ({int(nan_g.sum())} vs {int(nan_w.sum())})", math.inf
    finite = ~nan_w
    gd, wd = gd[finite], wd[finite]
    if wd.numel() == 0:
        return True, "", 0.0
    scale = 1.0 + wd.abs().max().item()
    err = (gd - wd).abs()
    allowed = atol * scale + rtol * wd.abs()
    bad = err > allowed
    diff = (err / scale).max().item()
    if bool(bad.any()):
        i = int(torch.argmax((err - allowed).flatten()))
        return False, (
            f"{what}: {int(bad.sum())} of {w.numel()} elements differ; worst {gd.flatten()[i].item():.6g} vs eager "
            f"{wd.flatten()[i].item():.6g} (max abs diff {err.max().item():.3e}, scale {scale:.3e})"
        ), diff  # fmt: skip
    return True, "", diff


@functools.cache
def supported_degrees() -> tuple[str, ...]:
    """The parallel degrees the planner accepts now (``dp`` always; ``tp``/``pp`` once they exist): each is
    probed by compiling a two-layer model for ``cpu:2`` with that degree pinned to 2."""
    import shardwise

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))
    x = torch.randn(4, 8)
    found = ["dp"]
    for degree in ("tp", "pp"):
        try:
            shardwise.compile(model, "cpu:2", example_inputs=(x,), constraints={"dp": 1, degree: 2}).close()
        except ShardwiseError:
            continue
        found.append(degree)
    return tuple(found)


@dataclass
class Fuzzer:
    """Runs cases on shared worker pools (one per world size, started on first use, ``close()`` stops them).

    ``timeout_s`` bounds every step on the workers: a hang becomes a crash, not a stuck fuzzer.
    """

    timeout_s: float = 60.0
    degrees: tuple[str, ...] | None = None
    pools: dict[int, WorkerPool] = field(default_factory=dict)
    features: tuple[str, ...] = ()  # the generator's extensions (shardwise.testing.fuzz.FEATURES)

    def __post_init__(self) -> None:
        if self.degrees is None:
            self.degrees = supported_degrees()

    def pool(self, world_size: int) -> WorkerPool:
        pool = self.pools.get(world_size)
        if pool is None:
            pool = self.pools[world_size] = WorkerPool(world_size, timeout_s=self.timeout_s)
        return pool

    def case(self, seed: int) -> FuzzCase:
        assert self.degrees is not None
        return generate(seed, degrees=self.degrees, features=self.features)

    def run(self, case_or_seed: FuzzCase | int) -> CaseResult:
        case = self.case(case_or_seed) if isinstance(case_or_seed, int) else case_or_seed
        start = time.perf_counter()
        status, stage, detail, diff = self._run(case)
        return CaseResult(
            case.seed, status, stage, detail, case.world_size, case.constraints, case.dtype, case.ops,
            time.perf_counter() - start, diff,
        )  # fmt: skip

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()
        self.pools.clear()

    def __enter__(self) -> Fuzzer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- one case --------------------------------------------------------------------------------------

    def _run(self, case: FuzzCase) -> tuple[str, str, str, float]:
        import shardwise

        try:
            loaded = load_case(case)
            inputs = loaded.inputs()
            with torch.no_grad():
                want = loaded.model().eval()(*inputs)
            reference = loaded.model().train()
            want_loss = loaded.loss_fn(reference(*inputs))
            want_loss.backward()
            torch.optim.SGD(reference.parameters(), lr=LR).step()
            want_state = reference.state_dict()
            dynamic = loaded.dynamic_shapes()
        except Exception as exc:
            return "invalid", "eager", _describe(exc), 0.0
        constraints = dict(case.constraints)
        pool = self.pool(case.world_size)
        worst = 0.0
        # inference
        outcome = self._step(
            "inference",
            lambda: shardwise.compile(
                loaded.model().eval(),
                case.cluster,
                example_inputs=inputs,
                constraints=constraints,
                dynamic_shapes=dynamic,
                workers=pool,
            ),
            lambda cm: cm.run(*inputs),
        )
        if isinstance(outcome, _Failure):
            return outcome.result
        ok, detail, diff = compare("output", outcome, want)
        worst = max(worst, diff)
        if not ok:
            return "mismatch", "run-inference", detail, diff
        # one training step
        sgd = functools.partial(torch.optim.SGD, lr=LR)
        outcome = self._step(
            "train",
            lambda: shardwise.compile(
                loaded.model(),
                case.cluster,
                example_inputs=inputs,
                mode="train",
                loss_fn=loaded.loss_fn,
                optimizer=sgd,
                constraints=constraints,
                dynamic_shapes=dynamic,
                workers=pool,
            ),  # fmt: skip
            lambda cm: (cm.train_step(*inputs), cm.state_dict()),
        )
        if isinstance(outcome, _Failure):
            return outcome.result
        loss, state = outcome
        # the loss carries the model's rounding: compare it at the model's precision
        model_dtype = getattr(torch, case.dtype)
        ok, detail, diff = compare(
            "loss", torch.tensor(loss, dtype=torch.float64).to(model_dtype), want_loss.detach().to(model_dtype)
        )
        worst = max(worst, diff)
        if not ok:
            return "mismatch", "train", detail, diff
        missing = [k for k in want_state if k not in state]
        if missing:
            return "mismatch", "train", f"state_dict after the step lacks {missing[:5]}", math.inf
        for key, value in want_state.items():
            ok, detail, diff = compare(f"state[{key!r}]", state[key], value)
            worst = max(worst, diff)
            if not ok:
                return "mismatch", "train", detail + " after one SGD step", diff
        return "ok", "done", "", worst

    @staticmethod
    def _step(mode: str, make: Any, use: Any) -> Any:
        """Compile (a clear ShardwiseError is 'unsupported', anything else a crash), then run: any error there
        is a crash, since shardwise accepted the model."""
        try:
            cm = make()
        except ShardwiseError as exc:
            return _Failure(("unsupported", f"compile-{mode}", _describe(exc, tb=False), 0.0))
        except Exception as exc:
            return _Failure(("crash", f"compile-{mode}", _describe(exc), 0.0))
        stage = "run-inference" if mode == "inference" else "train"
        try:
            with cm:
                return use(cm)
        except RuntimeFault as exc:  # the workers' traceback is in the message
            return _Failure(("crash", stage, _describe(exc, tb=False), 0.0))
        except Exception as exc:
            return _Failure(("crash", stage, _describe(exc), 0.0))


@dataclass(frozen=True)
class _Failure:
    result: tuple[str, str, str, float]


def _describe(exc: BaseException, tb: bool = True) -> str:
    head = f"{type(exc).__name__}: {exc}"
    if not tb:
        return head
    return head + "\n" + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)[-6:])


def save_reproducer(case: FuzzCase, result: CaseResult, directory: str | Path) -> Path:
    """Write ``<directory>/case_<seed>.py``: a standalone script that reproduces ``result``."""
    path = Path(directory) / f"case_{case.seed}.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    note = f"{result.status} at {result.stage} on {case.cluster} {dict(case.constraints)}\n{result.detail}"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(reproducer(case, note))
    tmp.replace(path)
    return path


__all__ += ["save_reproducer"]
