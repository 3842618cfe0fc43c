"""Compute time of one op (or one fused group) on one device: the only place work becomes seconds.

An op's work on one device (:class:`OpWork`) is its FLOPs and the bytes it moves, divided by the number of
devices its split spreads it over (``ways``), with floating-point bytes counted at the precision's width (the
model is traced in float32; bf16/fp16 runs move half the bytes). Its *cost class* comes from the op registry:

* ``gemm`` (matmuls, convolutions): roofline with the FLOP side at ``peak x efficiency.gemm``, plus the
  matmul's own fixed cost ``efficiency.gemm_overhead_s`` (packing and blocking: how the achieved rate falls
  for small matmuls);
* ``attention`` (fused ``scaled_dot_product_attention``): FLOP side at ``peak x efficiency.attention_forward``,
  plus its fixed cost ``efficiency.attention_overhead_s`` where the host computes its own ops;
  a causal call (``is_causal=True``, no mask tensor) computes only the blocks on and below the diagonal: its
  device FLOPs are half the registry's count, the convention of the published fused-attention rates the
  efficiencies come from (FlashAttention's benchmarks count a causal call at half the FLOPs of a full one);
  a call with neither ``is_causal`` nor a mask tensor runs its forward at ``efficiency.attention_forward_full``
  where the cluster lists it (FlashAttention-2's rate without a mask is published apart from its causal one);
* ``memory`` (every other op that moves data: elementwise, norms, softmax, reductions, copies, losses): the
  bytes at the memory's bandwidth (``memory bandwidth x efficiency.memory``), or at
  ``efficiency.cache_bandwidth`` when they fit in ``efficiency.cache_bytes``; a math op the device measured
  (``efficiency.elementwise_s``: tanh, exp, layer_norm, ...) takes the larger of that and its elements
  times its measured seconds per element;
* ``free`` (views, getitem, size arithmetic): no device work.

**Float8 linear layers** (``precision="fp8"``): a linear layer's matmuls run at the float8 peak (``FLOAT8``),
and its operands are scaled and cast to float8 first by memory-bound kernels of their own, priced at the memory
bandwidth beside the matmul (``FLOAT8_CAST_BYTES``: torchao's tensorwise dynamic scaling as torchao models it
itself): the input and the weight in the forward, the output's gradient and the weight's transposed copy in the
backward; a recomputed forward casts again.

The roofline is ``max(flop time, byte time)``. Every op that runs a kernel then pays the device's fixed
cost of one kernel (:meth:`ComputePrices.kernel_overhead_s`, the one place it is added): the launch
``efficiency.op_overhead_s`` (plus ``efficiency.record_overhead_s`` when autograd records it, in a training
forward) and, for a memory-bound op whose kind the device measured a fixed cost of its own for
(``efficiency.kernel_overhead_s``: a norm's, an indexed write's, a reduction's set-up), that cost, and from
``PARALLEL_GRAIN`` elements on, in a process computing on several threads, their fork and join
(``efficiency.parallel_overhead_s``); added to
the roofline when the host computes its own ops (a CPU process), the larger of the two when the host runs
ahead of the device (``overhead_hidden``: CUDA). Matmuls and attention have their fixed costs in their
device time (``gemm_overhead_s``, ``attention_overhead_s``). Views cost the host their
dispatch (``efficiency.view_overhead_s``) where it dispatches them (a CPU process), nothing on a device that
runs ahead.

A fused group (``fused_kernels`` devices) is one kernel: its FLOPs, and only the bytes of its inputs and
outputs, and one kernel's fixed cost (the launch, once: none of its ops' kinds' own); where the device runs
fused groups op by op (CPUs), a group costs the sum of its ops, each paying its own.

**Widths.** A model traced in float32 runs its floating values at the precision's width (autocast: bf16/fp16
runs move 2-byte values, :func:`float_scale`). A model traced in a 16-bit float type (its trainable weights
are bf16/fp16, as under FSDP's or Megatron's mixed precision) states every value's width itself, float32
upcasts included (an RMSNorm computed in float32 moves 4-byte values): its bytes count as traced
(:func:`traced_scale`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from shardwise.cluster.efficiency import PARALLEL_GRAIN, Efficiency
from shardwise.cluster.spec import DeviceSpec
from shardwise.errors import PlanError
from shardwise.ir.graph import Graph, Node
from shardwise.ir.registry import rule_for, tensor_operands
from shardwise.ir.tensor import TensorSpec, dtype_bytes

__all__ = [
    "OpWork", "COST_CLASSES", "cost_class", "op_base", "op_work", "precision_dtype", "float_scale", "traced_scale",
    "wire_spec", "ComputePrices", "CAUSAL_FRACTION", "is_causal_attention", "is_unmasked_attention", "is_low", "LOW_PRECISIONS", "FLOAT8",
    "FLOAT8_CAST_BYTES",
]  # fmt: skip

COST_CLASSES = ("gemm", "attention", "memory", "free")
# "fp8": bf16 mixed precision whose matmuls run on float8 tensor cores (see FLOAT8 below)
_PRECISION_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp8": "bfloat16"}
#: precisions whose values travel and are stored in 16 bits (fp8: only the matmuls' operands are float8)
LOW_PRECISIONS = ("bf16", "fp16", "fp8")
#: the dtype whose peak the ``gemm`` cost class gets at ``precision="fp8"``: float8 matmuls with tensorwise
#: dynamic scaling as torchao's Float8Linear runs them (e4m3 forward operands; the backward's e5m2 gradients
#: run at the same peak on H100: NVIDIA H100 Tensor Core GPU datasheet, FP8 1,979 TFLOP/s dense for both)
FLOAT8 = "float8_e4m3fn"
#: modules whose linear layer stays in bf16 under fp8: the output head (transformers' ``lm_head``, torchtitan's
#: ``output``), as torchtitan's float8 converter (``module_filter_fn``: ``fqn != "output"``), torchtune and
#: DeepSeek-V3's FP8 recipe (technical report 3.3: embedding and output head in BF16) keep it
FLOAT8_EXEMPT = ("lm_head", "output")
_FLOAT = ("float", "bfloat")
_LOW = ("bfloat16", "float16")
#: bytes moved per element of a 16-bit operand by the scaling and casting kernels of a float8 linear layer, by
#: operand: torchao's Float8Linear with tensorwise dynamic scaling (torchtitan's float8 recipe in 2024), counted as
#: torchao's own roofline model counts them (``torchao/testing/float8/roofline_utils.py``,
#: ``get_tensor_memory_traffic_ovhd_s``, "tensorwise", no fusion with the previous op): an activation (the input
#: in the forward, the output's gradient in the backward) is read once for its max-abs and once more to be cast,
#: written as float8 twice (row- and column-major, for the two matmuls that read it): 2 + 2 + 2 x 1; the weight
#: is read for its max-abs and cast once for the forward (2 + 2 + 1) and once more for the backward (2 + 1)
FLOAT8_CAST_BYTES = {"input": 6.0, "weight_forward": 5.0, "grad_output": 6.0, "weight_backward": 3.0}
#: device FLOPs of a causal fused-attention call over the registry's (full) count (see the module docstring)
CAUSAL_FRACTION = 0.5


def precision_dtype(precision: str) -> str:
    """The dtype whose peak FLOP/s a run at ``precision`` gets ("bf16" -> "bfloat16")."""
    return _PRECISION_DTYPE.get(precision, "float32")


def is_low(precision: str) -> bool:
    """Whether ``precision`` runs floating values in 16 bits (bf16, fp16, and fp8: bf16 with float8 matmuls)."""
    return precision in LOW_PRECISIONS


def float_scale(precision: str) -> float:
    """Bytes of a floating-point element at ``precision`` over its traced (float32) bytes."""
    return 0.5 if is_low(precision) else 1.0


def traced_scale(graph: Graph, precision: str) -> float:
    """Bytes of ``graph``'s floating values at ``precision`` over their traced bytes (see the module docstring):
    the precision's width for a float32 trace, 1.0 for a graph traced with 16-bit trainable weights."""
    low = any(p.requires_grad and p.spec.dtype in _LOW for p in graph.params)
    return 1.0 if low else float_scale(precision)


