"""Generated fused kernels against eager PyTorch.

Every kind of kernel (elementwise, reduction, softmax, layernorm, rmsnorm) runs under the Triton
interpreter (TRITON_INTERPRET=1, CPU tensors) in float32 and float16, with masked tails, strided and
broadcast inputs, and gradients through the Triton forward; each kernel also compiles for CUDA sm_80 with
Triton's own backend. Triton runs in a subprocess per batch: TRITON_INTERPRET must be set before triton is
first imported, and another test may already have imported it in this process.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fusion_cases import COLS, SHAPE, cases

from shardwise.cluster import get_cluster
from shardwise.codegen.kernels import LOWERED_OPS, POINTWISE_BLOCK, render_kernels
from shardwise.frontend.trace import trace
from shardwise.ir.plan import ExecutionPlan
from shardwise.passes.fusion import POINTWISE_OPS, REDUCE_OPS, ROW_OPS, fuse_plan
from shardwise.planner.auto import plan_auto

RUNNER = Path(__file__).with_name("kernel_runner.py")
KINDS = ("elementwise", "reduction", "softmax", "layernorm", "rmsnorm")
DTYPES = {"float32": torch.float32, "float16": torch.float16}


def _dp_plan(graph, cluster, **kwargs):
    """A data-parallel (or replicated) flat plan: the planner with tp=1 (what the simple planner made)."""
    constraints = {"tp": 1, **kwargs.pop("constraints", {})}
    return plan_auto(graph, cluster, constraints=constraints, **kwargs)


def _plan(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], precision: str) -> ExecutionPlan:
    graph, _ = trace(module, inputs)
    return fuse_plan(_dp_plan(graph, get_cluster("cpu:1"), precision=precision))


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> dict[str, tuple[str, ExecutionPlan, Path]]:
    """case_dtype -> (the kind it must fuse into, its fused plan, its kernels.py)."""
    out = {}
    directory = tmp_path_factory.mktemp("kernels")
    for dname, dtype in DTYPES.items():
        for name, (module, inputs, kind) in cases(dtype).items():
            plan = _plan(module, inputs, "fp16" if dtype == torch.float16 else "fp32")
            path = directory / f"{name}_{dname}.py"
            path.write_text(render_kernels(plan, version="test", plan_id=f"{name}-{dname}"))
            out[f"{name}_{dname}"] = (kind, plan, path)
    return out


class _Batches:
    """Subprocess batches (one per kernel kind, plus the CUDA compile), started together on first use so
    they share the cores, each read by its own test."""

    def __init__(self, generated: dict[str, tuple[str, ExecutionPlan, Path]]) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SHARDWISE_KERNELS")}
        self.procs: dict[str, subprocess.Popen[str]] = {}
        for kind in KINDS:
            paths = [str(path) for k, _, path in generated.values() if k == kind]
            self._start(kind, "interpret", paths, env)
        self._start("compile", "compile", [str(path) for _, _, path in generated.values()], env)
        self.paths = {kind: [p for k, _, p in generated.values() if k == kind] for kind in KINDS}

    def _start(self, key: str, mode: str, paths: list[str], env: dict[str, str]) -> None:
        cmd = [sys.executable, str(RUNNER), mode, *paths]
        self.procs[key] = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )

    def result(self, key: str) -> dict:
        out, err = self.procs[key].communicate(timeout=600)
        assert self.procs[key].returncode == 0, err[-4000:]
        return json.loads(out.strip().splitlines()[-1])

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


@pytest.fixture(scope="module")
def batches(generated):
    b = _Batches(generated)
    yield b
    b.close()


def test_the_pass_fuses_exactly_the_ops_codegen_lowers():
    assert POINTWISE_OPS | ROW_OPS | REDUCE_OPS == LOWERED_OPS


def test_cases_fuse_every_lowered_op_into_their_kind(generated):
    seen: set[str] = set()
    for key, (kind, plan, _) in generated.items():
        assert kind in {g.kind for g in plan.fused_groups}, key
        fused = {n for g in plan.fused_groups for n in g.nodes}
        for node in plan.graph.nodes:
            if node.name in fused:
                seen.add(node.op)
            else:  # only views stay outside the kernels of these cases
                assert node.op in ("aten.transpose.int",), (key, node.op)
    assert seen == LOWERED_OPS


def test_case_sizes_leave_masked_tails(generated):
    numel = math.prod(SHAPE)
    assert numel > POINTWISE_BLOCK and numel % POINTWISE_BLOCK  # two programs, the second one masked
    assert COLS & (COLS - 1)  # rows are not a power of two: lanes past the row are masked
    for key, (_, plan, _) in generated.items():
        for g in plan.fused_groups:
            domain = max((plan.graph.spec_of(v).shape for v in g.inputs), key=len)
            if key.startswith("zero_dim"):
                assert domain in ((), (5,)), key
            elif g.kind == "elementwise":
                assert math.prod(domain) == numel, key
            else:
                assert domain[-1] == COLS, key


@pytest.mark.parametrize("kind", KINDS)
def test_triton_kernels_equal_eager_in_the_interpreter(kind, batches):
    assert len(batches.paths[kind]) >= 2  # float32 and float16
    results = batches.result(kind)
    checked = 0
    for path, groups in results.items():
        for name, r in groups.items():
            assert r["launched"] >= 1, (path, name)  # the Triton launcher ran, not the eager fallback
            for o in r["outputs"]:
                assert o["shape"] == o["want_shape"] and o["dtype"] == o["want_dtype"], (path, name, o)
                assert o["as_planned"], (path, name, o)  # the shapes and dtypes GROUPS declares
                assert o["finite"], (path, name)
                assert o["close"], (path, name, o["max_abs_err"], o["max_abs_ref"])
            if "float32" in path:
                assert r["grads_close"] is True, (path, name)
            checked += 1
    assert checked >= len(batches.paths[kind])


def test_kernels_compile_for_cuda(batches):
    pytest.importorskip("triton.backends.nvidia")
    results = batches.result("compile")
    kinds = {r["kind"] for groups in results.values() for r in groups.values()}
    assert kinds == set(KINDS)
    for groups in results.values():
        for r in groups.values():
            assert r["cubin_bytes"] > 0
