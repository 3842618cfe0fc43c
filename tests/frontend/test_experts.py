"""The experts of an MoE layer traced as one op (shardwise/frontend/experts.py): which modules are replaced, what
the op computes against transformers' own module, and that the model is left as it was."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shardwise.frontend.experts import OP, experts_as_one_op, replaceable
from shardwise.frontend.trace import trace
from shardwise.runtime.lib.moe import moe_experts

pytest.importorskip("transformers")

from shardwise.zoo.hf import tiny_causal_lm  # noqa: E402


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe", "olmoe"])
def test_each_layer_has_one_experts_op(name):
    model, inputs = tiny_causal_lm(name)
    graph, _ = trace(model, inputs)
    ops = [n for n in graph.nodes if n.op == OP]
    assert len(ops) == model.config.num_hidden_layers
    assert all(n.module_path.endswith("mlp.experts") for n in ops)
    # the sort by expert and the loop over experts are inside the op, not in the graph
    assert not any(n.op in ("aten.sort.default", "aten.histc.default", "aten.split_with_sizes.default")
                   for n in graph.nodes)  # fmt: skip
    # the model is restored: its experts run transformers' own forward again
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_the_op_computes_what_transformers_computes():
    model, _ = tiny_causal_lm("mixtral")
    experts = model.model.layers[0].mlp.experts
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(10, experts.gate_up_proj.shape[2], generator=g)
    # expert 3 gets no token: an empty group
    index = torch.randint(0, 3, (10, 2), generator=g)
    weights = torch.rand(10, 2, generator=g)
    with torch.no_grad():
        expected = experts(hidden, index, weights)
        got = moe_experts(hidden, index, weights, experts.gate_up_proj, experts.down_proj, "silu")
        with experts_as_one_op(model) as replaced:
            assert replaced == model.config.num_hidden_layers
            through_op = experts(hidden, index, weights)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(through_op, expected, rtol=1e-6, atol=1e-6)


class _NotGated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.zeros(4, 8, 4))
        self.down_proj = nn.Parameter(torch.zeros(4, 4, 4))
        self.act_fn = nn.SiLU()


def test_other_experts_modules_are_traced_as_they_are():
    module = _NotGated()
    assert not replaceable(module)  # no transformers experts interface (has_gate, the default gate)
    model, _ = tiny_causal_lm("mixtral")
    experts = model.model.layers[0].mlp.experts
    assert replaceable(experts)
    experts.act_fn = nn.Tanh()  # an activation the runtime does not know: traced as it is
    assert not replaceable(experts)

