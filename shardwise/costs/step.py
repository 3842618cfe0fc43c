"""A whole step's price: flat plans op by op, pipelines by event simulation, and the figures derived from them.

**Flat plans** (``price_flat``): one rank's step (every rank of a flat plan runs the same shapes), in the order
the generated program runs it:

1. forward, op by op in graph order: the collectives that redistribute its operands, then its compute
   (``PriceList.forward_s`` on its share of the work; a fused group as one kernel on devices that fuse);
2. backward, in reverse order, for each op whose output needs a gradient: a recomputed op (``plan.recompute``)
   runs its forward again first (compute and collectives); then its backward compute; then the backward of its operands'
   redistributions (a slice's backward gathers, an all-gather's backward is a local slice unless the operand's
   gradient is partial on that axis, when it becomes a reduce-scatter; an all-to-all's backward is an
   all-to-all) and the all-reduce of operand gradients left partial (Megatron's conjugate operators);
   Each trainable parameter's gradient is accumulated by one node of the autograd engine (``accumulate_s``);
3. parameter gradients reduced after the backward (``plan.param_grad_reduce``) in buckets of ``BUCKET_BYTES``
   in reverse parameter order, each bucket launched when the backward has made all its gradients and run one
   after the other beside the backward: of what the backward could hide, the cluster's
   ``efficiency.comm_overlap`` is hidden (1: only what outlasts the backward is exposed; 0: all of it). A
   bucket of several gradients costs the host a copy into its flat buffer and one copy back per parameter.
   The data-parallel axes a gradient is summed over (``ir.placement.zero_group``: dp, and cp and ep where the
   mesh has them) are one collective over their combined group (``gradient_reductions``; the runtime's
   ``Mesh(combined=...)``), the other axes one each. Under ZeRO >= 1 that data-parallel reduction is a
   reduce-scatter, and the updated parameters are all-gathered over the same group after the step;
4. the optimizer step over this rank's parameter elements (``PriceList.optimizer_step_s``);
5. host offload (``plan.host_traffic``): each segment's host-link transfers beyond what that segment's forward
   (or backward) compute hides (the two directions are independent: full-duplex PCIe; transfers of one
   direction in one window queue behind each other; the ``"step"`` slot is hidden by nothing), and the host's
   optimizer step, memory-bound at the host's DRAM bandwidth (``cluster.host``), not overlapped.

**Pipelines**: :func:`simulate` times a schedule's per-device action lists from per-chunk forward and backward
times, point-to-point transfers and per-device tails (gradient reduction and optimizer);
:func:`analytic_step` is its closed-form estimate for ranking many candidates.

Every time a plan shows (its prediction, ``explain``, the timeline) comes from these functions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

from shardwise.cluster.spec import ClusterSpec
from shardwise.costs.attention import node_context_attention_s, node_ring_forward_factor, way_of
from shardwise.costs.backward import backward_s, group_backward_s, recompute_s
from shardwise.costs.compute import traced_scale
from shardwise.costs.prices import PriceList, price_list
from shardwise.ir.experts import MOE_EXPERTS, expert_axis
from shardwise.ir.fusion import FusedGroup
from shardwise.ir.graph import Graph, Node
from shardwise.ir.placement import DeviceMesh, Shard, ShardingSpec, zero_group
from shardwise.ir.plan import ExecutionPlan, HostTraffic, NodeStrategy, Prediction, Redistribute
from shardwise.ir.registry import tensor_operands
from shardwise.ir.tensor import TensorSpec

__all__ = [
    "BUCKET_BYTES", "BACKWARD_OF", "Event", "StepPrice", "OpPrice", "price_flat", "op_ways", "grad_values",
    "node_prices", "op_prices", "fused_forward", "fused_backward", "PricingContext", "plan_pricing",
    "recomputed_ops", "forward_collectives", "COMM_COLLECTIVES",
    "Action", "ScheduleDeadlock", "SimResult", "simulate", "analytic_step", "mfu", "predict_flat", "StageTail",
    "stage_tail_s", "PipelinePrice", "price_pipeline", "chunk_times", "accumulate_s", "pipeline_end_s",
    "gradient_reductions", "zero_shards",
]  # fmt: skip

BUCKET_BYTES = 25 * 2**20  # the generated gradient reduction's bucket size (as DDP's default)
#: the backward of each forward redistribution step ("" : nothing, or handled by the partial-gradient rule)
BACKWARD_OF = {"slice": "allgather", "reduce_scatter": "allgather", "alltoall": "alltoall"}
_FLOAT = ("float", "bfloat")


@dataclass(frozen=True)
class Event:
    """One piece of one rank's step: ``phase`` forward | backward | recompute | gradients | optimizer |
    offload; ``kind`` compute | comm; ``node`` the op it belongs to ("" for whole-step work)."""

    phase: str
    kind: str
    label: str
    node: str
    seconds: float


@dataclass(frozen=True)
class StepPrice:
    """A step's predicted time and what it is made of (``events`` sum to ``step_s`` for flat plans)."""

    step_s: float
    compute_s: float
    comm_s: float
    bubble_s: float
    events: tuple[Event, ...] = ()


@dataclass(frozen=True)
class OpPrice:
    """One op's prices on one rank of its plan (seconds)."""

    forward_s: float
    backward_s: float
    comm_forward_s: float
    comm_backward_s: float
    recompute_s: float = 0.0

    @property
    def step_s(self) -> float:
        """The op's whole share of a step: forward, backward, recomputation and their collectives."""
        return self.forward_s + self.backward_s + self.comm_forward_s + self.comm_backward_s + self.recompute_s

    @property
    def compute_s(self) -> float:
        return self.forward_s + self.backward_s + self.recompute_s

    @property
    def comm_s(self) -> float:
        return self.comm_forward_s + self.comm_backward_s


def op_ways(strategy: NodeStrategy | None, mesh: DeviceMesh) -> int:
    """How many devices an op's split spreads its work over."""
    if strategy is None:
        return 1
    ways = 1
    for axis, _label in strategy.split:
        ways *= mesh.axis_size(axis)
    return ways


def grad_values(graph: Graph) -> set[str]:
    """Names of the trainable parameters and of the floating-point values computed from them (the values
    whose gradient the backward makes)."""
    out = {p.name for p in graph.params if p.requires_grad and p.kind == "parameter" and p.spec.dtype.startswith(_FLOAT)}
    for n in graph.nodes:
        if any(v in out for v in n.inputs) and any(
            isinstance(o, TensorSpec) and o.dtype.startswith(_FLOAT) for o in n.outputs
        ):
            out.add(n.name)
    return out


def _local_bytes(spec: TensorSpec, placement: ShardingSpec | None, mesh: DeviceMesh, scale: float) -> float:
    n = spec.numel
    if placement is not None:
        for size, p in zip(mesh.shape, placement.placements, strict=True):
            if isinstance(p, Shard):
                n //= size
    width = spec.nbytes / max(spec.numel, 1)
    return n * width * (scale if spec.dtype.startswith(_FLOAT) else 1.0)


