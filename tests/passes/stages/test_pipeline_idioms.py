"""Pipelines follow the batch through the idioms people write (issue 16, point 7).

A hand-written GPT whose attention takes q, k, v with ``.view(b, s, 3, h, d).permute(2, 0, 3, 1, 4)`` and
unpacking (``unbind`` over the q/k/v axis, not the batch), and the same model written like nanoGPT (``split``,
a ``tril`` mask buffer sliced and compared, ``masked_fill``), both pipeline for ``pp=2`` (cpu:2, training):
the batch-row tracking accepts them, and three SGD steps on real gloo processes equal eager PyTorch (losses and
every parameter after the steps). The rows of the batch are also followed, op by op, through the other idioms
the issue names (``cat``, ``tril``/``triu`` of activations, masks made from activations, ``*_like``).
"""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import shardwise
from shardwise.frontend.trace import trace
from shardwise.passes.stages.rows import micro_shapes_problem, rows_problem
from shardwise.planner.pipeline import batch_inputs
from shardwise.testing.eager import assert_training_equal, eager_training

SGD = functools.partial(torch.optim.SGD, lr=0.1)


class Attention(nn.Module):
    def __init__(self, d: int, heads: int, block: int, style: str) -> None:
        super().__init__()
        self.d, self.heads, self.style = d, heads, style
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.register_buffer("bias", torch.tril(torch.ones(block, block)).view(1, 1, block, block))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        hd = d // self.heads
        if self.style == "unbind":  # q, k, v unpacked from one permuted view
            q, k, v = self.qkv(x).view(b, s, 3, self.heads, hd).permute(2, 0, 3, 1, 4)
        else:  # nanoGPT
            q, k, v = self.qkv(x).split(self.d, dim=2)
            q = q.view(b, s, self.heads, hd).transpose(1, 2)
            k = k.view(b, s, self.heads, hd).transpose(1, 2)
            v = v.view(b, s, self.heads, hd).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hd))
        att = att.masked_fill(self.bias[:, :, :s, :s] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        y = (att @ v).transpose(1, 2).contiguous().view(b, s, d)
        return self.proj(y)


class Block(nn.Module):
    def __init__(self, d: int, heads: int, block: int, style: str) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = Attention(d, heads, block, style)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, style: str, vocab: int = 32, d: int = 16, heads: int = 2, block: int = 8, layers: int = 2):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(block, d)
        self.blocks = nn.ModuleList(Block(d, heads, block, style) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.wte(ids) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def _loss(logits: torch.Tensor) -> torch.Tensor:
    return logits.float().sin().mean()


def _model(style: str) -> tuple[GPT, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    ids = torch.randint(0, 32, (4, 8), generator=torch.Generator().manual_seed(1))
    return GPT(style), (ids,)


@pytest.mark.parametrize("style", ["unbind", "split"])
def test_the_batch_is_followed_through_both_attentions(style: str) -> None:
    model, inputs = _model(style)
    for loss in (None, _loss):
        g = trace(model, inputs, loss_fn=loss)[0]
        assert rows_problem(g, batch_inputs(g)) == ""
        micro = trace(model, (inputs[0][:2],), loss_fn=loss)[0]
        assert micro_shapes_problem(g, micro, batch_inputs(g), 2) == ""


class Idioms(nn.Module):
    """Rows through cat (not over the batch), tril/triu of activations, masks made from activations, *_like."""

    def __init__(self, over_batch: str = "") -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.over_batch = over_batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)  # (rows, 4, 4)
        if self.over_batch == "cat":
            return torch.cat([h, h * 2.0], dim=0)[: x.shape[0]]
        if self.over_batch == "tril":
            return torch.tril(h.transpose(0, 2)).transpose(0, 2)
        h = torch.cat([h, torch.tril(h), torch.triu(h, 1)], dim=-1)  # (rows, 4, 12)
        mask = h > 0
        h = h.masked_fill(mask, 0.5) + torch.where(mask, h, torch.zeros_like(h)) + torch.ones_like(h)
        first, second = h.unbind(1)[:2]
        return torch.stack([first, second], dim=1) + h[:, :2]


def test_rows_through_cat_tril_triu_masks_unbind() -> None:
    x = torch.randn(6, 4, 4)
    g = trace(Idioms(), (x,))[0]
    assert rows_problem(g, batch_inputs(g)) == ""
    for how in ("cat", "tril"):  # the same ops over the batch dimension mix the rows
        g = trace(Idioms(how), (x,))[0]
        problem = rows_problem(g, batch_inputs(g))
        assert f"{how}.default" in problem and "test_pipeline_idioms.py" in problem, problem


def test_a_random_op_keeps_the_batch_whole() -> None:
    class Noisy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x) + torch.randn_like(x)

    g = trace(Noisy(), (torch.randn(6, 4),))[0]
    assert "draws random numbers" in rows_problem(g, batch_inputs(g))


@pytest.fixture(scope="module")
def pool(worker_pools):  # the session's pool of two (tests/conftest.py)
    return worker_pools(2, timeout_s=180)


@pytest.mark.multiproc
@pytest.mark.parametrize("style", ["unbind", "split"])
def test_both_gpts_pipeline_and_train_equal_to_eager(pool, style: str) -> None:
    model, inputs = _model(style)
    reference = copy.deepcopy(model)
    with shardwise.compile(
        model, "cpu:2", example_inputs=inputs, mode="train", loss_fn=_loss, optimizer=SGD, constraints={"pp": 2},
        workers=pool,
    ) as cm:  # fmt: skip
        assert cm.plan.pipeline is not None and cm.plan.degrees["pp"] == 2
        losses = [cm.train_step(*inputs) for _ in range(3)]
        state = cm.state_dict()
    assert_training_equal(losses, state, *eager_training(reference, inputs, _loss, SGD))
