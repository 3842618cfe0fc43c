"""Context parallelism with pipelines in the one search (issue 17, item 2): cp is offered on pipeline meshes where
the batch does not split over the replicas, as on flat ones; a pinned ``pp x cp`` layout is realized with every
chunk placed on its replica's ``cp x tp`` ranks, each attention over cp the way pinned, the chunk boundaries made
whole (the sending chunk all-gathers over cp); cp and ep are not both split in a pipeline (a clear error)."""

from __future__ import annotations

import pytest

import shardwise
from shardwise.cluster import get_cluster
from shardwise.costs.attention import way_of
from shardwise.errors import ConstraintError
from shardwise.frontend.trace import trace
from shardwise.planner.search import SearchOptions, search

pytest.importorskip("transformers")

from shardwise.zoo.hf import tiny_causal_lm  # noqa: E402


def _loss(out):  # noqa: ANN001, ANN202
    return out.logits.float().mean()


def test_the_search_offers_cp_on_pipelines_where_the_batch_does_not_split():
    model, inputs = tiny_causal_lm("llama", seq=64, batch=1)
    graph, _ = trace(model, inputs, loss_fn=_loss)
    result = search(graph, get_cluster("cpu:4"), {"pp": 2, "tp": 1, "recompute": "none"}, SearchOptions(mode="train"))
    with_cp = [c for c in result.ranked if c.cp == 2]
    assert with_cp and all(c.pp == 2 and c.dp == 1 for c in with_cp)
    assert {c.cp_attention for c in with_cp} <= {"allgather", "ulysses", "ring"}
    assert all(dict(c.cp_ways) for c in with_cp)  # every way priced


@pytest.mark.parametrize("way", ["ring", "allgather"])
def test_a_pinned_pipeline_with_cp_places_every_chunk_on_its_replicas_cp_ranks(way):
    model, inputs = tiny_causal_lm("llama", seq=64, batch=2)
    constraints = {"pp": 2, "cp": 2, "cp_attention": way, "microbatches": 2, "schedule": "1f1b"}
    cluster = get_cluster("cpu:4")
    with shardwise.compile(model, cluster, example_inputs=inputs, mode="train", loss_fn=_loss,
                           constraints=constraints) as cm:  # fmt: skip
        made = cm.plan
    spec = made.pipeline
    assert spec is not None and (spec.pp, spec.dp, spec.cp, spec.tp) == (2, 1, 2, 1)
    assert made.degrees["cp"] == 2 and made.mesh.axis_names == ("pp", "dp", "cp", "tp")
    for st in spec.stages:
        assert st.plan.mesh.axis_names == ("cp", "tp")
        assert st.plan.mesh.ranks == (2 * st.device_stage, 2 * st.device_stage + 1)  # its stage's ranks
        attention = [s for s in st.plan.strategies if s.node.startswith("scaled_dot_product_attention")]
        labels = [dict(s.split).get("cp") for s in attention]
        assert attention and all(label is not None and (way_of(label) or "allgather") == way for label in labels)
    first = next(s for s in spec.stages[0].plan.strategies if s.node == "<output>")
    assert any(r.collective.startswith("allgather") for r in first.redistributes)  # the boundary made whole
    assert any(n.startswith("context parallelism: cp=2 pinned; attention by " + way) for n in made.notes)


def test_cp_and_ep_together_in_a_pipeline_is_a_clear_error():
    model, inputs = tiny_causal_lm("mixtral", seq=64, batch=2)
    with pytest.raises(ConstraintError, match="split their sequence .cp. or their experts .ep., not both"):
        shardwise.compile(model, "cpu:8", example_inputs=inputs, mode="train", loss_fn=_loss,
                          constraints={"pp": 2, "cp": 2, "ep": 2})  # fmt: skip
