"""Memory in the objective: of placements predicted as fast, the one whose weights take the least memory."""

from __future__ import annotations

import pytest

import shardwise
from shardwise.ir.placement import Shard
from shardwise.ir.registry import tensor_operands
from shardwise.zoo import build_model


def _read_split_stored_whole(plan) -> set[str]:
    """Weights every reader reads split over some mesh axis but the plan stores whole."""
    keys = {p.name: p.key for p in plan.graph.params}
    stored = dict(plan.param_placements)
    split_by_all: dict[str, bool] = {}
    for node in plan.graph.nodes:
        s = plan.strategy(node.name)
        for j, v in enumerate(tensor_operands(node)):
            if v not in keys or j >= len(s.inputs) or s.inputs[j] is None:
                continue
            split = any(isinstance(p, Shard) for p in s.inputs[j].placements)
            split_by_all[keys[v]] = split_by_all.get(keys[v], True) and split
    return {
        k for k, split in split_by_all.items()
        if split and not any(isinstance(p, Shard) for p in stored[k].placements)
    }  # fmt: skip


@pytest.mark.parametrize("mode", ["inference", "train"])
@pytest.mark.parametrize("sp", [None, 1])
def test_tp2_stores_every_split_weight_sharded(mode: str, sp: int | None) -> None:
    model, inputs = build_model("gpt2", "small")
    constraints = {"tp": 2} if sp is None else {"tp": 2, "sp": sp}
    loss = (lambda out: out.logits.mean()) if mode == "train" else None
    plan = shardwise.compile(model, "cpu:2", example_inputs=inputs, mode=mode, loss_fn=loss,
                             constraints=constraints).plan  # fmt: skip
    assert plan.degrees["tp"] == 2
    assert _read_split_stored_whole(plan) == set()
