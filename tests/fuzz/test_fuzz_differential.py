"""Differential fuzzing against eager PyTorch on a fixed set of seeds (bench/fuzz.py runs thousands).

Every generated model must run eagerly; compiled for its random mesh on cpu:2 or cpu:4 it must equal eager
PyTorch (inference, and the loss and whole state after one SGD step) or be refused with a clear shardwise
error. The fuzzer shares one pool of workers per world size across all cases.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shardwise.testing.differential import Fuzzer, compare, save_reproducer, supported_degrees
from shardwise.testing.fuzz import generate, load_case, mesh_choices

# dp x tp meshes (the degrees that are settled); fixed bugs: 86, 234; 229 (matmul(h, h) with h split on its
# rows: each operand gets its own redistribution)
SEEDS = [*range(16), 86, 234, 229]
# Seeds that find known bugs (reported; each xfail is strict, so a fix shows up as XPASS: remove the mark).
KNOWN_BUGS: dict[int, str] = {}

# Seeds generated with pipeline meshes too (dp x tp x pp); reason given: a known bug (strict xfail).
PIPELINE_SEEDS = {
    57: "",
    75: "",
    76: "",
    127: "",
    2: "",  # a pipeline stage without trainable parameters (was: empty optimizer parameter list)
    51: "",  # x.view(8, -1): the batch is not cut (one micro-batch), was micro-batched silently wrong
    10: "",  # torch.full((12, 2)) and a min over the batch on pp=2 x dp=2: a clear refusal
    # BatchNorm training (was: in-place num_batches_tracked refused; then statistics updated before backward)
    6: "",  # tp=2
    21: "",  # dp=4
    142: "",  # pp=2 x tp=2
    829: "",  # a parameter no op reads: no pipeline chunk held it (state_dict lacked it)
    62: "",  # pp=2 in float64 (was: the loss rounded to float32)
}


@pytest.fixture(scope="module")
def fuzzer(worker_pools):
    # the session's pools (tests/conftest.py), each step bounded at 90 s; not closed here: the session does it
    return Fuzzer(timeout_s=90, pools={n: worker_pools(n, timeout_s=90) for n in (2, 4)})


def test_generated_models_run_in_eager_pytorch() -> None:
    """The generator builds only models eager PyTorch runs, forward and backward."""
    labels: collections.Counter[str] = collections.Counter()
    for seed in range(1000, 1100):
        case = generate(seed)
        labels.update(case.ops)
        loaded = load_case(case)
        inputs = loaded.inputs()
        with torch.no_grad():
            loaded.model().eval()(*inputs)
        model = loaded.model().train()
        loaded.loss_fn(model(*inputs)).backward()
        assert any(p.grad is not None for p in model.parameters()), seed
    # the ops the generator is meant to mix all appear
    for label in ("linear", "linear(shared)", "matmul", "sum", "amax", "softmax", "layer_norm", "rms_norm",
                  "transpose", "slice", "cat", "embedding", "attention", "where", "cast", "split"):  # fmt: skip
        assert labels[label] > 0, label


def test_generation_is_deterministic_and_meshes_use_every_process() -> None:
    assert generate(7).source == generate(7).source
    assert generate(7).source != generate(8).source
    assert mesh_choices(4, ("dp", "tp")) == [
        (("dp", 1), ("tp", 4)),
        (("dp", 2), ("tp", 2)),
        (("dp", 4), ("tp", 1)),
    ]
    for seed in range(50):
        case = generate(seed, degrees=("dp", "tp"))
        product = 1
        for _, degree in case.constraints:
            product *= degree
        assert product == case.world_size in (2, 4)


def test_compare_flags_wrong_values_shapes_and_nans() -> None:
    a = torch.linspace(-3, 3, 12).reshape(3, 4)
    assert compare("x", {"a": a}, {"a": a.clone()})[0]
    assert compare("x", a + 1e-7, a)[0]
    ok, detail, _ = compare("x", a + 1e-2, a)
    assert not ok and "12 of 12 elements differ" in detail
    assert "eager gives (4, 3)" in compare("x", a, a.T.contiguous())[1]
    b = a.clone()
    b[0, 0] = float("nan")
    assert "NaN" in compare("x", b, a)[1]
    assert "1 of 3 elements differ" in compare("x", torch.tensor([1, 2, 3]), torch.tensor([1, 2, 4]))[1]
    assert "2 tensors, eager PyTorch gives 1" in compare("x", (a, a), (a,))[1]


def _check(fuzzer: Fuzzer, seed: int, degrees: tuple[str, ...] = ("dp", "tp")) -> None:
    missing = set(degrees) - set(supported_degrees())
    if missing:
        pytest.skip(f"the planner does not make {', '.join(sorted(missing))} plans yet")
    result = fuzzer.run(generate(seed, degrees=degrees))
    assert result.status in ("ok", "unsupported"), (
        f"seed {seed}: {result.status} at {result.stage}: {result.detail}"
    )
    if result.status == "unsupported":  # a clear error: a message that says what is wrong, no traceback
        assert result.detail.split(":")[0].endswith("Error") and "Traceback" not in result.detail


@pytest.mark.multiproc
@pytest.mark.parametrize("seed", SEEDS)
def test_fixed_seed_equals_eager(fuzzer: Fuzzer, seed: int) -> None:
    _check(fuzzer, seed)


@pytest.mark.multiproc
@pytest.mark.parametrize(
    "seed", [pytest.param(s, marks=pytest.mark.xfail(strict=True, reason=r)) for s, r in KNOWN_BUGS.items()]
)
def test_known_bug_seeds(fuzzer: Fuzzer, seed: int) -> None:
    _check(fuzzer, seed)


@pytest.mark.multiproc
@pytest.mark.parametrize(
    "seed",
    [
        pytest.param(s, marks=pytest.mark.xfail(strict=True, reason=r)) if r else s
        for s, r in PIPELINE_SEEDS.items()
    ],
)
def test_pipeline_seeds(fuzzer: Fuzzer, seed: int) -> None:
    """Meshes with pipeline stages (dp x tp x pp)."""
    _check(fuzzer, seed, ("dp", "tp", "pp"))


@pytest.mark.multiproc
def test_reproducer_is_a_standalone_script(tmp_path: Path) -> None:
    """A saved failing case runs by itself (fresh interpreter, its own processes) and prints the comparison."""
    case = generate(3, degrees=("dp",), world_sizes=(2,))
    from shardwise.testing.differential import CaseResult

    result = CaseResult(
        3, "mismatch", "run-inference", "output[0]: example", 2, case.constraints, case.dtype, case.ops, 0.0
    )
    path = save_reproducer(case, result, tmp_path)
    text = path.read_text()
    assert text.startswith("# mismatch at run-inference on cpu:2") and "from shardwise.testing" not in text
    env = {**os.environ, "SHARDWISE_THREADS_PER_WORKER": "1"}
    proc = subprocess.run(
        [sys.executable, str(path)], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "inference[0]: max abs diff" in proc.stdout
    assert "state after one SGD step" in proc.stdout and "loss " in proc.stdout
