"""What a device and its libraries achieve of the peak figures: cluster data, each figure with its source.

A :class:`DeviceSpec` holds peak FLOP/s and bandwidths; real kernels and collective libraries reach a stable
fraction of those peaks and pay a fixed cost per call. The price list (``shardwise.costs``) multiplies the
peaks by these fractions and adds these overheads; nothing else in shardwise knows them. Presets fill them from
independent published measurements (never fitted to a training throughput we compare against), and
``shardwise calibrate`` measures them on the machine it runs on. A figure nobody measured stays at its neutral
value (fraction 1.0, overhead 0.0), and its source says so.

Fields:

- ``gemm``: large dense matrix multiplications (linear layers, batched matmuls, convolutions), achieved / peak
  FLOP/s;
- ``attention_forward`` / ``attention_backward``: fused attention kernels (``scaled_dot_product_attention``),
  achieved / peak on the kernel's own FLOP count;
- ``memory``: streaming (memory-bound) kernels, achieved / peak memory bandwidth;
- ``intra_node`` / ``inter_node``: collective bus bandwidth achieved by the library over the links inside a
  node / across nodes, as a fraction of the link bandwidth;
- ``op_overhead_s``: the fixed cost of launching one kernel (the framework's dispatch on the host); with
  ``overhead_hidden`` the host runs ahead of the device (CUDA streams), so an op takes the larger of its
  device time and this overhead, otherwise (a CPU process computing its own ops) the sum;
- ``collective_overhead_s``: the fixed cost of one collective call beyond the links' latency (the library's
  own bookkeeping: gloo's per-call work, NCCL's launch);
- ``fused_kernels``: fused groups run as one kernel (Triton on CUDA); on CPUs the generated program runs a
  fused group's ops one by one, so fusion saves nothing there;
- ``sources``: ``(field, where the figure comes from)`` pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

from shardwise.cluster.checks import check_nonnegative, check_positive, fail

__all__ = ["Efficiency", "EFFICIENCY_FIELDS", "PEAK"]

EFFICIENCY_FIELDS = (
    "gemm", "attention_forward", "attention_backward", "memory", "intra_node", "inter_node", "op_overhead_s",
    "collective_overhead_s", "overhead_hidden", "fused_kernels",
)  # fmt: skip
_FRACTIONS = ("gemm", "attention_forward", "attention_backward", "memory", "intra_node", "inter_node")
_SECONDS = ("op_overhead_s", "collective_overhead_s")
_FLAGS = ("overhead_hidden", "fused_kernels")


@dataclass(frozen=True)
class Efficiency:
    """Achieved fractions of the peaks and fixed overheads of one device kind (see the module docstring).

    Invariants: fractions are in (0, 1]; overheads are >= 0 seconds; ``sources`` names only known fields,
    each once.
    """

    gemm: float = 1.0
    attention_forward: float = 1.0
    attention_backward: float = 1.0
    memory: float = 1.0
    intra_node: float = 1.0
    inter_node: float = 1.0
    op_overhead_s: float = 0.0
    collective_overhead_s: float = 0.0
    overhead_hidden: bool = True
    fused_kernels: bool = True
    sources: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        for name in _FRACTIONS:
            value = check_positive(f"efficiency.{name}", getattr(self, name), "a fraction of the peak")
            if value > 1.0:
                raise fail(f"efficiency.{name}", value, "must be a fraction of the peak in (0, 1]")
        for name in _SECONDS:
            check_nonnegative(f"efficiency.{name}", getattr(self, name), "seconds")
        for name in _FLAGS:
            if not isinstance(getattr(self, name), bool):
                raise fail(f"efficiency.{name}", getattr(self, name), "must be true or false")
        seen: set[str] = set()
        for entry in self.sources:
            if not (isinstance(entry, tuple) and len(entry) == 2 and all(isinstance(x, str) for x in entry)):
                raise fail("efficiency.sources", entry, "must be (field, source) pairs of strings")
            if entry[0] not in EFFICIENCY_FIELDS or entry[0] in seen:
                raise fail(
                    "efficiency.sources", entry[0], "must name each of " + ", ".join(EFFICIENCY_FIELDS) + " once"
                )
            seen.add(entry[0])

    def source(self, name: str) -> str:
        """Where ``name``'s figure comes from ("not measured: neutral value" when nobody said)."""
        return dict(self.sources).get(name, "not measured: neutral value")


#: Peak figures, no overheads: the plain roofline (a device nobody measured).
PEAK = Efficiency()
