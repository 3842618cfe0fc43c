"""IR values: frozen dataclasses, verify, JSON round trip, text form; the op registry's annotations."""

from __future__ import annotations

import dataclasses

import pytest

from shardwise.cluster import get_cluster
from shardwise.errors import PlanFileError
from shardwise.frontend.trace import trace
from shardwise.ir import (
    ExecutionPlan,
    GraphInvariantError,
    Partial,
    Replicate,
    Shard,
    ShardingSpec,
    format_graph,
    graph_from_json,
    graph_to_json,
    parse_dimops,
    verify,
)  # fmt: skip
from shardwise.ir.registry import REGISTRY, op_dims, tensor_operands
from shardwise.ir.tensor import TensorSpec
from shardwise.planner.auto import plan_auto
from shardwise.zoo import MODEL_NAMES, build_model


def _dp_plan(graph, cluster, **kwargs):
    """A data-parallel (or replicated) flat plan: the planner with tp=1 (what the simple planner made)."""
    constraints = {"tp": 1, **kwargs.pop("constraints", {})}
    return plan_auto(graph, cluster, constraints=constraints, **kwargs)


@pytest.fixture(scope="module")
def graphs():
    return {name: trace(*build_model(name))[0] for name in MODEL_NAMES}


def test_placements_print_short_and_repr_exact():
    spec = ShardingSpec((Shard(0), Replicate(), Partial()))
    assert str(spec) == "[S(0), R, P]"
    assert repr(Shard(1)) == "Shard(dim=1)"
    with pytest.raises(dataclasses.FrozenInstanceError):
        Shard(0).dim = 1  # type: ignore[misc]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_graph_json_round_trip_is_exact(graphs, name):
    g = graphs[name]
    assert graph_from_json(graph_to_json(g)) == g
    assert format_graph(g).count("\n") > len(g.nodes)


def test_plan_json_round_trip_and_schema_version(graphs):
    plan = _dp_plan(graphs["gpt2"], get_cluster("cpu:2"), constraints={"dp": 2})
    text = plan.to_json()
    assert ExecutionPlan.from_json(text) == plan
    with pytest.raises(PlanFileError, match="schema version 999"):
        ExecutionPlan.from_json(text.replace('"shardwise_plan": 1', '"shardwise_plan": 999', 1))
    with pytest.raises(PlanFileError, match="truncated"):
        ExecutionPlan.from_json(text[: len(text) // 2])
    with pytest.raises(PlanFileError, match="not a shardwise plan"):
        ExecutionPlan.from_json('{"hello": 1}')


def test_verify_rejects_use_before_definition(graphs):
    g = graphs["mlp"]
    broken = g.replace(nodes=tuple(reversed(g.nodes)))
    with pytest.raises(GraphInvariantError, match="before it is defined"):
        verify(broken)


def test_dimops_parse_and_errors():
    dims = parse_dimops("m k+, n k+, n -> m n")
    assert str(dims) == "m k+, n k+, n -> m n"
    assert dims.is_reduction("k") and not dims.is_reduction("m")
    assert dims.splittable_labels() == ("m", "k", "n")
    with pytest.raises(ValueError, match="contraction"):
        parse_dimops("m k+ -> m k")
    with pytest.raises(ValueError, match="no '->'"):
        parse_dimops("m k")


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_node_annotation_matches_its_operands(graphs, name):
    """For each op of each zoo model: one label per dimension of every operand, and a label names one size
    (except a reshape's group label, which names the leading dims of a merged or split group)."""
    g = graphs[name]
    specs = {i.name: i.spec for i in g.inputs} | {p.name: p.spec for p in g.params}
    checked = 0
    for node in g.nodes:
        if not node.tuple_output:
            specs[node.name] = node.outputs[0]
        if node.op in ("getitem", "sym_size", "scalar_op"):
            continue
        ins = [specs[n] for n in tensor_operands(node) if isinstance(specs.get(n), TensorSpec)]
        outs = [o for o in node.outputs if isinstance(o, TensorSpec)]
        dims = op_dims(node, ins)
        assert len(dims.inputs) == len(ins), node.op
        assert len(dims.outputs) == len(outs), node.op
        sizes: dict[str, set[int]] = {}
        for operand, spec in list(zip(dims.inputs, ins)) + list(zip(dims.outputs, outs)):
            assert len(operand) == spec.rank, f"{node.op}: {operand} vs {spec}"
            for d, size in zip(operand, spec.shape):
                if d.label != "1":
                    sizes.setdefault(d.label, set()).add(size)
        for label in dims.splittable_labels():
            # only a reshape's group label spans dims of different sizes (split together, contiguously)
            if REGISTRY[node.op].kind != "view":
                assert len(sizes.get(label, {0})) == 1, f"{node.op}: label {label} names sizes {sizes[label]}"
        checked += 1
    assert checked > 5


def test_registry_rules_are_complete():
    assert len(REGISTRY) > 150
    for op, rule in REGISTRY.items():
        assert rule.op == op and rule.kind and callable(rule.dims) and callable(rule.flops)
