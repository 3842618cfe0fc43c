"""The fuzzer's extensions (issue 16, point 8): in-place ops, custom ops that decompose to ATen, size arithmetic
with a dynamic batch, and models deep enough for the pipeline they are compiled for.

The extended generator's models run in eager PyTorch (forward and backward); every pipeline case has at least
as many blocks as stages and a batch its mesh divides into micro-batches; the blocks keep the batch's rows
apart, which the batch-row tracking confirms op by op (shardwise.passes.stages.rows) on their traced graphs;
a few fixed seeds compile and equal eager PyTorch on real processes (or are refused with a clear error).
The original generator (no features) is unchanged: the seeds pinned in test_fuzz_differential.py still make
the same models.
"""

from __future__ import annotations

import collections
import re

import pytest
import torch

from shardwise.errors import ShardwiseError
from shardwise.frontend.trace import trace
from shardwise.passes.stages.rows import micro_shapes_problem
from shardwise.planner.pipeline import batch_inputs
from shardwise.testing.differential import Fuzzer
from shardwise.testing.fuzz import FEATURES, generate, load_case

DEGREES = ("dp", "tp", "pp")


def test_extended_models_run_in_eager_pytorch_and_mix_the_new_ops() -> None:
    labels: collections.Counter[str] = collections.Counter()
    dynamic = 0
    for seed in range(2000, 2120):
        case = generate(seed, degrees=DEGREES, features=FEATURES)
        labels.update(label.removeprefix("block:").split("(")[0] for label in case.ops)
        loaded = load_case(case)
        inputs = loaded.inputs()
        dynamic += loaded.dynamic_shapes() is not None
        with torch.no_grad():
            loaded.model().eval()(*inputs)
        model = loaded.model().train()
        loaded.loss_fn(model(*inputs)).backward()
        pinned = dict(case.constraints)
        if pinned["pp"] > 1:
            blocks = int(re.search(r"blocks\((\d+)\)", " ".join(case.ops)).group(1))
            assert blocks >= pinned["pp"], (seed, case.ops)
            assert inputs[0].shape[0] % (2 * pinned["dp"]) == 0, seed
        else:
            assert inputs[0].shape[0] % pinned["dp"] == 0, seed
    for label in ("inplace", "custom", "sym", "blocks"):
        assert labels[label] > 0, label
    assert dynamic > 0


def test_the_original_generator_is_unchanged_without_features() -> None:
    case = generate(51, degrees=DEGREES)  # pinned in test_fuzz_differential.py: x.view(8, -1)
    assert "view(8, -1)" in case.source and "FuzzBlock" not in case.source and "dynamic_shapes" not in case.source
    with pytest.raises(ValueError, match="unknown fuzz features"):
        generate(1, features=("bogus",))


def test_pipeline_blocks_keep_the_rows_of_the_batch_apart() -> None:
    """Every deep case the frontend accepts may be cut into micro-batches (nothing mixes rows)."""
    checked = 0
    for seed in range(3000, 3080):
        case = generate(seed, degrees=DEGREES, features=FEATURES)
        if "FuzzBlock" not in case.source:
            continue
        loaded = load_case(case)
        x = loaded.inputs()[0]
        try:
            full = trace(loaded.model(), (x,), loss_fn=loaded.loss_fn)[0]
        except ShardwiseError:  # an op the frontend refuses (see the fuzz table): not a rows question
            continue
        micro = trace(loaded.model(), (x[: x.shape[0] // 2],), loss_fn=loaded.loss_fn)[0]
        assert micro_shapes_problem(full, micro, batch_inputs(full), x.shape[0] // 2) == "", (seed, case.ops)
        checked += 1
    assert checked >= 10, checked


@pytest.fixture(scope="module")
def fuzzer(worker_pools):
    # the session's pools (tests/conftest.py), each step bounded at 90 s; not closed here: the session does it
    return Fuzzer(timeout_s=90, features=FEATURES, pools={n: worker_pools(n, timeout_s=90) for n in (2, 4)})


# pipelines of blocks: pp=2 (40), pp=4 (46), pp=2 x dp=2 (67), pp=2 with an in-place op (69); a dynamic batch
# with size arithmetic (74: the batch merged and split again; 54: a view of computed sizes); a dynamic batch
# with an in-place and a custom op on dp=4 (70)
SEEDS = [40, 46, 67, 69, 74, 54, 70]


@pytest.mark.multiproc
@pytest.mark.parametrize("seed", SEEDS)
def test_extended_seed_equals_eager(fuzzer: Fuzzer, seed: int) -> None:
    result = fuzzer.run(generate(seed, degrees=DEGREES, features=FEATURES))
    assert result.status in ("ok", "unsupported"), f"seed {seed}: {result.status} at {result.stage}: {result.detail}"
    if result.status == "unsupported":
        assert result.detail.split(":")[0].endswith("Error") and "Traceback" not in result.detail