def redistribute_s(prices: PriceList, mesh: DeviceMesh, step: Redistribute) -> float:
    """One redistribution step: the library's collective on its axis, or the recorded time of the point-to-point
    schedule it runs instead (the synthesizer's simulation, see ``_operand_comm``)."""
    if step.algorithm.startswith("library"):
        return prices.axis_collective_s(step.collective, step.nbytes, mesh, step.axis)
    return step.time_s


def _operand_comm(
    prices: PriceList, mesh: DeviceMesh, steps: Sequence, grad_axes: Sequence[str], local_bytes: float,
    needs_grad: bool, bucketed: bool,
) -> tuple[float, float]:  # fmt: skip
    """(forward, backward) seconds of one operand's redistribution and of its gradient's reduction. A step
    that runs a point-to-point schedule instead of the library's algorithm costs the time it records (the
    synthesizer's simulation of its messages, each priced as :func:`costs.comm.message_s` prices it)."""
    fwd = sum(redistribute_s(prices, mesh, s) for s in steps)
    if not needs_grad:
        return fwd, 0.0
    remaining = list(grad_axes)
    bwd = 0.0
    for s in steps:
        if s.collective == "allgather" and s.axis in remaining:  # its gradient is partial: reduce-scatter
            remaining.remove(s.axis)
            bwd += prices.axis_collective_s("reduce_scatter", s.nbytes, mesh, s.axis)
            continue
        back = BACKWARD_OF.get(s.collective, "")
        if back:
            bwd += prices.axis_collective_s(back, s.nbytes, mesh, s.axis)
    if not bucketed:
        for axis in remaining:
            bwd += prices.axis_collective_s("allreduce", local_bytes, mesh, axis)
    return fwd, bwd


def plan_pricing(plan: ExecutionPlan, prices: PriceList) -> PricingContext:
    """The pricing context of a flat plan's ops (what :func:`node_prices` prices them with)."""
    return PricingContext(
        plan.graph, plan.mesh, prices, train=plan.mode == "train", bucketed=_bucketed_params(plan)
    )


def node_prices(plan: ExecutionPlan, prices: PriceList, *, fused_attention: bool = False) -> dict[str, OpPrice]:
    """Every op's prices on one rank of a flat plan (see the module docstring, steps 1 and 2). On a device that
    runs a fused group as one kernel, the group's forward (and recomputation) is shared among its ops in
    proportion to what each would cost alone, so the ops' prices add up to the step. ``fused_attention``: the
    program computes ring attention's blocks with fused attention kernels (a compiled published system's;
    shardwise's own programs do not: ``costs.attention``)."""
    ops = op_prices(
        plan.graph, plan.mesh, plan.strategies, prices, train=plan.mode == "train",
        bucketed=_bucketed_params(plan), recomputed=_recomputed(plan.graph, plan.recompute),
        fused_attention=fused_attention,
    )  # fmt: skip
    fused = fused_forward(plan.graph, plan.mesh, plan.strategies, plan.fused_groups, prices)
    for group in plan.fused_groups if fused else ():
        kernel = fused[group.nodes[0]]
        alone = sum(ops[n].forward_s for n in group.nodes)
        for n in group.nodes:
            p = ops[n]
            share = kernel * (p.forward_s / alone if alone else 1 / len(group.nodes))
            again = share + p.comm_forward_s if p.recompute_s else 0.0  # a recomputed group: its kernel again
            ops[n] = dataclasses.replace(p, forward_s=share, recompute_s=again)
    return ops


def op_prices(
    graph: Graph, mesh: DeviceMesh, strategies: Sequence[NodeStrategy], prices: PriceList, *, train: bool,
    bucketed: Collection[str] = (), recomputed: Collection[str] = (), scale: float = 1.0,
    fused_attention: bool = False,
) -> dict[str, OpPrice]:  # fmt: skip
    """Every op's prices on one rank of ``graph`` placed by ``strategies`` on ``mesh``. ``bucketed``: the
    parameters whose gradients are reduced after the backward (not at each use); ``recomputed``: the ops run
    again in the backward; ``scale``: price the ops on ``scale`` times the traced rows (FLOPs, activations
    and their collectives scale; parameters do not) — how the pipeline search prices a micro-batch."""
    by_node = {s.node: s for s in strategies}
    context = PricingContext(
        graph, mesh, prices, train=train, bucketed=bucketed, scale=scale, fused_attention=fused_attention
    )
    shared: set[tuple] = set()  # the program's shared collectives: the first reader in graph order pays
    return {
        node.name: context.price(node, by_node.get(node.name), recomputed=node.name in recomputed, shared=shared)
        for node in graph.nodes
    }


