"""PyTorch's own op corpus (OpInfo's ``op_db``) as models for shardwise: one model per op, its first float32
CPU sample as the example inputs.

:func:`corpus` lists the cases: for every OpInfo that supports float32 on the CPU, its first sample input,
wrapped as an ``nn.Module`` whose ``forward`` takes the sample's tensors (the other arguments are written into
the module) and calls the op. :func:`captured` tells whether torch.export captures it (the corpus test compiles
only what export captures: the rest is torch's limit, not shardwise's). :func:`outputs_equal` compares a run
with eager PyTorch at the tolerance OpInfo itself uses for float32 (``torch.testing.assert_close``'s defaults,
or a larger ``toleranceOverride`` the OpInfo declares for its forward-output tests).

Some ops cannot be compared at all: they draw random numbers (eager itself differs from call to call) or return
uninitialised memory (``empty``); :data:`NONDETERMINISTIC` says which, and why (docs/ops.md).

Needs ``expecttest`` (imported by torch's test helpers): the ``dev`` extras install it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree

__all__ = [
    "CorpusCase", "corpus", "corpus_names", "case_named", "captured", "outputs_equal", "tolerance_of",
    "NONDETERMINISTIC", "UNSUPPORTED", "RUN_FAILURES", "Outcome", "STATUSES", "run_case", "free_links_cluster",
]

# ops whose output eager PyTorch itself does not reproduce (compared by shape and dtype only where shardwise
# runs them): op name -> why
NONDETERMINISTIC: dict[str, str] = {
    "empty": "uninitialised memory",
    "empty_like": "uninitialised memory",
    "empty_strided": "uninitialised memory",
    "empty_permuted": "uninitialised memory",
    "new_empty": "uninitialised memory",
    "new_empty_strided": "uninitialised memory",
}

# ops shardwise refuses with a clear error, and why (docs/ops.md lists them): name -> (a pattern the error
# message matches, the reason in words)
_RANDOM_INPUT = ("mutates its input", "writes random numbers into its input tensor in place (x.cauchy_()): "
                 "a compiled model does not change its inputs")
_INPUT_WRITE = ("mutates its input .* in place", "writes into a tensor the caller passed (the running statistics)")
UNSUPPORTED: dict[str, tuple[str, str]] = {
    **dict.fromkeys(
        ("cauchy", "exponential", "geometric", "log_normal", "normal.in_place", "uniform"), _RANDOM_INPUT
    ),
    **dict.fromkeys(("_native_batch_norm_legit", "_batch_norm_with_update"), _INPUT_WRITE),
    "histogramdd": ("cannot represent", "returns a list of tensors inside a tuple"),
    **dict.fromkeys(
        ("sparse.sampled_addmm", "sparse.mm.reduce"),
        ("input 'tensors_0' is a sparse tensor", "takes a sparse (CSR) input: shardwise plans dense tensors only"),
    ),
}

# ops that compile but whose program fails on the worker processes, and why: name -> (pattern, reason); none
# today (docs/ops.md)
RUN_FAILURES: dict[str, tuple[str, str]] = {}

# OpInfo tests that compare an op's forward outputs (their float32 tolerance overrides apply here)
_FORWARD_TESTS = (None, "test_compare_cpu", "test_variant_consistency_eager", "test_noncontiguous_samples",
                  "test_out", "test_python_ref", "test_python_ref_torch_fallback")  # fmt: skip
_DEFAULT_TOL = (1.3e-6, 1e-5)  # torch.testing.assert_close for float32: (rtol, atol)


@dataclass(frozen=True)
class CorpusCase:
    """One op of the corpus: ``name`` (``op`` or ``op.variant``), its OpInfo and the sample's pieces."""

    name: str
    opinfo: Any
    sample: Any

    def model(self) -> torch.nn.Module:
        return OpModule(self.opinfo.op, self.sample)

    def inputs(self) -> tuple[torch.Tensor, ...]:
        leaves = pytree.tree_leaves((self.sample.input, self.sample.args, self.sample.kwargs))
        return tuple(t for t in leaves if isinstance(t, torch.Tensor))

    @property
    def tolerance(self) -> tuple[float, float]:
        return tolerance_of(self.opinfo)