def is_causal_attention(node: Node) -> bool:
    """A fused attention call with ``is_causal=True`` (and so no mask tensor)."""
    if cost_class(node.op) != "attention":
        return False
    causal = node.args[5] if len(node.args) > 5 else node.kwarg_dict.get("is_causal", False)
    return causal is True


def is_unmasked_attention(node: Node) -> bool:
    """A fused attention call with neither ``is_causal`` nor a mask tensor: every block of its scores computed
    (its forward at ``efficiency.attention_forward_full`` where the cluster lists it)."""
    return cost_class(node.op) == "attention" and not is_causal_attention(node) and len(tensor_operands(node)) <= 3


def wire_spec(spec: TensorSpec, precision: str) -> TensorSpec:
    """``spec`` as it travels at ``precision``: floats in bfloat16 under bf16/fp16 (the traced graph is float32)."""
    if is_low(precision) and spec.dtype.startswith(_FLOAT) and spec.dtype not in ("bfloat16", "float16"):
        return TensorSpec(spec.shape, "bfloat16")
    return spec


def op_base(op: str) -> str:
    """The ATen base name of an op ("aten.tanh.default" -> "tanh"; "aten.gelu.default" with
    approximate="tanh" is still "gelu": the caller refines it)."""
    parts = op.split(".")
    return parts[1] if len(parts) >= 2 and parts[0] == "aten" else op