class PricingContext:
    """What pricing the ops of one placed graph needs, computed once (see :func:`op_prices`)."""

    def __init__(
        self, graph: Graph, mesh: DeviceMesh, prices: PriceList, *, train: bool, bucketed: Collection[str] = (),
        scale: float = 1.0, fused_attention: bool = False,
    ) -> None:  # fmt: skip
        self.graph = graph
        self.fused_attention = fused_attention
        self.mesh = mesh
        self.prices = prices
        self.bucketed = bucketed
        self.scale = scale
        self.param_bytes = {p.name: p.spec.nbytes for p in graph.params}
        self.grad = grad_values(graph) if train else set()
        self.width = traced_scale(graph, prices.precision)

    def price(
        self, node: Node, s: NodeStrategy | None, recomputed: bool = False, shared: set[tuple] | None = None
    ) -> OpPrice:
        """``node`` run by strategy ``s`` (its split, its operands' redistributions, its partial gradients).
        ``shared``: the collectives earlier ops of the step already ran (updated): ops reading one value the
        same way share its redistribution (and its backward) and the all-reduce of its partial gradient, as
        the generated program does (``codegen.emit``: one collective per value, placement and gradient
        axes), so only the first reader pays them."""
        prices, mesh, scale, graph = self.prices, self.mesh, self.scale, self.graph
        work = prices.work(node, op_ways(s, mesh), self.param_bytes, self.width)
        if scale != 1.0:
            work = work.scaled(scale)
        needs = node.name in self.grad
        forward_work = work
        if s is not None and self.fused_attention and work.cost_class == "attention":
            # a published program's ring runs its blocks after the first without a mask (costs.attention)
            for axis, label in s.split:
                if way_of(label) == "ring":
                    ins = [graph.spec_of(v) for v in tensor_operands(node) if _has_spec(graph, v)]
                    factor = node_ring_forward_factor(prices, node, ins, mesh.axis_size(axis))  # type: ignore[arg-type]
                    forward_work = dataclasses.replace(work, flops=work.flops * factor)
        fwd = prices.compute.forward_s(forward_work, recording=needs)
        bwd = backward_s(prices.compute, work) if needs else 0.0
        comm_f = comm_b = 0.0
        if s is not None and node.op != "getitem":
            steps_by_value: dict[str, list] = {}
            for r in s.redistributes:
                factor = 1.0 if r.value in self.param_bytes else scale
                steps_by_value.setdefault(r.value, []).append(dataclasses.replace(r, nbytes=int(r.nbytes * factor)))
            reduce = dict(s.grad_reduce)
            done: set[str] = set()
            for j, v in enumerate(tensor_operands(node)):
                steps = steps_by_value.get(v, []) if v not in done else []
                done.add(v)
                spec = graph.spec_of(v) if _has_spec(graph, v) else None
                want = s.inputs[j] if j < len(s.inputs) else None
                local = _local_bytes(spec, want, mesh, self.width) if isinstance(spec, TensorSpec) else 0.0
                if v not in self.param_bytes:
                    local *= scale
                grads = tuple(reduce.get(j, ()))
                if shared is not None:
                    steps, grads = _unshared(shared, v, want, steps, grads, v in self.bucketed)
                f, b = _operand_comm(prices, mesh, steps, grads, local, v in self.grad and needs,
                                     v in self.bucketed)  # fmt: skip
                comm_f += f
                comm_b += b
            axis = expert_axis(s, mesh) if node.op == MOE_EXPERTS else None
            if axis is not None:
                f, b = expert_exchange_s(prices, mesh, axis, node, s, graph, self.width * scale)
                comm_f += f
                comm_b += b if needs else 0.0
        if s is not None:
            for axis, label in s.split:
                way = way_of(label)
                if way is None:
                    continue
                # context-parallel attention by Ulysses or ring: its own communication (costs.attention)
                ins = [graph.spec_of(v) for v in tensor_operands(node) if _has_spec(graph, v)]
                f, b = node_context_attention_s(
                    prices, mesh, axis, way, node, ins, node.outputs[0], s.inputs,  # type: ignore[arg-type]
                    compute_forward_s=fwd, compute_backward_s=bwd, train=needs, width=self.width * scale,
                    fused_blocks=self.fused_attention,
                )  # fmt: skip
                comm_f += f
                comm_b += b
        rec = recompute_s(prices.compute, forward_work) + comm_f if recomputed else 0.0
        return OpPrice(fwd, bwd, comm_f, comm_b, rec)


def moe_exchange_s(alltoall: Callable[[float], float], rows_bytes: float, counts_bytes: float) -> tuple[float, float]:
    """(forward, backward) seconds of the all-to-alls of one expert-parallel experts op (``runtime.lib.moe``),
    ``alltoall(nbytes)`` pricing one all-to-all over the expert-parallel group: the forward exchanges the rows
    per expert (``counts_bytes``), then dispatches this rank's routed rows (``rows_bytes``: tokens x k rows) to
    their experts' ranks and combines the results back (two all-to-alls of the rows); the backward runs the
    two row exchanges again in the other direction. Routing is priced as balanced (each rank sends ``1/n`` of
    its rows to each rank), what a router trained with a load-balancing loss aims at."""
    exchange = alltoall(rows_bytes)
    return alltoall(counts_bytes) + 2 * exchange, 2 * exchange


def expert_exchange_s(
    prices: PriceList, mesh: DeviceMesh, axis: str, node: Node, s: NodeStrategy, graph: Graph, scale: float
) -> tuple[float, float]:
    """:func:`moe_exchange_s` of an experts op placed by ``s`` with its experts split over ``axis``."""
    operands = tensor_operands(node)
    hidden, index, experts = (graph.spec_of(v) for v in (operands[0], operands[1], operands[3]))
    if not all(isinstance(x, TensorSpec) for x in (hidden, index, experts)):
        return 0.0, 0.0
    rows = _local_bytes(hidden, s.inputs[0], mesh, scale) * index.shape[-1]  # type: ignore[union-attr]
    counts = 8 * experts.shape[0]  # type: ignore[union-attr]
    return moe_exchange_s(lambda n: prices.axis_collective_s("alltoall", n, mesh, axis), rows, counts)


#: redistribution steps that move data between ranks (the others are local: a slice, a partial's zeroing)
COMM_COLLECTIVES = ("allgather", "allreduce", "reduce_scatter", "alltoall")


def forward_collectives(plan: ExecutionPlan) -> list[tuple[str, Redistribute]]:
    """Each collective the forward of a flat plan's program runs, in graph order, with the module path of the op
    it runs before (``"<output>"``: the outputs made whole at the end): the ops' operands' redistribution steps
    that move data, a value read the same way by several ops once (the sharing rule :meth:`PricingContext.price`
    prices by), and the outputs' (``price_flat``'s last forward event); gradients' reductions are not listed."""
    by_node = {s.node: s for s in plan.strategies}
    shared: set[tuple] = set()
    out: list[tuple[str, Redistribute]] = []
    for node in plan.graph.nodes:
        s = by_node.get(node.name)
        if s is None or node.op == "getitem":
            continue
        steps_by_value: dict[str, list] = {}
        for r in s.redistributes:
            steps_by_value.setdefault(r.value, []).append(r)
        done: set[str] = set()
        for j, v in enumerate(tensor_operands(node)):
            steps = steps_by_value.get(v, []) if v not in done else []
            done.add(v)
            want = s.inputs[j] if j < len(s.inputs) else None
            steps, _ = _unshared(shared, v, want, steps, (), False)
            out.extend((node.module_path, r) for r in steps if r.collective in COMM_COLLECTIVES)
    final = by_node.get("<output>")
    if final is not None:
        out.extend(("<output>", r) for r in final.redistributes if r.collective in COMM_COLLECTIVES)
    return out


def _unshared(
    shared: set[tuple], value: str, target: ShardingSpec | None, steps: list, grad_axes: tuple[str, ...],
    bucketed: bool,
) -> tuple[list, tuple[str, ...]]:  # fmt: skip
    """What one operand read still costs once the collectives in ``shared`` ran (and records its own): its
    redistribution steps (with the gradient axes their all-gather reduce-scatters) unless a reader of the same
    value in the same placement ran them, its partial gradient's all-reduce unless one was run for the same
    value, placement and axes (the keys ``codegen.emit`` shares collectives by)."""
    fused = tuple(r.axis for r in steps if r.collective == "allgather" and r.axis in grad_axes)
    remaining = tuple(a for a in grad_axes if a not in fused)
    forward_key = ("steps", value, target, fused)
    if steps:
        if forward_key in shared:
            steps, fused = [], ()
        else:
            shared.add(forward_key)
    grad_key = ("grad", value, target, fused, remaining)
    if remaining and not bucketed:
        if grad_key in shared:
            remaining = ()
        else:
            shared.add(grad_key)
    return steps, fused + remaining


