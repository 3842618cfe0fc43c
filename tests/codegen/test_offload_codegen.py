"""Generated programs apply ExecutionPlan.tiers (planning only, GPT-2 4 layers dp=2 on cpu:2): optimizer state
on the host switches the program to C.HostOptimizer, each offloaded layer's statements run under
torch.autograd.graph.save_on_cpu (the recomputed ones under checkpoint instead), and a plan without tiers
generates neither. The numerics are checked on gloo processes in tests/e2e/test_offload_equals_eager.py."""

from __future__ import annotations

import shardwise
from shardwise.cluster import get_cluster
from shardwise.codegen.emit import render_program
from shardwise.codegen.offload import host_activation_ranges, offloads_optimizer
from shardwise.passes.offload import Tiers, apply_offload, choose_offload, offload_candidates
from shardwise.passes.remat import problem_of
from shardwise.testing.program_text import layers_running
from shardwise.zoo import build_model


def test_tiers_are_generated():
    model, inputs = build_model("gpt2", device="meta", layers=4, seq=64, batch=8)
    plan = shardwise.compile(
        model, "cpu:2", example_inputs=inputs, mode="train", loss_fn=lambda o: o.logits.float().sin().mean(),
        constraints={"dp": 2},
    ).plan  # fmt: skip
    spec = get_cluster("cpu:2")
    plain = render_program(plan, version="test", plan_id="test")
    assert "OFFLOAD_OPTIMIZER = False" in plain and "save_on_cpu" not in plain and not offloads_optimizer(plan)
    both = apply_offload(plan, choose_offload(plan, spec, tiers=(Tiers(True, False, True),), recompute=False), spec)
    assert offloads_optimizer(both) and len(host_activation_ranges(both)) == 4
    source = render_program(both, version="test", plan_id="test")
    compile(source, "program.py", "exec")
    assert "OFFLOAD_OPTIMIZER = True" in source and layers_running(source, "torch.autograd.graph.save_on_cpu(") == 4
    # with two layers recomputed, only the other two can keep their activations on the host
    _, problem = problem_of(plan)
    mixed = [c for c in offload_candidates(
        plan, spec, tiers=(Tiers(activations=True),)) if len(c.units) == 2]  # fmt: skip
    assert mixed and len(problem.units) == 4
    applied = apply_offload(plan, mixed[0], spec)
    source = render_program(applied, version="test", plan_id="test")
    compile(source, "program.py", "exec")
    assert layers_running(source, "torch.utils.checkpoint.checkpoint(") == 2
    assert layers_running(source, "torch.autograd.graph.save_on_cpu(") == 2 == len(applied.tiers)
