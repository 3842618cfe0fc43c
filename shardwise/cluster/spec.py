"""Cluster description: devices, nodes, links, switches and NICs, as frozen values.

Units everywhere: bytes, bytes/s, seconds, FLOP/s. Endpoint names: devices ``g{rank}`` (global rank =
node * devices_per_node + local index), NICs ``n{node}.nic{i}``, per-node switches ``n{node}.nvswitch``, the
inter-node fabric ``ib``. Every ClusterSpec is validated when built (``ClusterSpecError`` otherwise), so code
holding one may rely on: endpoints of links and switches exist, NICs serve devices of their own node, and
every device can reach every other one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from typing import Any

from shardwise.cluster import ring, routing
from shardwise.cluster.checks import (
    DTYPES,
    LINK_KINDS,
    SWITCH_KINDS,
    check_kind,
    check_name,
    check_nonnegative,
    check_positive,
    check_positive_int,
    fail,
    normalize_dtype,
)
from shardwise.cluster.efficiency import PEAK, Efficiency

__all__ = ["DeviceSpec", "LinkSpec", "SwitchSpec", "NicSpec", "ClusterSpec"]


@dataclass(frozen=True)
class DeviceSpec:
    """One accelerator (or CPU process): peak FLOP/s per dtype, memory size and bandwidth.

    Invariants: ``peak_flops`` has unique canonical dtype names (see ``checks.DTYPES``), includes
    ``float32``, and every figure is positive.
    """

    kind: str
    peak_flops: tuple[tuple[str, float], ...]
    memory_bytes: int
    memory_bandwidth: float

    def __post_init__(self) -> None:
        check_name("kind", self.kind)
        if not isinstance(self.peak_flops, tuple) or not self.peak_flops:
            raise fail("peak_flops", self.peak_flops, "must be a non-empty tuple of (dtype, FLOP/s) pairs")
        seen: set[str] = set()
        for entry in self.peak_flops:
            if not (isinstance(entry, tuple) and len(entry) == 2):
                raise fail("peak_flops", entry, "must be a (dtype, FLOP/s) pair")
            dtype, value = entry
            if normalize_dtype(dtype) != dtype:
                raise fail(f"peak_flops.{dtype}", dtype, "must be a dtype name: " + ", ".join(DTYPES))
            if dtype in seen:
                raise fail(f"peak_flops.{dtype}", dtype, "must appear once")
            seen.add(dtype)
            check_positive(f"peak_flops.{dtype}", value, "FLOP/s")
        if "float32" not in seen:
            raise fail(
                "peak_flops", dict(self.peak_flops), "must include float32 (the fallback for other dtypes)"
            )
        check_positive_int("memory_bytes", self.memory_bytes, "a positive integer (bytes)")
        check_positive("memory_bandwidth", self.memory_bandwidth, "bytes/s")

    def flops(self, dtype: str) -> float:
        """Peak FLOP/s for ``dtype`` ("bfloat16", "torch.bfloat16", "bf16"); float32's if not listed."""
        table = dict(self.peak_flops)
        name = normalize_dtype(dtype)
        return table.get(name, table["float32"]) if name is not None else table["float32"]


@dataclass(frozen=True)
class LinkSpec:
    """One DIRECTED link between two endpoints; beta (s/byte) = 1/bandwidth."""

    src: str
    dst: str
    bandwidth: float
    latency: float
    kind: str

    def __post_init__(self) -> None:
        check_name("src", self.src)
        check_name("dst", self.dst)
        if self.src == self.dst:
            raise fail("dst", self.dst, "must differ from src (a link joins two endpoints)")
        check_positive("bandwidth", self.bandwidth, "bytes/s")
        check_nonnegative("latency", self.latency, "seconds")
        check_kind("kind", self.kind, LINK_KINDS)

    @property
    def beta(self) -> float:
        return 1.0 / self.bandwidth


