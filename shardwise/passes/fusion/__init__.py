"""Operator fusion: group each rank's chains of elementwise ops and row-wise reduction epilogues (bias +
activation, residual add + normalization, softmax pieces, dropout, casts) into kernels.

``fuse_plan(plan)`` records the groups in ``plan.fused_groups``; codegen turns each into a Triton kernel
plus its eager PyTorch equivalent (``shardwise.codegen.kernels``).
"""

from __future__ import annotations

from shardwise.passes.fusion.greedy import (
    PASS_NAME,
    FusionOptions,
    FusionResult,
    FusionStats,
    fuse,
    fuse_plan,
    fusion_stats,
)
from shardwise.passes.fusion.groups import GroupShape, analyze
from shardwise.passes.fusion.ops import POINTWISE_OPS, REDUCE_OPS, ROW_OPS, role_of

__all__ = [
    "PASS_NAME", "FusionOptions", "FusionResult", "FusionStats", "fuse", "fuse_plan", "fusion_stats",
    "GroupShape", "analyze", "POINTWISE_OPS", "REDUCE_OPS", "ROW_OPS", "role_of",
]  # fmt: skip
