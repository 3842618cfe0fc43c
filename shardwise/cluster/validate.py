"""Whole-cluster consistency checks, run whenever a ClusterSpec is built.

Guarantees after ``validate_cluster(spec)`` returns: field types and values are sane; endpoint names are
unique; every link and switch joins known devices/NICs; every NIC sits on an existing node and serves only
devices of that node (name ``n{k}.…`` agreeing with its node); no two links share (src, dst); and every
device can reach every other device. Failures raise ClusterSpecError naming the field and what is allowed.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from shardwise.cluster import routing
from shardwise.cluster.checks import check_name, check_positive, check_positive_int, fail
from shardwise.errors import ClusterSpecError

if TYPE_CHECKING:
    from shardwise.cluster.spec import ClusterSpec

__all__ = ["validate_cluster"]

_NODE_PREFIX = re.compile(r"^n(\d+)\.")


def _tuple_of(field: str, value: object, cls: type) -> None:
    if not isinstance(value, tuple) or not all(isinstance(v, cls) for v in value):
        raise fail(field, value, f"must be a tuple of {cls.__name__}")


def _listing(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (", ..." if len(names) > limit else "")


def validate_cluster(spec: ClusterSpec) -> None:
    from shardwise.cluster.spec import DeviceSpec, LinkSpec, NicSpec, SwitchSpec

    check_name("name", spec.name)
    check_positive_int("num_nodes", spec.num_nodes)
    check_positive_int("devices_per_node", spec.devices_per_node)
    if not isinstance(spec.device, DeviceSpec):
        raise fail("device", spec.device, "must be a DeviceSpec")
    _tuple_of("links", spec.links, LinkSpec)
    _tuple_of("switches", spec.switches, SwitchSpec)
    _tuple_of("nics", spec.nics, NicSpec)
    check_positive_int("host_memory_bytes", spec.host_memory_bytes, "a positive integer (bytes)")
    check_positive("host_link_bandwidth", spec.host_link_bandwidth, "bytes/s")
    from shardwise.cluster.efficiency import Efficiency

    if not isinstance(spec.efficiency, Efficiency):
        raise fail("efficiency", spec.efficiency, "must be an Efficiency (shardwise.cluster.efficiency)")

    world = spec.world_size
    devices = [spec.device_name(r) for r in range(world)]
    device_set = set(devices)
    device_range = f"g0..g{world - 1}" if world > 1 else "g0"

    nic_names: list[str] = []
    for i, nic in enumerate(spec.nics):
        field = f"nics[{i}]"
        if nic.name in device_set or nic.name in nic_names:
            raise fail(f"{field}.name", nic.name, "must be unique and differ from device names (g0, g1, ...)")
        nic_names.append(nic.name)
        if nic.node >= spec.num_nodes:
            raise fail(f"{field}.node", nic.node, f"must be a node index 0..{spec.num_nodes - 1}")
        prefix = _NODE_PREFIX.match(nic.name)
        if prefix is not None and int(prefix.group(1)) != nic.node:
            raise fail(
                f"{field}.node", nic.node, f"contradicts the NIC name {nic.name!r} (node {prefix.group(1)})"
            )
        own = spec.ranks_of_node(nic.node)
        for j, rank in enumerate(nic.devices):
            if rank not in own:
                raise fail(
                    f"{field}.devices[{j}]",
                    rank,
                    f"NIC {nic.name!r} is on node {nic.node}, whose devices are ranks {own[0]}..{own[-1]}",
                )

    endpoints = device_set | set(nic_names)
    allowed = f"must name a device ({device_range})" + (
        f" or a NIC ({_listing(nic_names)})" if nic_names else ""
    )
    seen_links: dict[tuple[str, str], int] = {}
    for i, link in enumerate(spec.links):
        for end in ("src", "dst"):
            if getattr(link, end) not in endpoints:
                raise fail(f"links[{i}].{end}", getattr(link, end), allowed)
        pair = (link.src, link.dst)
        if pair in seen_links:
            raise ClusterSpecError(
                f"links[{i}]: {link.src}->{link.dst} is not allowed: it repeats links[{seen_links[pair]}]; "
                "describe parallel links as one link with their summed bandwidth"
            )
        seen_links[pair] = i

    switch_names: list[str] = []
    for i, sw in enumerate(spec.switches):
        if sw.name in endpoints or sw.name in switch_names:
            raise fail(f"switches[{i}].name", sw.name, "must be unique and differ from device and NIC names")
        switch_names.append(sw.name)
        for j, member in enumerate(sw.members):
            if member not in endpoints:
                raise fail(f"switches[{i}].members[{j}]", member, allowed)

    if world > 1:
        graph = routing.build_graph(spec)
        forward = routing.reachable(graph, devices[0])
        backward = routing.reachable(graph, devices[0], reverse=True)
        for dev in devices[1:]:
            if dev not in forward or dev not in backward:
                a, b = (devices[0], dev) if dev not in forward else (dev, devices[0])
                raise ClusterSpecError(
                    f"devices: {a} cannot reach {b}: every device must reach every other one; add links, "
                    "a switch over the devices of a node, or NICs joined by an inter-node switch ('ib')"
                )