@dataclass(frozen=True)
class SwitchSpec:
    """A switch as a hyperedge: every member endpoint has one port of ``port_bandwidth`` each way.

    Crossing the switch costs ``latency`` once (charged on the way in).
    """

    name: str
    kind: str
    port_bandwidth: float
    latency: float
    members: tuple[str, ...]

    def __post_init__(self) -> None:
        check_name("name", self.name)
        check_kind("kind", self.kind, SWITCH_KINDS)
        check_positive("port_bandwidth", self.port_bandwidth, "bytes/s")
        check_nonnegative("latency", self.latency, "seconds")
        if not isinstance(self.members, tuple) or not self.members:
            raise fail("members", self.members, "must be a non-empty list of endpoint names")
        for i, member in enumerate(self.members):
            check_name(f"members[{i}]", member)
        if len(set(self.members)) != len(self.members):
            raise fail("members", list(self.members), "must name each endpoint once")


@dataclass(frozen=True)
class NicSpec:
    """A NIC of node ``node`` shared by the devices (GLOBAL ranks) ``devices`` of that node.

    ``latency`` is the end-to-end alpha of a message leaving through this NIC; ``bandwidth`` its rate per
    direction.
    """

    name: str
    node: int
    devices: tuple[int, ...]
    bandwidth: float
    latency: float

    def __post_init__(self) -> None:
        check_name("name", self.name)
        if isinstance(self.node, bool) or not isinstance(self.node, int) or self.node < 0:
            raise fail("node", self.node, "must be a node index >= 0")
        if not isinstance(self.devices, tuple) or not self.devices:
            raise fail("devices", self.devices, "must be a non-empty list of global ranks")
        for i, rank in enumerate(self.devices):
            if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
                raise fail(f"devices[{i}]", rank, "must be a global rank (an integer >= 0)")
        if len(set(self.devices)) != len(self.devices):
            raise fail("devices", list(self.devices), "must name each rank once")
        check_positive("bandwidth", self.bandwidth, "bytes/s")
        check_nonnegative("latency", self.latency, "seconds")

    @property
    def beta(self) -> float:
        return 1.0 / self.bandwidth


