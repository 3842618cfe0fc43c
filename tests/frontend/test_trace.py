"""Frontend: torch.export lowering into the IR."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shardwise.errors import TraceError, UnsupportedOpError
from shardwise.frontend.trace import trace
from shardwise.ir import verify
from shardwise.ir.registry import is_known_op
from shardwise.zoo import MODEL_NAMES, build_model


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_zoo_models_lower_with_costs_module_paths_and_known_ops(name):
    model, inputs = build_model(name)
    graph, _ = trace(model, inputs)
    verify(graph)
    unknown = sorted({n.op for n in graph.nodes if not is_known_op(n.op)})
    assert unknown == [], f"ops outside the registry: {unknown}"
    keys = {p.key for p in graph.params} | {a for p in graph.params for a in p.aliases}
    assert set(model.state_dict()) <= keys  # every state_dict entry is bound to a graph parameter
    assert graph.total_flops > 0
    heavy = [n for n in graph.nodes if n.op in ("aten.linear.default", "aten.addmm.default", "aten.conv2d.default")]
    assert heavy and all(n.flops > 0 and n.bytes_moved > 0 and n.module_path for n in heavy)
    assert all(not n.source.startswith("/") for n in graph.nodes)  # repository-relative source lines


def test_gpt2_tied_weights_are_one_parameter_with_an_alias():
    model, inputs = build_model("gpt2")
    graph, _ = trace(model, inputs)
    tied = graph.param_by_key("lm_head.weight")
    assert tied is graph.param_by_key("transformer.wte.weight")
    assert tied.aliases


def test_linear_module_path_and_flops_are_exact():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 16)

        def forward(self, x):
            return torch.relu(self.proj(x))

    graph, _ = trace(Net(), (torch.randn(4, 8),))
    linear = next(n for n in graph.nodes if n.op == "aten.linear.default")
    assert linear.module_path == "proj"
    assert linear.flops == 2 * 4 * 8 * 16
    assert str(linear.outputs[0]) == "f32[4,16]"
    assert linear.source.startswith("tests/frontend/test_trace.py:")  # the model's line, not nn.Linear's


def test_meta_device_gpt2_48_layers_hidden_1600_traces_without_allocating():
    model, inputs = build_model(
        "gpt2", device="meta", layers=48, hidden=1600, heads=25, vocab=50257, seq=1024, batch=1
    )
    assert all(p.is_meta for p in model.parameters())
    graph, _ = trace(model, inputs)
    assert graph.meta_device
    assert 1.5e9 < graph.num_params < 1.7e9  # GPT-2 XL size
    assert len([n for n in graph.nodes if n.op == "aten.scaled_dot_product_attention.default"]) == 48


def test_custom_op_without_decomposition_runs_whole_and_names_its_module():
    """An op outside ATen with no decomposition is kept (it runs whole); the graph names the module that
    registers it, for the generated program to import."""
    lib = torch.library.Library("swtest", "DEF")
    lib.define("twice(Tensor x) -> Tensor")
    lib.impl("twice", lambda x: x * 2, "CompositeExplicitAutograd")
    lib.impl("twice", lambda x: torch.empty_like(x), "Meta")

    class Net(nn.Module):
        def forward(self, x):
            return torch.ops.swtest.twice(x)

    graph, _ = trace(Net(), (torch.randn(2, 2),))
    assert [n.op for n in graph.nodes] == ["swtest.twice.default"]
    assert graph.libraries == (__name__,)


def test_custom_op_of_no_module_is_a_clear_error_naming_the_op_and_line():
    """A custom op registered by code of no importable module (here: exec) cannot be called by a generated
    program: the error names the op, the model's line and what to do."""
    namespace: dict = {"torch": torch}
    exec(
        "lib = torch.library.Library('swtest2', 'DEF')\n"
        "lib.define('twice(Tensor x) -> Tensor')\n"
        "lib.impl('twice', lambda x: x * 2, 'CompositeExplicitAutograd')\n"
        "lib.impl('twice', lambda x: torch.empty_like(x), 'Meta')\n",
        namespace,
    )

    class Net(nn.Module):
        def forward(self, x):
            return torch.ops.swtest2.twice(x)

    with pytest.raises(UnsupportedOpError, match=r"test_trace\.py:\d+.*'swtest2\.twice\.default'.*importable module"):
        trace(Net(), (torch.randn(2, 2),))


def test_inputs_that_do_not_match_the_model_are_a_trace_error():
    model, _ = build_model("mlp")
    with pytest.raises(TraceError, match="could not trace MLP"):
        trace(model, (torch.randn(4, 7),))
    with pytest.raises(TraceError, match="tuple"):
        trace(model, torch.randn(4, 32))


def test_batch_norm_statistics_in_training_are_buffer_updates():
    """In-place updates of buffers (a BatchNorm's running statistics and step count) become functional ops
    whose results update the buffers (in-place ops on intermediates are functionalized the same way)."""
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).train()
    graph, _ = trace(model, (torch.randn(8, 4),), loss_fn=lambda out: out.square().mean())
    verify(graph)
    assert {key for key, _ in graph.buffer_updates} == {"1.running_mean", "1.running_var", "1.num_batches_tracked"}
    assert not any(n.op.endswith("_.Tensor") or n.op == "aten.batch_norm.default" for n in graph.nodes)