def _has_spec(graph: Graph, name: str) -> bool:
    try:
        graph.spec_of(name)
    except KeyError:
        return False
    return True


def _bucketed_params(plan: ExecutionPlan) -> set[str]:
    keys = {k for k, _ in plan.param_grad_reduce}
    return {p.name for p in plan.graph.params if p.key in keys}


def recomputed_ops(plan: ExecutionPlan) -> set[str]:
    """The ops a plan runs again in the backward: its recompute ranges, or every op of a pipeline chunk whose
    pipeline recomputes whole chunks."""
    return _recomputed(plan.graph, plan.recompute)


def _recomputed(graph: Graph, ranges: Iterable[tuple[str, str]]) -> set[str]:
    names = [n.name for n in graph.nodes]
    index = {n: k for k, n in enumerate(names)}
    out: set[str] = set()
    for first, last in ranges:
        if first in index and last in index:
            out.update(names[index[first] : index[last] + 1])
    return out


def price_flat(plan: ExecutionPlan, prices: PriceList, *, fused_backward: bool = False) -> StepPrice:
    """The step of a flat plan (see the module docstring). ``fused_backward``: the program runs each fused
    group's backward as one kernel too (``costs.backward``; shardwise's own programs do not), and ring
    attention's blocks are fused attention kernels (``costs.attention``)."""
    graph = plan.graph
    train = plan.mode == "train"
    ops = node_prices(plan, prices, fused_attention=fused_backward)
    label = {n.name: n.module_path or n.name for n in graph.nodes}
    events: list[Event] = []
    fused_bwd = _fused_backward(plan, prices) if fused_backward and train else {}
    for node in graph.nodes:
        p = ops[node.name]
        if p.comm_forward_s:
            events.append(Event("forward", "comm", label[node.name], node.name, p.comm_forward_s))
        if p.forward_s:
            events.append(Event("forward", "compute", label[node.name], node.name, p.forward_s))
    gather = _output_comm_s(plan, prices)
    if gather:
        events.append(Event("forward", "comm", "outputs (made whole on every rank)", "<output>", gather))
    if not train:
        return _total(events, 0.0)
    backward_events: list[Event] = []
    grad_ready: dict[str, float] = {}  # parameter name -> backward time elapsed when its gradient is complete
    clock = 0.0
    params = {p.name for p in graph.params}
    for node in reversed(graph.nodes):
        p = ops[node.name]
        rec = p.recompute_s  # (a recomputed fused group runs its kernel once more: node_prices shares it)
        bwd = fused_bwd.get(node.name, p.backward_s)
        for phase, kind, seconds in (("recompute", "compute", rec), ("backward", "compute", bwd),
                                     ("backward", "comm", p.comm_backward_s)):  # fmt: skip
            if seconds:
                backward_events.append(Event(phase, kind, label[node.name], node.name, seconds))
                clock += seconds
        if p.backward_s:
            for v in node.inputs:
                if v in params:
                    grad_ready[v] = clock
    accumulate = accumulate_s(prices, len(_trainable(plan)))
    if accumulate:
        backward_events.append(Event("backward", "compute", "parameter gradients accumulated", "", accumulate))
        clock += accumulate
    events += backward_events
    backward_total = clock
    gradient_s, bucket_copies_s = _gradient_reduction(plan, prices, grad_ready, backward_total)
    if bucket_copies_s:
        events.append(Event("gradients", "compute", "gradient buckets flattened and copied back", "", bucket_copies_s))
    if gradient_s:
        events.append(Event("gradients", "comm", "gradient reduction (exposed)", "", gradient_s))
    opt = _optimizer_s(plan, prices)
    if opt:
        events.append(Event("optimizer", "compute", f"optimizer step ({plan.optimizer or 'adamw'})", "", opt))
    gather = _zero_gather_s(plan, prices)
    if gather:
        events.append(Event("optimizer", "comm", "ZeRO: all-gather the updated parameters", "", gather))
    if plan.host_traffic is not None:
        exposed, host_optimizer = offload_s(plan.host_traffic, ops, prices)
        if exposed:
            events.append(Event("offload", "comm", "host offload: transfers no compute hides", "", exposed))
        if host_optimizer:
            events.append(Event("offload", "compute", "optimizer step on the host", "", host_optimizer))
    return _total(events, 0.0)


def offload_s(traffic: HostTraffic, ops: Mapping[str, OpPrice], prices: PriceList) -> tuple[float, float]:
    """(exposed host-link seconds, host optimizer seconds) of a flat plan's host offload (module docstring,
    step 5); ``ops`` are the plan's op prices in graph order."""
    from shardwise.cluster.host import host_memory_bandwidth

    seconds = list(ops.values())
    segs = traffic.segments
    forward: dict[int, float] = {}
    backward: dict[int, float] = {}

    def add(segment: int, a: int, z: int) -> None:
        forward[segment] = sum(p.forward_s + p.comm_forward_s for p in seconds[a:z])
        backward[segment] = sum(p.backward_s + p.comm_backward_s + p.recompute_s for p in seconds[a:z])

    if segs:
        add(-1, 0, segs[0][0])
        add(len(segs), segs[-1][1], len(seconds))
        for i, (a, z) in enumerate(segs):
            add(i, a, z)
    else:
        add(-1, 0, len(seconds))
    link = prices.cluster.host_link_bandwidth
    queued: dict[tuple[str, int, str], float] = {}
    for phase, segment, direction, nbytes in traffic.moves:
        key = (phase, segment, direction)
        queued[key] = queued.get(key, 0.0) + nbytes
    exposed = 0.0
    for (phase, segment, _), nbytes in queued.items():
        window = 0.0 if phase == "step" else (forward if phase == "fwd" else backward).get(segment, 0.0)
        exposed += max(0.0, nbytes / link - window)
    host = traffic.host_optimizer_bytes / host_memory_bandwidth(prices.cluster.name, prices.cluster)
    return exposed, host


def predict_flat(plan: ExecutionPlan, cluster: ClusterSpec) -> Prediction:
    """A flat plan's Prediction: its step priced by :func:`price_flat`, its memory map's peaks, and the
    achieved model FLOP/s (forward FLOPs of the graph, x3 in training: the backward's 2x)."""
    prices = price_list(cluster, plan.precision)
    step = price_flat(plan, prices)
    flops = plan.graph.total_flops * (3 if plan.mode == "train" else 1)
    tflops, util = mfu(flops, plan.mesh.size, step.step_s, prices.peak_flops)
    return Prediction(
        step_time_s=step.step_s, compute_s=step.compute_s, comm_s=step.comm_s, bubble_s=0.0,
        memory_bytes=tuple(m.arena_bytes for m in plan.memory), tflops_per_device=tflops, mfu=util,
    )  # fmt: skip