@dataclass(frozen=True)
class ClusterSpec:
    """A whole cluster: ``num_nodes`` nodes of ``devices_per_node`` identical devices and their wiring.

    ``links`` are direct device-to-device (or device/NIC) links, directed; ``switches`` are hyperedges
    (per-node NVSwitch, the inter-node fabric over NICs); ``nics`` attach devices to the fabric.
    ``efficiency``: what the device and its libraries achieve of the peak figures (``cluster.efficiency``).
    Derived figures (routes, group alpha/beta) are computed on demand and cached on the instance. Times are
    the price list's business (``shardwise.costs``), not this class's.
    """

    name: str
    num_nodes: int
    devices_per_node: int
    device: DeviceSpec
    links: tuple[LinkSpec, ...]
    switches: tuple[SwitchSpec, ...]
    nics: tuple[NicSpec, ...]
    host_memory_bytes: int
    host_link_bandwidth: float
    efficiency: Efficiency = PEAK

    def __post_init__(self) -> None:
        from shardwise.cluster.validate import validate_cluster

        object.__setattr__(self, "_cache", {})
        validate_cluster(self)

    # ----- shape -------------------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return self.num_nodes * self.devices_per_node

    def node_of(self, rank: int) -> int:
        (rank,) = ring.check_ranks(self, (rank,))
        return rank // self.devices_per_node

    def ranks_of_node(self, node: int) -> tuple[int, ...]:
        if isinstance(node, bool) or not isinstance(node, int) or not 0 <= node < self.num_nodes:
            raise ValueError(
                f"node {node!r} is not a node of cluster {self.name!r} (0..{self.num_nodes - 1})"
            )
        start = node * self.devices_per_node
        return tuple(range(start, start + self.devices_per_node))

    def device_name(self, rank: int) -> str:
        return f"g{rank}"

    @property
    def nic_names(self) -> frozenset[str]:
        return self._cached("nic_names", lambda: frozenset(n.name for n in self.nics))

    def nics_of(self, rank: int) -> tuple[NicSpec, ...]:
        """The NICs that serve ``rank`` directly."""
        (rank,) = ring.check_ranks(self, (rank,))
        return tuple(n for n in self.nics if rank in n.devices)

    # ----- communication figures ---------------------------------------------------------------------
    def graph(self) -> routing.Graph:
        """The directed endpoint graph (endpoint -> (neighbour, alpha, beta) edges); see ``routing``."""
        return self._cached("graph", lambda: routing.build_graph(self))

    def p2p_route(self, a: int, b: int) -> routing.Route:
        """Cheapest route from rank ``a`` to rank ``b``: the best direct connection if any, else the least
        (beta, alpha, hops) path (see ``routing``)."""
        (a,) = ring.check_ranks(self, (a,))
        (b,) = ring.check_ranks(self, (b,))
        return self._cached(("route", a, b), lambda: self._route(a, b))

    def p2p_alpha_beta(self, a: int, b: int) -> tuple[float, float]:
        """(alpha s, beta s/byte) of the cheapest path a -> b; (0, 0) when a == b."""
        route = self.p2p_route(a, b)
        return route.alpha, route.beta

    def group_alpha_beta(self, ranks: Sequence[int]) -> tuple[float, float]:
        """(alpha, beta) of a library ring over ``ranks`` (see ``ring`` for the model, incl. NIC sharing)."""
        group = ring.check_ranks(self, ranks)
        return self._cached(("group", frozenset(group)), lambda: ring.group_alpha_beta(self, group))

    def summary(self) -> str:
        """One human line: shape, device, and the intra-/inter-node figures a ring over them gets."""
        dev = self.device
        text = (
            f"{self.name}: {self.num_nodes} node(s) x {self.devices_per_node} {dev.kind} "
            f"({dev.memory_bytes / 2**30:.4g} GiB, {dev.memory_bandwidth / 1e9:.4g} GB/s, "
            f"{dev.flops('bfloat16') / 1e12:.4g} TFLOP/s bf16, {dev.flops('float32') / 1e12:.4g} fp32)"
        )
        if self.devices_per_node > 1:
            a, b = self.group_alpha_beta(self.ranks_of_node(0))
            text += f"; intra-node ring {1 / b / 1e9:.4g} GB/s, {a * 1e6:.3g} us"
        if self.num_nodes > 1:
            a, b = self.group_alpha_beta([0, self.devices_per_node])
            text += (
                f"; inter-node (1 rank/node, NIC shared by its GPUs) {1 / b / 1e9:.4g} GB/s, {a * 1e6:.3g} us"
            )
        return text

    # ----- serialisation -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        from shardwise.cluster.schema import spec_to_dict

        return spec_to_dict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ClusterSpec:
        """Build from a plain mapping (YAML/JSON), validating every field; ClusterSpecError otherwise."""
        from shardwise.cluster.schema import spec_from_dict

        return spec_from_dict(d)

    def to_yaml(self, path: str | PathLike[str]) -> None:
        from shardwise.cluster.schema import write_yaml

        write_yaml(self, path)

    @classmethod
    def from_yaml(cls, path: str | PathLike[str]) -> ClusterSpec:
        from shardwise.cluster.schema import read_yaml

        return read_yaml(path)

    def fingerprint(self) -> str:
        """sha256 (hex) of the canonical JSON of ``to_dict()``: equal specs, equal fingerprints."""

        def digest() -> str:
            text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
            return hashlib.sha256(text.encode()).hexdigest()

        return self._cached("fingerprint", digest)

    # ----- internals ---------------------------------------------------------------------------------
    def _direct_index(self) -> tuple[dict[tuple[str, str], list[LinkSpec]], dict[str, list[SwitchSpec]]]:
        links: dict[tuple[str, str], list[LinkSpec]] = {}
        for link in self.links:
            links.setdefault((link.src, link.dst), []).append(link)
        switches: dict[str, list[SwitchSpec]] = {}
        for sw in self.switches:
            for member in sw.members:
                switches.setdefault(member, []).append(sw)
        return links, switches

    def _route(self, a: int, b: int) -> routing.Route:
        src, dst = self.device_name(a), self.device_name(b)
        if a != b:
            links, switches = self._cached("direct_index", self._direct_index)
            direct = routing.direct_route(src, dst, links.get((src, dst), ()), switches.get(src, ()))
            if direct is not None:
                return direct
        routes = self._cached(("routes", a), lambda: routing.routes_from(self.graph(), src))
        return routes[dst]

    def _cached(self, key: object, make: Any) -> Any:
        cache: dict[object, Any] = self.__dict__["_cache"]
        if key not in cache:
            cache[key] = make()
        return cache[key]
