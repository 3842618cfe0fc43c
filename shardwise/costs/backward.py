"""The backward pass and recomputation, one rule each.

**Backward.** An op whose output needs a gradient runs its backward once per step. Its work is its forward
work times the factor of its cost class, at the class's achieved rate:

* ``gemm``: 2x the forward FLOPs (the gradient of each operand is one matmul of the forward's size), two kernels
  (each with the matmul's fixed cost ``efficiency.gemm_overhead_s``); a float8 linear layer also casts its
  output's gradient and its weight's transposed copy (``compute.FLOAT8_CAST_BYTES``, at the memory's bandwidth);
* ``attention``: 2.5x the forward FLOPs at ``efficiency.attention_backward`` (the FlashAttention-2 convention:
  the backward recomputes the attention matrix; Dao, 2023), one kernel;
* ``memory``: 2x the forward bytes (read the output's gradient and what was saved, write the input's
  gradient), one kernel; a math op the device measured (``efficiency.elementwise_s``) takes the larger of
  that and its elements times its measured backward seconds per element;
* ``free`` (views): no device work; where the host dispatches every op (a CPU process) one launch.

**Fused groups.** Where a program runs a fused group's backward as one kernel too (torch.compile's
AOTAutograd and Inductor, Megatron-LM's fused softmax, bias-GeLU and layer-norm kernels), that kernel reads the
gradients of the group's outputs and what it saved, and writes the gradients of its inputs: the memory class's
rule applied to the kernel, twice the group's forward boundary bytes (and its members' backward FLOPs), one
launch (:func:`group_backward_s`). shardwise's own generated programs differentiate a group's eager ops, so
their groups keep the per-op rule; on devices that run groups op by op (CPUs) a group is always its ops.

Each backward kernel costs the host ``efficiency.backward_op_overhead_s`` (the autograd engine running one
node of the backward graph; hidden, like the forward's launches, where the host runs ahead of the device).

**Recomputation.** A recomputed op runs its forward once more in the backward: its price is its forward
price, overhead included (a recomputed fused group: the group's kernel once more). Nothing else is charged for
recomputation (the kept inputs are already priced as memory by the memory map).
"""

from __future__ import annotations

from shardwise.costs.compute import ComputePrices, OpWork

__all__ = ["BACKWARD_FACTOR", "BACKWARD_KERNELS", "backward_s", "recompute_s", "group_backward_s"]

#: backward work over forward work, by cost class (see the module docstring)
BACKWARD_FACTOR = {"gemm": 2.0, "attention": 2.5, "memory": 2.0, "free": 0.0}
#: kernels one backward launches, by cost class
BACKWARD_KERNELS = {"gemm": 2, "attention": 1, "memory": 1, "free": 1}


def backward_s(prices: ComputePrices, work: OpWork) -> float:
    """One op's backward on one device (see the module docstring)."""
    cls = work.cost_class
    factor = BACKWARD_FACTOR[cls]
    eff = prices.efficiency
    overhead = eff.backward_op_overhead_s
    if cls == "free":
        return 0.0 if eff.overhead_hidden else overhead
    if cls == "memory":
        device = max(prices.byte_s(factor * work.bytes), prices.math_s(work, backward=True))
    else:
        device = max(
            prices.flop_s(factor * work.flops, cls, backward=True, float8=work.float8), prices.byte_s(factor * work.bytes)
        )
        if cls == "gemm" and not eff.overhead_hidden:
            device += BACKWARD_KERNELS[cls] * eff.gemm_overhead_s
        device += prices.cast_s(work, backward=True)  # a float8 linear layer's casts of the output's gradient
    return prices.with_overhead(device, BACKWARD_KERNELS[cls], overhead)


def recompute_s(prices: ComputePrices, work: OpWork) -> float:
    """One op's recomputation in the backward: its forward once more."""
    return prices.forward_s(work)


def group_backward_s(prices: ComputePrices, works: list[OpWork], boundary_bytes: float) -> float:
    """The backward of a fused group run as one kernel whose forward moved ``boundary_bytes`` (see the module
    docstring); the sum of its ops' backwards where the device runs groups op by op."""
    if not prices.efficiency.fused_kernels:
        return sum(backward_s(prices, w) for w in works)
    flop_s = sum(
        prices.flop_s(BACKWARD_FACTOR[w.cost_class] * w.flops, w.cost_class, backward=True, float8=w.float8)
        for w in works
        if w.cost_class != "free"
    )
    backward = prices.byte_s(BACKWARD_FACTOR["memory"] * boundary_bytes)
    casts = sum(prices.cast_s(w, backward=True) for w in works)
    return prices.with_overhead(max(flop_s, backward) + casts, 1, prices.efficiency.backward_op_overhead_s)