def _total(events: Sequence[Event], bubble: float) -> StepPrice:
    compute = sum(e.seconds for e in events if e.kind == "compute")
    comm = sum(e.seconds for e in events if e.kind == "comm")
    return StepPrice(compute + comm + bubble, compute, comm, bubble, tuple(events))


def _fused_forward(plan: ExecutionPlan, prices: PriceList, ops: Mapping[str, OpPrice]) -> dict[str, float]:
    return fused_forward(plan.graph, plan.mesh, plan.strategies, plan.fused_groups, prices)


def _fused_backward(plan: ExecutionPlan, prices: PriceList) -> dict[str, float]:
    grad = grad_values(plan.graph)
    return fused_backward(plan.graph, plan.mesh, plan.strategies, plan.fused_groups, prices, grad=grad)


def fused_forward(
    graph: Graph, mesh: DeviceMesh, strategies: Sequence[NodeStrategy], groups: Sequence[FusedGroup],
    prices: PriceList, scale: float = 1.0,
) -> dict[str, float]:  # fmt: skip
    """Forward compute of fused ops where the device runs a group as one kernel: the group's time on its
    first member, 0 on the others; empty where the device runs groups op by op."""
    if not groups or not prices.cluster.efficiency.fused_kernels:
        return {}
    out: dict[str, float] = {}
    for group, works, moved in _group_works(graph, mesh, strategies, groups, prices, scale):
        t = prices.compute.group_forward_s(works, moved)
        for k, n in enumerate(group.nodes):
            out[n] = t if k == 0 else 0.0
    return out


def fused_backward(
    graph: Graph, mesh: DeviceMesh, strategies: Sequence[NodeStrategy], groups: Sequence[FusedGroup],
    prices: PriceList, scale: float = 1.0, grad: Collection[str] | None = None,
) -> dict[str, float]:  # fmt: skip
    """Backward compute of fused ops for a program that runs each group's backward as one kernel
    (``costs.backward.group_backward_s``): the group's time on its first member, 0 on the others; groups none
    of whose members needs a gradient (``grad``: the values that do; default all) are left out."""
    if not groups or not prices.cluster.efficiency.fused_kernels:
        return {}
    out: dict[str, float] = {}
    for group, works, moved in _group_works(graph, mesh, strategies, groups, prices, scale):
        if grad is not None and not any(n in grad for n in group.nodes):
            continue
        t = group_backward_s(prices.compute, works, moved)
        for k, n in enumerate(group.nodes):
            out[n] = t if k == 0 else 0.0
    return out


def _group_works(
    graph: Graph, mesh: DeviceMesh, strategies: Sequence[NodeStrategy], groups: Sequence[FusedGroup],
    prices: PriceList, scale: float,
) -> Iterable[tuple[FusedGroup, list, float]]:  # fmt: skip
    """(group, its members' work, the bytes its kernel moves) for each fused group."""
    by_node = {s.node: s for s in strategies}
    param_bytes = {p.name: p.spec.nbytes for p in graph.params}
    width = traced_scale(graph, prices.precision)
    for group in groups:
        works = [
            prices.work(graph.node(n), op_ways(by_node.get(n), mesh), param_bytes, width).scaled(scale)
            for n in group.nodes
        ]
        moved = sum(w.bytes for w in works) - group.bytes_saved * width * scale
        yield group, works, max(moved, 0.0)


def _sharded_over(placement: ShardingSpec | None, mesh: DeviceMesh, axis: str) -> bool:
    """Whether ``placement`` splits its tensor over mesh ``axis``."""
    if placement is None or axis not in mesh.axis_names:
        return False
    return isinstance(placement.placements[mesh.axis_names.index(axis)], Shard)


def _param_local_elements(plan: ExecutionPlan) -> dict[str, int]:
    placements = dict(plan.param_placements)
    out = {}
    for p in plan.graph.params:
        pl = placements.get(p.key)
        shape = pl.local_shape(p.spec.shape, plan.mesh) if pl is not None else p.spec.shape
        n = 1
        for d in shape:
            n *= d
        out[p.name] = n
    return out


def accumulate_s(prices: PriceList, tensors: int) -> float:
    """The backward's accumulation of ``tensors`` parameter gradients: one node of the autograd engine each
    (hidden where the host runs ahead of the device)."""
    eff = prices.cluster.efficiency
    return 0.0 if eff.overhead_hidden else tensors * eff.backward_op_overhead_s


def _gradient_reduction(
    plan: ExecutionPlan, prices: PriceList, ready: Mapping[str, float], backward_s: float
) -> tuple[float, float]:
    """(exposed seconds of the bucketed parameter-gradient reduction, seconds of the host's copies into and
    out of the buckets) (see the module docstring, step 3). A bucket runs beside the backward; the cluster's
    ``efficiency.comm_overlap`` is the fraction of it the backward hides (1: what outlasts the backward is
    exposed; 0: all of it). A bucket of several gradients is one flat buffer: the runtime copies the
    gradients into it (one concatenation) and the sums back out (one copy per parameter)."""
    axes_of = dict(plan.param_grad_reduce)
    if not axes_of:
        return 0.0, 0.0
    mesh = plan.mesh
    local = _param_local_elements(plan)
    buckets: dict[tuple[str, ...], list[tuple[float, float]]] = {}  # axes -> [(ready, bytes)]
    for p in reversed(plan.graph.params):
        axes = tuple(a for a in axes_of.get(p.key, ()) if mesh.axis_size(a) > 1)
        if not axes or p.name not in ready:
            continue
        buckets.setdefault(axes, []).append((ready[p.name], 4.0 * local[p.name]))
    comm_free = 0.0
    total = 0.0
    copies = 0.0
    compute = prices.compute

    def launch(axes: tuple[str, ...], start: float, size: float, count: int) -> float:
        nonlocal total, copies
        t = _bucket_s(plan, prices, axes, size)
        total += t
        if count > 1:  # torch.cat into the flat buffer, then one copy_ back per parameter
            copies += compute.with_overhead(compute.byte_s(2 * size), 1 + count)
        return max(comm_free, start) + t

    for axes, grads in buckets.items():
        grads.sort()
        size = start = 0.0
        count = 0
        for t, nbytes in grads:
            size += nbytes
            count += 1
            start = max(start, t)
            if size >= BUCKET_BYTES:
                comm_free = launch(axes, start, size, count)
                size, count = 0.0, 0
        if size:
            comm_free = launch(axes, start, size, count)
    overlap = prices.cluster.efficiency.comm_overlap
    return overlap * max(0.0, comm_free - backward_s) + (1.0 - overlap) * total, copies


