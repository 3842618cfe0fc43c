"""Per-layer-unit costs for the whole-plan search: time, communication and memory of one micro-batch.

A :class:`UnitProfiler` prices each layer unit (``stages.units``) for a tensor-parallel degree, sequence
parallelism on or off, and a micro-batch size. Repeated blocks share a signature, so a model with hundreds of
identical blocks is placed and priced once per (tp, sp): the unit's subgraph is cut out (``stages.extract``),
placed on a ``1 x tp`` mesh by the intra-op planner (``stages.place``), fused the way codegen will fuse it
(``passes.fusion``), and then

- **priced** op by op by the price list (``costs.step.op_prices``: each op's forward, backward, the
  collectives of its redistributions and their backward, the all-reduce of partial activation gradients),
  on the micro-batch's rows: FLOPs, activations and their collectives scale from the traced batch,
  parameters do not; a fused group's forward (and its recomputation) as one kernel, its backward too where the
  program fuses it (``fused_backward``). These are the same prices a realized pipeline chunk made of these
  units gets (``costs.step.chunk_times``). ``kernels`` replaces the fusion pass by another program's kernels
  (a function from the placed unit to its fused groups: how a published system's program is priced);
- **sized** by the memory map's own step program (``passes.memory.program.step_buffers`` on the placed
  unit): its parameter elements, the bytes it keeps from its forward to its backward (``saved_bytes``: every
  activation, mask, cast and collective buffer live across the step's forward/backward boundary, its output
  included) and the most it holds beyond those while it runs (``working_bytes``), scaled the same way except
  what does not grow with the rows: the 2-byte copies autocast makes of the weights a matmul reads (one per
  micro-batch's forward, kept for its backward).

Times are seconds on one device of the group for one micro-batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from shardwise.cluster import ClusterSpec
from shardwise.costs.prices import PriceList, price_list
from shardwise.costs.step import fused_backward, fused_forward, grad_values, op_prices
from shardwise.ir.experts import weight_operands
from shardwise.ir.fusion import FusedGroup
from shardwise.ir.graph import Graph
from shardwise.ir.placement import Shard
from shardwise.ir.registry import MOE_EXPERTS, tensor_operands
from shardwise.ir.tensor import TensorSpec
from shardwise.passes.memory.program import buffer_kind, step_buffers
from shardwise.passes.sharding.gradients import param_grad_reduce
from shardwise.passes.stages.extract import extract_chunks
from shardwise.passes.stages.place import PlacedChunk, place_chunk
from shardwise.passes.stages.units import LayerUnits

__all__ = ["UnitCost", "UnitProfiler", "PRECISION_BYTES", "traced_batch"]

PRECISION_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 2}  # fp8: bf16 values, float8 matmuls
OUTPUT_NODE = "<output>"
_FLOAT = ("float", "bfloat")
# buffers that belong to one micro-batch's forward/backward (the rest: parameters, state, the whole input)
_PER_MICROBATCH = frozenset(("act", "agrad", "mask", "coll", "cgrad", "cast"))
_KEPT = frozenset(("act", "mask", "coll", "cast"))


def traced_batch(graph: Graph) -> int:
    """The batch size the graph was traced with: dim 0 of its first tensor input (1 if none, or if it is empty:
    an empty batch is not cut into parts)."""
    for i in graph.inputs:
        if isinstance(i.spec, TensorSpec) and i.spec.rank > 0:
            return i.spec.shape[0] or 1
    return 1


@dataclass(frozen=True)
class UnitCost:
    """One layer unit, one micro-batch, one device of its tensor-parallel group."""

    forward_s: float  # compute plus blocking tensor-parallel communication
    backward_s: float  # the backward alone (a recomputed forward is added by the caller: ``recompute_s``)
    comm_forward_s: float
    comm_backward_s: float
    param_elems: int  # local elements of the unit's parameters and buffers
    trainable_elems: int  # local trainable elements
    grad_reduce_bytes: int  # partial parameter gradients reduced over tp once per step (fp32)
    activation_bytes: int  # kept from the forward to the backward (the memory map's buffers)
    input_bytes: int  # kept per micro-batch under full recomputation
    output_bytes: int  # the values a cut after this unit sends (whole, per tp rank)
    flops: float  # forward FLOPs of the unit on one device of its group
    working_bytes: int = 0  # the most the unit holds beyond ``activation_bytes`` while it runs
    recompute_s: float = 0.0  # its forward run again in the backward (compute and collectives)
    tensors: int = 0  # trainable parameter tensors (the optimizer steps them one by one on CPUs)
    # of ``activation_bytes`` and ``working_bytes``: the experts' weights' casts and collectives (a rank holds
    # 1 / ep of them under expert parallelism, which the unit's placement on its tp group does not split)
    experts_saved_bytes: int = 0
    experts_working_bytes: int = 0
    # what a pipeline chunk starting at this unit keeps per micro-batch under full recomputation: the values
    # it receives, whole and at the width the program holds them (the memory map's ``input`` buffers)
    received_bytes: int = 0


@dataclass(frozen=True)
class _Placed:
    """A placed unit and what does not depend on the micro-batch size."""

    chunk: PlacedChunk
    groups: tuple[FusedGroup, ...]
    copies: frozenset[str]
    bucketed: frozenset[str]
    param_elems: int
    trainable_elems: int
    tensors: int
    grad_reduce_bytes: int
    saved_bytes: float  # at the traced batch, of buffers that grow with the rows
    working_bytes: float
    input_bytes: float
    output_bytes: float
    flops: float
    saved_fixed: float = 0.0  # kept per micro-batch whatever its rows (autocast's weight copies)
    working_fixed: float = 0.0  # held while it runs whatever its rows (parameters' casts and collectives)
    experts_saved: float = 0.0  # the experts' weights' part of saved_fixed
    experts_working: float = 0.0  # and of working_fixed
    received: float = 0.0  # the unit's inputs as its step program holds them, at the traced batch


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
        placer: Callable[..., PlacedChunk] = place_chunk,
        fusion: bool = True,
        optimizer_state: int = 2,
        kernels: Callable[[PlacedChunk], tuple[FusedGroup, ...]] | None = None,
        fused_backward: bool = False,
    ) -> None:
        self.graph = graph
        self.units = units
        self.cluster = cluster
        self.precision = precision
        self.train = train
        self.prices: PriceList = price_list(cluster, precision)
        self.placer = placer
        self.fusion = fusion
        self.optimizer_state = optimizer_state
        self.kernels = kernels
        self.fused_backward = fused_backward
        self.batch = traced_batch(graph)
        self._unit_graphs: dict[int, tuple[Graph, frozenset[str]]] = {}
        self._placed: dict[tuple[int, int, bool], _Placed] = {}
        self._costs: dict[tuple[int, int, bool, int], UnitCost] = {}
        self.placements = 0  # how many placements were solved (for the planner's notes)

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
        sig = self.units.signature[u]
        key = (sig, tp, sp, microbatch)
        if key in self._costs:
            return self._costs[key]
        pkey = (sig, tp, sp)
        if pkey not in self._placed:
            self._placed[pkey] = self._place(u, tp, sp)
        p = self._placed[pkey]
        s = microbatch / self.batch
        c = p.chunk
        ops = op_prices(
            c.graph, c.mesh, c.strategies, self.prices, train=self.train, bucketed=p.bucketed,
            recomputed=frozenset(n.name for n in c.graph.nodes), scale=s,
        )  # fmt: skip
        fused = fused_forward(c.graph, c.mesh, c.strategies, p.groups, self.prices, scale=s)
        fused_b = (
            fused_backward(c.graph, c.mesh, c.strategies, p.groups, self.prices, scale=s, grad=grad_values(c.graph))
            if self.fused_backward and self.train
            else {}
        )
        fwd = bwd = cf = cb = rec = 0.0
        for name, op in ops.items():
            if name in p.copies:
                continue  # input-derived copies run once per chunk, not once per unit
            fwd += fused.get(name, op.forward_s) + op.comm_forward_s
            bwd += fused_b.get(name, op.backward_s) + op.comm_backward_s
            cf += op.comm_forward_s
            cb += op.comm_backward_s
            rec += fused[name] + op.comm_forward_s if name in fused else op.recompute_s
        out = UnitCost(
            forward_s=fwd, backward_s=bwd if self.train else 0.0, comm_forward_s=cf,
            comm_backward_s=cb if self.train else 0.0, param_elems=p.param_elems,
            trainable_elems=p.trainable_elems, grad_reduce_bytes=p.grad_reduce_bytes,
            activation_bytes=int(p.saved_bytes * s + p.saved_fixed), input_bytes=int(p.input_bytes * s),
            output_bytes=int(p.output_bytes * s), flops=p.flops * s,
            working_bytes=int(p.working_bytes * s + p.working_fixed),
            experts_saved_bytes=int(p.experts_saved), experts_working_bytes=int(p.experts_working),
            received_bytes=int(p.received * s),
            recompute_s=rec, tensors=p.tensors,
        )  # fmt: skip
        self._costs[key] = out
        return out

    def _place(self, u: int, tp: int, sp: bool) -> _Placed:
        graph, copies = self.unit_graph(u)
        placed = self.placer(
            graph, self.cluster, tp, sequence_parallel=sp, train=self.train, precision=self.precision
        )
        self.placements += 1
        g, mesh = placed.graph, placed.mesh
        width = PRECISION_BYTES.get(self.precision, 4) / 4
        specs: dict[str, TensorSpec] = {i.name: i.spec for i in g.inputs if isinstance(i.spec, TensorSpec)}
        for n in g.nodes:
            if not n.tuple_output and isinstance(n.outputs[0], TensorSpec):
                specs[n.name] = n.outputs[0]

        def nbytes(spec: TensorSpec) -> float:
            return spec.nbytes * (width if spec.dtype.startswith(_FLOAT) else 1.0)

        by_node = {s.node: s for s in placed.strategies}
        ways_flops = 0.0
        for n in g.nodes:
            s = by_node.get(n.name)
            ways = 1
            for axis, _ in (s.split if s is not None else ()):
                ways *= mesh.axis_size(axis)
            if n.name not in copies:
                ways_flops += n.flops / ways
        # parameters: local elements, trainable ones, and those whose partial gradients are reduced per step
        grad_keys = param_grad_reduce(g, placed.strategies) if self.train else {}
        bucketed = frozenset(p.name for p in g.params if p.key in grad_keys)
        param_elems = trainable = tensors = grad_reduce = 0
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
                tensors += 1
                if p.key in grad_keys and "tp" in grad_keys[p.key]:
                    grad_reduce += 4 * n
        if self.kernels is not None:
            groups = tuple(self.kernels(placed))
        else:
            groups = self._fused_groups(placed) if self.fusion else ()
        saved, working, fixed, working_fixed, x_saved, x_working = (
            self._memory(placed) if self.train else (0.0, self._inference_working(placed), 0.0, 0.0, 0.0, 0.0)
        )
        received = (
            float(sum(b.size for b in self._buffers(placed, True) if buffer_kind(b.id) == "input")) if self.train else 0.0
        )
        inputs = sum(nbytes(i.spec) for i in g.inputs if isinstance(i.spec, TensorSpec) and i.name in specs)
        if sp:
            inputs /= tp
        outputs = sum(nbytes(specs[v]) for v in g.output_names if v in specs)
        return _Placed(
            chunk=placed, groups=groups, copies=copies, bucketed=bucketed, param_elems=param_elems,
            trainable_elems=trainable, tensors=tensors, grad_reduce_bytes=grad_reduce, saved_bytes=saved, saved_fixed=fixed,
            working_bytes=working, input_bytes=inputs, output_bytes=outputs, flops=ways_flops,
            working_fixed=working_fixed, experts_saved=x_saved, experts_working=x_working, received=received,
        )  # fmt: skip

    def _fused_groups(self, placed: PlacedChunk) -> tuple[FusedGroup, ...]:
        try:
            from shardwise.passes.fusion import fuse
        except ImportError:  # fusion not available: every op is its own kernel
            return ()
        keys = {p.name: p.key for p in placed.graph.params}
        strategies = [s for s in placed.strategies if s.node != OUTPUT_NODE]
        result = fuse(
            placed.graph, strategies, placed.mesh, input_placements=placed.input_placements,
            param_placements={keys[k]: v for k, v in placed.param_placements.items() if k in keys},
            train=self.train,
        )  # fmt: skip
        return tuple(result.groups)

    def _buffers(self, placed: PlacedChunk, train: bool) -> list:
        return step_buffers(
            placed.graph, placed.mesh, placed.strategies, param_placements=placed.param_placements,
            input_placements=placed.input_placements, train=train, precision=self.precision,
            optimizer_factor=self.optimizer_state, grad_reduce=param_grad_reduce(placed.graph, placed.strategies),
        )  # fmt: skip

    def _memory(self, placed: PlacedChunk) -> tuple[float, float, float, float, float, float]:
        """(bytes kept from the forward to the backward, the most held beyond them that grows with the rows,
        the kept bytes that do not, the most held beyond them that does not) of one micro-batch at the traced
        batch, from the memory map's buffers of the unit's training step. What does not grow with the rows:
        the parameters' casts and collectives (a weight gathered whole for a matmul, its gradient's
        collective), as large at any micro-batch size; the working parts are each part's own peak (their sum
        bounds the peak of the whole). And of the last two, the experts' weights' part."""
        buffers = self._buffers(placed, True)
        boundary = len(placed.graph.nodes)  # the step of the outputs: the forward/backward boundary
        params = {p.name for p in placed.graph.params}
        spans = [b for b in buffers if buffer_kind(b.id) in _KEPT and b.start <= boundary < b.end]
        kept = sum(b.size for b in spans if not _of_params(b.id, params))
        fixed = sum(b.size for b in spans if _of_params(b.id, params))
        rows = [b for b in buffers if not _of_params(b.id, params)]
        weights = [b for b in buffers if _of_params(b.id, params)]
        keys = {p.name: p.key for p in placed.graph.params}
        experts = {keys[v] for n in placed.graph.nodes if n.op == MOE_EXPERTS
                   for v in (tensor_operands(n)[k] for k in weight_operands(len(tensor_operands(n)))) if v in keys}  # fmt: skip
        experts |= {v for v in keys if keys[v] in experts}
        mine = [b for b in weights if _of_values(b.id, experts)]
        x_saved = sum(b.size for b in spans if _of_values(b.id, experts))
        return (
            float(kept), float(max(_profile(rows) - kept, 0)), float(fixed), float(max(_profile(weights) - fixed, 0)),
            float(x_saved), float(max(_profile(mine) - x_saved, 0)),
        )

    def _inference_working(self, placed: PlacedChunk) -> float:
        return float(_profile(self._buffers(placed, False)))


def _held_value(buffer_id: str) -> tuple[str, str]:
    """(kind, value) of a buffer of the memory map's step program: the value a ``cast:`` (autocast copy of a
    parameter, named by its key) or a ``coll:`` / ``cgrad:`` buffer (a collective on a value or on its gradient)
    holds; other kinds' values are not used."""
    kind, _, rest = buffer_id.partition(":")
    return kind, rest.split("@", 1)[0] if kind == "cast" else rest.split("->", 1)[0].split("@", 1)[0]


def _of_params(buffer_id: str, params: set[str]) -> bool:
    """Whether a buffer holds a parameter's value whatever the rows: its autocast copy (``cast:``) or a
    collective on it or on its gradient (``coll:`` / ``cgrad:`` of a parameter value)."""
    kind, value = _held_value(buffer_id)
    return kind == "cast" or (kind in ("coll", "cgrad") and value in params)


def _of_values(buffer_id: str, values: set[str]) -> bool:
    """Whether a parameter's buffer (``_of_params``) is that of one of ``values`` (parameter names or keys)."""
    kind, value = _held_value(buffer_id)
    return kind in ("cast", "coll", "cgrad") and value in values


def _profile(buffers: list) -> int:
    """The most bytes of per-micro-batch buffers live at one step."""
    events: dict[int, int] = {}
    for b in buffers:
        if buffer_kind(b.id) in _PER_MICROBATCH:
            events[b.start] = events.get(b.start, 0) + b.size
            events[b.end] = events.get(b.end, 0) - b.size
    live = peak = 0
    for t in sorted(events):
        live += events[t]
        peak = max(peak, live)
    return peak