def cost_class(op: str) -> str:
    """The op's cost class (see the module docstring), from the op registry's kind."""
    rule = rule_for(op)
    if rule is None:
        return "memory"  # an op we do not know runs whole, as a kernel that reads and writes its tensors
    if not rule.moves_data or rule.kind in ("scalar", "getitem"):
        return "free"
    if rule.kind in ("matmul", "conv"):
        return "gemm"
    if rule.kind == "attention":
        return "attention"
    return "memory"


@dataclass(frozen=True)
class OpWork:
    """One op's work on one device: FLOPs, bytes of activations and of parameters it moves, its cost class;
    ``op`` its ATen base name and ``elements`` its output elements (what a per-element price multiplies)."""

    cost_class: str
    flops: float
    activation_bytes: float
    param_bytes: float
    op: str = ""
    elements: float = 0.0
    float8: bool = False  # a linear layer run on float8 tensor cores (precision "fp8")
    # a float8 linear layer's casting kernels (``FLOAT8_CAST_BYTES``), bytes: (forward, backward) of its activations
    # (input / output gradient: they grow with the rows) and of its weight (they do not)
    cast_rows: tuple[float, float] = (0.0, 0.0)
    cast_weight: tuple[float, float] = (0.0, 0.0)
    unmasked: bool = False  # a fused attention call without a mask (:func:`is_unmasked_attention`)

    @property
    def bytes(self) -> float:
        return self.activation_bytes + self.param_bytes

    def cast_bytes(self, backward: bool = False) -> float:
        """Bytes the float8 casts of this op move in its forward (or backward); 0 for any other op."""
        i = 1 if backward else 0
        return self.cast_rows[i] + self.cast_weight[i]

    def scaled(self, factor: float) -> OpWork:
        """The same op on ``factor`` times the rows (FLOPs, activations and elements scale, parameters do not)."""
        rows = (self.cast_rows[0] * factor, self.cast_rows[1] * factor)
        return OpWork(self.cost_class, self.flops * factor, self.activation_bytes * factor, self.param_bytes,
                      self.op, self.elements * factor, self.float8, rows, self.cast_weight, self.unmasked)  # fmt: skip


def _math_name(node: Node) -> str:
    """The name a measured per-element price is listed under (``efficiency.elementwise_s``)."""
    base = op_base(node.op)
    if base in ("gelu", "gelu_") and node.kwarg_dict.get("approximate") == "tanh":
        return "gelu_tanh"
    if base in ("_softmax", "softmax", "_safe_softmax"):
        return "softmax"
    if base in ("_log_softmax",):
        return "log_softmax"
    if base in ("native_layer_norm",):
        return "layer_norm"
    return base.rstrip("_")