class OpModule(torch.nn.Module):
    """``forward(*tensors)`` calls ``op(input, *args, **kwargs)`` of the sample with its tensors replaced by
    the forward's arguments (everything else as written in the sample)."""

    def __init__(self, op: Callable[..., Any], sample: Any) -> None:
        super().__init__()
        self.op = op
        leaves, self.spec = pytree.tree_flatten((sample.input, sample.args, sample.kwargs))
        self.is_tensor = [isinstance(x, torch.Tensor) for x in leaves]
        self.constants = [None if t else x for t, x in zip(self.is_tensor, leaves, strict=True)]

    def forward(self, *tensors: torch.Tensor) -> Any:
        given = iter(tensors)
        leaves = [next(given) if t else c for t, c in zip(self.is_tensor, self.constants, strict=True)]
        inp, args, kwargs = pytree.tree_unflatten(leaves, self.spec)
        return self.op(inp, *args, **kwargs)


def _name(op: Any) -> str:
    return f"{op.name}.{op.variant_test_name}" if op.variant_test_name else op.name


def _first_sample(op: Any) -> Any | None:
    try:
        samples = op.sample_inputs("cpu", torch.float32, requires_grad=False)
        try:
            return next(iter(samples), None)
        finally:  # close the sample generator now (closed later by the collector, it may run inside a trace)
            for it in (samples, getattr(samples, "child_iter", None)):
                close = getattr(it, "close", None)
                if close is not None:
                    close()
    except Exception:  # an OpInfo whose samples need what this machine lacks
        return None


@functools.cache
def _opinfos() -> dict[str, Any]:
    from torch.testing._internal.common_methods_invocations import op_db

    return {_name(op): op for op in op_db if torch.float32 in op.supported_dtypes("cpu")}


def corpus_names() -> tuple[str, ...]:
    """Names of the OpInfos of ``op_db`` that support float32 on the CPU, in ``op_db``'s order."""
    return tuple(_opinfos())


def case_named(name: str) -> CorpusCase | None:
    """The case of OpInfo ``name`` with its first float32 CPU sample (made after ``torch.manual_seed(0)``:
    the same every time), or None when it gives no sample here."""
    op = _opinfos()[name]
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        sample = _first_sample(op)
    finally:
        torch.random.set_rng_state(state)
    return None if sample is None else CorpusCase(name, op, sample)


def corpus() -> tuple[CorpusCase, ...]:
    """Every case of the corpus, in ``op_db``'s order."""
    return tuple(c for c in (case_named(n) for n in corpus_names()) if c is not None)


def captured(case: CorpusCase) -> str:
    """"" if torch.export (non-strict) captures the case, else why not (one line)."""
    try:
        torch.export.export(case.model(), case.inputs(), strict=False)
    except Exception as exc:  # torch raises many kinds
        text = str(exc).strip().splitlines()
        return f"{type(exc).__name__}: {text[0][:160] if text else ''}"
    return ""


def tolerance_of(opinfo: Any) -> tuple[float, float]:
    """(rtol, atol) for float32: assert_close's defaults, or the largest ``toleranceOverride`` the OpInfo
    declares for float32 on the CPU in a test of its forward outputs."""
    rtol, atol = _DEFAULT_TOL
    for info in getattr(opinfo, "decorators", ()) or ():
        if getattr(info, "test_name", None) not in _FORWARD_TESTS:
            continue
        if getattr(info, "device_type", None) not in (None, "cpu"):
            continue
        dtypes = getattr(info, "dtypes", None)
        if dtypes is not None and torch.float32 not in dtypes:
            continue
        for deco in getattr(info, "decorators", ()):
            tol = getattr(deco, "d", {}).get(torch.float32) if hasattr(deco, "d") else None
            if tol is not None:
                rtol, atol = max(rtol, tol.rtol), max(atol, tol.atol)
    return rtol, atol


def _leaves(x: Any) -> list[Any]:
    return pytree.tree_leaves(x)


def outputs_equal(got: Any, want: Any, tolerance: tuple[float, float], *, values: bool = True) -> str:
    """"" if ``got`` equals ``want`` (same structure of tensors and numbers, values within ``tolerance``,
    NaNs in the same places), else the first difference. ``values=False``: shapes and dtypes only."""
    g, w = _leaves(got), _leaves(want)
    if len(g) != len(w):
        return f"{len(g)} outputs, eager gives {len(w)}"
    rtol, atol = tolerance
    for i, (a, b) in enumerate(zip(g, w, strict=True)):
        if isinstance(b, torch.Tensor):
            if not isinstance(a, torch.Tensor):
                return f"output {i}: {type(a).__name__}, eager gives a tensor"
            if a.shape != b.shape or a.dtype != b.dtype:
                return f"output {i}: {tuple(a.shape)} {a.dtype}, eager gives {tuple(b.shape)} {b.dtype}"
            if not values:
                continue
            try:
                torch.testing.assert_close(a, b, rtol=rtol, atol=atol, equal_nan=True, check_stride=False)
            except AssertionError as exc:
                lines = [x.strip() for x in str(exc).splitlines() if x.strip()]
                return f"output {i}: " + "; ".join(lines[:3])
        elif isinstance(b, float) and isinstance(a, float):
            if not (math.isclose(a, b, rel_tol=rtol, abs_tol=atol) or (math.isnan(a) and math.isnan(b))):
                return f"output {i}: {a} vs eager {b}"
        elif a != b:
            return f"output {i}: {a!r} vs eager {b!r}"
    return ""




