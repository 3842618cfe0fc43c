"""One price per layout: every public path that shows a time shows the same number.

For a set of layouts — flat and pipelined, with and without recomputation, on ``cpu:2`` and ``dgx-a100x2`` — the
plan's prediction, ``explain`` (the chosen row and the per-module prices), ``explain --op`` (each op's chosen
candidate) and the report's timeline all read the price list (``shardwise.costs``), so they agree exactly.
"""

from __future__ import annotations

import pytest

import shardwise
from shardwise.cli.explain import explain_ops, explain_plan
from shardwise.cli.report import report_data
from shardwise.cli.timeline import build_timeline
from shardwise.cluster import get_cluster
from shardwise.costs.prices import price_list
from shardwise.costs.step import node_prices, price_flat
from shardwise.zoo import build_model

LAYOUTS = [
    ("cpu:2", "cpu", "inference", {"dp": 2}),
    ("cpu:2", "cpu", "train", {"tp": 2}),
    ("cpu:2", "cpu", "train", {"dp": 2, "tp": 1, "recompute": "full"}),
    ("cpu:2", "cpu", "train", {"pp": 2, "microbatches": 2, "schedule": "1f1b"}),
    ("cpu:2", "cpu", "train", {"pp": 2, "microbatches": 2, "recompute": "full"}),
    ("dgx-a100x2", "meta", "train", {"tp": 8, "dp": 2}),
    ("dgx-a100x2", "meta", "train", {"tp": 8, "dp": 2, "recompute": "full"}),
    ("dgx-a100x2", "meta", "train", {"pp": 2, "tp": 8, "microbatches": 4}),
]


def _loss(out):
    return out.logits.float().mean()


@pytest.fixture(scope="module", params=LAYOUTS, ids=lambda x: f"{x[0]}-{x[2]}-" + "-".join(f"{k}{v}" for k, v in x[3].items()))
def planned(request):
    cluster_name, device, mode, constraints = request.param
    model, inputs = build_model("gpt2", "tiny", device=device, layers=4, batch=8)
    cm = shardwise.compile(
        model, cluster_name, example_inputs=inputs, mode=mode, loss_fn=_loss if mode == "train" else None,
        constraints=constraints,
    )  # fmt: skip
    return cm.plan, get_cluster(cluster_name)


def test_the_plan_explain_and_the_timeline_show_one_price(planned):
    plan, cluster = planned
    step = plan.predicted.step_time_s
    assert step > 0
    data = explain_plan(plan, cluster)
    assert data["chosen"]["step_time_s"] == step
    chosen = [a for a in data["alternatives"] if a["chosen"]]
    assert len(chosen) == 1 and chosen[0]["step_time_s"] == step
    assert build_timeline(plan, cluster).makespan_s == pytest.approx(step, rel=1e-12)
    assert report_data(plan, cluster)["timeline"]["makespan_s"] == pytest.approx(step, rel=1e-12)
    if plan.pipeline is None:
        # the flat step is its events: each op's prices, then the gradients, the optimizer step and offload
        priced = price_flat(plan, price_list(cluster, plan.precision))
        assert priced.step_s == step
        ops = node_prices(plan, price_list(cluster, plan.precision))
        per_op = sum(p.step_s for p in ops.values())
        rest = sum(e.seconds for e in priced.events if not e.node or e.node == "<output>")
        assert per_op + rest == pytest.approx(step, rel=1e-9)


def test_explain_op_shows_each_ops_price_in_the_plan(planned):
    plan, cluster = planned
    subs = [st.plan for st in plan.pipeline.stages] if plan.pipeline is not None else [plan]
    prices = [node_prices(sub, price_list(cluster, sub.precision)) for sub in subs]
    first = next(
        n.name for sub, ops in zip(subs, prices, strict=True) for n in sub.graph.nodes
        if n.module_path.startswith("transformer.h.") and ops[n.name].step_s
    )  # fmt: skip
    explained, _ = explain_ops(plan, first, cluster)
    assert explained
    for e in explained:
        chunk = int(e.note.rsplit("chunk ", 1)[1]) if "pipeline chunk" in e.note else 0
        picked = [c for c in e.candidates if c.chosen]
        assert len(picked) == 1, e.node
        assert picked[0].time_s == pytest.approx(prices[chunk][e.node].step_s, rel=1e-12), e.node