def gradient_reductions(mesh: DeviceMesh, axes: Iterable[str], zero: int) -> tuple[tuple[object, str], ...]:
    """The collectives that sum a gradient over mesh ``axes``, as the runtime runs them
    (``runtime.lib.gradients.reduction_axes``): (axis or combined axes, collective), one all-reduce per axis
    that is not data-parallel, then one over the combined group of its data-parallel axes (``zero_group``), a
    reduce-scatter under ZeRO >= 1 (the sharded bucket). Axes of one rank are left out."""
    axes = tuple(a for a in axes if mesh.axis_size(a) > 1)
    group = zero_group(mesh, axes)
    out: list[tuple[object, str]] = [(a, "allreduce") for a in axes if a not in group]
    if group:
        out.append((group if len(group) > 1 else group[0], "reduce_scatter" if zero >= 1 else "allreduce"))
    return tuple(out)


def zero_shards(plan: ExecutionPlan) -> dict[str, int]:
    """Per trainable parameter (value name), how many ranks ZeRO >= 1 shards its optimizer state (and fp32
    master) over: the size of the data-parallel group its gradient is summed over (``zero_group``; 1 without
    ZeRO). A ZeRO-3 parameter split over a data axis is summed over the other data axes only (its gather's
    backward reduce-scatters it), so its local piece is sharded over them."""
    axes_of = dict(plan.param_grad_reduce)
    placements = dict(plan.param_placements)
    mesh = plan.mesh
    out = {}
    for p in _trainable(plan):
        pl = placements.get(p.key)
        split = {a for a, x in zip(mesh.axis_names, pl.placements, strict=True) if isinstance(x, Shard)} if pl else set()
        group = zero_group(mesh, axes_of.get(p.key, ())) if plan.zero_stage >= 1 else ()
        out[p.name] = mesh.group_size(tuple(a for a in group if a not in split))
    return out


def _bucket_s(plan: ExecutionPlan, prices: PriceList, axes: tuple[str, ...], nbytes: float) -> float:
    return sum(
        prices.axis_collective_s(kind, nbytes, plan.mesh, axis)
        for axis, kind in gradient_reductions(plan.mesh, axes, plan.zero_stage)
    )


def _trainable(plan: ExecutionPlan) -> list:
    return [
        p for p in plan.graph.params
        if p.requires_grad and p.kind == "parameter" and p.spec.dtype.startswith(_FLOAT)
    ]  # fmt: skip


def _optimizer_s(plan: ExecutionPlan, prices: PriceList) -> float:
    if any(name.startswith("optimizer:") for name, _ in plan.tiers):
        return 0.0  # the host steps it (offload_s)
    local = _param_local_elements(plan)
    trainable = _trainable(plan)
    shards = zero_shards(plan)
    # ZeRO: this rank steps its slice of each parameter's (local) elements
    elements = sum(local[p.name] / shards[p.name] for p in trainable)
    foreach = prices.cluster.efficiency.overhead_hidden  # PyTorch steps tensors with foreach kernels on GPUs
    return prices.optimizer_step_s(elements, len(trainable), plan.optimizer or "adamw", foreach=foreach)


def _zero_gather_s(plan: ExecutionPlan, prices: PriceList) -> float:
    """ZeRO 1 and 2: the updated parameters all-gathered after the step over the group each was sharded over
    (ZeRO 3 keeps them sharded: its gathers are the plan's redistributions before each use)."""
    if plan.zero_stage not in (1, 2):
        return 0.0
    local = _param_local_elements(plan)
    axes_of = dict(plan.param_grad_reduce)
    by_group: dict[tuple[str, ...], float] = {}
    for p in _trainable(plan):
        group = zero_group(plan.mesh, axes_of.get(p.key, ()))
        if group:
            by_group[group] = by_group.get(group, 0.0) + 4.0 * local[p.name]
    return sum(prices.axis_collective_s("allgather", n, plan.mesh, g) for g, n in by_group.items())


# --- pipelines ---------------------------------------------------------------------------------------------

Action = tuple[str, int, int]


class ScheduleDeadlock(RuntimeError):
    """The action lists wait on each other: no order of execution completes them (a shardwise bug)."""


@dataclass(frozen=True)
class SimResult:
    step_s: float
    device_busy_s: tuple[float, ...]  # compute time of each device stage
    device_end_s: tuple[float, ...]  # when each device stage finished its last action
    bubble_s: float  # idle time of the busiest device stage before its last action
    comm_exposed_s: float  # the step's tail spent in gradient reduction and the optimizer
    actions: tuple[tuple[tuple[float, float], ...], ...] = ()  # per device stage: (start, end) of each action


def simulate(
    actions: Sequence[Sequence[Action]],
    forward_s: Sequence[float],
    backward_s: Sequence[float],
    transfer_s: Callable[[int, int], float] | Sequence[float],
    tail_s: Sequence[float] = (),
) -> SimResult:
    """Time per-device action lists ``(kind, chunk, microbatch)``: an action starts when its device is free
    and its inputs have arrived (forward of chunk ``c`` needs forward ``c - 1`` of the same micro-batch plus
    the transfer; backward of ``c`` needs backward ``c + 1`` plus the transfer, and its own forward). Sends
    never block the sender, so transfers overlap compute. After its last action each device runs its tail
    (gradient reduction and optimizer); the step ends when the last device is done.

    ``forward_s[c]``/``backward_s[c]``: one micro-batch of chunk ``c``; ``transfer_s``: seconds to send
    chunk ``c``'s output to chunk ``c + 1`` (the same for the gradient back), as a function
    ``(c, microbatch)`` or a sequence by chunk; ``tail_s[p]``: device ``p``'s tail."""
    pp = len(actions)
    chunks = len(forward_s)
    xfer = transfer_s if callable(transfer_s) else (lambda c, _i, t=transfer_s: t[c] if c < len(t) else 0.0)
    f_done: dict[tuple[int, int], float] = {}
    b_done: dict[tuple[int, int], float] = {}
    pos = [0] * pp
    free = [0.0] * pp
    busy = [0.0] * pp
    spans: list[list[tuple[float, float]]] = [[] for _ in range(pp)]
    remaining = sum(len(a) for a in actions)
    while remaining:
        progressed = False
        for p in range(pp):
            while pos[p] < len(actions[p]):
                kind, c, i = actions[p][pos[p]]
                if kind == "F":
                    if c == 0:
                        ready = 0.0
                    elif (c - 1, i) in f_done:
                        ready = f_done[(c - 1, i)] + (xfer(c - 1, i) if (c - 1) % pp != c % pp else 0.0)
                    else:
                        break
                    dur = forward_s[c]
                else:
                    if (c, i) not in f_done:
                        break
                    if c == chunks - 1:
                        ready = f_done[(c, i)]
                    elif (c + 1, i) in b_done:
                        ready = max(
                            f_done[(c, i)],
                            b_done[(c + 1, i)] + (xfer(c, i) if (c + 1) % pp != c % pp else 0.0),
                        )
                    else:
                        break
                    dur = backward_s[c]
                start = max(free[p], ready)
                end = start + dur
                (f_done if kind == "F" else b_done)[(c, i)] = end
                spans[p].append((start, end))
                free[p] = end
                busy[p] += dur
                pos[p] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = {p: actions[p][pos[p]] for p in range(pp) if pos[p] < len(actions[p])}
            raise ScheduleDeadlock(f"pipeline schedule deadlocks: next actions {stuck}")
    tails = [tail_s[p] if p < len(tail_s) else 0.0 for p in range(pp)]
    ends = [free[p] + tails[p] for p in range(pp)]
    step = max(ends) if ends else 0.0
    worst = max(range(pp), key=lambda p: busy[p]) if pp else 0
    bubble = free[worst] - busy[worst] if pp else 0.0
    exposed = step - max(free) if pp else 0.0
    return SimResult(step, tuple(busy), tuple(free), bubble, exposed, tuple(tuple(s) for s in spans))


