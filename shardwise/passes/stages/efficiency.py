"""Achievable fractions of a device's peak figures, from independent published measurements.

The roofline of ``passes.cost`` divides by *peak* FLOP/s and bandwidth; real kernels and collective libraries
reach a stable fraction of those peaks. The whole-plan cost model multiplies the peaks by the fractions
below. Each figure comes from a measurement published independently of the systems we compare against (never
fitted to a training throughput), and the source is named next to it. Devices with no published figure use
1.0 (the plain roofline), so CPU process clusters keep their calibrated numbers.

The fractions:

- ``gemm``: large dense matrix multiplications (linear layers, batched matmuls), achieved / peak FLOP/s;
- ``attention_forward`` / ``attention_backward``: fused attention kernels (``scaled_dot_product_attention``,
  FlashAttention-2 on A100), achieved / peak on the kernel's own FLOP count (the backward recomputes the
  attention matrix: 2.5x the forward FLOPs, FlashAttention-2's convention);
- ``memory``: streaming (memory-bound) kernels, achieved / peak memory bandwidth;
- ``intra_node`` / ``inter_node``: collective bus bandwidth achieved by NCCL / the link (NVLink/NVSwitch) or
  NIC (InfiniBand) bandwidth, for rings inside one node and rings across nodes.
"""

from __future__ import annotations

from dataclasses import dataclass

from shardwise.cluster import ClusterSpec

__all__ = ["Efficiency", "efficiency_for", "PEAK", "ATTENTION_BACKWARD_FLOPS"]

# FlashAttention-2 (Dao, 2023) counts the backward pass as 2.5x the forward FLOPs (it recomputes S = QK^T).
ATTENTION_BACKWARD_FLOPS = 2.5


@dataclass(frozen=True)
class Efficiency:
    gemm: float = 1.0
    attention_forward: float = 1.0
    attention_backward: float = 1.0
    memory: float = 1.0
    intra_node: float = 1.0
    inter_node: float = 1.0
    source: str = "peak figures (no published efficiency for this device)"


PEAK = Efficiency()

_A100 = Efficiency(
    # Bekman, "Machine Learning Engineering", Maximum Achievable Matmul FLOPS table (mamf-finder, v2):
    # A100 SXM bf16 271.2 of 312 TFLOP/s (86.9 %).
    gemm=271.2 / 312.0,
    # Dao, "FlashAttention-2" (2023), A100 benchmarks: forward pass up to 73 % and backward pass up to 63 % of
    # the theoretical maximum FLOP/s (abstract: 50-73 % overall).
    attention_forward=0.73,
    attention_backward=0.63,
    # mli/transformers-benchmarks issue #4: A800 80GB (the A100 die and HBM2e) copy bandwidth 1727 GB/s of
    # the 1935 GB/s theoretical (89 %).
    memory=1727.0 / 1935.0,
    # NVIDIA/nccl-tests issue #175: 8x A100 SXM, all_reduce_perf bus bandwidth 232.5 GB/s on one node (of the
    # 300 GB/s NVLink3 per GPU and direction, 77.5 %); between two nodes with 4x 200 Gb/s HDR each, 86 GB/s
    # of the 100 GB/s the NICs carry (86 %).
    intra_node=232.5 / 300.0,
    inter_node=86.0 / 100.0,
    source="A100: mamf-finder GEMM, FlashAttention-2, A800 copy bandwidth, nccl-tests on 8x A100 / 2 nodes",
)

_H100 = Efficiency(
    # Bekman, Maximum Achievable Matmul FLOPS table (v2): H100 SXM bf16 794.5 of 989 TFLOP/s (80.3 %).
    gemm=794.5 / 989.0,
    source="H100: mamf-finder GEMM only (other fractions: peak)",
)

_BY_KIND = {"A100-SXM4-80GB": _A100, "A100-SXM4-40GB": _A100, "H100-SXM5-80GB": _H100}


def efficiency_for(cluster: ClusterSpec) -> Efficiency:
    """The published efficiencies of the cluster's device kind, or :data:`PEAK` when none are known."""
    return _BY_KIND.get(cluster.device.kind, PEAK)
