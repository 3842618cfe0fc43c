"""The placement ILP's objective is the price list's price of the plan it makes (issue 15, items 3 and 4).

The ILP (``passes.sharding.auto.place``) chooses a placement by its objective; the plan made from that placement
is priced by ``costs.step.price_flat``. If the two disagree, the ILP optimizes something the price list does not
charge (it once left out the optimizer step and the gradient buckets' copies and latency, and ``price_flat``
charged each reader of a value for a collective the program shares), and picks plans its own price list calls
slower.

Tolerance: 2% of the step. What is deliberately approximate in the objective (``auto`` module docstring):
bucket boundaries (a bucket's latency is charged once, plus a share per byte of ``BUCKET_BYTES``; these small
models fill one bucket per group of axes, so the share is the whole difference: 0.1% of a dp=2 step), the
optimizer and bucket copies priced linearly in the elements (exact on ``cpu:2``'s nominal figures), the
bucketed reduction charged whole where ``price_flat`` hides what the backward overlaps (nothing here: the last
bucket is ready at the backward's end). 2% is well above these and well below the 13-20% disagreements the test
was written against.
"""

from __future__ import annotations

import pytest

from shardwise.cluster import get_cluster
from shardwise.costs.prices import price_list
from shardwise.costs.step import price_flat
from shardwise.frontend.trace import trace
from shardwise.ir.placement import Shard
from shardwise.ir.registry import tensor_operands
from shardwise.passes.sharding.ilp import Charge, ClassVar, Problem, solve
from shardwise.planner.flat import FlatAnalyses, FlatOptions, Realized, realize_flat
from shardwise.zoo import build_model

TOLERANCE = 0.02
# (model, dp, tp, sequence parallelism allowed): dp=2, tp=2 (the ILP may split tokens), Megatron's tp (sp=1)
LAYOUTS = [(m, dp, tp, sp) for m in ("gpt2", "llama") for dp, tp, sp in ((2, 1, True), (1, 2, True), (1, 2, False))]


@pytest.fixture(scope="module")
def analyses() -> dict[str, FlatAnalyses]:
    out = {}
    for name in ("gpt2", "llama"):
        model, inputs = build_model(name)
        model.train()
        graph, _ = trace(model, inputs, loss_fn=lambda o: o.logits.mean())
        out[name] = FlatAnalyses(graph)
    return out


def _realize(analyses: dict[str, FlatAnalyses], name: str, dp: int, tp: int, sp: bool) -> Realized:
    # fusion off: the objective prices the placement; fusion changes no price on cpu:2 (it runs fused groups op
    # by op), but it is a later pass
    return realize_flat(
        analyses[name].graph, get_cluster("cpu:2"), dp=dp, tp=tp, sp=sp, zero=0, recompute="none",
        options=FlatOptions(mode="train", fusion=False), analyses=analyses[name],
    )  # fmt: skip


@pytest.mark.parametrize(("name", "dp", "tp", "sp"), LAYOUTS)
def test_objective_is_the_price_of_the_plan(analyses, name: str, dp: int, tp: int, sp: bool) -> None:
    realized = _realize(analyses, name, dp, tp, sp)
    plan = realized.plan
    price = price_flat(plan, price_list(get_cluster("cpu:2"), plan.precision)).step_s
    objective = realized.stats.objective_s
    assert objective > 0
    assert abs(objective - price) <= TOLERANCE * price, (objective, price)
    # the plan's recorded prediction is the same price
    assert plan.predicted.step_time_s == pytest.approx(price, rel=1e-9)
    assert any(f"objective {objective * 1e3:.3f} ms" in note for note in plan.notes), plan.notes


@pytest.mark.parametrize("solver", ["cbc", "cpsat"])
@pytest.mark.parametrize(("charge", "expected"), [(1.5, (0, 0)), (5.0, (1, 1))])
def test_a_charge_is_paid_once(solver: str, charge: float, expected: tuple[int, int]) -> None:
    # two classes whose first candidates are cheaper (1 against 2) but trigger one charge (a bucket's latency):
    # paid once, 1.5 keeps them (1 + 1 + 1.5 < 2 + 2; twice it would not); 5 does not
    problem = Problem([ClassVar("a", [1.0, 2.0], [0.0, 0.0]), ClassVar("b", [1.0, 2.0], [0.0, 0.0])])
    problem.charges.append(Charge(charge, [(0, 0), (1, 0)]))
    sol = solve(problem, solver=solver)
    assert sol.choice == expected
    assert sol.objective_s == pytest.approx(2.0 + charge if expected == (0, 0) else 4.0)


def _split(plan) -> set[str]:  # noqa: ANN001
    return {k for k, s in plan.param_placements if any(isinstance(p, Shard) for p in s.placements)}


def _read_split_stored_whole(plan) -> set[str]:  # noqa: ANN001
    """Weights every reader reads split over some mesh axis but the plan stores whole."""
    keys = {p.name: p.key for p in plan.graph.params}
    split_by_all: dict[str, bool] = {}
    for node in plan.graph.nodes:
        s = plan.strategy(node.name)
        for j, v in enumerate(tensor_operands(node)):
            if v not in keys or j >= len(s.inputs) or s.inputs[j] is None:
                continue
            split = any(isinstance(p, Shard) for p in s.inputs[j].placements)
            split_by_all[keys[v]] = split_by_all.get(keys[v], True) and split
    return {k for k, split in split_by_all.items() if split and k not in _split(plan)}


def test_tp2_on_gpt2_splits_weights_unless_replication_is_faster(analyses) -> None:
    """Issue 15.4: tp=2 on GPT-2 (training) stores every weight it reads split sharded, and shards some, unless
    the price list says the plan that replicates them is more than 1% faster than the one that splits them."""
    plan = _realize(analyses, "gpt2", 1, 2, True).plan
    assert _read_split_stored_whole(plan) == set()
    if not _split(plan):
        megatron = _realize(analyses, "gpt2", 1, 2, False).plan
        assert _split(megatron)
        assert plan.predicted.step_time_s * 1.01 < megatron.predicted.step_time_s


@pytest.mark.parametrize("zero", [0, 1])
def test_objective_is_the_price_of_a_zero_plan_over_dp_and_cp(zero: int) -> None:
    # dp2 x cp2 on cpu:4: the gradients summed over the combined group (one collective), and under ZeRO 1 the
    # optimizer's share and the all-gather of the updated parameters over it, as price_flat prices them
    pytest.importorskip("transformers")
    from shardwise.zoo.hf import tiny_causal_lm

    model, inputs = tiny_causal_lm("llama", seq=256)
    graph, _ = trace(model, inputs, loss_fn=lambda out: out.logits.float().sin().mean())
    cluster = get_cluster("cpu:4")
    realized = realize_flat(
        graph, cluster, dp=2, tp=1, sp=True, zero=zero, recompute="none", cp=2, cp_ways=("ulysses",),
        options=FlatOptions(mode="train", fusion=False), analyses=FlatAnalyses(graph),
    )  # fmt: skip
    plan = realized.plan
    assert plan.zero_stage == zero and any(set(axes) == {"dp", "cp"} for _, axes in plan.param_grad_reduce)
    price = price_flat(plan, price_list(cluster, plan.precision)).step_s
    assert abs(realized.stats.objective_s - price) <= TOLERANCE * price, (realized.stats.objective_s, price)
