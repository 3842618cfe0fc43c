"""Tensor parallelism inside each expert (etp) of a mixture of experts' experts op: the fused gate and up
projections cut into parameter parts (passes/sharding/rewrite.py experts_in_parts) and the op's inner label."""

from __future__ import annotations

import pytest

from shardwise.frontend.experts import OP
from shardwise.frontend.trace import trace

pytest.importorskip("transformers")

from shardwise.zoo.hf import tiny_causal_lm  # noqa: E402


def test_tensor_parallelism_splits_each_expert_through_parameter_parts():
    """With tp, the fused gate and up projections become two parts of their parameter, so that a split of the
    intermediate dimension gives each rank matching rows of both; that split leaves partial sums (the op's
    inner label), and the op's other operands are read whole with partial gradients."""
    from shardwise.ir.graph import Value
    from shardwise.ir.placement import DeviceMesh
    from shardwise.ir.registry import op_dims
    from shardwise.passes.sharding.rewrite import expose_tensor_parallelism
    from shardwise.passes.sharding.strategy import make_strategy, split_is_valid

    model, inputs = tiny_causal_lm("mixtral")
    graph, _ = trace(model, inputs)
    rewritten = expose_tensor_parallelism(graph)
    node = next(n for n in rewritten.nodes if n.op == OP)
    gate, up = (rewritten.params[[p.name for p in rewritten.params].index(a.name)] for a in node.args[3:5])
    assert gate.part_of == up.part_of == "model.layers.0.mlp.experts.gate_up_proj"
    assert (gate.part, up.part) == ((1, 0, 128), (1, 128, 256))
    specs = [rewritten.spec_of(a.name) for a in node.args if isinstance(a, Value)]
    dims = op_dims(node, specs)
    assert split_is_valid(node, dims, "f", 2, specs, list(node.outputs))
    mesh = DeviceMesh((2,), ("tp",), (0, 1))
    names = [a.name for a in node.args if isinstance(a, Value)]
    s = make_strategy(node, dims, names, [None] * 6, specs, list(node.outputs), {"tp": "f"}, mesh, None, train=True)
    assert [str(x) for x in s.inputs] == ["[R]", "[R]", "[R]", "[S(1)]", "[S(1)]", "[S(2)]"]
    assert [str(x) for x in s.outputs] == ["[P]"]
    assert dict(s.grad_reduce) == {0: ("tp",), 2: ("tp",)}  # the hidden states and the routing weights
