"""Can the batch be cut into parts (pipeline micro-batches, pipeline replicas)? shardwise.passes.stages.rows"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shardwise.frontend.trace import trace
from shardwise.passes.stages.rows import micro_shapes_problem, rows_problem
from shardwise.planner.pipeline import batch_inputs


class Rowwise(nn.Module):
    """Every row of the output depends only on its own row: cutting the batch is exact."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.norm = nn.LayerNorm(8)
        self.b = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(torch.relu(self.a(x)))
        h = h.view(x.shape[0], 2, 4).transpose(1, 2).reshape(x.shape[0], -1)
        return self.b(h) + h.sum(dim=-1, keepdim=True)


class Mixing(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.a = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if self.how == "batch-sum":
            return h - h.sum(dim=0)
        if self.how == "batch-softmax":
            return torch.softmax(h, dim=0)
        if self.how == "hard-coded":
            return h * torch.full((8, 6), 0.5)
        if self.how == "whole-mean":
            return h - h.mean()
        return h


def _graph(model: nn.Module, rows: int = 8, loss: bool = False):  # noqa: ANN202
    x = torch.randn(rows, 6)
    return trace(model, (x,), loss_fn=(lambda out: (out**2).mean()) if loss else None)[0]


def test_rowwise_models_may_be_cut_for_inference_and_training() -> None:
    for loss in (False, True):
        g = _graph(Rowwise(), loss=loss)
        assert rows_problem(g, batch_inputs(g)) == ""
        assert micro_shapes_problem(g, _graph(Rowwise(), 4, loss), batch_inputs(g), 4) == ""


@pytest.mark.parametrize(
    ("how", "words"),
    [
        ("batch-sum", "reduces over the batch"),
        ("batch-softmax", "needs whole rows of the batch"),
        ("hard-coded", "batch's size that does not come from the inputs"),
        ("whole-mean", "mean over the whole batch"),
    ],
)
def test_ops_that_mix_rows_are_named(how: str, words: str) -> None:
    g = _graph(Mixing(how))
    problem = rows_problem(g, batch_inputs(g))
    assert words in problem and "test_rows.py" in problem, problem


def test_losses_must_be_means_over_the_batch() -> None:
    x = torch.randn(8, 6)
    model = Mixing("none")
    mean = trace(model, (x,), loss_fn=lambda out: (out**2).mean() * 0.5 + 1.0)[0]
    assert rows_problem(mean, batch_inputs(mean)) == ""
    total = trace(model, (x,), loss_fn=lambda out: (out**2).sum())[0]
    assert "reduces over the batch" in rows_problem(total, batch_inputs(total))
    squared = trace(model, (x,), loss_fn=lambda out: out.mean() ** 2)[0]
    assert "not an average over rows" in rows_problem(squared, batch_inputs(squared))


def test_outputs_must_carry_the_batch_first() -> None:
    class Columns(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.t() * 2.0

    g = _graph(Columns())
    assert "does not have the batch as its first dimension" in rows_problem(g, batch_inputs(g))


def test_a_hard_coded_batch_size_shows_in_the_micro_batch_shapes() -> None:
    class View8(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(6, 6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x).view(8, -1)  # rows of 4: (8, 3), not (4, 6)

    full, micro = _graph(View8()), _graph(View8(), 4)
    assert rows_problem(full, batch_inputs(full)) == ""  # at the traced size it looks row-wise
    problem = micro_shapes_problem(full, micro, batch_inputs(full), 4)
    assert "hard-codes its batch size 8" in problem and "(8, 3)" in problem, problem


class Along(nn.Module):
    """Ops the sharding annotations run whole, along a dim given as an argument."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.a = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x).unsqueeze(1).expand(-1, 3, -1)  # (rows, 3, 6)
        d = self.dim
        h = h.flip(d) + h.sort(dim=d).values + torch.topk(h, 2, dim=d).values.sum(d, keepdim=True)
        h = h + h.var(dim=d, keepdim=True) + h.max(dim=d, keepdim=True).values
        h = h + torch.logsumexp(h, dim=d, keepdim=True) + torch.linalg.vector_norm(h, dim=d, keepdim=True)
        return torch.nn.functional.pad(h, (1, 1)) if d != 0 else h


def test_ops_along_other_dims_keep_rows_apart_and_along_the_batch_mix_them() -> None:
    g = _graph(Along(1))
    assert rows_problem(g, batch_inputs(g)) == ""
    g = _graph(Along(0))
    assert "acts along the batch dimension" in rows_problem(g, batch_inputs(g))


class Scatter(nn.Module):
    """A mask made by scattering ones at each row's top-k positions (DeepSeek-V3's group-limited routing), along
    the feature dim (rows stay apart) or along the batch dim (they mix)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.a = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        top = torch.topk(h, 2, dim=self.dim)[1]
        mask = torch.zeros_like(h)
        mask.scatter_(self.dim, top, 1)
        return h * mask


def test_a_scatter_along_other_dims_keeps_rows_apart_and_along_the_batch_mixes_them() -> None:
    g = _graph(Scatter(1), loss=True)
    assert rows_problem(g, batch_inputs(g)) == ""
    x = torch.randn(8, 6)
    model = Scatter(1)
    assert torch.equal(model(x), torch.cat([model(x[:4]), model(x[4:])]))  # what the check claims
    g = _graph(Scatter(0), loss=True)
    assert "mixes the rows" in rows_problem(g, batch_inputs(g))


def test_cross_entropy_as_a_mean_is_a_batch_mean() -> None:
    class Loss(nn.Module):
        def __init__(self, reduction: str) -> None:
            super().__init__()
            self.reduction = reduction
            self.a = nn.Linear(6, 6)

        def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(self.a(x), target, reduction=self.reduction)

    x, target = torch.randn(8, 6), torch.randint(0, 6, (8,))
    for reduction, ok in (("mean", True), ("sum", False)):
        g = trace(Loss(reduction), (x, target))[0]
        problem = rows_problem(g, batch_inputs(g))
        assert (problem == "") == ok, problem
