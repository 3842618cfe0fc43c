"""The planner uses a synthesized collective where it is predicted faster than the library's, and the plan
records which algorithm every collective uses (issue 5, item 7)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shardwise.cluster import get_cluster
from shardwise.errors import PlanError
from shardwise.frontend.trace import trace
from shardwise.ir.plan import ExecutionPlan
from shardwise.planner.auto import plan_auto
from shardwise.planner.collectives import SYNTHESIZED_COLLECTIVES
from shardwise.zoo import build_model


@pytest.fixture(scope="module")
def graph():
    model, inputs = build_model(
        "gpt2", device="meta", layers=1, hidden=1024, heads=8, vocab=512, seq=1024, batch=2
    )
    return trace(model, inputs)[0]


def _collectives(plan: ExecutionPlan):
    return [r for s in plan.strategies for r in s.redistributes if r.collective in SYNTHESIZED_COLLECTIVES]


def test_synthesized_collectives_replace_slower_library_ones(graph, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("SHARDWISE_CACHE_DIR", str(tmp_path))
    cluster = get_cluster("ndv2")  # one NDv2 node: the NVLink hybrid cube-mesh, where rings are uneven
    library = plan_auto(graph, cluster, constraints={"tp": 8, "sp": 1})
    synth = plan_auto(graph, cluster, constraints={"tp": 8, "sp": 1}, collectives="synthesize")
    before, after = _collectives(library), _collectives(synth)
    assert before and len(before) == len(after)
    assert all(r.algorithm == "library:ring" for r in before)
    chosen = [b for b in after if b.algorithm.startswith("synth:")]
    assert chosen, [b.algorithm for b in after]
    for a, b in zip(before, after, strict=True):
        assert (a.value, a.collective, a.nbytes) == (b.value, b.collective, b.nbytes)
        assert b.time_s <= a.time_s
        if b.algorithm.startswith("synth:"):
            assert b.time_s < a.time_s
        else:
            assert b.algorithm.startswith("library:") and b.time_s == a.time_s
    saved = sum(a.time_s - b.time_s for a, b in zip(before, after, strict=True))
    assert synth.predicted.step_time_s == pytest.approx(library.predicted.step_time_s - saved)
    assert any(n.startswith("collectives:") for n in synth.notes)
    # every chosen schedule's point-to-point program is in the plan, for the generated program to run
    programs = dict(synth.collective_programs)
    assert set(programs) == {b.algorithm for b in chosen}
    for b in chosen:
        program = json.loads(programs[b.algorithm])
        assert (program["format"], program["collective"], program["nranks"]) == (
            "shardwise.collective.v1", b.collective, 8,
        )  # fmt: skip
    assert library.collective_programs == ()
    # the choice survives the plan file
    again = ExecutionPlan.from_json(synth.to_json())
    assert [r.algorithm for r in _collectives(again)] == [r.algorithm for r in after]
    assert again.collective_programs == synth.collective_programs


def test_unknown_collectives_policy_is_refused(graph):
    with pytest.raises(PlanError, match="collectives="):
        plan_auto(graph, get_cluster("ndv2"), collectives="fastest")