def op_work(
    node: Node, ways: int = 1, precision: str = "fp32", param_bytes: Mapping[str, int] | None = None,
    scale: float | None = None,
) -> OpWork:  # fmt: skip
    """``node``'s work on one of the ``ways`` devices its split spreads it over. ``param_bytes`` gives the
    bytes of the graph's parameter values by name: an op's reads of them are counted apart (they do not grow
    with the batch). ``scale``: bytes at this precision over traced bytes (:func:`traced_scale`; default: a
    float32 trace, :func:`float_scale`). A causal fused attention does ``CAUSAL_FRACTION`` of its FLOPs."""
    cls = cost_class(node.op)
    if cls == "free":
        return OpWork(cls, 0.0, 0.0, 0.0)
    if scale is None:
        scale = float_scale(precision)
    param = float(sum(param_bytes[v] for v in node.inputs if v in param_bytes)) if param_bytes else 0.0
    if node.in_place:  # a write into a buffer reads none of it: bytes_moved is what it writes (Node.in_place)
        param = 0.0
    activation = max(float(node.bytes_moved) - param, 0.0)
    flops = node.flops * (CAUSAL_FRACTION if is_causal_attention(node) else 1.0)
    elements = float(sum(o.numel for o in node.outputs if isinstance(o, TensorSpec)))
    float8 = precision == "fp8" and cls == "gemm" and param > 0 and not _exempt(node)
    rows = weight = (0.0, 0.0)
    if float8:
        rows, weight = _float8_casts(node, activation, param, elements)
    return OpWork(cls, flops / ways, activation * scale / ways, param * scale / ways, _math_name(node),
                  elements / ways, float8, (rows[0] / ways, rows[1] / ways),
                  (weight[0] / ways, weight[1] / ways), is_unmasked_attention(node))  # fmt: skip


def _float8_casts(
    node: Node, activation: float, param: float, out_elements: float
) -> tuple[tuple[float, float], tuple[float, float]]:
    """(forward, backward) bytes of a float8 linear layer's casts (``FLOAT8_CAST_BYTES``) of its activations and of
    its weight, from its traced bytes: the output's elements, the input's (the rest of its activation bytes), the
    weight's (its parameter bytes), each at its traced width."""
    out = next((o for o in node.outputs if isinstance(o, TensorSpec)), None)
    width = float(dtype_bytes(out.dtype)) if out is not None else 2.0
    in_elements = max(activation / width - out_elements, 0.0)
    c = FLOAT8_CAST_BYTES
    rows = (in_elements * c["input"], out_elements * c["grad_output"])
    w = param / width
    return rows, (w * c["weight_forward"], w * c["weight_backward"])


def _exempt(node: Node) -> bool:
    """A linear layer that stays in bf16 under fp8 (``FLOAT8_EXEMPT``)."""
    return node.module_path.rsplit(".", 1)[-1] in FLOAT8_EXEMPT


