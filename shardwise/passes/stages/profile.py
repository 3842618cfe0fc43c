"""Per-layer-unit costs for the whole-plan search: time, communication and memory of one micro-batch.

A :class:`UnitProfiler` prices each layer unit (``stages.units``) for a tensor-parallel degree, sequence
parallelism on or off, and a micro-batch size. Repeated blocks share a signature, so a model with hundreds of
identical blocks is placed and priced once per (tp, sp): the unit's subgraph is cut out
(``stages.extract``), placed on a ``1 x tp`` mesh by the intra-op planner (``stages.place``), fused the way
codegen will fuse it (``passes.fusion``), and costed here:

- **compute** per op: roofline on the device's peak figures times the published efficiencies
  (``stages.efficiency``): matmuls at the GEMM fraction, fused attention at FlashAttention-2's forward and
  backward fractions, everything else at the achieved memory bandwidth; fused groups move only their
  inputs and outputs. The backward of a matmul costs 2x its forward FLOPs, attention 2.5x (it recomputes the
  attention matrix), memory-bound ops 2x their bytes. Work divides by the op's split.
- **tensor-parallel communication**: every redistribution of the placement (forward), its adjoint
  (backward), and the all-reduce (or reduce-scatter) of partial activation gradients, at the ring cost of
  the group with the achieved bus bandwidth; parameter gradients that are partial (sequence-parallel norms)
  are reduced once per step (``grad_reduce_bytes``).
- **memory**: parameters (local pieces), the activations the backward reads (inputs of matmuls, attention,
  norms, non-linear elementwise ops, attention outputs; views share their base), and the unit's inputs
  (what full recomputation keeps).

Sizes scale with the micro-batch linearly from the traced batch (activation bytes and FLOPs are linear in the
batch dimension for the ops of a transformer; parameter reads are not), and float bytes by the precision
(the model is traced in float32). Times are seconds on one device of the group for one micro-batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from shardwise.cluster import ClusterSpec
from shardwise.cluster.costmodel import ring_collective_time
from shardwise.ir.graph import Graph
from shardwise.ir.placement import Shard, ShardingSpec
from shardwise.ir.plan import NodeStrategy
from shardwise.ir.registry import rule_for, tensor_operands
from shardwise.ir.tensor import TensorSpec
from shardwise.passes.stages.efficiency import ATTENTION_BACKWARD_FLOPS, Efficiency, efficiency_for
from shardwise.passes.stages.extract import extract_chunks
from shardwise.passes.stages.place import PlacedChunk, place_chunk
from shardwise.passes.stages.units import LayerUnits

__all__ = ["UnitCost", "UnitProfiler", "CommModel", "PRECISION_BYTES", "traced_batch"]

PRECISION_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
OUTPUT_NODE = "<output>"
_FLOAT = ("float", "bfloat")
# elementwise ops whose backward reads their inputs (the others are linear: add, sub, copies, dropout(0))
_SAVING_ELEMENTWISE = {
    "mul", "div", "pow", "tanh", "exp", "log", "sigmoid", "silu", "gelu", "relu", "rsqrt", "sqrt", "sin",
    "cos", "where", "maximum", "minimum", "abs", "clamp", "softplus", "erf", "reciprocal", "square", "mean",
    "var", "std", "log_softmax", "_softmax", "softmax", "native_dropout",
}  # fmt: skip
_SAVING_KINDS = {"matmul", "conv", "attention", "norm", "softmax", "loss", "embedding", "pool"}
# the backward of each forward redistribution (see passes.sharding.auto); partial gradients are separate
_BACKWARD_OF = {"slice": "allgather", "reduce_scatter": "allgather", "alltoall": "alltoall"}


def traced_batch(graph: Graph) -> int:
    """The batch size the graph was traced with: dim 0 of its first tensor input (1 if none)."""
    for i in graph.inputs:
        if isinstance(i.spec, TensorSpec) and i.spec.rank > 0:
            return i.spec.shape[0]
    return 1


class CommModel:
    """Library (ring) collective and point-to-point times with the achieved bandwidth fractions.

    On clusters of identical nodes (every node has the same NICs serving the same local devices, no direct
    links) a group spanning many nodes costs what the same local ranks on two nodes cost (the ring's alpha
    and beta come from one node's ring and one node-to-node crossing), so the figures are computed on
    nodes 0 and 1 and cached: planning for thousands of devices needs no route search over all of them.
    A group holding different local ranks on different nodes is priced with its largest node's pattern
    (an approximation; exact for the evenly spread groups of tp x dp x pp meshes with tp | devices per node
    and dp * tp a multiple of it).
    """

    def __init__(self, cluster: ClusterSpec, efficiency: Efficiency) -> None:
        self.cluster = cluster
        self.efficiency = efficiency
        self._ab: dict[tuple[int, ...], tuple[float, float]] = {}
        per = cluster.devices_per_node
        layouts = {
            tuple(
                sorted(
                    (nic.bandwidth, nic.latency, tuple(d - nic.node * per for d in nic.devices))
                    for nic in group
                )
            )
            for group in _nics_by_node(cluster).values()
        }
        self.homogeneous = len(layouts) <= 1 and not cluster.links

    def _canonical(self, ranks: tuple[int, ...]) -> tuple[tuple[int, ...], bool]:
        """(ranks to ask the cluster about, whether they span nodes)."""
        per = self.cluster.devices_per_node
        by_node: dict[int, list[int]] = {}
        for r in ranks:
            by_node.setdefault(r // per, []).append(r % per)
        multi = len(by_node) > 1
        if not self.homogeneous:
            return ranks, multi
        # nodes holding different local ranks (a group that straddles nodes unevenly): price it like the
        # busiest node's pattern on every node (the ring's crossing and its intra-node part)
        local = max((tuple(sorted(v)) for v in by_node.values()), key=len)
        nodes = 2 if multi else 1
        return tuple(n * per + x for n in range(nodes) for x in local), multi

    def alpha_beta(self, ranks: tuple[int, ...]) -> tuple[float, float]:
        canon, multi = self._canonical(tuple(ranks))
        if canon not in self._ab:
            alpha, beta = self.cluster.group_alpha_beta(canon)
            eff = self.efficiency.inter_node if multi else self.efficiency.intra_node
            self._ab[canon] = (alpha, beta / eff)
        return self._ab[canon]

    def collective_s(self, collective: str, nbytes: float, ranks: tuple[int, ...]) -> float:
        if len(ranks) < 2 or nbytes <= 0:
            return 0.0
        total = 0.0
        for kind in collective.split("+"):
            if kind in ("slice", "to_partial", "none", ""):
                continue
            alpha, beta = self.alpha_beta(ranks)
            total += ring_collective_time(kind, nbytes, len(ranks), alpha, beta)
        return total

    def p2p_s(self, nbytes: float, src: int, dst: int) -> float:
        if src == dst or nbytes <= 0:
            return 0.0
        per = self.cluster.devices_per_node
        multi = src // per != dst // per
        if self.homogeneous:
            src, dst = src % per, (per if multi else 0) + dst % per
        key = (-1, src, dst)
        if key not in self._ab:
            alpha, beta = self.cluster.p2p_alpha_beta(src, dst)
            eff = self.efficiency.inter_node if multi else self.efficiency.intra_node
            self._ab[key] = (alpha, beta / eff)
        alpha, beta = self._ab[key]
        return alpha + nbytes * beta


def _nics_by_node(cluster: ClusterSpec) -> dict[int, list]:
    out: dict[int, list] = {n: [] for n in range(cluster.num_nodes)}
    for nic in cluster.nics:
        out.setdefault(nic.node, []).append(nic)
    return out


@dataclass(frozen=True)
class UnitCost:
    """One layer unit, one micro-batch, one device of its tensor-parallel group."""

    forward_s: float  # compute plus blocking tensor-parallel communication
    backward_s: float  # the backward alone (a recomputed forward is added by the caller)
    comm_forward_s: float
    comm_backward_s: float
    param_elems: int  # local elements of the unit's parameters and buffers
    trainable_elems: int  # local trainable elements
    grad_reduce_bytes: int  # partial parameter gradients reduced over tp once per step (fp32)
    activation_bytes: int  # saved for the backward
    input_bytes: int  # kept per micro-batch under full recomputation
    output_bytes: int  # the values a cut after this unit sends (whole, per tp rank)
    flops: float  # forward FLOPs of the unit on one device of its group


@dataclass
class _Priced:
    """A placed unit's costs at the traced batch, split into parts that scale with the batch and parts
    that do not, so any micro-batch size is priced without placing again."""

    fwd_fixed: float
    fwd_scaled: float
    bwd_fixed: float
    bwd_scaled: float
    comm_fwd: list[tuple[str, float]]  # (collective, bytes at the traced batch)
    comm_bwd: list[tuple[str, float]]
    param_elems: int
    trainable_elems: int
    grad_reduce_bytes: int
    activation_bytes: float
    input_bytes: float
    output_bytes: float
    flops: float


class UnitProfiler:
    """Prices layer units of ``graph`` (see the module docstring); results are cached per signature class."""

    def __init__(
        self,
        graph: Graph,
        units: LayerUnits,
        cluster: ClusterSpec,
        *,
        precision: str,
        train: bool,
        efficiency: Efficiency | None = None,
        placer: Callable[..., PlacedChunk] = place_chunk,
        fusion: bool = True,
    ) -> None:
        self.graph = graph
        self.units = units
        self.cluster = cluster
        self.precision = precision
        self.train = train
        self.efficiency = efficiency or efficiency_for(cluster)
        self.comm = CommModel(cluster, self.efficiency)
        self.placer = placer
        self.fusion = fusion
        self.batch = traced_batch(graph)
        self.float_scale = PRECISION_BYTES.get(precision, 4) / 4
        self._unit_graphs: dict[int, tuple[Graph, frozenset[str]]] = {}
        self._priced: dict[tuple[int, int, bool], _Priced] = {}
        self.placements = 0  # how many placements were solved (for the planner's notes)
        peak_dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(precision, "float32")
        self.peak = cluster.device.flops(peak_dtype)
        self.bandwidth = cluster.device.memory_bandwidth

    # -- subgraphs ----------------------------------------------------------------------------------------

    def unit_graph(self, u: int) -> tuple[Graph, frozenset[str]]:
        """The unit's own subgraph and the names of the input-derived nodes copied into it."""
        if u not in self._unit_graphs:
            owner = {}
            for k, names in enumerate(self.units.nodes):
                for n in names:
                    owner[n] = 0 if k < u else (1 if k == u else 2)
            chunks = extract_chunks(self.graph, owner, 3)
            copies = frozenset(n for c, n in chunks.recomputed if c == 1)
            self._unit_graphs[u] = (chunks.graphs[1], copies)
        return self._unit_graphs[u]

    # -- pricing ------------------------------------------------------------------------------------------

    def cost(self, u: int, tp: int, sp: bool, microbatch: int) -> UnitCost:
        """Unit ``u`` on ``tp`` devices (sequence parallel or not) for a micro-batch of ``microbatch`` rows."""
        sp = sp and tp > 1
        key = (self.units.signature[u], tp, sp)
        if key not in self._priced:
            self._priced[key] = self._price(u, tp, sp)
        p = self._priced[key]
        s = microbatch / self.batch
        ranks = tuple(range(tp))
        cf = sum(self.comm.collective_s(c, b * s, ranks) for c, b in p.comm_fwd)
        cb = sum(self.comm.collective_s(c, b * s, ranks) for c, b in p.comm_bwd)
        return UnitCost(
            forward_s=p.fwd_fixed + p.fwd_scaled * s + cf,
            backward_s=p.bwd_fixed + p.bwd_scaled * s + cb,
            comm_forward_s=cf,
            comm_backward_s=cb,
            param_elems=p.param_elems,
            trainable_elems=p.trainable_elems,
            grad_reduce_bytes=p.grad_reduce_bytes,
            activation_bytes=int(p.activation_bytes * s),
            input_bytes=int(p.input_bytes * s),
            output_bytes=int(p.output_bytes * s),
            flops=p.flops * s,
        )

    def _price(self, u: int, tp: int, sp: bool) -> _Priced:
        graph, copies = self.unit_graph(u)
        placed = self.placer(
            graph, self.cluster, tp, sequence_parallel=sp, train=self.train, precision=self.precision
        )
        self.placements += 1
        g = placed.graph
        by_node = {s.node: s for s in placed.strategies}
        mesh = placed.mesh
        params = {p.name: p for p in g.params}
        specs: dict[str, TensorSpec] = {i.name: i.spec for i in g.inputs if isinstance(i.spec, TensorSpec)}
        for n in g.nodes:
            if not n.tuple_output and isinstance(n.outputs[0], TensorSpec):
                specs[n.name] = n.outputs[0]
        fs = self.float_scale

        def nbytes(spec: TensorSpec) -> float:
            return spec.nbytes * (fs if spec.dtype.startswith(_FLOAT) else 1.0)

        def factor(s: NodeStrategy | None) -> int:
            if s is None or not s.split:
                return 1
            f = 1
            for axis, _ in s.split:
                f *= mesh.axis_size(axis)
            return f

        def local(spec: TensorSpec, placement: ShardingSpec | None) -> float:
            if placement is None:
                return nbytes(spec)
            n = spec.numel
            for size, pl in zip(mesh.shape, placement.placements, strict=True):
                if isinstance(pl, Shard):
                    n //= size
            return n * (nbytes(spec) / max(spec.numel, 1))

        gemm = self.peak * self.efficiency.gemm
        bw = self.bandwidth * self.efficiency.memory
        fwd_fixed = fwd_scaled = bwd_fixed = bwd_scaled = flops = 0.0
        mem_fwd_bytes_scaled = 0.0
        comm_fwd: list[tuple[str, float]] = []
        comm_bwd: list[tuple[str, float]] = []
        grad_reduce_bytes = 0
        for n in g.nodes:
            if n.name in copies:
                continue  # input-derived copies run once per chunk, not once per unit
            s = by_node.get(n.name)
            rule = rule_for(n.op)
            kind = rule.kind if rule is not None else "other"
            f = factor(s)
            param_in = sum(params[v].spec.nbytes * fs for v in n.inputs if v in params) / f
            total = n.bytes_moved * fs / f
            act = max(total - param_in, 0.0)
            fl = n.flops / f
            flops += fl
            if kind in ("matmul", "conv"):
                fwd_scaled += fl / gemm  # compute-bound at transformer sizes; bytes checked below
                bwd_scaled += 2 * fl / gemm
                fwd_fixed += 0.0
                # memory-bound small matmuls: charge the excess of the byte time over the FLOP time
                excess = (act + param_in) / bw - fl / gemm
                if excess > 0:
                    fwd_fixed += excess
                    bwd_fixed += 2 * excess
            elif kind == "attention":
                fwd_scaled += fl / (self.peak * self.efficiency.attention_forward)
                bwd_scaled += ATTENTION_BACKWARD_FLOPS * fl / (self.peak * self.efficiency.attention_backward)
            elif rule is not None and not rule.moves_data:
                pass
            else:
                fwd_fixed += param_in / bw
                bwd_fixed += 2 * param_in / bw
                mem_fwd_bytes_scaled += act
            if s is None:
                continue
            operands = tensor_operands(n) if n.op != "getitem" else []
            gathered = {r.value for r in s.redistributes if "allgather" in r.collective}
            for r in s.redistributes:
                comm_fwd.append((r.collective, r.nbytes * fs))
                back = "+".join(b for b in (_BACKWARD_OF.get(k, "") for k in r.collective.split("+")) if b)
                if back:
                    comm_bwd.append((back, r.nbytes * fs))
            if self.train:
                for index, axes in s.grad_reduce:
                    if "tp" not in axes or index >= len(operands):
                        continue
                    value = operands[index]
                    if value in params:
                        grad_reduce_bytes += int(params[value].spec.numel * 4 / f)
                    elif value in specs:
                        kind_ = "reduce_scatter" if value in gathered else "allreduce"
                        comm_bwd.append((kind_, nbytes(specs[value])))
        # fusion: fused groups read their inputs and write their outputs once
        saved = self._fusion_saved(placed) if self.fusion else 0.0
        mem = max(mem_fwd_bytes_scaled - saved * fs, 0.0)
        fwd_scaled += mem / bw
        bwd_scaled += 2 * mem / bw
        # parameters
        param_elems = trainable = 0
        for p in g.params:
            pl = placed.param_placements.get(p.name)
            n = p.spec.numel
            if pl is not None:
                for size, x in zip(mesh.shape, pl.placements, strict=True):
                    if isinstance(x, Shard):
                        n //= size
            param_elems += n
            if p.requires_grad and p.kind == "parameter" and p.spec.dtype.startswith(_FLOAT):
                trainable += n
        activation = self._saved_bytes(g, by_node, params, local) if self.train else 0.0
        inputs = sum(nbytes(i.spec) for i in g.inputs if isinstance(i.spec, TensorSpec) and i.name in specs)
        if sp:
            inputs /= tp
        outputs = sum(nbytes(specs[v]) for v in g.output_names if v in specs)
        return _Priced(
            fwd_fixed=fwd_fixed, fwd_scaled=fwd_scaled, bwd_fixed=bwd_fixed, bwd_scaled=bwd_scaled,
            comm_fwd=[c for c in comm_fwd], comm_bwd=comm_bwd, param_elems=param_elems,
            trainable_elems=trainable, grad_reduce_bytes=grad_reduce_bytes, activation_bytes=activation,
            input_bytes=inputs, output_bytes=outputs, flops=flops,
        )  # fmt: skip

    def _fusion_saved(self, placed: PlacedChunk) -> float:
        try:
            from shardwise.passes.fusion import fuse
        except ImportError:  # fusion not available: every op is its own kernel
            return 0.0
        keys = {p.name: p.key for p in placed.graph.params}
        strategies = [s for s in placed.strategies if s.node != OUTPUT_NODE]
        result = fuse(
            placed.graph, strategies, placed.mesh, input_placements=placed.input_placements,
            param_placements={keys[k]: v for k, v in placed.param_placements.items() if k in keys},
            train=self.train,
        )  # fmt: skip
        return float(sum(g.bytes_saved for g in result.groups))

    def _saved_bytes(
        self, g: Graph, by_node: dict[str, NodeStrategy], params: dict, local: Callable[..., float]
    ) -> float:
        """Bytes of the activations the backward reads, counted once per storage (views share a base)."""
        base: dict[str, str] = {}
        size: dict[str, float] = {}
        for i in g.inputs:
            if isinstance(i.spec, TensorSpec):
                size[i.name] = local(i.spec, None)
        for n in g.nodes:
            rule = rule_for(n.op)
            if n.op == "getitem" or (rule is not None and not rule.moves_data):
                src = n.inputs[0] if n.inputs else n.name
                base[n.name] = base.get(src, src)
                continue
            s = by_node.get(n.name)
            if not n.tuple_output and isinstance(n.outputs[0], TensorSpec):
                size[n.name] = local(n.outputs[0], s.outputs[0] if s is not None and s.outputs else None)
            elif n.tuple_output:
                size[n.name] = sum(
                    local(o, s.outputs[k] if s is not None and k < len(s.outputs) else None)
                    for k, o in enumerate(n.outputs)
                    if isinstance(o, TensorSpec)
                )
        saved: set[str] = set()
        for n in g.nodes:
            rule = rule_for(n.op)
            kind = rule.kind if rule is not None else "other"
            short = n.op.split(".")[1] if n.op.startswith("aten.") else n.op
            if kind in _SAVING_KINDS or (kind == "elementwise" and short in _SAVING_ELEMENTWISE):
                for v in n.inputs:
                    if v not in params:
                        saved.add(base.get(v, v))
                if kind == "attention":
                    saved.add(n.name)  # the output (and its log-sum-exp) are read by the backward
        return sum(size.get(v, 0.0) for v in saved)
