"""The price list of one cluster at one precision: the object every planner, pass and view asks for a price.

``price_list(cluster, precision)`` bundles the compute prices (``costs.compute``, ``costs.backward``) and the
communication prices (``costs.comm``) of a cluster and caches them; ``PriceList`` methods are the questions
the rest of shardwise asks (an op's forward, backward and recomputation on one device, a collective on a
group or on a mesh axis, a message, an optimizer step). A layout has one price whichever path asks, because
there is one place that answers.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

from shardwise.cluster.spec import ClusterSpec
from shardwise.costs.backward import backward_s, recompute_s
from shardwise.costs.comm import CommPrices
from shardwise.costs.compute import ComputePrices, OpWork, op_work
from shardwise.costs.memory import optimizer_state
from shardwise.ir.graph import Node
from shardwise.ir.placement import DeviceMesh

__all__ = ["PriceList", "MeshPrices", "price_list", "mesh_prices", "OPTIMIZER_KERNELS"]

#: kernels an optimizer's step launches per parameter tensor when it steps them one at a time (PyTorch's
#: single-tensor implementations on CPU: AdamW decays, updates two moments, bias-corrects, divides and adds;
#: SGD with momentum updates the buffer and the weight); a foreach step launches a handful for all tensors
OPTIMIZER_KERNELS = {"adamw": 10, "adam": 10, "sgd": 3, "none": 0}


class PriceList:
    """Prices on ``cluster`` at ``precision`` (see the module docstring)."""

    def __init__(self, cluster: ClusterSpec, precision: str = "fp32") -> None:
        self.cluster = cluster
        self.precision = precision
        self.compute = ComputePrices(cluster.device, cluster.efficiency, precision)
        self.comm = CommPrices(cluster)
        self._axis: dict[tuple[DeviceMesh, str], tuple[int, ...]] = {}

    @property
    def peak_flops(self) -> float:
        return self.compute.peak_flops

    # -- one op ---------------------------------------------------------------------------------------------

    def work(
        self, node: Node, ways: int = 1, param_bytes: Mapping[str, int] | None = None, scale: float | None = None
    ) -> OpWork:
        """``node``'s work on one of ``ways`` devices; ``scale``: bytes at this precision over traced bytes
        (``costs.compute.traced_scale`` of its graph; default: a float32 trace)."""
        return op_work(node, ways, self.precision, param_bytes, scale)

    def forward_s(self, node: Node, ways: int = 1, param_bytes: Mapping[str, int] | None = None) -> float:
        """One op's forward on one of the ``ways`` devices it is split over."""
        return self.compute.forward_s(self.work(node, ways, param_bytes))

    def backward_s(self, node: Node, ways: int = 1, param_bytes: Mapping[str, int] | None = None) -> float:
        """One op's backward on one device (the caller knows whether the op needs one)."""
        return backward_s(self.compute, self.work(node, ways, param_bytes))

    def recompute_s(self, node: Node, ways: int = 1, param_bytes: Mapping[str, int] | None = None) -> float:
        return recompute_s(self.compute, self.work(node, ways, param_bytes))

    def step_s(self, node: Node, ways: int = 1, grad: bool = False, param_bytes: Mapping[str, int] | None = None) -> float:
        """One op's share of a step: its forward (recorded by autograd when ``grad``), and its backward when
        ``grad``."""
        work = self.work(node, ways, param_bytes)
        fwd = self.compute.forward_s(work, recording=grad)
        return fwd + (backward_s(self.compute, work) if grad else 0.0)

    # -- communication --------------------------------------------------------------------------------------

    def collective_s(self, collective: str, nbytes: float, ranks: Sequence[int]) -> float:
        return self.comm.collective_s(collective, nbytes, ranks)

    def axis_group(self, mesh: DeviceMesh, axis: str | tuple[str, ...]) -> tuple[int, ...]:
        """The ranks of the first group of ``axis`` (every group of an evenly laid mesh costs the same); a tuple
        of axes: their combined group (the ranks that differ only along them, row-major over them)."""
        key = (mesh, axis)
        if key not in self._axis:
            names = (axis,) if isinstance(axis, str) else tuple(axis)
            present = [a for a in names if a in mesh.axis_names]
            if not present:
                self._axis[key] = (mesh.ranks[0],)
            else:
                self._axis[key] = mesh.groups(tuple(present))[0]
        return self._axis[key]

    def axis_collective_s(
        self, collective: str, nbytes: float, mesh: DeviceMesh, axis: str | tuple[str, ...]
    ) -> float:
        """A library collective of ``nbytes`` (the full buffer on that group) over one group of mesh ``axis``
        (or of the combined axes, one collective over all their ranks)."""
        if nbytes <= 0:
            return 0.0
        return self.comm.collective_s(collective, nbytes, self.axis_group(mesh, axis))

    def p2p_s(self, nbytes: float, src: int, dst: int) -> float:
        return self.comm.p2p_s(nbytes, src, dst)

    # -- the optimizer ----------------------------------------------------------------------------------------

    def optimizer_step_s(self, elements: float, tensors: int, optimizer: str, *, foreach: bool) -> float:
        """One optimizer step over ``elements`` float32 elements in ``tensors`` tensors on one device. Where the
        cluster measured the optimizer as the framework runs it (``efficiency.optimizer_s``, one tensor at a
        time): its cost per step, per tensor and per element. Otherwise its memory traffic (read weight,
        gradient and state; write weight and state) at the achieved bandwidth, plus its kernel launches
        (``OPTIMIZER_KERNELS`` per tensor, or one set when ``foreach``)."""
        if elements <= 0:
            return 0.0
        measured = self.cluster.efficiency.optimizer(optimizer)
        if measured is not None and not foreach:
            per_step, per_tensor, per_element = measured
            return per_step + per_tensor * max(tensors, 1) + per_element * elements
        state = optimizer_state(optimizer)
        traffic = elements * ((4 + 4 + 4 * state) + (4 + 4 * state))
        kernels = OPTIMIZER_KERNELS.get(optimizer.lower(), 10) * (1 if foreach else max(tensors, 1))
        return self.compute.with_overhead(self.compute.byte_s(traffic), kernels)


class MeshPrices:
    """A price list seen from one mesh: ops split over its axes, collectives over one group of an axis."""

    def __init__(self, prices: PriceList, mesh: DeviceMesh) -> None:
        self.prices = prices
        self.mesh = mesh
        self.cluster = prices.cluster
        self.precision = prices.precision

    @property
    def peak_flops(self) -> float:
        return self.prices.peak_flops

    def compute_s(self, node: Node, ways: int = 1) -> float:
        """One op's forward on one of the ``ways`` devices its split spreads it over."""
        return self.prices.forward_s(node, ways)

    def step_s(self, node: Node, ways: int = 1, grad: bool = False) -> float:
        """One op's forward, and its backward when ``grad``."""
        return self.prices.step_s(node, ways, grad)

    def collective_s(self, collective: str, nbytes: float, axis: str | tuple[str, ...]) -> float:
        """A library collective over one group of mesh ``axis`` (or of combined axes); ``nbytes`` = the full
        buffer on that group."""
        return self.prices.axis_collective_s(collective, nbytes, self.mesh, axis)


def mesh_prices(cluster: ClusterSpec, mesh: DeviceMesh, precision: str = "fp32") -> MeshPrices:
    return MeshPrices(price_list(cluster, precision), mesh)


@functools.lru_cache(maxsize=32)
def price_list(cluster: ClusterSpec, precision: str = "fp32") -> PriceList:
    """The (cached) price list of ``cluster`` at ``precision``."""
    return PriceList(cluster, precision)
