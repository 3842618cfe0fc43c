"""The graph at another batch size derived from two traces equals the model traced at that size."""

from __future__ import annotations

import pytest
import torch

from shardwise.frontend.trace import trace
from shardwise.passes.stages.rebatch import RebatchingTracer, rebatch
from shardwise.zoo import build_model


def _loss(out):
    return (out.logits if hasattr(out, "logits") else out).float().mean()


def _tracer(name: str):
    model, (ids,) = build_model(name, batch=8)
    model.train()
    return lambda n: trace(model, (ids[:n],), loss_fn=_loss)[0]


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_derived_graph_equals_a_trace_at_that_size(name: str) -> None:
    tr = _tracer(name)
    full, sample = tr(8), tr(2)
    for rows in (3, 4):
        real, got = tr(rows), rebatch(full, sample, rows)
        assert got is not None
        assert got.inputs == real.inputs and got.params == real.params and got.outputs == real.outputs
        assert len(got.nodes) == len(real.nodes)
        for a, b in zip(got.nodes, real.nodes, strict=True):
            assert (a.name, a.op, a.args, a.kwargs, a.outputs, a.flops, a.bytes_moved) == (
                b.name, b.op, b.args, b.kwargs, b.outputs, b.flops, b.bytes_moved
            ), a.name  # fmt: skip


class _PairScores(torch.nn.Module):
    """Scores of every pair of rows: FLOPs grow with the square of the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        return h @ h.t()


def test_sizes_not_proportional_to_the_rows_are_traced() -> None:
    model, x = _PairScores(), torch.randn(8, 6)
    calls: list[int] = []

    def tr(n: int):
        calls.append(n)
        return trace(model, (x[:n],))[0]

    full = tr(8)
    assert rebatch(full, tr(2), 4) is None
    tracer = RebatchingTracer(full, tr)
    tracer(2)
    got = tracer(4)
    assert calls == [8, 2, 2, 4] and tracer.traced == 2 and tracer.derived == 0
    assert got.nodes[-1].outputs[0].shape == (4, 4)