class ComputePrices:
    """Op and fused-group forward times on one device kind at one precision (see the module docstring)."""

    def __init__(self, device: DeviceSpec, efficiency: Efficiency, precision: str) -> None:
        self.device = device
        self.efficiency = efficiency
        self.precision = precision
        self.peak_flops = device.flops(precision_dtype(precision))
        # the matmuls' peak: float8's under fp8 (the device must list one), else the precision's
        self.gemm_peak = self.peak_flops
        if precision == "fp8":
            table = dict(device.peak_flops)
            if FLOAT8 not in table:
                raise PlanError(
                    f"precision='fp8' runs matmuls on float8 tensor cores, and {device.kind} lists no float8 peak "
                    f"(peak_flops.{FLOAT8} in its cluster spec): use precision='bf16', or a device with float8 "
                    "(H100, H800, ...)"
                )
            self.gemm_peak = table[FLOAT8]
        self.bandwidth = device.memory_bandwidth * efficiency.memory

    def flop_s(
        self, flops: float, cost_class: str, backward: bool = False, float8: bool = False, unmasked: bool = False
    ) -> float:
        """Seconds for ``flops`` at the achieved rate of ``cost_class`` (``float8``: a linear layer on float8
        tensor cores, at the float8 peak times the same achieved fraction as 16-bit matmuls; ``unmasked``: an
        attention forward without a mask, at ``attention_forward_full`` where the cluster lists it)."""
        eff = self.efficiency
        if cost_class == "gemm":
            return flops / ((self.gemm_peak if float8 else self.peak_flops) * eff.gemm)
        if cost_class == "attention":
            rate = eff.attention_backward if backward else eff.attention_forward
            if unmasked and not backward and eff.attention_forward_full:
                rate = eff.attention_forward_full
        else:
            rate = 1.0
        return flops / (self.peak_flops * rate)

    def byte_s(self, nbytes: float) -> float:
        """Seconds to stream ``nbytes`` (read and written): at the cache's bandwidth when they fit in it."""
        eff = self.efficiency
        if eff.cache_bytes > 0 and eff.cache_bandwidth > 0 and nbytes <= eff.cache_bytes:
            return nbytes / eff.cache_bandwidth
        return nbytes / self.bandwidth

    def op_overhead_s(self, recording: bool = False) -> float:
        """The host's fixed cost of one forward op (``recording``: autograd records it)."""
        eff = self.efficiency
        return eff.op_overhead_s + (eff.record_overhead_s if recording else 0.0)

    def kernel_overhead_s(self, work: OpWork, recording: bool = False) -> float:
        """The host's fixed cost of one kernel running ``work`` alone: the launch (:meth:`op_overhead_s`) and, for
        a memory-bound op or a matmul, its kind's own fixed cost (``efficiency.kernel_overhead_s``: a matmul kind's
        beyond a plain mm's, which ``gemm_overhead_s`` prices; 0 where not measured) and, for a memory-bound op
        of ``PARALLEL_GRAIN`` elements or more, the intra-op threads' fork and join (``parallel_overhead_s``)."""
        eff = self.efficiency
        fixed = 0.0
        if work.cost_class in ("memory", "gemm") and work.op:
            fixed = eff.kernel_overhead(work.op)
        if work.cost_class == "memory" and work.elements >= PARALLEL_GRAIN:  # split over the threads: fork and join
            fixed += eff.parallel_overhead_s
        return self.op_overhead_s(recording) + fixed

    def with_overhead(self, seconds: float, kernels: float = 1, overhead: float | None = None) -> float:
        """``seconds`` of device work run as ``kernels`` launches of ``overhead`` seconds each (by default
        ``efficiency.op_overhead_s``; see the module docstring)."""
        total = (self.efficiency.op_overhead_s if overhead is None else overhead) * kernels
        if self.efficiency.overhead_hidden:
            return max(seconds, total)
        return seconds + total

    def math_s(self, work: OpWork, backward: bool = False) -> float:
        """The measured per-element time of a math op's forward (or backward), 0 when not measured."""
        per = self.efficiency.elementwise(work.op) if work.op else None
        if per is None:
            return 0.0
        return work.elements * (per[1] if backward else per[0])

    def device_s(self, work: OpWork) -> float:
        """One op's forward device time, without the host's overhead."""
        if work.cost_class == "free":
            return 0.0
        if work.cost_class == "memory":
            return max(self.byte_s(work.bytes), self.math_s(work))
        flop_s = self.flop_s(work.flops, work.cost_class, float8=work.float8, unmasked=work.unmasked)
        device = max(flop_s, self.byte_s(work.bytes))
        if work.cost_class == "gemm" and not self.efficiency.overhead_hidden:
            device += self.efficiency.gemm_overhead_s
        if work.cost_class == "attention" and not self.efficiency.overhead_hidden:
            device += self.efficiency.attention_overhead_s
        return device + self.cast_s(work)

    def cast_s(self, work: OpWork, backward: bool = False) -> float:
        """The float8 casting kernels of a linear layer's forward (or backward), beside its matmuls (0 for any
        other op): their bytes at the memory's bandwidth."""
        nbytes = work.cast_bytes(backward)
        return self.byte_s(nbytes) if nbytes else 0.0

    def view_s(self) -> float:
        """The host's cost of one view (no kernel): ``view_overhead_s`` (``op_overhead_s`` where not measured);
        nothing where the host runs ahead of the device."""
        eff = self.efficiency
        if eff.overhead_hidden:
            return 0.0
        return eff.view_overhead_s or eff.op_overhead_s

    def forward_s(self, work: OpWork, recording: bool = False) -> float:
        """One op's forward (see the module docstring); ``recording``: autograd records it (training)."""
        if work.cost_class == "free":
            return self.view_s()
        return self.with_overhead(self.device_s(work), 1, self.kernel_overhead_s(work, recording))

    def group_forward_s(self, works: list[OpWork], boundary_bytes: float, recording: bool = False) -> float:
        """A fused group of ops whose inputs and outputs total ``boundary_bytes`` (at this precision): one
        kernel, one kernel's fixed cost (the launch), on ``fused_kernels`` devices; else its ops one by one."""
        if not self.efficiency.fused_kernels:
            return sum(self.forward_s(w, recording) for w in works)
        flops = sum(
            self.flop_s(w.flops, w.cost_class, float8=w.float8, unmasked=w.unmasked) for w in works
            if w.cost_class != "free"
        )  # fmt: skip
        casts = sum(self.cast_s(w) for w in works)
        return self.with_overhead(max(flops, self.byte_s(boundary_bytes)) + casts, 1, self.op_overhead_s(recording))