def analytic_step(
    pp: int,
    virtual: int,
    microbatches: int,
    device_work_s: Sequence[float],
    chunk_work_s: Sequence[float],
    transfer_s: float,
    tail_s: Sequence[float],
) -> float:
    """A closed-form estimate of :func:`simulate` for ranking many candidates: the busiest device's work over
    all micro-batches, plus the fill-and-drain bubble of ``pp - 1`` chunk steps and its transfers."""
    m = microbatches
    busiest = max(device_work_s) if device_work_s else 0.0
    bubble = (pp - 1) * (max(chunk_work_s) + 2 * transfer_s) if pp > 1 else 0.0
    return m * busiest + bubble + (max(tail_s) if tail_s else 0.0)


def mfu(model_flops: float, devices: int, step_s: float, peak_flops: float) -> tuple[float, float]:
    """(TFLOP/s per device, model FLOPs utilization) of ``model_flops`` per step on ``devices`` devices."""
    if step_s <= 0 or devices <= 0:
        return 0.0, 0.0
    per_device = model_flops / devices / step_s
    return per_device / 1e12, per_device / peak_flops


# --- the tail of a pipeline device stage, and a whole pipeline plan ------------------------------------------


@dataclass(frozen=True)
class StageTail:
    """What one device stage does after its last backward, on one of its ranks."""

    trainable_elems: float  # local (tensor-parallel) trainable elements of the stage's chunks
    tensors: int  # trainable parameter tensors
    tp_grad_bytes: float  # partial parameter gradients reduced over the tensor-parallel group (fp32)
    dp_ranks: tuple[int, ...]
    tp_ranks: tuple[int, ...]
    tied: tuple[tuple[float, tuple[int, ...]], ...] = ()  # (fp32 bytes, ranks of the stages holding a copy)
    # expert parallelism: elements reduced over no data-parallel rank (the experts when ep = dp: each expert's
    # gradient is complete on its rank); in pipelines an inner data group the gradients are all-reduced over
    # first (fp32 bytes) before ``dp_ranks``: the ep group when 1 < ep < dp (``dp_ranks`` then the dp/ep
    # replicas, ZeRO's axis), the cp group under context parallelism
    unreduced_elems: float = 0.0
    inner_ranks: tuple[int, ...] = ()
    inner_grad_bytes: float = 0.0
    # flat plans with 1 < ep < dp: of trainable_elems, those summed over a part of dp_ranks only (the experts'
    # dp/ep replicas), the others over all of dp_ranks at once (their combined group, runtime.lib.gradients)
    expert_elems: float = 0.0
    expert_ranks: tuple[int, ...] = ()


def stage_tail_s(prices: PriceList, tail: StageTail, *, optimizer: str, zero: int) -> float:
    """A device stage's gradient reduction (data parallel, tensor-parallel partial sums, tied weights) and
    optimizer step: run after its last backward (ZeRO >= 1: a reduce-scatter over data parallelism, the
    optimizer on this rank's slice, then an all-gather of the updated parameters). Each group of data-parallel
    ranks is one collective (``gradient_reductions``). With expert parallelism the gradients of the experts are
    reduced over their replicas only: none when ep = dp (``unreduced_elems``); in pipelines with ep < dp the
    others over ``inner_ranks`` first, then everything over the replicas ``dp_ranks`` (with cp: every gradient
    over the cp group ``inner_ranks`` first); in flat plans with ep < dp the experts' over ``expert_ranks`` and
    the others over ``dp_ranks``."""
    reduced = max(tail.trainable_elems - tail.unreduced_elems - tail.expert_elems, 0.0)
    parts = [(reduced, tail.dp_ranks)]
    if tail.expert_elems:
        parts.append((tail.expert_elems, tail.expert_ranks))
    t = prices.collective_s("allreduce", tail.inner_grad_bytes, tail.inner_ranks)
    elements = tail.unreduced_elems
    for elems, ranks in parts:
        sharded = zero >= 1 and len(ranks) > 1
        t += prices.collective_s("reduce_scatter" if sharded else "allreduce", 4.0 * elems, ranks)
        if sharded:
            t += prices.collective_s("allgather", 4.0 * elems, ranks)
        elements += elems / len(ranks) if sharded else elems
    t += prices.collective_s("allreduce", tail.tp_grad_bytes, tail.tp_ranks)
    for nbytes, ranks in tail.tied:
        t += prices.collective_s("allreduce", nbytes, ranks)
    foreach = prices.cluster.efficiency.overhead_hidden
    t += prices.optimizer_step_s(elements, tail.tensors, optimizer, foreach=foreach)
    return t


@dataclass(frozen=True)
class PipelinePrice:
    """A pipeline plan's step: the simulated schedule and the per-chunk and per-stage figures it ran on."""

    step: StepPrice
    sim: SimResult
    chunk_forward_s: tuple[float, ...]
    chunk_backward_s: tuple[float, ...]
    transfer_s: tuple[float, ...]
    tail_s: tuple[float, ...]
    end_s: float = 0.0  # after every device's tail: the loss all-reduce or the outputs' gather (pipeline_end_s)


def chunk_times(
    plan: ExecutionPlan, prices: PriceList, recompute: bool, *, fused_backward: bool = False
) -> tuple[float, float, float, float]:
    """(forward, backward, forward collectives, backward collectives) of one micro-batch of a pipeline chunk's
    plan on one rank; with ``recompute`` the backward runs the whole forward again first, otherwise the ranges
    the chunk's plan recomputes (``plan.recompute``) (a fused group as its kernel); ``fused_backward``: the
    program runs each fused group's backward as one kernel too."""
    graph = plan.graph
    train = plan.mode == "train"
    names = frozenset(n.name for n in graph.nodes) if recompute else frozenset(_recomputed(graph, plan.recompute))
    ops = op_prices(
        graph, plan.mesh, plan.strategies, prices, train=train, bucketed=_bucketed_params(plan),
        recomputed=names,
    )  # fmt: skip
    fused = fused_forward(graph, plan.mesh, plan.strategies, plan.fused_groups, prices)
    fused_b = _fused_backward(plan, prices) if fused_backward and train else {}
    fwd = bwd = cf = cb = 0.0
    for name, p in ops.items():
        fwd += fused.get(name, p.forward_s) + p.comm_forward_s
        rec = fused[name] + p.comm_forward_s if p.recompute_s and name in fused else p.recompute_s
        bwd += fused_b.get(name, p.backward_s) + p.comm_backward_s + rec
        cf += p.comm_forward_s
        cb += p.comm_backward_s
    out = _output_comm_s(plan, prices)
    bwd += accumulate_s(prices, len(_trainable(plan)))  # every micro-batch's backward accumulates them
    return fwd + out, bwd if train else 0.0, cf + out, cb


