"""The backward pass and recomputation, one rule each.

**Backward.** An op whose output needs a gradient runs its backward once per step. Its work is its forward
work times the factor of its cost class, at the class's achieved rate:

* ``gemm``: 2x the forward FLOPs (the gradient of each operand is one matmul of the forward's size), two kernels;
* ``attention``: 2.5x the forward FLOPs at ``efficiency.attention_backward`` (the FlashAttention-2 convention:
  the backward recomputes the attention matrix; Dao, 2023), one kernel;
* ``memory``: 2x the forward bytes (read the output's gradient and what was saved, write the input's
  gradient), one kernel;
* ``free`` (views): no device work; where the host dispatches every op (a CPU process) one launch.

**Recomputation.** A recomputed op runs its forward once more in the backward: its price is its forward
price, overhead included. Nothing else is charged for recomputation (the kept inputs are already priced as
memory by the memory map).
"""

from __future__ import annotations

from shardwise.costs.compute import ComputePrices, OpWork

__all__ = ["BACKWARD_FACTOR", "BACKWARD_KERNELS", "backward_s", "recompute_s"]

#: backward work over forward work, by cost class (see the module docstring)
BACKWARD_FACTOR = {"gemm": 2.0, "attention": 2.5, "memory": 2.0, "free": 0.0}
#: kernels one backward launches, by cost class
BACKWARD_KERNELS = {"gemm": 2, "attention": 1, "memory": 1, "free": 1}


def backward_s(prices: ComputePrices, work: OpWork) -> float:
    """One op's backward on one device (see the module docstring)."""
    cls = work.cost_class
    factor = BACKWARD_FACTOR[cls]
    if cls == "free":
        return 0.0 if prices.efficiency.overhead_hidden else prices.efficiency.op_overhead_s
    if cls == "memory":
        device = prices.byte_s(factor * work.bytes)
    else:
        device = max(prices.flop_s(factor * work.flops, cls, backward=True), prices.byte_s(factor * work.bytes))
    return prices.with_overhead(device, BACKWARD_KERNELS[cls])


def recompute_s(prices: ComputePrices, work: OpWork) -> float:
    """One op's recomputation in the backward: its forward once more."""
    return prices.forward_s(work)
