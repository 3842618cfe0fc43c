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
- ``attention_forward_full``: the forward of a fused attention call without a mask (every block of the score
  matrix computed), where it is published apart from ``attention_forward`` (a causal call's); 0: as
  ``attention_forward``;
- ``memory``: streaming (memory-bound) kernels, achieved / peak memory bandwidth;
- ``intra_node`` / ``inter_node``: collective bus bandwidth achieved by the library over the links inside a
  node / across nodes, as a fraction of the link bandwidth;
- ``op_overhead_s``: the fixed cost of launching one kernel (the framework's dispatch on the host); with
  ``overhead_hidden`` the host runs ahead of the device (CUDA streams), so an op takes the larger of its
  device time and this overhead, otherwise (a CPU process computing its own ops) the sum;
- ``view_overhead_s``: the host's cost of one view (no kernel: the dispatch only) where the host dispatches
  every op (not ``overhead_hidden``); 0: ``op_overhead_s``;
- ``record_overhead_s``: what autograd adds to that cost for an op it records (a training forward);
- ``backward_op_overhead_s``: the fixed cost of one node of the backward as the autograd engine runs it
  (hidden like ``op_overhead_s`` when ``overhead_hidden``);
- ``gemm_overhead_s``: a matmul's fixed cost beyond ``op_overhead_s`` (packing, blocking: how the achieved
  rate falls for small matmuls);
- ``attention_overhead_s``: a fused attention call's fixed cost beyond ``op_overhead_s`` (on CPUs its
  blocking, buffers and threads' set-up: what a decode step's tiny attention call costs), where the host
  computes its own ops;
- ``kernel_overhead_s``: ``(op, seconds)`` the fixed cost of one kernel of a memory-bound op kind beyond
  ``op_overhead_s`` (ATen base names as the price list names them: ``layer_norm``, ``index_copy``, ``mean``,
  ...), or of a matmul kind beyond a plain mm's (``addmm``, ``linear``: ``gemm_overhead_s`` prices the mm's), where the host computes its own ops: a kernel's set-up that its bytes do not account for (a norm's
  row loop, an indexed write's index checks, a reduction's iterator); ops not listed pay ``op_overhead_s``
  alone. A fused kernel (``fused_kernels``) is one launch of its own and pays ``op_overhead_s`` once, none
  of these;
- ``parallel_overhead_s``: what a memory-bound op of at least ``PARALLEL_GRAIN`` elements pays beyond
  ``kernel_overhead_s`` in a process computing on several intra-op threads, where the framework splits it over
  them (waking the pool's threads and joining them: on a virtual machine whose idle cores sleep, tens of
  microseconds); 0 for one-thread processes and where nobody measured it;
- ``cache_bytes`` / ``cache_bandwidth``: an op whose bytes (read and written) fit in ``cache_bytes`` streams
  at ``cache_bandwidth`` bytes/s instead of the memory's (0: no such level is known);
- ``elementwise_s``: ``(op, forward, backward)`` seconds per element of math ops whose work per element
  exceeds streaming on this device (ATen base names: ``tanh``, ``exp``, ``layer_norm``, ...); such an op
  takes the larger of that and its bytes' time;
- ``optimizer_s``: ``(optimizer, seconds per step, per parameter tensor, per element)`` of a step as the
  framework runs it; optimizers not listed are priced by their memory traffic and kernel launches;
- ``collective_overhead_s``: the fixed cost of one collective call beyond the links' latency (the library's
  own bookkeeping: gloo's per-call work, NCCL's launch);
