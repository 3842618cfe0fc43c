"""Rematerialization: which activations a rank recomputes in the backward instead of keeping them, under a
memory budget, and the recompute time that costs (issue 6).

``choose_recomputation(plan, budget_bytes)`` picks the layers of a flat training plan to run under
activation checkpointing (exact dynamic programming over the chain of layers, ``dp``; or a
Checkmate-style ILP, ``ilp``), measured and checked on the memory pass's buffers;
``apply_recomputation(plan, choice)`` records it in the plan, and codegen wraps those layers in
``torch.utils.checkpoint``. See docs/memory.md, "Rematerialization".
"""

from __future__ import annotations

from shardwise.passes.remat.build import RankStep, build_problem, rank_step
from shardwise.passes.remat.choose import (
    apply_recomputation,
    cheapest_recomputation,
    choose_recomputation,
    problem_of,
    recompute_all_layers,
)
from shardwise.passes.remat.dp import pareto_front, solve_chain
from shardwise.passes.remat.ilp import solve_ilp
from shardwise.passes.remat.peak import recompute_buffers, recompute_peak
from shardwise.passes.remat.problem import RematChoice, RematProblem, RematUnit, model_peak
from shardwise.passes.remat.segments import layer_segments, tensor_cut_segments

__all__ = [
    "RankStep", "RematChoice", "RematProblem", "RematUnit", "apply_recomputation", "build_problem",
    "cheapest_recomputation", "choose_recomputation", "layer_segments", "model_peak", "pareto_front",
    "problem_of", "rank_step", "recompute_all_layers", "recompute_buffers", "recompute_peak", "solve_chain",
    "solve_ilp", "tensor_cut_segments",
]  # fmt: skip