@dataclass(frozen=True)
class Outcome:
    """What became of one case: ``status`` is one of :data:`STATUSES`; ``detail`` the reason (one line)."""

    name: str
    status: str
    detail: str = ""
    world_size: int = 0
    splits: bool = False  # the plan splits some op across the ranks
    seconds: float = 0.0


# not-captured: torch.export does not capture the sample; no-sample / eager-fails: nothing to compare with;
# refused: a clear ShardwiseError; crash: any other error while compiling; run-fails: the program failed on
# the workers; mismatch / equal: it ran, compared with eager PyTorch
STATUSES = ("not-captured", "no-sample", "eager-fails", "refused", "crash", "run-fails", "mismatch", "equal")


def free_links_cluster() -> Any:
    """Two local processes whose links cost (nearly) nothing: the planner splits every op a rule lets it split
    (on ``cpu:2`` the corpus' tiny samples run whole: communication costs more than it saves)."""
    from shardwise.cluster.presets import cpu_cluster

    return cpu_cluster(2, latency=1e-9, bandwidth=1e14, name="cpu-2-free-links")


def _run_seed(opinfo: Any) -> int:
    """The generator seed eager PyTorch drew the case's random numbers from: OpInfo wraps its random ops in
    ``wrapper_set_seed`` (``torch.manual_seed(42)`` inside the op, which a trace does not keep); 1 otherwise
    (the seed ``run_case`` sets before the eager call)."""
    code = getattr(opinfo.op, "__code__", None)
    return 42 if code is not None and "wrapper_set_seed" in code.co_names else 1


def run_case(
    name: str, pool_for: Callable[[int], Any], *, run: bool | Callable[[Any], bool] = True, cluster: Any = "cpu:2",
    split_only: bool = False,
) -> Outcome:  # fmt: skip
    """Compile case ``name`` for ``cluster`` and run it on ``pool_for(world_size)``'s workers; ``run`` may be a
    predicate on the plan (False: compile only, the outcome is "equal" with the detail "compiled only").
    ``split_only``: a plan that splits nothing is not run (the outcome is "equal", "splits nothing")."""
    import time

    import shardwise
    from shardwise.errors import ShardwiseError, TraceError

    start = time.perf_counter()

    def done(status: str, detail: str = "", **kw: Any) -> Outcome:
        line = detail.strip().splitlines()[0][:300] if detail.strip() else ""
        return Outcome(name, status, line, seconds=time.perf_counter() - start, **kw)

    case = case_named(name)
    if case is None:
        return done("no-sample")
    model, inputs = case.model(), case.inputs()
    try:
        torch.manual_seed(1)  # random ops: the run starts from the same generator state (CompiledModel.run)
        with torch.no_grad():
            want = model(*inputs)
    except Exception as exc:
        return done("eager-fails", f"{type(exc).__name__}: {exc}")
    try:
        cm = shardwise.compile(model, cluster, example_inputs=inputs, workers=pool_for(2))
    except TraceError as exc:
        return done("not-captured" if str(exc).startswith("torch.export could not trace") else "refused", str(exc))
    except ShardwiseError as exc:
        return done("refused", f"{type(exc).__name__}: {exc}")
    except Exception as exc:
        return done("crash", f"{type(exc).__name__}: {exc}")
    info = {"world_size": cm.plan.world_size, "splits": any(s.split for s in cm.plan.strategies)}
    if split_only and not info["splits"]:
        cm.close()
        return done("equal", "splits nothing", **info)
    if not (run(cm.plan) if callable(run) else run):
        cm.close()
        return done("equal", "compiled only", **info)
    if cm.plan.world_size != 2:  # the planner may keep a tiny op on 1 of the 2 devices
        cm.close()
        cm = shardwise.compile(model, cluster, example_inputs=inputs, workers=pool_for(cm.plan.world_size))
    try:
        with cm:
            torch.manual_seed(_run_seed(case.opinfo))
            got = cm.run(*inputs)
    except Exception as exc:
        return done("run-fails", f"{type(exc).__name__}: {exc}", **info)
    diff = outputs_equal(got, want, case.tolerance, values=case.opinfo.name not in NONDETERMINISTIC)
    return done("mismatch" if diff else "equal", diff, **info)
