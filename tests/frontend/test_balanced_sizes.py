"""Sizes that depend on tensor values, on the meta device: a split by counts read from a tensor gets equal
pieces (balanced routing), and the planner says it assumed so."""

from __future__ import annotations

import torch
from torch import nn

from shardwise.frontend.trace import trace
from shardwise.planner.assumptions import BALANCED_ROUTING, assumptions


class _Routed(nn.Module):
    """Rows sorted by group, each group through its own weight (a mixture of experts' loop, by hand)."""

    def __init__(self, groups: int = 4, width: int = 8) -> None:
        super().__init__()
        self.router = nn.Linear(width, groups)
        self.weight = nn.Parameter(torch.randn(groups, width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        choice = self.router(x).argmax(-1)
        order = choice.argsort()
        counts = nn.functional.one_hot(choice, self.weight.shape[0]).sum(0).tolist()
        rest = x.size(0) - sum(counts)  # as shardwise's own decomposition of grouped matmuls writes it
        pieces = x[order].split([*counts, rest])
        return torch.cat([p @ self.weight[i] for i, p in enumerate(pieces[:-1])])


def test_meta_model_splits_into_equal_pieces() -> None:
    with torch.device("meta"):
        model = _Routed()
    graph, _ = trace(model, (torch.empty(10, 8, device="meta"),))
    rows = [n.outputs[0].shape[0] for n in graph.nodes if n.op == "aten.matmul.default"]
    assert rows == [3, 3, 2, 2]  # 10 rows over 4 groups, the first 10 % 4 get one more
    assert assumptions(graph) == (BALANCED_ROUTING,)


def test_real_model_takes_the_example_sizes() -> None:
    torch.manual_seed(0)
    model, x = _Routed(), torch.randn(10, 8)
    graph, _ = trace(model, (x,))
    rows = [n.outputs[0].shape[0] for n in graph.nodes if n.op == "aten.matmul.default"]
    expected = torch.bincount(model.router(x).argmax(-1), minlength=4).tolist()
    assert rows == expected and assumptions(graph) == ()
