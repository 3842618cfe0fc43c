"""Host-side figures the offload cost model needs and a ClusterSpec does not hold: the host's memory
bandwidth (for the optimizer step on the host) and the host memory one rank may use.

Host memory bandwidth per node, theoretical peak of the CPUs' DRAM channels (channels x transfer rate x 8
bytes), from the vendors' system guides and CPU datasheets:

* DGX A100: 2x AMD EPYC 7742, 8 channels DDR4-3200 each: 2 x 8 x 25.6 GB/s = 409.6 GB/s;
* DGX H100: 2x Intel Xeon Platinum 8480C, 8 channels DDR5-4800 each: 2 x 8 x 38.4 GB/s = 614.4 GB/s;
* DGX-2 and Azure NDv2: 2x Intel Xeon Platinum 8168, 6 channels DDR4-2666 each: 2 x 6 x 21.3 GB/s =
  255.9 GB/s;
* ``cpu`` devices (local processes): the host *is* the device memory, so the device's own
  ``memory_bandwidth`` (already one process's share).

The GPUs of a node share the host's bandwidth and memory equally (``devices_per_node``). A real CPU
optimizer reaches a fraction of the peak (STREAM-like kernels), so host optimizer times are lower bounds.
The host link (``ClusterSpec.host_link_bandwidth``: PCIe per GPU) is taken as full duplex: host-to-device
and device-to-host copies do not slow each other.
"""

from __future__ import annotations

from shardwise.cluster.spec import ClusterSpec

__all__ = ["HOST_MEMORY_BANDWIDTH", "host_memory_bandwidth", "host_bytes_per_rank"]

GBps = 1e9
HOST_MEMORY_BANDWIDTH = {  # bytes/s per node, by preset name prefix (see the module docstring)
    "dgx-a100": 2 * 8 * 25.6 * GBps,
    "dgx-h100": 2 * 8 * 38.4 * GBps,
    "dgx2": 2 * 6 * 21.33 * GBps,
    "ndv2": 2 * 6 * 21.33 * GBps,
}
_DEFAULT = HOST_MEMORY_BANDWIDTH["dgx-a100"]


def host_memory_bandwidth(cluster_name: str, spec: ClusterSpec | None = None) -> float:
    """One rank's share of its host's DRAM bandwidth (bytes/s)."""
    if spec is not None and spec.device.kind == "cpu" or cluster_name.startswith("cpu"):
        return spec.device.memory_bandwidth if spec is not None else 10 * GBps
    per_node = next((v for k, v in HOST_MEMORY_BANDWIDTH.items() if cluster_name.startswith(k)), _DEFAULT)
    return per_node / (spec.devices_per_node if spec is not None else 8)


def host_bytes_per_rank(spec: ClusterSpec) -> int:
    """The host memory one rank may fill: the node's memory shared by its devices."""
    return spec.host_memory_bytes // spec.devices_per_node
