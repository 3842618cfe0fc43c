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


class Gather(nn.Module):
    """Routing weights picked by each row's own top-k indices (DeepSeek-V3's ``scores.gather(1, topk_indices)``),
    along the feature dim (rows stay apart) or along the batch dim (they mix)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.a = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.a(x).sigmoid()
        top = torch.topk(scores, 2, dim=1)[1]
        if self.dim == 0:  # indices into other rows: a row's output reads rows 0 or 1 of the batch
            top = top % 2
        return scores.gather(self.dim, top)


class Lookup(nn.Module):
    """A table without rows gathered by each row's ids along the table's dim: an embedding, row-wise."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(5))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table.gather(0, ids.flatten()).view(ids.shape)


def test_a_gather_by_each_rows_indices_keeps_rows_apart_and_along_the_batch_mixes_them() -> None:
    x = torch.randn(8, 6)
    model = Gather(1)
    g = _graph(model, loss=True)
    assert rows_problem(g, batch_inputs(g)) == ""
    assert micro_shapes_problem(g, _graph(model, 4, True), batch_inputs(g), 4) == ""
    # what the check claims (up to the matmul's rounding at another row count)
    torch.testing.assert_close(model(x), torch.cat([model(x[:4]), model(x[4:])]), rtol=0, atol=1e-6)
    mixing = Gather(0)
    assert not torch.allclose(mixing(x), torch.cat([mixing(x[:4]), mixing(x[4:])]))  # it does mix them
    g = _graph(mixing, loss=True)
    problem = rows_problem(g, batch_inputs(g))
    assert "gathers along the batch dimension (it mixes the rows)" in problem and "test_rows.py" in problem, problem
    ids = torch.randint(0, 5, (8, 3))
    g = trace(Lookup(), (ids,))[0]
    assert rows_problem(g, batch_inputs(g)) == ""


def test_a_gather_by_indices_that_carry_no_rows_is_refused() -> None:
    class Fixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(6, 6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            index = torch.arange(8).remainder(6).view(8, 1)  # one index per row of a batch of 8, written in
            return self.a(x).gather(1, index)

    g = _graph(Fixed())
    problem = rows_problem(g, batch_inputs(g))
    assert "gathers by indices of other rows than its input's" in problem, problem


class Concat(nn.Module):
    """Keys made as DeepSeek-V3's ``expand_kv`` does: a new tensor at the batch's size, filled by two copies
    (one from each row's values, one broadcast from a tensor without rows, or, mixing, from a tensor of the
    batch's size written into the model)."""

    def __init__(self, written: bool = False) -> None:
        super().__init__()
        self.written = written
        self.a = nn.Linear(6, 4)
        self.b = nn.Parameter(torch.randn(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if self.written:  # rows of the batch overwritten by the rows of a tensor of 8 rows made in the model
            out = torch.cat([h, h[:, :2]], dim=1)
            out[:, 4:].copy_(torch.ones(8, 2))
            return out * 2.0
        out = h.new_empty(x.shape[0], 6)
        out[:, :4].copy_(h)
        out[:, 4:].copy_(self.b)
        return out * 2.0


def test_copies_into_a_new_tensor_keep_rows_apart_unless_the_source_has_other_rows() -> None:
    x = torch.randn(8, 6)
    model = Concat()
    g = _graph(model, loss=True)
    assert micro_shapes_problem(g, _graph(model, 4, True), batch_inputs(g), 4) == ""
    torch.testing.assert_close(model(x), torch.cat([model(x[:4]), model(x[4:])]), rtol=0, atol=1e-6)
    # without the model traced at the micro-batch size, a tensor made at the batch size counts as written in
    assert "does not come from the inputs" in rows_problem(g, batch_inputs(g))
    g = _graph(Concat(written=True), loss=True)
    problem = rows_problem(g, batch_inputs(g))
    assert "copies into rows of the batch a tensor of the batch's size" in problem, problem


def test_deepseek_v3_routing_and_latent_attention_keep_rows_apart() -> None:
    """transformers' DeepSeek-V3 (tiny configuration): group-limited routing (``scatter``, ``gather`` by each
    token's top-k) and MLA's ``expand_kv`` (``new_empty`` filled by two ``copy_``) let the batch be cut."""
    transformers = pytest.importorskip("transformers")
    config = transformers.DeepseekV3Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_group=2,
        topk_group=1, num_experts_per_tok=2, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4,
        qk_nope_head_dim=4, v_head_dim=8, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, 64, (4, 8))

    def graph(rows: int):  # noqa: ANN202
        return trace(model, (ids[:rows],), loss_fn=lambda out: out.logits.float().mean())[0]

    full = graph(4)
    ops = {n.op for n in full.nodes}
    assert {"aten.gather.default", "aten.copy.default", "aten.scatter.value"} <= ops, ops  # the ops in question
    assert micro_shapes_problem(full, graph(2), batch_inputs(full), 2) == ""
    with torch.no_grad():
        whole = model(ids).logits
        parts = torch.cat([model(ids[:2]).logits, model(ids[2:]).logits])
    torch.testing.assert_close(whole, parts, rtol=0, atol=1e-5)
