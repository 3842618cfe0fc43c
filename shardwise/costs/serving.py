"""Serving prices: a prefill of a batch of prompts, a decode step of a batch of contexts, and the KV cache a
parallel layout (tensor-parallel ``tp`` x pipeline-parallel ``pp`` devices) holds. docs/serving.md gives every
formula and its source.

A decoder layer's work on one of its ``tp`` devices is priced with the price list's own rules
(``costs.compute``): its matmuls as one ``gemm``-class roofline (FLOPs at ``peak x efficiency.gemm``, the
weights and activations at the achieved memory bandwidth), attention as an ``attention``-class roofline (a
causal prefill does ``CAUSAL_FRACTION`` of the full FLOPs; a decode step reads every cached key and value),
norms, activations and residual adds as ``memory``-class bytes, each kernel paying the device's launch cost
(on devices that run ops one by one, CPUs: each memory-bound op of the traced layer priced on its own, with
the device's measured per-element math costs; devices with fused kernels run them fused, as serving engines
do, and are priced by the formula of docs/serving.md).
Its tensor-parallel collectives and the pipeline's point-to-point messages between stages are ``costs.comm``
prices on the devices the layout occupies. Which collectives a layer and a pass run is the layout's
(:class:`LayoutCollectives`): by default Megatron's, what serving engines run (two all-reduces a layer, after
attention and after the MLP, and the logits' all-gather); for a program shardwise planned, the collectives its
prefill and decode plans run (:meth:`LayoutCollectives.from_plans`: e.g. a layout that also splits the norms
over ``tp``, as the planner lays out a norm where collectives cost next to nothing, all-reduces each norm's
statistics before it normalizes), each collective's bytes a line in the pass's tokens and sequences solved from
the two plans. Once per pass: the embedding lookup, the final norm and the output head on one row per sequence.

Pipelines: a batch's pass through ``pp`` stages takes the sum of the stages (``latency_s``); stages hold equal
numbers of layers, so a new batch can enter the first stage after ``latency_s / pp`` (``stage_s``). A decode
step of ``B`` running sequences on a pipeline runs them as ``pp`` micro-batches in flight at once, so every
sequence advances one token per pass of a micro-batch of ``B / pp`` (``decode_step_s``).

KV cache: each device of a layout keeps the keys and values of its ``layers / pp`` layers and
``max(1, kv_heads / tp)`` heads (grouped-query heads are replicated when ``tp`` exceeds them). Its capacity in
tokens is what the engine's share of device memory holds after the weights of its stage and the working set,
in whole blocks of ``block_tokens`` (``EngineMemory``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from shardwise.costs.compute import CAUSAL_FRACTION, OpWork
from shardwise.costs.prices import PriceList
from shardwise.costs.step import forward_collectives
from shardwise.ir.plan import ExecutionPlan

__all__ = [
    "ServingModel", "EngineMemory", "ENGINES", "PhaseTime", "ServingPrices", "MEMORY_PASSES_PER_TOKEN",
    "LayoutCollectives",
]  # fmt: skip

#: memory-class bytes one token moves per layer besides matmuls and attention, in units of ``hidden``: two
#: norms (read + write: 2 each) and two residual adds (read two, write one: 3 each)
MEMORY_PASSES_PER_TOKEN = 2 * 2 + 2 * 3
#: kernels one layer launches besides its matmuls and attention when no trace counted them: two norms, the
#: activation, two residual adds
OTHER_KERNELS_PER_LAYER = 5
#: kernels of a pass outside the layers when no trace counted them: embedding, final norm, output head
EDGE_KERNELS = 3


@dataclass(frozen=True)
class ServingModel:
    """What the serving prices need to know of a decoder-only model; ``source`` says where the figures came
    from (a HuggingFace configuration, parameters counted on the model built on the meta device).

    Invariants: every count is >= 0; ``layers``, ``hidden``, ``heads``, ``kv_heads``, ``head_dim`` >= 1.
    """

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int  # the MLP's inner width
    gated: bool  # a gated MLP (SwiGLU: gate and up projections), else two matrices
    vocab: int
    layer_params: int  # parameters of one decoder layer
    layer_matmul_params: int  # of which in matmul weights (2 FLOPs per token each)
    layer_matmul_io: int  # sum over the layer's matmuls of (inputs + outputs) per token
    layer_matmuls: int  # matmul kernels per layer
    embed_params: int  # the token embedding (vocab x hidden)
    position_params: int  # learned position embeddings (0 with rotary positions)
    head_params: int  # an untied output head (0 when tied to the token embedding)
    final_params: int  # parameters outside the layers, embeddings and head (the final norm, ...)
    layer_kernels: int = OTHER_KERNELS_PER_LAYER  # kernels per layer besides matmuls and attention
    layer_views: int = 0  # views per layer (no kernel; the host's dispatch where it dispatches them)
    edge_kernels: int = EDGE_KERNELS  # kernels of a pass outside the layers
    edge_views: int = 0
    #: a layer's memory-bound ops from a trace: (price-list name, float32 bytes per token, elements per token)
    layer_memory_ops: tuple[tuple[str, float, float], ...] = ()
    #: the kind of a layer's matmuls and of the output head from a trace (price-list names: "addmm", "linear";
    #: "": not traced), whose fixed cost per kernel the price list may know (``efficiency.kernel_overhead_s``)
    matmul_op: str = ""
    head_op: str = ""
    weight_bytes: int = 2  # bytes per weight element (fp16/bf16)
    kv_bytes: int = 2  # bytes per cached key/value element
    act_bytes: int = 2  # bytes per activation element
    source: str = ""

    def __post_init__(self) -> None:
        for name in ("layers", "hidden", "heads", "kv_heads", "head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"ServingModel.{name} must be >= 1, got {getattr(self, name)}")

    @property
    def params(self) -> int:
        """Every parameter once (a tied head counted with the embedding)."""
        return (self.layers * self.layer_params + self.embed_params + self.position_params + self.head_params
                + self.final_params)  # fmt: skip

    @property
    def tied(self) -> bool:
        return self.head_params == 0

    def kv_heads_per_device(self, tp: int) -> float:
        """Key/value heads one of ``tp`` devices keeps (replicated when ``tp`` exceeds them)."""
        return max(1.0, self.kv_heads / tp)

    def kv_bytes_per_token(self, tp: int = 1, pp: int = 1) -> float:
        """Bytes of keys and values one token adds on one device of a (tp, pp) layout."""
        return 2 * math.ceil(self.layers / pp) * self.kv_heads_per_device(tp) * self.head_dim * self.kv_bytes

    def prefill_flops_per_token(self) -> float:
        """Matmul FLOPs of one prompt token through every layer (attention's are in ``prefill``)."""
        return 2.0 * self.layers * self.layer_matmul_params


@dataclass(frozen=True)
class EngineMemory:
    """How a serving engine spends device memory (see the module docstring).

    ``utilization``: the share of device memory the engine may use; ``reserve_fraction``: a working set
    reserved as a share of device memory, or 0 to estimate it as the activations of one forward pass of
    ``max_batched_tokens`` tokens and the fp32 logits of ``max_seqs`` sequences; ``vocab_parallel``: the
    token embedding and output head are split over ``tp`` (else every device holds them whole).
    """

    name: str
    utilization: float
    block_tokens: int
    reserve_fraction: float
    vocab_parallel: bool
    max_batched_tokens: int
    max_seqs: int
    source: str
    #: scheduling limits of disaggregated prefill instances (tokens and prompts per batch) and decode instances
    #: (sequences per batch); 0: the colocated limits above
    prefill_max_batched_tokens: int = 0
    prefill_max_seqs: int = 0
    decode_max_seqs: int = 0
    #: share of the KV blocks a colocated instance keeps free when it admits a prompt (vLLM's watermark)
    watermark: float = 0.01
    #: host time every iteration (a prefill batch or a decode step) adds on the first stage: a constant and
    #: a share per cached token of the batch
    iteration_overhead_s: float = 0.0
    iteration_overhead_per_token_s: float = 0.0
    #: colocated scheduling: True, every iteration runs the running sequences' decode steps and prefill chunks
    #: of waiting prompts together, within ``max_batched_tokens`` tokens (vLLM's V1 scheduler, chunked
    #: prefill); False, an iteration is either a prefill of whole prompts or a decode step, prefills first
    #: (vLLM before V1 without chunked prefill: the engine DistServe measured)
    chunked_prefill: bool = False

    @property
    def prefill_limits(self) -> tuple[int, int]:
        """(tokens, prompts) of one batch of a disaggregated prefill instance."""
        return (
            self.prefill_max_batched_tokens or self.max_batched_tokens,
            self.prefill_max_seqs or self.max_seqs,
        )

    @property
    def decode_seqs(self) -> int:
        """Sequences of one decode batch of a disaggregated decode instance."""
        return self.decode_max_seqs or self.max_seqs


#: engines whose memory accounting we know (their sources are in docs/serving.md)
ENGINES = {
    "vllm": EngineMemory(
        "vllm", utilization=0.9, block_tokens=16, reserve_fraction=0.0, vocab_parallel=True,
        max_batched_tokens=8192, max_seqs=256, chunked_prefill=True,
        source="vLLM engine arguments: --gpu-memory-utilization 0.9, --block-size 16, --max-num-seqs 256, "
               "--max-num-batched-tokens 8192 (serve-plan's launch commands pass the last two); the working set "
               "is profiled on a forward pass of --max-num-batched-tokens tokens (VocabParallelEmbedding / "
               "ParallelLMHead split the vocabulary over tp); the V1 engine that `vllm serve` runs always chunks "
               "prefills (EngineArgs._set_default_args_v1) and its scheduler (vllm/v1/core/sched/scheduler.py) "
               "runs the running requests' tokens first, then waiting prompts' chunks, in one batch",
    ),
    "distserve": EngineMemory(
        "distserve", utilization=0.95, block_tokens=16, reserve_fraction=0.01, vocab_parallel=False,
        max_batched_tokens=16384, max_seqs=1024,
        prefill_max_batched_tokens=8192, prefill_max_seqs=128, decode_max_seqs=1024,
        iteration_overhead_s=2e-3, iteration_overhead_per_token_s=1e-7,
        source="DistServe simdistserve/profilers/profile_memory.py: gpu_memory_utilization 0.95, block_size 16, "
               "peak runtime memory = 1% of device memory + the model; distserve/config.py counts the "
               "vocabulary and position embeddings whole on every device; scheduling limits from "
               "evaluation/2-benchmark-serving/2-start-api-server.py (colocated = its vLLM baseline: "
               "--max-num-batched-tokens 16384 --max-num-seqs 1024; prefill: --context-max-batch-size 128 "
               "--context-max-tokens-per-batch 8192; decode: --decoding-max-batch-size 1024); per-iteration "
               "overhead 2 ms + 0.1 us per cached token from simdistserve/base/worker.py add_ray_overhead",
    ),
}  # fmt: skip


#: a collective of a pass: (kind, bytes per token of the pass, bytes per sequence of the pass)
Collective = tuple[str, float, float]
_LAYER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")  # a module path's layer number ("model.layers.3.mlp" -> 3)


@dataclass(frozen=True)
class LayoutCollectives:
    """The collectives a ``tp``-way tensor-parallel layout runs in one pass (prefill or decode step) over its
    ``tp`` ranks: ``layer`` those of one decoder layer (every layer alike), ``edge`` those outside the layers,
    each ``(kind, bytes per token, bytes per sequence)`` of the pass; ``source`` says whose layout it is.

    Invariants: ``tp`` >= 2; kinds are collectives ``costs.comm`` prices; bytes are >= 0.
    """

    tp: int
    layer: tuple[Collective, ...]
    edge: tuple[Collective, ...]
    source: str

    @staticmethod
    def megatron(model: ServingModel, tp: int) -> LayoutCollectives:
        """Megatron's layout (what serving engines run): two all-reduces of the hidden state a layer, after
        attention and after the MLP, and the float32 logits of one row per sequence all-gathered."""
        hidden = float(model.hidden * model.act_bytes)
        return LayoutCollectives(tp, (("allreduce", hidden, 0.0),) * 2, (("allgather", 0.0, model.vocab * 4.0),),
                                 "Megatron-LM's tensor-parallel layout")  # fmt: skip

    @staticmethod
    def from_plans(
        prefill: ExecutionPlan, decode: ExecutionPlan, prefill_tokens: int, decode_tokens: int, seqs: int,
    ) -> LayoutCollectives:  # fmt: skip
        """The collectives a generation program's prefill plan (``prefill_tokens`` tokens of ``seqs`` sequences)
        and decode plan (``decode_tokens`` tokens of the same sequences) run, as their prices count them
        (``costs.step.forward_collectives``): those before an op of a numbered module (a decoder layer) per
        layer, the others at the edge; each collective's bytes ``a x tokens + b x seqs`` solved from its bytes
        in the two plans. Raises ``ValueError`` when the two plans run different collectives, their layers
        different ones, or the plans are not tensor-parallel."""
        runs = [forward_collectives(plan) for plan in (prefill, decode)]
        kinds = [[(step.collective, step.axis) for _, step in run] for run in runs]
        if kinds[0] != kinds[1]:
            raise ValueError(f"the prefill and decode plans run different collectives: {kinds[0]} / {kinds[1]}")
        if prefill_tokens == decode_tokens:
            raise ValueError("from_plans needs passes of different token counts to tell bytes per token from per sequence")
        tp = max((plan.mesh.axis_size(axis) for plan in (prefill, decode) for _, axis in kinds[0]), default=1)
        if tp < 2:
            raise ValueError("the plans run no tensor-parallel collective: a layout of one rank has none")
        layers: dict[int, list[Collective]] = {}
        edge: list[Collective] = []
        for (path, first), (_, second) in zip(*runs, strict=True):
            per_token = (first.nbytes - second.nbytes) / (prefill_tokens - decode_tokens)
            per_seq = max((second.nbytes - per_token * decode_tokens) / seqs, 0.0)
            entry = (first.collective, max(per_token, 0.0), per_seq)
            number = _LAYER.search(path) if path != "<output>" else None
            (layers.setdefault(int(number.group(1)), []) if number else edge).append(entry)
        shapes = {tuple(entries) for entries in layers.values()}
        if len(shapes) > 1:
            raise ValueError(f"the plans' layers run different collectives: {sorted(shapes)}")
        layer = next(iter(shapes), ())
        return LayoutCollectives(tp, tuple(layer), tuple(edge), "the collectives of a planned program's prefill and "
                                 "decode step (costs.step.forward_collectives)")  # fmt: skip

    def passes(self, entries: Sequence[Collective], tokens: float, seqs: float) -> list[tuple[str, float]]:
        """(kind, bytes) of ``entries`` in a pass of ``tokens`` tokens of ``seqs`` sequences."""
        return [(kind, per_token * tokens + per_seq * seqs) for kind, per_token, per_seq in entries]


@dataclass(frozen=True)
class PhaseTime:
    """One pass of a batch: ``latency_s`` through every stage, ``stage_s`` until the next batch may enter."""

    latency_s: float
    stage_s: float


class ServingPrices:
    """Prefill, decode and KV-cache prices of ``model`` on the devices of ``prices`` (one price list: the
    cluster's device figures, its achieved efficiencies and its links), for an engine's memory accounting.
    ``collectives``: the tensor-parallel layout's collectives (:class:`LayoutCollectives`: a planned program's,
    for its ``tp``), by default Megatron's at every ``tp`` (see the module docstring)."""

    def __init__(
        self, model: ServingModel, prices: PriceList, engine: EngineMemory | str = "vllm", *,
        collectives: LayoutCollectives | None = None,
    ) -> None:  # fmt: skip
        self.model = model
        self.collectives = collectives
        self.prices = prices
        self.engine = ENGINES[engine] if isinstance(engine, str) else engine
        self.compute = prices.compute
        self.cluster = prices.cluster
        self._base: dict[tuple[int, float], float] = {}
        self._edges: dict[tuple[int, int, float, float], float] = {}

    # -- layouts ------------------------------------------------------------------------------------------

    def check_layout(self, tp: int, pp: int) -> None:
        if tp < 1 or pp < 1:
            raise ValueError(f"tp and pp must be >= 1, got tp={tp} pp={pp}")
        if tp * pp > self.cluster.world_size:
            raise ValueError(
                f"a tp={tp} x pp={pp} instance needs {tp * pp} devices; {self.cluster.name} has "
                f"{self.cluster.world_size}"
            )

    def tp_ranks(self, tp: int, first: int = 0) -> tuple[int, ...]:
        return tuple(range(first, first + tp))

    # -- memory -------------------------------------------------------------------------------------------

    def weight_bytes_per_device(self, tp: int, pp: int) -> float:
        """Weights on the fullest device of a (tp, pp) layout: its stage's layers split over ``tp``, and the
        embeddings (first stage) or the head (last stage; a tied head is a copy of the embedding there when
        ``pp`` > 1), split over ``tp`` when the engine is vocabulary-parallel."""
        self.check_layout(tp, pp)
        m = self.model
        vocab_ways = tp if self.engine.vocab_parallel else 1
        layers = math.ceil(m.layers / pp) * m.layer_params / tp
        first = m.embed_params / vocab_ways + m.position_params
        head = (m.head_params or m.embed_params) / vocab_ways
        if pp == 1:
            edges = first + m.head_params / vocab_ways + m.final_params
        else:
            edges = max(first, head + m.final_params)
        return (layers + edges) * m.weight_bytes

    def working_set_bytes(self, tp: int) -> float:
        """Memory one device keeps free for a forward pass's activations (see ``EngineMemory``)."""
        e, m = self.engine, self.model
        if e.reserve_fraction > 0:
            return e.reserve_fraction * self.cluster.device.memory_bytes
        inner = (2 if m.gated else 1) * m.ffn / tp
        per_token = (4 * m.hidden + (m.heads + 2 * m.kv_heads) * m.head_dim / tp + inner) * m.act_bytes
        return e.max_batched_tokens * per_token + e.max_seqs * m.vocab / tp * 4

    def kv_capacity_tokens(self, tp: int, pp: int) -> int:
        """Tokens of KV cache one instance of the (tp, pp) layout holds (0 when the weights do not fit)."""
        e = self.engine
        free = (e.utilization * self.cluster.device.memory_bytes - self.weight_bytes_per_device(tp, pp)
                - self.working_set_bytes(tp))  # fmt: skip
        block = e.block_tokens * self.model.kv_bytes_per_token(tp, pp)
        return max(0, int(free // block)) * e.block_tokens

    # -- time ---------------------------------------------------------------------------------------------

    def _kernel(self, work: OpWork) -> float:
        return self.compute.forward_s(work)

    def _layer_s(self, tp: int, tokens: float, attention_flops: float, attention_bytes: float) -> float:
        """One decoder layer on one of ``tp`` devices for ``tokens`` rows (see the module docstring)."""
        key = (tp, tokens)
        if key not in self._base:
            self._base[key] = self._layer_base_s(tp, tokens)
        return self._base[key] + self._kernel(OpWork("attention", attention_flops, attention_bytes, 0.0))

    def _layer_base_s(self, tp: int, tokens: float) -> float:
        """A layer's matmuls, memory-bound kernels and tensor-parallel all-reduces (all but attention)."""
        m = self.model
        io = m.layer_matmul_io * (1 + 1 / tp) / 2  # each matmul has one side split over tp
        gemm = OpWork("gemm", 2.0 * m.layer_matmul_params * tokens / tp, tokens * io * m.act_bytes,
                      m.layer_matmul_params * m.weight_bytes / tp, m.matmul_op)  # fmt: skip
        t = self.compute.with_overhead(self.compute.device_s(gemm), m.layer_matmuls, self.compute.kernel_overhead_s(gemm))
        if m.layer_memory_ops and not self.compute.efficiency.fused_kernels:
            # a device that runs ops one by one (a CPU process running the traced program) pays each traced op:
            # its bytes, its measured per-element math, its launch (a split op's share: / tp, an estimate)
            scale = m.act_bytes / 4 * tokens / tp
            for name, nbytes, elements in m.layer_memory_ops:
                t += self.compute.forward_s(
                    OpWork("memory", 0.0, nbytes * scale, 0.0, name, elements * tokens / tp)
                )
        else:
            inner = (3 if m.gated else 2) * m.ffn / tp
            memory = tokens * (MEMORY_PASSES_PER_TOKEN * m.hidden + inner) * m.act_bytes
            t += self.compute.with_overhead(self.compute.byte_s(memory), m.layer_kernels)
        t += m.layer_views * self.compute.view_s()
        for kind, nbytes in self.layer_collectives(tp, tokens):
            t += self.prices.collective_s(kind, nbytes, self.tp_ranks(tp))
        return t

    def layout_collectives(self, tp: int) -> LayoutCollectives | None:
        """The collectives of the ``tp``-way layout (None at tp 1): the given ones (for their ``tp`` only), else
        Megatron's."""
        if tp == 1:
            return None
        if self.collectives is None:
            return LayoutCollectives.megatron(self.model, tp)
        if self.collectives.tp != tp:
            raise ValueError(f"these serving prices price a tp={self.collectives.tp} layout's collectives "
                             f"({self.collectives.source}), not tp={tp}'s")  # fmt: skip
        return self.collectives

    def layer_collectives(self, tp: int, tokens: float, seqs: float | None = None) -> list[tuple[str, float]]:
        """(kind, bytes) of each collective one decoder layer runs over ``tp`` for ``tokens`` rows of ``seqs``
        sequences (default: one row each) in the layout (``layout_collectives``)."""
        layout = self.layout_collectives(tp)
        return [] if layout is None else layout.passes(layout.layer, tokens, tokens if seqs is None else seqs)

    def edge_collectives(self, tp: int, tokens: float, seqs: float) -> list[tuple[str, float]]:
        """(kind, bytes) of the collectives of a pass outside its layers in the layout (Megatron's: the logits'
        all-gather over ``tp``)."""
        layout = self.layout_collectives(tp)
        return [] if layout is None else layout.passes(layout.edge, tokens, seqs)

    def _edges_s(self, tp: int, pp: int, tokens: float, seqs: float) -> float:
        """Embedding lookup, final norm, output head on one row per sequence (logits all-gathered over tp) and
        the pipeline's messages between stages."""
        key = (tp, pp, tokens, seqs)
        if key not in self._edges:
            self._edges[key] = self._edges_uncached_s(tp, pp, tokens, seqs)
        return self._edges[key]

    def _edges_uncached_s(self, tp: int, pp: int, tokens: float, seqs: float) -> float:
        m = self.model
        edge_bytes = 2 * (tokens + seqs) * m.hidden * m.act_bytes  # the embedding lookup, the final norm
        t = self.compute.with_overhead(self.compute.byte_s(edge_bytes), max(m.edge_kernels - 1, 0))
        t += m.edge_views * self.compute.view_s()
        head = OpWork("gemm", 2.0 * seqs * m.vocab * m.hidden / tp, seqs * (m.hidden + m.vocab / tp) * m.act_bytes,
                      m.vocab * m.hidden * m.weight_bytes / tp, m.head_op)  # fmt: skip
        t += self.compute.with_overhead(self.compute.device_s(head), 1, self.compute.kernel_overhead_s(head))
        for kind, nbytes in self.edge_collectives(tp, tokens, seqs):
            t += self.prices.collective_s(kind, nbytes, self.tp_ranks(tp))
        for stage in range(pp - 1):
            t += self.prices.p2p_s(tokens * m.hidden * m.act_bytes, stage * tp, (stage + 1) * tp)
        return t

    def prefill(self, tp: int, pp: int, prompt_lens: list[int] | tuple[int, ...]) -> PhaseTime:
        """A prefill of one batch of prompts (lengths ``prompt_lens``) on a (tp, pp) instance."""
        return self.prefill_sums(tp, pp, float(sum(prompt_lens)), float(sum(s * s for s in prompt_lens)),
                                 len(prompt_lens))  # fmt: skip

    def prefill_sums(
        self, tp: int, pp: int, tokens: float, square_sum: float, seqs: int, causal: bool = True
    ) -> PhaseTime:
        """``prefill`` from the batch's token count, sum over prompts of queries x keys (the squared lengths
        for causal self-attention) and number of prompts. ``causal=False``: every query attends to every key
        counted (an attention with a mask tensor computes all of them: a static KV cache's window)."""
        self.check_layout(tp, pp)
        if seqs <= 0:
            return PhaseTime(0.0, 0.0)
        m = self.model
        heads = m.heads / tp
        flops = 4.0 * heads * m.head_dim * square_sum * (CAUSAL_FRACTION if causal else 1.0)
        nbytes = tokens * (2 * heads + 2 * m.kv_heads_per_device(tp)) * m.head_dim * m.act_bytes
        nbytes += tokens * 2 * m.kv_heads_per_device(tp) * m.head_dim * m.kv_bytes  # writing the cache
        latency = m.layers * self._layer_s(tp, tokens, flops, nbytes) + self._edges_s(tp, pp, tokens, seqs)
        return PhaseTime(latency, latency / pp)

    def decode(self, tp: int, pp: int, batch: float, context_tokens: float) -> PhaseTime:
        """One pass of a decode batch of ``batch`` sequences holding ``context_tokens`` cached tokens in all
        (each reads its whole context) through a (tp, pp) instance."""
        self.check_layout(tp, pp)
        if batch <= 0:
            return PhaseTime(0.0, 0.0)
        m = self.model
        heads = m.heads / tp
        kv = m.kv_heads_per_device(tp)
        flops = 4.0 * heads * m.head_dim * context_tokens
        nbytes = (
            context_tokens * 2 * kv * m.head_dim * m.kv_bytes + batch * 2 * heads * m.head_dim * m.act_bytes
        )
        latency = m.layers * self._layer_s(tp, batch, flops, nbytes) + self._edges_s(tp, pp, batch, batch)
        return PhaseTime(latency, latency / pp)

    def mixed_step_s(
        self, tp: int, pp: int, decodes: int, decode_context: float, chunks: tuple | list = ()
    ) -> float:
        """Seconds of one iteration that runs, in one forward pass, a decode step of ``decodes`` sequences
        holding ``decode_context`` cached tokens and prefill chunks ``(new, prior)``: ``new`` prompt tokens of a
        sequence whose first ``prior`` tokens are already cached (chunked prefill). The chunk's queries attend
        causally to its own tokens and to every prior one, which are read from the cache. With no chunks it is
        ``decode_step_s``; with whole prompts only (prior 0) it is ``prefill``'s latency when ``pp`` is 1 or the
        prompt is one. On a pipeline the sequences run as ``min(pp, sequences)`` micro-batches in flight, as in
        ``decode_step_s``: the iteration takes one micro-batch's pass, of an equal share of the work but at least
        the largest chunk (a chunk is not split between micro-batches)."""
        self.check_layout(tp, pp)
        seqs = decodes + len(chunks)
        if seqs <= 0:
            return 0.0
        if not chunks:
            return self.decode_step_s(tp, pp, decodes, decode_context)
        m = self.model
        heads, kv = m.heads / tp, m.kv_heads_per_device(tp)
        new = float(sum(n for n, _ in chunks))
        pairs = decode_context + sum(n * p + CAUSAL_FRACTION * n * n for n, p in chunks)  # query x key pairs
        prior = float(sum(p for _, p in chunks))
        nbytes = (decode_context + prior) * 2 * kv * m.head_dim * m.kv_bytes  # cached keys and values read
        nbytes += decodes * 2 * heads * m.head_dim * m.act_bytes  # decode queries and outputs
        # the chunk's queries, keys, values and outputs, and the cache it writes
        nbytes += new * ((2 * heads + 2 * kv) * m.act_bytes + 2 * kv * m.kv_bytes) * m.head_dim
        g = min(pp, seqs)
        if g > 1:  # one micro-batch's share, at least the largest chunk with its attention and cache reads
            n, p = max(chunks)
            share = max(1.0 / g, n / (decodes + new))
            pairs = max(pairs / g, n * p + CAUSAL_FRACTION * n * n)
            nbytes = max(
                nbytes / g,
                (p * 2 * kv * m.kv_bytes + n * ((2 * heads + 2 * kv) * m.act_bytes + 2 * kv * m.kv_bytes))
                * m.head_dim,
            )
        else:
            share = 1.0
        tokens = (decodes + new) * share
        latency = m.layers * self._layer_s(tp, tokens, 4.0 * heads * m.head_dim * pairs, nbytes)
        return latency + self._edges_s(tp, pp, tokens, max(1.0, seqs / g))

    def decode_step_s(self, tp: int, pp: int, batch: int, context_tokens: float) -> float:
        """Seconds between two tokens of every sequence of a running batch (see the module docstring: ``pp``
        micro-batches in flight)."""
        if batch <= 0:
            return 0.0
        groups = min(pp, batch)
        return self.decode(tp, pp, batch / groups, context_tokens / groups).latency_s

    def weight_read_bound_s(self, tp: int, pp: int = 1) -> float:
        """The least time of any decode step: the weights every step reads (each layer's matmul weights and the
        output head) read once, split over ``tp`` devices, at the device's peak memory bandwidth."""
        m = self.model
        weights = (m.layers * m.layer_matmul_params + m.vocab * m.hidden) * m.weight_bytes
        return weights / tp / self.cluster.device.memory_bandwidth

    def iteration_overhead_s(self, context_tokens: float) -> float:
        """Host time the engine adds to one iteration whose sequences hold ``context_tokens`` cached tokens
        (``EngineMemory.iteration_overhead_s``)."""
        e = self.engine
        return e.iteration_overhead_s + e.iteration_overhead_per_token_s * context_tokens

    def kv_transfer_s(self, tokens: float, src: int, dst: int, ways: int = 1) -> float:
        """Moving the KV cache of ``tokens`` tokens (every layer and head) from an instance starting at rank
        ``src`` to one starting at ``dst``, over ``ways`` device pairs in parallel."""
        if tokens <= 0:
            return 0.0
        nbytes = tokens * self.model.kv_bytes_per_token(1, 1) / max(ways, 1)
        return self.prices.p2p_s(nbytes, src, dst)
