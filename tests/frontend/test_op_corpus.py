"""PyTorch's op corpus (OpInfo's ``op_db``, float32 CPU samples) compiled for ``cpu:2`` and run equal to eager.

One test per OpInfo (its first sample, see shardwise.testing.opcorpus). An op torch.export does not capture is
skipped, visibly, with export's reason (torch's limit, not shardwise's). Every other op compiles, or is refused
with a clear ``ShardwiseError`` and listed with its reason in ``UNSUPPORTED`` (docs/ops.md says why); an op
listed there that compiles fails the test (the list must shrink as support grows).

What compiles runs on real gloo processes: one pool per world size serves the whole module (a pool takes each
new program without restarting). Loading a program costs ~0.3 s (its process groups), so by default the
programs run for every op whose plan splits something across the ranks and for every fourth op of the others
(by position in op_db: deterministic); ``SHARDWISE_OP_CORPUS=all`` runs every one (bench/op_corpus.py prints
the full table). Outputs are compared at OpInfo's own float32 tolerance.

On ``cpu:2`` the planner runs these tiny samples whole (communication costs more than it saves), so the same
subset is compiled again for two processes with (nearly) free links, where the planner splits every op a
registry rule lets it split, and every such plan runs and must equal eager too: a check of the rules.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

pytest.importorskip("expecttest", reason="torch's OpInfo database needs expecttest (pip install -e '.[dev]')")

from shardwise.testing.opcorpus import (  # noqa: E402
    RUN_FAILURES,
    UNSUPPORTED,
    corpus_names,
    free_links_cluster,
    run_case,
)

pytestmark = pytest.mark.multiproc

DOCS = Path(__file__).resolve().parents[2] / "docs" / "ops.md"
RUN_ALL = os.environ.get("SHARDWISE_OP_CORPUS", "") == "all"
NAMES = corpus_names()


@pytest.fixture(scope="module")
def pools(worker_pools):  # the session's pools (tests/conftest.py)
    return lambda n: worker_pools(n, timeout_s=120)


@pytest.mark.parametrize("index", range(len(NAMES)), ids=NAMES)
def test_op_compiles_for_cpu2_and_runs_equal_to_eager(pools, index: int) -> None:
    name = NAMES[index]

    def runs(plan) -> bool:  # noqa: ANN001
        return RUN_ALL or index % 4 == 0 or name in RUN_FAILURES or any(s.split for s in plan.strategies)

    out = run_case(name, pools, run=runs)
    if out.status in ("not-captured", "no-sample", "eager-fails"):
        pytest.skip(f"{name} ({out.status}): {out.detail[:200]}")
    if out.status == "refused":
        assert name in UNSUPPORTED, f"{name} is refused and not listed as unsupported: {out.detail}"
        assert re.search(UNSUPPORTED[name][0], out.detail), f"{name} is refused for another reason: {out.detail}"
        return
    assert name not in UNSUPPORTED, f"{name} compiles now: remove it from UNSUPPORTED and docs/ops.md"
    if out.status == "run-fails" and name in RUN_FAILURES:
        assert re.search(RUN_FAILURES[name][0], out.detail), f"{name} fails for another reason: {out.detail}"
        return
    assert name not in RUN_FAILURES, f"{name} runs now: remove it from RUN_FAILURES and docs/ops.md"
    assert out.status == "equal", f"{name} ({out.status}): {out.detail}"
    if RUN_ALL or index % 4 == 0:  # again on free links: every op a rule lets the planner split is split
        split = run_case(name, pools, cluster=free_links_cluster(), split_only=True)
        assert split.status == "equal", f"{name} split across the ranks ({split.status}): {split.detail}"


def test_unsupported_ops_are_documented() -> None:
    text = DOCS.read_text()
    missing = [name for name in {**UNSUPPORTED, **RUN_FAILURES} if f"`{name}`" not in text]
    assert not missing, f"docs/ops.md does not list {missing}"


def test_tensors_held_by_the_model_reach_the_workers(pools) -> None:
    import torch

    import shardwise

    class Scaled(torch.nn.Module):  # plain tensor attributes: torch.export lifts them as constants
        def __init__(self) -> None:
            super().__init__()
            self.scale = torch.tensor([0.5, 2.0, -1.0])
            self.rows = torch.tensor([2, 0, 3, 1])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[self.rows] * self.scale

    model, x = Scaled(), torch.randn(4, 3)
    with shardwise.compile(model, "cpu:2", example_inputs=(x,), workers=pools(2)) as cm:
        got = cm.run(x)
    torch.testing.assert_close(got, model(x))


def test_random_ops_draw_what_eager_draws_and_the_generator_continues(pools) -> None:
    import torch
    import torch.nn.functional as F

    import shardwise

    class Noisy(torch.nn.Module):  # a VAE-style sample, dropout in training, and a random tensor of its own
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Linear(6, 6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.a(x)
            h = h + torch.randn_like(h) * 0.1 + torch.rand(h.shape[-1])
            return F.dropout(h, 0.25, training=True) * torch.bernoulli(torch.full_like(h, 0.5))

    torch.manual_seed(0)
    model, x = Noisy(), torch.randn(8, 6)
    for cluster, constraints in (("cpu:2", {"dp": 2}), (free_links_cluster(), {"tp": 2})):
        with shardwise.compile(model, cluster, example_inputs=(x,), constraints=constraints, workers=pools(2)) as cm:
            torch.manual_seed(5)
            got, after = cm.run(x), torch.rand(3)
        torch.manual_seed(5)
        with torch.no_grad():
            want = model(x)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(after, torch.rand(3))  # the caller's generator moved on as eager's did


def test_expand_as_splits_like_its_shape_source(pools) -> None:
    """normalize: x / norm.expand_as(x), split on the expanded dim (the rule once left x whole: shapes differed)."""
    out = run_case("nn.functional.normalize", pools, cluster=free_links_cluster(), split_only=True)
    assert out.splits and out.status == "equal", out


def test_complex32_and_uint64_results_come_back_from_two_processes_equal_to_eager(pools) -> None:
    """chalf and hash_tensor: torch's pickling cannot load these dtypes; the workers send them anyway."""
    import torch

    import shardwise

    class Bits(torch.nn.Module):
        def forward(self, x: torch.Tensor, code: torch.Tensor) -> tuple[torch.Tensor, ...]:
            wide = (x.abs() * 1000).to(torch.uint64)
            return x.chalf(), wide, torch.hash_tensor(x), code.to(torch.int64) + 1

    model = Bits()
    x, code = torch.randn(8, 3), torch.tensor([2**64 - 2, 3], dtype=torch.uint64)
    with torch.no_grad():
        want = model(x, code)
    with shardwise.compile(model, "cpu:2", example_inputs=(x, code), workers=pools(2)) as cm:
        assert cm.plan.world_size == 2  # run by two worker processes (the op itself whole on each)
        got = cm.run(x, code)
    assert [t.dtype for t in got] == [torch.complex32, torch.uint64, torch.uint64, torch.int64]

    def bits(t: torch.Tensor) -> torch.Tensor:  # torch.equal does not take complex32 or uint64
        return t.view({torch.complex32: torch.int32, torch.uint64: torch.int64}.get(t.dtype, t.dtype))

    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and torch.equal(bits(g), bits(w))


def test_a_sparse_input_is_refused_naming_it_and_saying_what_to_do() -> None:
    import torch

    import shardwise
    from shardwise.errors import UserInputError

    class SampledAddmm(torch.nn.Module):
        def forward(self, mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return torch.sparse.sampled_addmm(mask, a, b)

    mask = torch.eye(4).to_sparse_csr()
    with pytest.raises(UserInputError, match=r"input 'mask' is a sparse tensor \(torch\.sparse_csr.*mask\.to_dense\(\)"):
        shardwise.compile(SampledAddmm(), "cpu:2", example_inputs=(mask, torch.randn(4, 3), torch.randn(3, 4)))

    class SparseBuffer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("adjacency", torch.eye(4).to_sparse())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.sparse.mm(self.adjacency, x)

    with pytest.raises(UserInputError, match=r"buffer 'adjacency' is a sparse tensor \(torch\.sparse_coo"):
        shardwise.compile(SparseBuffer(), "cpu:2", example_inputs=(torch.randn(4, 3),))
