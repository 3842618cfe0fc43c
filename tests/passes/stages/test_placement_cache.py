"""Chunks of the same structure share one placement and one fusion (names mapped), equal to placing and fusing
each on its own (passes.stages.place.place_chunk's cache, planner.pipeline's fusion reuse)."""

from __future__ import annotations

import pytest

from shardwise.cluster import get_cluster
from shardwise.frontend.trace import trace
from shardwise.passes.stages import chunk_owner, extract_chunks, layer_units
from shardwise.passes.stages.place import structure_key
from shardwise.planner.pipeline import _chunk_plan
from shardwise.planner.search import Candidate
from shardwise.zoo import build_model


@pytest.mark.parametrize("tp", [1, 2])
def test_a_repeated_chunk_takes_the_placement_and_kernels_it_would_get(tp: int) -> None:
    model, inputs = build_model("gpt2", layers=6)
    model.train()
    graph, _ = trace(model, inputs, loss_fn=lambda o: o.logits.float().mean())
    units = layer_units(graph)
    n = len(units)
    bounds = [(0, 2), (2, 4), (4, 6), (6, n)]  # embeddings + 1 layer, 2 layers, 2 layers, the rest
    chunks = extract_chunks(graph, chunk_owner(units.nodes, bounds), len(bounds)).graphs
    assert structure_key(chunks[1]) == structure_key(chunks[2]) != structure_key(chunks[0])
    cluster = get_cluster("cpu:2")
    cand = Candidate(pp=4, dp=1, tp=tp, sp=False, microbatch=1, microbatches=1, schedule="1f1b", virtual=1,
                     recompute="none", bounds=tuple(bounds), step_s=0.0, compute_s=0.0, comm_s=0.0, bubble_s=0.0,
                     memory_bytes=(), fits=True, simulated=False)  # fmt: skip
    kw = {"mode": "train", "precision": "fp32", "optimizer": "adamw", "fusion": True}
    shared: dict = {}
    first = _chunk_plan(chunks[1], cluster, cand, placements=shared, **kw)
    reused = _chunk_plan(chunks[2], cluster, cand, placements=shared, **kw)
    alone = _chunk_plan(chunks[2], cluster, cand, placements={}, **kw)
    assert reused.graph.nodes == alone.graph.nodes and reused.graph.params == alone.graph.params
    assert reused.strategies == alone.strategies
    assert reused.param_placements == alone.param_placements and reused.input_placements == alone.input_placements
    assert reused.fused_groups == alone.fused_groups and reused.passes == alone.passes
    assert len(first.fused_groups) == len(reused.fused_groups) > 0
    assert [n.name for n in reused.graph.nodes] != [n.name for n in first.graph.nodes]  # other layers, other names