def _output_comm_s(plan: ExecutionPlan, prices: PriceList) -> float:
    final = next((s for s in plan.strategies if s.node == "<output>"), None)
    if final is None:
        return 0.0
    return sum(redistribute_s(prices, plan.mesh, r) for r in final.redistributes)


def price_pipeline(plan: ExecutionPlan, prices: PriceList, *, fused_backward: bool = False) -> PipelinePrice:
    """A pipeline plan's step (``plan.pipeline``): per-chunk times from the chunks' own plans, transfers
    between the stages, each stage's tail, and the schedule's event simulation. ``fused_backward``: as for
    :func:`price_flat`."""
    spec = plan.pipeline
    if spec is None:
        raise ValueError("price_pipeline needs a pipeline plan (plan.pipeline is None)")
    train = plan.mode == "train"
    recompute = spec.recompute == "full"
    times = [chunk_times(st.plan, prices, recompute, fused_backward=fused_backward) for st in spec.stages]
    fwd = tuple(t[0] for t in times)
    bwd = tuple(t[1] for t in times)
    transfer = [0.0] * len(spec.stages)
    width = traced_scale(plan.graph, plan.precision)
    for t in spec.transfers:
        nbytes = t.spec.nbytes * (width if t.spec.dtype.startswith(_FLOAT) else 1.0)
        src, dst = spec.rank(t.src % spec.pp, 0, 0), spec.rank(t.dst % spec.pp, 0, 0)
        transfer[t.src] += prices.p2p_s(nbytes, src, dst)
    tails = [0.0] * spec.pp
    if train:
        for p in range(spec.pp):
            tails[p] = stage_tail_s(prices, _stage_tail(plan, p), optimizer=plan.optimizer or "adamw",
                                    zero=getattr(spec, "zero", 0))  # fmt: skip
    sim = simulate([list(a) for a in spec.actions], fwd, bwd, transfer, tails)
    busy = max(sim.device_busy_s) if sim.device_busy_s else 0.0
    worst = max(range(spec.pp), key=lambda p: sim.device_busy_s[p]) if spec.pp else 0
    chunks_on_worst = range(worst, len(spec.stages), spec.pp)
    end = pipeline_end_s(plan, prices)
    comm = sum((times[c][2] + times[c][3]) * spec.microbatches for c in chunks_on_worst) + tails[worst] + end
    step = StepPrice(sim.step_s + end, max(busy - comm + tails[worst] + end, 0.0), comm, sim.bubble_s)
    return PipelinePrice(step, sim, fwd, bwd, tuple(transfer), tuple(tails), end)


def pipeline_end_s(plan: ExecutionPlan, prices: PriceList) -> float:
    """What a pipeline step does on every rank after its schedule and tails: training all-reduces the step's
    loss over every rank (a float64 scalar); inference gathers the last stage's outputs (every micro-batch,
    every replica) to rank 0 as one pickled object each (``efficiency.object_overhead_s`` and
    ``object_byte_s``)."""
    spec = plan.pipeline
    assert spec is not None
    ranks = tuple(range(spec.world_size))
    if len(ranks) < 2:
        return 0.0
    if plan.mode == "train":
        return prices.collective_s("allreduce", 8.0, ranks)
    last = spec.stages[-1].plan.graph
    width = traced_scale(plan.graph, plan.precision)
    nbytes = 0.0
    for name in last.output_names:
        out = last.spec_of(name)
        if isinstance(out, TensorSpec):
            nbytes += out.nbytes * (width if out.dtype.startswith(_FLOAT) else 1.0)
    eff = prices.cluster.efficiency
    return eff.object_overhead_s + eff.object_byte_s * nbytes * spec.microbatches * spec.dp


def _stage_tail(plan: ExecutionPlan, p: int) -> StageTail:
    spec = plan.pipeline
    assert spec is not None
    trainable = tensors = experts = 0
    tp_bytes = cp_bytes = 0.0
    tied_keys = {k: chunks for k, chunks in spec.tied}
    tied: list[tuple[float, tuple[int, ...]]] = []
    seen: set[str] = set()
    ep = getattr(spec, "ep", 1)
    for c in range(p, len(spec.stages), spec.pp):
        chunk = spec.stages[c].plan
        local = _param_local_elements(chunk)
        reduce = dict(chunk.param_grad_reduce)
        split = {k for k, pl in chunk.param_placements if _sharded_over(pl, chunk.mesh, "ep")}
        for q in _trainable(chunk):
            if q.key in seen:
                continue  # a weight two chunks of this stage read (interleaved): one copy
            seen.add(q.key)
            trainable += local[q.name]
            experts += local[q.name] if q.key in split else 0
            tensors += 1
            if "tp" in reduce.get(q.key, ()):
                tp_bytes += 4.0 * local[q.name]
            if "cp" in reduce.get(q.key, ()):
                cp_bytes += 4.0 * local[q.name]
            if q.key in tied_keys:
                stages = sorted({x % spec.pp for x in tied_keys[q.key]})
                if len(stages) > 1:
                    tied.append((4.0 * local[q.name], tuple(spec.rank(s, 0, 0) for s in stages)))
    replicas = tuple(spec.rank(p, d, 0) for d in range(spec.dp))
    # expert parallelism (runtime.lib.pipeline): experts reduced over their dp/ep replicas only; below dp the
    # other gradients over the ep group first, then over the replicas (ZeRO's axis)
    if 1 < ep < spec.dp:
        by_ep = {"inner_ranks": replicas[:ep], "inner_grad_bytes": 4.0 * (trainable - experts)}
        replicas = replicas[::ep]
    else:
        by_ep = {"unreduced_elems": float(experts)} if ep > 1 else {}
    if spec.cp > 1:  # the partial gradients of the sequence's pieces, summed over the replica's cp ranks first
        by_ep = {"inner_ranks": tuple(spec.rank(p, 0, 0, c) for c in range(spec.cp)), "inner_grad_bytes": cp_bytes}
    return StageTail(
        trainable_elems=float(trainable), tensors=tensors, tp_grad_bytes=tp_bytes, dp_ranks=replicas,
        tp_ranks=tuple(spec.rank(p, 0, t) for t in range(spec.tp)), tied=tuple(tied), **by_ep,  # type: ignore[arg-type]
    )  # fmt: skip
