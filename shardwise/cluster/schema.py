"""ClusterSpec <-> plain dict / YAML, with strict validation of what a user wrote.

The dict form (also the YAML file) is::

    name: dgx-a100x2
    num_nodes: 2
    devices_per_node: 8
    world_size: 16              # optional; if present must equal num_nodes * devices_per_node
    device: {kind: A100-SXM4-80GB, peak_flops: {float32: 19.5TFLOPS, ...}, memory_bytes: 80GiB,
             memory_bandwidth: 2039GB/s}
    host_memory_bytes: 2TiB
    host_link_bandwidth: 31.5GB/s
    links:    [{src: g0, dst: g1, bandwidth: 45GB/s, latency: 0.3us, kind: nvlink}, ...]   # optional
    switches: [{name: n0.nvswitch, kind: nvswitch, port_bandwidth: 300GB/s, latency: 0.7us,
                members: [g0, ..., g7]}, ...]                                             # optional
    nics:     [{name: n0.nic0, node: 0, devices: [0], bandwidth: 200Gb/s, latency: 2.6us}, ...]  # optional
    efficiency: {gemm: 0.87, memory: 0.89, op_overhead_s: 5us, overhead_hidden: true, ...,         # optional
                 sources: {gemm: "where the figure comes from", ...}}

A cluster of identical nodes may describe one node and leave the count to ``num_nodes`` (optional, instead of
or beside the explicit lists)::

    per_node:                   # repeated on every node k; g<i> is the node's i-th device (global rank
      switches: [{name: nvswitch, kind: nvswitch, port_bandwidth: 450GB/s, latency: 0.7us,   #  k*per+i),
                  members: [g0, g1, ..., g7]}]                                              # names get n<k>.
      nics: [{name: nic0, devices: [0], bandwidth: 400Gb/s, latency: 2.6us}, ...]   # devices: local indices
      links: [{src: g0, dst: g1, bandwidth: 45GB/s, latency: 0.3us, kind: nvlink}, ...]
    fabric: {name: ib, kind: ib, port_bandwidth: 400Gb/s, latency: 0us}   # one switch joining every NIC

so ``num_nodes`` is the only figure to change for more nodes (names come out as the presets name them:
``n0.nvswitch``, ``n1.nic3``, ``ib``).

Numbers may carry units (see ``units``); plain numbers are base units. Unknown keys, wrong types, bad
values and contradictions raise ClusterSpecError naming the field (``links[3].bandwidth``), the value and
what is allowed. ``spec_to_dict`` writes plain numbers only, so ``from_dict(to_dict(s)) == s`` exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from os import PathLike
from pathlib import Path
from typing import Any

import yaml

from shardwise.cluster import units
from shardwise.cluster.checks import (
    DTYPES,
    check_nonnegative,
    check_positive,
    fail,
    normalize_dtype,
    prefixed,
)
from shardwise.cluster.efficiency import EFFICIENCY_FIELDS, PEAK, Efficiency
from shardwise.cluster.spec import ClusterSpec, DeviceSpec, LinkSpec, NicSpec, SwitchSpec
from shardwise.errors import ClusterSpecError

__all__ = ["spec_to_dict", "spec_from_dict", "write_yaml", "read_yaml"]

_TOP_REQUIRED = (
    "name",
    "num_nodes",
    "devices_per_node",
    "device",
    "host_memory_bytes",
    "host_link_bandwidth",
)
_TOP_OPTIONAL = ("world_size", "links", "switches", "nics", "efficiency", "per_node", "fabric")
_PER_NODE_KEYS = ("switches", "nics", "links")
_NODE_NIC_KEYS = ("name", "devices", "bandwidth", "latency")
_FABRIC_KEYS = ("name", "kind", "port_bandwidth", "latency")
_DEVICE_KEYS = ("kind", "peak_flops", "memory_bytes", "memory_bandwidth")
_LINK_KEYS = ("src", "dst", "bandwidth", "latency", "kind")
_SWITCH_KEYS = ("name", "kind", "port_bandwidth", "latency", "members")
_NIC_KEYS = ("name", "node", "devices", "bandwidth", "latency")


# ----- to dict ---------------------------------------------------------------------------------------


def spec_to_dict(spec: ClusterSpec) -> dict[str, Any]:
    """Plain-data form of ``spec`` (numbers in base units), suitable for YAML/JSON and fingerprints."""
    dev = spec.device
    return {
        "name": spec.name,
        "num_nodes": spec.num_nodes,
        "devices_per_node": spec.devices_per_node,
        "world_size": spec.world_size,
        "device": {
            "kind": dev.kind,
            "peak_flops": {dtype: float(v) for dtype, v in dev.peak_flops},
            "memory_bytes": dev.memory_bytes,
            "memory_bandwidth": float(dev.memory_bandwidth),
        },
        "host_memory_bytes": spec.host_memory_bytes,
        "host_link_bandwidth": float(spec.host_link_bandwidth),
        "links": [
            {
                "src": link.src,
                "dst": link.dst,
                "bandwidth": float(link.bandwidth),
                "latency": float(link.latency),
                "kind": link.kind,
            }
            for link in spec.links
        ],
        "switches": [
            {
                "name": sw.name,
                "kind": sw.kind,
                "port_bandwidth": float(sw.port_bandwidth),
                "latency": float(sw.latency),
                "members": list(sw.members),
            }
            for sw in spec.switches
        ],
        "nics": [
            {
                "name": nic.name,
                "node": nic.node,
                "devices": list(nic.devices),
                "bandwidth": float(nic.bandwidth),
                "latency": float(nic.latency),
            }
            for nic in spec.nics
        ],
        "efficiency": _efficiency_to_dict(spec.efficiency),
    }


def _efficiency_to_dict(eff: Efficiency) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in EFFICIENCY_FIELDS:
        value = getattr(eff, name)
        if name in _EFFICIENCY_TABLES:
            out[name] = {row[0]: [float(x) for x in row[1:]] for row in value}
        else:
            out[name] = value if isinstance(value, bool) else float(value)
    out["sources"] = dict(eff.sources)
    return out


# ----- from dict -------------------------------------------------------------------------------------


def _keys(where: str, d: object, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> Mapping:
    if not isinstance(d, Mapping):
        raise fail(
            where or "cluster spec", d, "must be a mapping with keys " + ", ".join(required + optional)
        )
    allowed = required + optional
    dot = f"{where}." if where else ""
    for key in d:
        if key not in allowed:
            raise ClusterSpecError(
                f"{dot}{key}: unknown key is not allowed: allowed keys are {', '.join(allowed)}"
            )
    for key in required:
        if key not in d:
            raise ClusterSpecError(f"{dot}{key}: missing: add it (required keys: {', '.join(required)})")
    return d


def _quantity(
    field: str, raw: object, parse: Callable[[object], float], unit: str, *, zero_ok: bool
) -> float:
    try:
        value = parse(raw)
    except ValueError as err:
        raise fail(field, raw, str(err)) from None
    check = check_nonnegative if zero_ok else check_positive
    return check(field, value, unit, shown=raw)


def _int(field: str, raw: object, *, minimum: int, what: str) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < minimum:
        raise fail(field, raw, f"must be {what}")
    return raw


def _byte_count(field: str, raw: object) -> int:
    value = _quantity(field, raw, units.parse_bytes, "bytes", zero_ok=False)
    if value != int(value):
        raise fail(field, raw, "must be a whole number of bytes")
    return int(value)


def _str(field: str, raw: object) -> str:
    if not isinstance(raw, str):
        raise fail(field, raw, "must be a string")
    return raw


def _list(field: str, raw: object) -> list[Any]:
    if not isinstance(raw, list):
        raise fail(field, raw, "must be a list")
    return raw


def _device(raw: object) -> DeviceSpec:
    d = _keys("device", raw, _DEVICE_KEYS)
    flops_raw = d["peak_flops"]
    if not isinstance(flops_raw, Mapping) or not flops_raw:
        raise fail("device.peak_flops", flops_raw, "must be a mapping of dtype name to FLOP/s")
    flops: dict[str, float] = {}
    for key, value in flops_raw.items():
        dtype = normalize_dtype(key) if isinstance(key, str) else None
        if dtype is None:
            raise ClusterSpecError(
                f"device.peak_flops.{key}: unknown dtype is not allowed: use one of {', '.join(DTYPES)}"
            )
        if dtype in flops:
            raise fail(f"device.peak_flops.{key}", key, f"repeats dtype {dtype}")
        flops[dtype] = _quantity(
            f"device.peak_flops.{key}", value, units.parse_flops, "FLOP/s", zero_ok=False
        )
    with prefixed("device"):
        return DeviceSpec(
            kind=_str("kind", d["kind"]),
            peak_flops=tuple(flops.items()),
            memory_bytes=_byte_count("memory_bytes", d["memory_bytes"]),
            memory_bandwidth=_quantity(
                "memory_bandwidth", d["memory_bandwidth"], units.parse_bandwidth, "bytes/s", zero_ok=False
            ),
        )


def _link(i: int, raw: object) -> LinkSpec:
    where = f"links[{i}]"
    d = _keys(where, raw, _LINK_KEYS)
    with prefixed(where):
        return LinkSpec(
            src=_str("src", d["src"]),
            dst=_str("dst", d["dst"]),
            bandwidth=_quantity("bandwidth", d["bandwidth"], units.parse_bandwidth, "bytes/s", zero_ok=False),
            latency=_quantity("latency", d["latency"], units.parse_seconds, "seconds", zero_ok=True),
            kind=_str("kind", d["kind"]),
        )


def _switch(i: int, raw: object) -> SwitchSpec:
    where = f"switches[{i}]"
    d = _keys(where, raw, _SWITCH_KEYS)
    with prefixed(where):
        members = _list("members", d["members"])
        return SwitchSpec(
            name=_str("name", d["name"]),
            kind=_str("kind", d["kind"]),
            port_bandwidth=_quantity(
                "port_bandwidth", d["port_bandwidth"], units.parse_bandwidth, "bytes/s", zero_ok=False
            ),
            latency=_quantity("latency", d["latency"], units.parse_seconds, "seconds", zero_ok=True),
            members=tuple(_str(f"members[{j}]", m) for j, m in enumerate(members)),
        )


def _nic(i: int, raw: object) -> NicSpec:
    where = f"nics[{i}]"
    d = _keys(where, raw, _NIC_KEYS)
    with prefixed(where):
        devices = _list("devices", d["devices"])
        return NicSpec(
            name=_str("name", d["name"]),
            node=_int("node", d["node"], minimum=0, what="a node index (an integer >= 0)"),
            devices=tuple(
                _int(f"devices[{j}]", r, minimum=0, what="a global rank (an integer >= 0)")
                for j, r in enumerate(devices)
            ),
            bandwidth=_quantity("bandwidth", d["bandwidth"], units.parse_bandwidth, "bytes/s", zero_ok=False),
            latency=_quantity("latency", d["latency"], units.parse_seconds, "seconds", zero_ok=True),
        )


#: efficiency fields written as a mapping of name to a list of seconds, and the list's length
_EFFICIENCY_TABLES = {"elementwise_s": 2, "optimizer_s": 3, "kernel_overhead_s": 1}


def _efficiency_table(where: str, raw: object, width: int) -> tuple[tuple, ...]:
    if not isinstance(raw, Mapping):
        raise fail(where, raw, f"must be a mapping of name to a list of {width} seconds")
    rows = []
    for key, figures in raw.items():
        if not (isinstance(figures, (list, tuple)) and len(figures) == width):
            raise fail(f"{where}.{key}", figures, f"must be a list of {width} seconds")
        values = (_quantity(f"{where}.{key}", x, units.parse_seconds, "seconds", zero_ok=True) for x in figures)
        rows.append((str(key), *values))
    return tuple(rows)


def _efficiency(raw: object) -> Efficiency:
    d = _keys("efficiency", raw, (), (*EFFICIENCY_FIELDS, "sources"))
    values: dict[str, Any] = {}
    for name in EFFICIENCY_FIELDS:
        if name not in d:
            continue
        where = f"efficiency.{name}"
        if name in ("overhead_hidden", "fused_kernels"):
            if not isinstance(d[name], bool):
                raise fail(where, d[name], "must be true or false")
            values[name] = d[name]
        elif name in _EFFICIENCY_TABLES:
            values[name] = _efficiency_table(where, d[name], _EFFICIENCY_TABLES[name])
        elif name.endswith("_s"):
            values[name] = _quantity(where, d[name], units.parse_seconds, "seconds", zero_ok=True)
        elif name == "cache_bytes":
            values[name] = _quantity(where, d[name], units.parse_bytes, "bytes", zero_ok=True)
        elif name == "cache_bandwidth":
            values[name] = _quantity(where, d[name], units.parse_bandwidth, "bytes/s", zero_ok=True)
        elif name == "comm_overlap":
            values[name] = _quantity(where, d[name], float, "a fraction in [0, 1]", zero_ok=True)
        elif name == "attention_forward_full":
            values[name] = _quantity(where, d[name], float, "a fraction of the peak (0: as attention_forward)",
                                     zero_ok=True)  # fmt: skip
        else:
            values[name] = _quantity(where, d[name], float, "a fraction of the peak", zero_ok=False)
    sources = d.get("sources", {})
    if not isinstance(sources, Mapping):
        raise fail("efficiency.sources", sources, "must be a mapping of field name to source text")
    values["sources"] = tuple((str(k), _str(f"efficiency.sources.{k}", v)) for k, v in sources.items())
    return Efficiency(**values)


def _local_device(field: str, raw: object, per_node: int) -> int:
    """A node-local device name ``g<i>`` (0 <= i < devices_per_node) -> i."""
    name = _str(field, raw)
    if not (name.startswith("g") and name[1:].isdigit() and int(name[1:]) < per_node):
        raise fail(field, raw, f"must name one of the node's devices g0..g{per_node - 1}")
    return int(name[1:])


def _expand_per_node(raw: object, fabric_raw: object, num_nodes: int, per_node: int) -> dict[str, list[Any]]:
    """The ``per_node`` template (and ``fabric``) written out for every node, as explicit lists in the dict form:
    switch and NIC names get an ``n<node>.`` prefix, device names and NIC devices become global ranks."""
    d = _keys("per_node", raw, (), _PER_NODE_KEYS) if raw is not None else {}
    out: dict[str, list[Any]] = {"switches": [], "nics": [], "links": []}
    switches = _list("per_node.switches", d.get("switches", []))
    nics = _list("per_node.nics", d.get("nics", []))
    links = _list("per_node.links", d.get("links", []))
    for i, sw in enumerate(switches):
        _keys(f"per_node.switches[{i}]", sw, _SWITCH_KEYS)
        for j, m in enumerate(_list(f"per_node.switches[{i}].members", sw["members"])):
            _local_device(f"per_node.switches[{i}].members[{j}]", m, per_node)
    for i, nic in enumerate(nics):
        _keys(f"per_node.nics[{i}]", nic, _NODE_NIC_KEYS)
        for j, r in enumerate(_list(f"per_node.nics[{i}].devices", nic["devices"])):
            what = f"a local device index (0..{per_node - 1})"
            if _int(f"per_node.nics[{i}].devices[{j}]", r, minimum=0, what=what) >= per_node:
                raise fail(f"per_node.nics[{i}].devices[{j}]", r, f"must be {what}")
    for i, link in enumerate(links):
        _keys(f"per_node.links[{i}]", link, _LINK_KEYS)
        for end in ("src", "dst"):
            _local_device(f"per_node.links[{i}].{end}", link[end], per_node)

    def rank(name: str, node: int) -> str:
        return f"g{node * per_node + int(name[1:])}"

    for node in range(num_nodes):
        for sw in switches:
            out["switches"].append({**sw, "name": f"n{node}.{_str('per_node.switches[].name', sw['name'])}",
                                    "members": [rank(m, node) for m in sw["members"]]})  # fmt: skip
        for nic in nics:
            out["nics"].append({**nic, "name": f"n{node}.{_str('per_node.nics[].name', nic['name'])}", "node": node,
                                "devices": [node * per_node + r for r in nic["devices"]]})  # fmt: skip
        for link in links:
            out["links"].append({**link, "src": rank(link["src"], node), "dst": rank(link["dst"], node)})
    if fabric_raw is not None:
        f = _keys("fabric", fabric_raw, _FABRIC_KEYS)
        if not out["nics"]:
            raise fail("fabric", dict(f), "joins the NICs of per_node.nics: describe them there")
        out["switches"].append({**f, "members": [nic["name"] for nic in out["nics"]]})
    return out


def spec_from_dict(raw: object) -> ClusterSpec:
    """Validate and build a ClusterSpec from plain data; ClusterSpecError names the first bad field."""
    d = _keys("", raw, _TOP_REQUIRED, _TOP_OPTIONAL)
    num_nodes = _int("num_nodes", d["num_nodes"], minimum=1, what="a positive integer")
    per_node = _int("devices_per_node", d["devices_per_node"], minimum=1, what="a positive integer")
    if "per_node" in d or "fabric" in d:
        template = _expand_per_node(d.get("per_node"), d.get("fabric"), num_nodes, per_node)
        d = {k: v for k, v in d.items() if k not in ("per_node", "fabric")}
        for key, items in template.items():
            d[key] = items + _list(key, d.get(key, []))
    if "world_size" in d:
        world = _int("world_size", d["world_size"], minimum=1, what="a positive integer")
        if world != num_nodes * per_node:
            raise fail(
                "world_size",
                world,
                f"contradicts num_nodes ({num_nodes}) x devices_per_node ({per_node}) = {num_nodes * per_node}",
            )
    return ClusterSpec(
        name=_str("name", d["name"]),
        num_nodes=num_nodes,
        devices_per_node=per_node,
        device=_device(d["device"]),
        links=tuple(_link(i, x) for i, x in enumerate(_list("links", d.get("links", [])))),
        switches=tuple(_switch(i, x) for i, x in enumerate(_list("switches", d.get("switches", [])))),
        nics=tuple(_nic(i, x) for i, x in enumerate(_list("nics", d.get("nics", [])))),
        host_memory_bytes=_byte_count("host_memory_bytes", d["host_memory_bytes"]),
        host_link_bandwidth=_quantity(
            "host_link_bandwidth", d["host_link_bandwidth"], units.parse_bandwidth, "bytes/s", zero_ok=False
        ),
        efficiency=_efficiency(d["efficiency"]) if "efficiency" in d else PEAK,
    )


# ----- YAML ------------------------------------------------------------------------------------------

_HEADER = (
    "# shardwise cluster spec. Units: bytes, bytes/s, seconds, FLOP/s (strings such as '25GB/s', '200Gb/s',\n"
    "# '80GiB', '2.6us', '312TFLOPS' are accepted too). Devices are g<rank>, rank = node*devices_per_node+i.\n"
)


def write_yaml(spec: ClusterSpec, path: str | PathLike[str]) -> None:
    """Write ``spec`` as YAML (plain numbers; ``read_yaml`` gives back an equal spec)."""
    text = yaml.safe_dump(spec_to_dict(spec), sort_keys=False, default_flow_style=None, width=110)
    Path(path).write_text(_HEADER + text, encoding="utf-8")


def read_yaml(path: str | PathLike[str]) -> ClusterSpec:
    """Read and validate a cluster YAML file; ClusterSpecError names the file and the bad field."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as err:
        raise ClusterSpecError(f"cannot read cluster file {str(p)!r}: {err.strerror or err}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ClusterSpecError(f"{p}: not valid YAML: {err}") from None
    try:
        return spec_from_dict(data)
    except ClusterSpecError as err:
        raise ClusterSpecError(f"{p}: {err}") from None
