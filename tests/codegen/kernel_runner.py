"""Run generated kernels in a fresh process and print one JSON line of results (used by test_kernels.py).

``python kernel_runner.py interpret <kernels.py>...``: with TRITON_INTERPRET=1 (set here, before triton is
imported), run every group's Triton kernel on CPU tensors and its eager code on the same inputs; report
the largest differences, whether the Triton launcher really ran, and gradients through the Triton forward.
``python kernel_runner.py compile <kernels.py>...``: compile every kernel with Triton's CUDA backend for
sm_80 (no GPU needed) and report the size of each cubin.
``python kernel_runner.py program <dir>...``: run whole generated programs with every group on Triton.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import sys

MODE = sys.argv[1]
if MODE in ("interpret", "program"):
    os.environ["TRITON_INTERPRET"] = "1"
os.environ["SHARDWISE_KERNELS"] = "triton"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
import triton  # noqa: E402

_PTR = {
    "float32": "*fp32",
    "float16": "*fp16",
    "bfloat16": "*bf16",
    "bool": "*i1",
    "int64": "*i64",
    "int32": "*i32",
}


def load(path: str):
    spec = importlib.util.spec_from_file_location(f"kernels_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def inputs_for(specs, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape, dtype in specs:
        if dtype == "bool":
            t = torch.rand(shape, generator=g) > 0.6
            if len(shape):
                t[..., 0] = False  # no row fully masked out
            out.append(t)
        elif len(out) % 2 and len(shape):  # every other input is a strided view: the kernel reads strides
            wide = torch.randn(*shape[:-1], 2 * shape[-1], generator=g).to(getattr(torch, dtype))
            out.append(wide[..., ::2])
        else:
            out.append(torch.randn(shape, generator=g).to(getattr(torch, dtype)))
    return out


def as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def interpret(path: str) -> dict:
    k = load(path)
    results = {}
    for name, (kind, in_specs, out_specs) in k.GROUPS.items():
        launches = []
        launch = getattr(k, f"_{name}_triton")

        def counted(*args, _launch=launch, _log=launches):
            _log.append(1)
            return _launch(*args)

        setattr(k, f"_{name}_triton", counted)
        args = inputs_for(in_specs, seed=len(results))
        with torch.no_grad():
            got = as_tuple(getattr(k, name)(*args))
            want = as_tuple(getattr(k, f"_{name}_eager")(*args))
        outs = []
        for g, w, (shape, dtype) in zip(got, want, out_specs, strict=True):
            outs.append(
                {
                    "as_planned": list(g.shape) == list(shape) and str(g.dtype) == f"torch.{dtype}",
                    "shape": list(g.shape),
                    "want_shape": list(w.shape),
                    "dtype": str(g.dtype),
                    "want_dtype": str(w.dtype),
                    "max_abs_err": (g.float() - w.float()).abs().max().item() if g.numel() else 0.0,
                    "max_abs_ref": w.float().abs().max().item() if w.numel() else 0.0,
                    "close": _close(g, w, half="float16" in os.path.basename(path)),
                    "finite": bool(torch.isfinite(w.float()).all()),
                }
            )
        grads = None
        floats = [t.dtype for t in args if t.is_floating_point()]
        if floats and all(d == torch.float32 for d in floats):
            grads = _grads(k, name, args)
        results[name] = {"kind": kind, "launched": len(launches), "outputs": outs, "grads_close": grads}
    return results


def _close(g: torch.Tensor, w: torch.Tensor, half: bool) -> bool:
    """Within a few units in the last place (relative): 4 ulps of float16 for kernels made for float16 (eager
    rounds every op to float16 too, so one different rounding early can move a later result by an ulp),
    about 80 ulps of float32 otherwise (long chains of approximate exp/log/div)."""
    if g.shape != w.shape or g.dtype != w.dtype:
        return False
    rtol, atol = (4e-3, 1e-4) if half else (1e-5, 1e-6)
    return bool(torch.allclose(g.float(), w.float(), rtol=rtol, atol=atol, equal_nan=True))


def _grads(k, name: str, args: list[torch.Tensor]) -> bool:
    """Gradients through the Triton forward (backward recomputes the eager ops) equal eager autograd's."""
    leaves = [a.clone().requires_grad_(a.is_floating_point()) for a in args]
    outs = as_tuple(getattr(k, name)(*leaves))
    sum(o.float().sum() * (i + 1) for i, o in enumerate(outs)).backward()
    ref_leaves = [a.clone().requires_grad_(a.is_floating_point()) for a in args]
    ref = as_tuple(getattr(k, f"_{name}_eager")(*ref_leaves))
    sum(o.float().sum() * (i + 1) for i, o in enumerate(ref)).backward()
    for a, b in zip(leaves, ref_leaves, strict=True):
        if (a.grad is None) != (b.grad is None):
            return False
        if a.grad is not None and not torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-5):
            return False
    return True


def compile_all(path: str) -> dict:
    from triton.backends.compiler import GPUTarget

    k = load(path)
    results = {}
    for name, (kind, in_specs, out_specs) in k.GROUPS.items():
        fn = getattr(k, f"_{name}_kernel")
        params = list(inspect.signature(fn.fn).parameters)
        pointers = [d for _, d in in_specs] + [d for _, d in out_specs]
        signature = {}
        for i, p in enumerate(params):
            signature[p] = "constexpr" if p == "BLOCK" else _PTR[pointers[i]] if i < len(pointers) else "i32"
        block = k.POINTWISE_BLOCK if kind == "elementwise" else 64
        src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs={"BLOCK": block})
        compiled = triton.compile(src, target=GPUTarget("cuda", 80, 32))
        results[name] = {"kind": kind, "cubin_bytes": len(compiled.asm["cubin"])}
    return results


def program(directory: str) -> dict:
    """Run a whole generated program (``directory/pkg``, weights and inputs saved beside it) with every fused
    group on its Triton kernel; compare with the eager model's outputs saved there."""
    import torch.utils._pytree as pytree

    for name in [m for m in sys.modules if m == "pkg" or m.startswith("pkg.")]:
        del sys.modules[name]  # the previous directory's package
    sys.path.insert(0, directory)
    importlib.invalidate_caches()
    package = importlib.import_module("pkg")
    sys.path.remove(directory)
    kernels = importlib.import_module("pkg.kernels")
    launches = {name: 0 for name in kernels.GROUPS}
    for name in kernels.GROUPS:
        launch = getattr(kernels, f"_{name}_triton")

        def counted(*args, _launch=launch, _name=name):
            launches[_name] += 1
            return _launch(*args)

        setattr(kernels, f"_{name}_triton", counted)
    prog = package.build(0, 1)
    prog.load_full_state_dict(torch.load(os.path.join(directory, "weights.pt")))
    inputs, expected = torch.load(os.path.join(directory, "io.pt"))
    got = [t for t in pytree.tree_leaves(prog.infer(*inputs)) if isinstance(t, torch.Tensor)]
    return {
        "launches": launches,
        "max_abs_err": max((g - w).abs().max().item() for g, w in zip(got, expected, strict=True)),
        "outputs": len(got),
    }


if __name__ == "__main__":
    run = {"interpret": interpret, "compile": compile_all, "program": program}[MODE]
    print(json.dumps({path: run(path) for path in sys.argv[2:]}))
