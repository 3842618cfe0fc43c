"""Stage partitioning: layer units, chunk subgraphs (run chunk by chunk they equal the whole model), the
min-max partitioner against the exact dynamic program, and unit costs that scale as they should."""

from __future__ import annotations

import random

import pytest
import torch

from shardwise.cluster import get_cluster
from shardwise.frontend.trace import model_tensors, trace
from shardwise.ir.graph import Graph, Value
from shardwise.passes.stages import chunk_owner, extract_chunks, layer_units
from shardwise.passes.stages.partition import balance, balance_dp, chunk_times
from shardwise.passes.stages.profile import UnitProfiler
from shardwise.zoo import build_model


def _lm(name: str, layers: int = 4):
    model, (ids,) = build_model(name, layers=layers)
    model.train()
    labels = torch.randint(0, 128, ids.shape, generator=torch.Generator().manual_seed(3))
    graph, _ = trace(model, (ids,), example_kwargs={"labels": labels}, loss_fn=lambda o: o.loss)
    return model, ids, labels, graph


@pytest.fixture(scope="module")
def gpt2():
    return _lm("gpt2")


@pytest.fixture(scope="module")
def llama():
    return _lm("llama")


@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_units_are_pre_blocks_post_and_blocks_share_a_signature(which, request):
    graph = request.getfixturevalue(which)[3]
    units = layer_units(graph)
    assert units.labels[0] == "pre" and units.labels[-1] == "post" and units.blocks == 4
    assert len(set(units.signature[1:-1])) == 1  # identical blocks: priced once
    assert units.signature[0] != units.signature[1] != units.signature[-1]
    owner = units.unit_of()
    assert set(owner) == {n.name for n in graph.nodes}
    for n in graph.nodes:  # values only flow forward
        assert all(owner.get(v, 0) <= owner[n.name] for v in n.inputs)


def _run_graph(graph: Graph, env: dict[str, torch.Tensor], params: dict[str, torch.Tensor]) -> dict:
    """Evaluate an IR graph with eager ATen calls (reference interpreter for the tests)."""
    from shardwise.ir.graph import Const

    vals = dict(env)
    vals.update({p.name: params[p.key] for p in graph.params})

    def arg(a):
        if isinstance(a, Value):
            return vals[a.name]
        if isinstance(a, Const):
            if a.kind == "dtype":
                return getattr(torch, a.value)
            if a.kind == "device":
                return torch.device("cpu")
            return getattr(torch, a.value)
        if isinstance(a, tuple):
            return [arg(x) for x in a]
        return a

    for n in graph.nodes:
        if n.op == "getitem":
            vals[n.name] = vals[n.args[0].name][n.args[1]]
            continue
        ns, name, overload = n.op.split(".", 2)
        fn = getattr(getattr(getattr(torch.ops, ns), name), overload)
        vals[n.name] = fn(*[arg(a) for a in n.args], **{k: arg(v) for k, v in n.kwargs})
    return vals


@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_chunks_run_in_order_equal_the_whole_graph(which, request):
    model, ids, labels, graph = request.getfixturevalue(which)
    units = layer_units(graph)
    params = model_tensors(model)
    for p in graph.params:
        if p.key not in params:
            params[p.key] = next(params[a] for a in p.aliases if a in params)
    env = {graph.inputs[0].name: ids, graph.inputs[1].name: labels}
    whole = _run_graph(graph, env, params)[graph.output_names[0]]
    chunks = extract_chunks(graph, chunk_owner(units.nodes, [(0, 2), (2, 4), (4, 6)]), 3)
    assert [t.grad for t in chunks.transfers] == [True] * len(chunks.transfers)
    assert all(t.src < t.dst for t in chunks.transfers)
    if which == "gpt2":
        assert [k for k, _ in chunks.tied] in (["lm_head.weight"], ["transformer.wte.weight"])
    values: dict[str, torch.Tensor] = {}
    out = None
    for c, g in enumerate(chunks.graphs):
        feed = {i.name: values[i.name] if i.name in values else env[i.name] for i in g.inputs}
        got = _run_graph(g, feed, params)
        for t in chunks.transfers:
            if t.src == c:
                values[t.value] = got[t.value]
        out = got[g.output_names[0]] if c == 2 else None
    torch.testing.assert_close(out, whole, rtol=0, atol=0)
    # masks and position tables are recomputed, not sent: only the hidden state crosses each boundary
    assert len(chunks.transfers) == 2 and chunks.recomputed