- ``object_overhead_s`` / ``object_byte_s``: gathering a Python object holding tensors (pickled) to one
  rank: a fixed cost and seconds per byte of its tensors (a pipeline's inference hands rank 0 its outputs so);
- ``comm_overlap``: the fraction of a collective's time hidden behind computation when it runs
  asynchronously beside it (1: NCCL on its own stream; gloo on busy CPU cores hides less);
- ``fused_kernels``: fused groups run as one kernel (Triton on CUDA); on CPUs the generated program runs a
  fused group's ops one by one, so fusion saves nothing there;
- ``sources``: ``(field, where the figure comes from)`` pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

from shardwise.cluster.checks import check_nonnegative, check_positive, fail

__all__ = ["Efficiency", "EFFICIENCY_FIELDS", "PEAK", "PARALLEL_GRAIN"]

#: elements from which PyTorch's CPU kernels split an elementwise op over the intra-op threads
#: (``at::internal::GRAIN_SIZE``, aten/src/ATen/TensorIterator.h; ``TensorIteratorBase::for_each`` runs serially
#: below it)
PARALLEL_GRAIN = 32768

EFFICIENCY_FIELDS = (
    "gemm", "attention_forward", "attention_backward", "attention_forward_full", "memory", "intra_node",
    "inter_node", "op_overhead_s", "view_overhead_s", "record_overhead_s", "backward_op_overhead_s",
    "gemm_overhead_s", "cache_bytes", "cache_bandwidth", "elementwise_s", "optimizer_s", "collective_overhead_s",
    "object_overhead_s", "object_byte_s", "comm_overlap", "overhead_hidden", "fused_kernels",
    "attention_overhead_s", "kernel_overhead_s", "parallel_overhead_s",
)  # fmt: skip
_FRACTIONS = ("gemm", "attention_forward", "attention_backward", "memory", "intra_node", "inter_node")
_SECONDS = (
    "op_overhead_s", "view_overhead_s", "record_overhead_s", "backward_op_overhead_s", "gemm_overhead_s", "collective_overhead_s",
    "object_overhead_s", "object_byte_s", "attention_overhead_s", "parallel_overhead_s",
)  # fmt: skip
_AMOUNTS = ("cache_bytes", "cache_bandwidth")  # bytes, bytes/s: >= 0 (0: unknown)
_TABLES = {"elementwise_s": 3, "optimizer_s": 4, "kernel_overhead_s": 2}  # (name, figure, ...) rows of these widths
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
    attention_forward_full: float = 0.0  # 0: as attention_forward
    memory: float = 1.0
    intra_node: float = 1.0
    inter_node: float = 1.0
    op_overhead_s: float = 0.0
    view_overhead_s: float = 0.0
    record_overhead_s: float = 0.0
    backward_op_overhead_s: float = 0.0
    gemm_overhead_s: float = 0.0
    attention_overhead_s: float = 0.0
    cache_bytes: float = 0.0
    cache_bandwidth: float = 0.0
    elementwise_s: tuple[tuple[str, float, float], ...] = ()
    optimizer_s: tuple[tuple[str, float, float, float], ...] = ()
    kernel_overhead_s: tuple[tuple[str, float], ...] = ()
    parallel_overhead_s: float = 0.0
    collective_overhead_s: float = 0.0
    object_overhead_s: float = 0.0
    object_byte_s: float = 0.0
    comm_overlap: float = 1.0
    overhead_hidden: bool = True
    fused_kernels: bool = True
    sources: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        for name in _FRACTIONS:
            value = check_positive(f"efficiency.{name}", getattr(self, name), "a fraction of the peak")
            if value > 1.0:
                raise fail(f"efficiency.{name}", value, "must be a fraction of the peak in (0, 1]")
        full = check_nonnegative("efficiency.attention_forward_full", self.attention_forward_full, "a fraction")
        if full > 1.0:
            raise fail("efficiency.attention_forward_full", full, "must be a fraction of the peak in (0, 1] (0: as "
                       "attention_forward)")  # fmt: skip
        for name in _SECONDS:
            check_nonnegative(f"efficiency.{name}", getattr(self, name), "seconds")
        for name in _AMOUNTS:
            check_nonnegative(f"efficiency.{name}", getattr(self, name), "a figure >= 0 (0: unknown)")
        overlap = check_nonnegative("efficiency.comm_overlap", self.comm_overlap, "a fraction")
        if overlap > 1.0:
            raise fail("efficiency.comm_overlap", overlap, "must be a fraction in [0, 1]")
        for name, width in _TABLES.items():
            rows = getattr(self, name)
            if not isinstance(rows, tuple):
                raise fail(f"efficiency.{name}", rows, f"must be a tuple of (name, {width - 1} figures) rows")
            names = set()
            for row in rows:
                if not (isinstance(row, tuple) and len(row) == width and isinstance(row[0], str)):
                    raise fail(f"efficiency.{name}", row, f"must be a (name, {width - 1} figures) row")
                if row[0] in names:
                    raise fail(f"efficiency.{name}", row[0], "must appear once")
                names.add(row[0])
                for value in row[1:]:
                    check_nonnegative(f"efficiency.{name}.{row[0]}", value, "seconds")
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

    def elementwise(self, op: str) -> tuple[float, float] | None:
        """(forward, backward) seconds per element of math op ``op`` (ATen base name), if measured."""
        for row in self.elementwise_s:
            if row[0] == op:
                return row[1], row[2]
        return None

    def kernel_overhead(self, op: str) -> float:
        """The fixed cost of one kernel of op kind ``op`` beyond ``op_overhead_s`` (0 when not measured)."""
        for row in self.kernel_overhead_s:
            if row[0] == op:
                return row[1]
        return 0.0

    def optimizer(self, name: str) -> tuple[float, float, float] | None:
        """(seconds per step, per parameter tensor, per element) of optimizer ``name``'s step, if measured."""
        for row in self.optimizer_s:
            if row[0] == name.lower():
                return row[1], row[2], row[3]
        return None

    def source(self, name: str) -> str:
        """Where ``name``'s figure comes from ("not measured: neutral value" when nobody said)."""
        return dict(self.sources).get(name, "not measured: neutral value")


#: Peak figures, no overheads: the plain roofline (a device nobody measured).
PEAK = Efficiency()
