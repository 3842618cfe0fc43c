"""What the frontend accepts and refuses, op by op: random ops (by ATen's tag, not by name), outputs of a
data-dependent size, and tensors written into the model's forward (lifted constants)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shardwise.errors import UnsupportedOpError
from shardwise.frontend.trace import model_tensors, trace


class Fn(nn.Module):
    def __init__(self, fn) -> None:  # noqa: ANN001
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


@pytest.mark.parametrize(
    "fn",
    [
        lambda x: F.rrelu(x, training=True),  # aten.rrelu_with_noise: random, whatever its name
        lambda x: x + torch.randn_like(x),
        lambda x: torch.empty_like(x).exponential_() * x,
        lambda x: F.feature_alpha_dropout(x, 0.5, training=True),
    ],
    ids=["rrelu", "randn_like", "exponential_", "feature-alpha-dropout"],
)
def test_ops_that_draw_random_numbers_are_refused_with_their_line(fn) -> None:  # noqa: ANN001
    with pytest.raises(UnsupportedOpError, match=r"draws random numbers.*") as info:
        trace(Fn(fn), (torch.randn(4, 3),))
    assert "test_trace_ops.py" in str(info.value)


@pytest.mark.parametrize(
    "fn",
    [
        lambda x: F.rrelu(x, training=False),
        lambda x: F.dropout(x, 0.0, training=True) + F.alpha_dropout(x, 0.5, training=False),
        lambda x: F.feature_alpha_dropout(x, 0.0, training=True),
    ],
    ids=["rrelu-eval", "dropout-p0-or-eval", "feature-alpha-dropout-p0"],
)
def test_the_same_ops_without_randomness_trace(fn) -> None:  # noqa: ANN001
    trace(Fn(fn), (torch.randn(4, 3),))


def test_an_output_of_data_dependent_size_is_refused_with_its_line() -> None:
    with pytest.raises(UnsupportedOpError, match="size depends on the values") as info:
        trace(Fn(lambda x: x.nonzero().float().sum(0)), (torch.randn(4, 3),))
    assert "test_trace_ops.py" in str(info.value)


def test_tensors_held_by_the_model_are_weights_of_the_program() -> None:
    class Scaled(nn.Module):  # plain tensor attributes (neither parameters nor buffers): lifted constants
        def __init__(self) -> None:
            super().__init__()
            self.scale = torch.tensor([0.5, 2.0, -1.0])
            self.rows = torch.tensor([2, 0])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[self.rows] * self.scale

    model = Scaled()
    graph = trace(model, (torch.randn(4, 3),))[0]
    constants = {p.key for p in graph.params if p.kind == "constant"}
    assert len(constants) == 2
    tensors = model_tensors(model)
    assert constants <= set(tensors)
    assert any(torch.equal(tensors[k], model.scale) for k in constants)