def test_balance_equals_the_dynamic_program():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 14)
        k = rng.randint(1, n)
        times = [rng.random() * rng.choice([1, 1, 5]) for _ in range(n)]
        got = balance(times, k)
        best, _ = balance_dp(times, k)
        assert got is not None and len(got) == k and got[0][0] == 0 and got[-1][1] == n
        assert all(a < b for a, b in got)
        assert max(chunk_times(times, got)) == pytest.approx(best, rel=1e-5)


def test_balance_respects_memory_and_reports_infeasible():
    times = [1.0] * 8
    # chunk 0 may hold at most 2 units, the others any number
    got = balance(times, 3, lambda c, a, b: c != 0 or b - a <= 2)
    assert got is not None and got[0][1] - got[0][0] <= 2
    assert balance(times, 3, lambda c, a, b: b - a <= 2) is None  # 3 chunks x 2 units < 8 units
    assert balance([1.0, 2.0], 3) is None


@pytest.fixture(scope="module")
def gpt2_meta():
    model, (ids,) = build_model("gpt2", device="meta", layers=2, hidden=1024, heads=16, seq=512, batch=4)
    return trace(model, (ids,), example_kwargs={"labels": ids}, loss_fn=lambda o: o.loss)[0]


def test_unit_costs_scale_with_the_micro_batch_and_split_with_tensor_parallelism(gpt2_meta):
    graph = gpt2_meta
    units = layer_units(graph)
    prof = UnitProfiler(graph, units, get_cluster("dgx-a100x1"), precision="bf16", train=True)
    one, four = prof.cost(1, 1, False, 1), prof.cost(1, 1, False, 4)
    assert four.flops == pytest.approx(4 * one.flops)
    # saved activations grow with the rows; autocast's bf16 copies of the weights are kept once per micro-batch
    two = prof.cost(1, 1, False, 2)
    grows = two.activation_bytes - one.activation_bytes
    assert grows > 0 and four.activation_bytes - one.activation_bytes == pytest.approx(3 * grows, rel=1e-6)
    assert one.activation_bytes - grows > 0  # bf16: the weights' copies
    assert four.param_elems == one.param_elems > 0
    assert one.backward_s > one.forward_s > 0 and one.comm_forward_s == 0
    tp2 = prof.cost(1, 2, False, 4)
    assert tp2.param_elems < four.param_elems and tp2.flops < four.flops
    assert tp2.comm_forward_s > 0 and tp2.comm_backward_s > 0  # the row-parallel all-reduces
    assert prof.cost(2, 1, False, 1) == one  # identical blocks are priced once
    assert prof.placements == 2
    assert graph.meta_device


def test_efficiencies_are_published_fractions_below_one():
    a100 = get_cluster("dgx-a100x1").efficiency
    for name in ("gemm", "attention_forward", "attention_backward", "memory", "intra_node", "inter_node"):
        assert 0.5 < getattr(a100, name) < 1.0
        assert "not measured" not in a100.source(name)  # every figure names where it comes from


def test_every_parameter_is_held_by_a_chunk_even_one_no_op_reads():
    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.unused = (torch.nn.Linear(4, 4) for _ in range(3))

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    graph, _ = trace(Model(), (torch.randn(2, 4),))
    units = layer_units(graph)
    chunks = extract_chunks(graph, chunk_owner(units.nodes, [(0, 1), (1, len(units))]), 2)
    held = [p.key for g in chunks.graphs for p in g.params]
    assert sorted(held) == sorted(p.key for p in graph.params)  # each once, "unused.*" in the first chunk
    assert {"unused.weight", "unused.bias"} <= {p.key for p in chunks.graphs[0].params}
