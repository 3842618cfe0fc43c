"""Fused kernels: each of a plan's fused groups becomes a Triton kernel (from jinja2 templates) and its
eager PyTorch equivalent, written into the generated package as ``kernels.py``."""

from __future__ import annotations

from shardwise.codegen.kernels.lower import LOWERED_OPS, lower_node
from shardwise.codegen.kernels.render import MAX_ROW, POINTWISE_BLOCK, render_kernels

__all__ = ["render_kernels", "LOWERED_OPS", "lower_node", "POINTWISE_BLOCK", "MAX_ROW"]
