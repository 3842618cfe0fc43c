"""Cluster presets for real machines, with the source of every figure.

Forms: ``dgx-a100xN``, ``dgx-h100xN``, ``dgx2xN``, ``ndv2xN`` (N >= 1 nodes; the bare name means one node),
``cpu:N`` (one node of N local processes of this machine, as ``shardwise calibrate`` measures it: calibrated
on first use and cached, see ``cluster.machine``; with ``SHARDWISE_CPU_CLUSTER=nominal`` the fixed nominal
figures of :func:`cpu_cluster` instead), or a path to a YAML file.

Latencies NVIDIA does not publish are our choices, stated where used: NVSwitch/NVLink alpha 0.7 us on
A100/H100 (sub-microsecond, a bit above TACCL's 0.3 us per NVLink hop on V100 to allow for the switch), and
InfiniBand alpha 2.6 us (TACCL's measured GPU-to-GPU IB alpha on Azure NDv2, reused for HDR/NDR, whose
switch and NIC latencies are of the same order). The fabric switch "ib" adds no latency of its own: the
NIC latency is the end-to-end figure.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

from shardwise.cluster.efficiency import PEAK, Efficiency
from shardwise.cluster.spec import ClusterSpec, DeviceSpec, LinkSpec, NicSpec, SwitchSpec
from shardwise.errors import ClusterSpecError

__all__ = ["get_cluster", "preset_names", "NDV2_DOUBLE_NVLINKS", "NDV2_SINGLE_NVLINKS", "cpu_cluster"]

KiB, MiB, GiB, TiB = 2**10, 2**20, 2**30, 2**40
TFLOPS = 1e12
GBps = 1e9  # decimal GB/s, as vendors quote bandwidth
US = 1e-6


def _per_mib(us_per_mib: float) -> float:
    """Bandwidth in bytes/s from a TACCL-style inverse bandwidth in microseconds per MB (MB = 2**20 bytes)."""
    return MiB / (us_per_mib * US)


# PCIe per-direction x16 rates: 8/16/32 GT/s per lane x 16 lanes x 128/130 encoding / 8 bits (PCI-SIG).
PCIE3_X16 = 15.75 * GBps
PCIE4_X16 = 31.5 * GBps
PCIE5_X16 = 63.0 * GBps

# ----- devices -----------------------------------------------------------------------------------------

# NVIDIA A100 Tensor Core GPU datasheet (80GB SXM): FP64 9.7 TF, FP32 19.5 TF, TF32 156 TF, BF16/FP16 312 TF
# (dense), INT8 624 TOPS; 80 GB HBM2e at 2,039 GB/s. 80 GB = 81920 MiB as nvidia-smi reports it.
A100_SXM4_80GB = DeviceSpec(
    kind="A100-SXM4-80GB",
    peak_flops=(
        ("float64", 9.7 * TFLOPS),
        ("float32", 19.5 * TFLOPS),
        ("tfloat32", 156 * TFLOPS),
        ("bfloat16", 312 * TFLOPS),
        ("float16", 312 * TFLOPS),
        ("int8", 624 * TFLOPS),
    ),
    memory_bytes=80 * GiB,
    memory_bandwidth=2039 * GBps,
)

# NVIDIA H100 Tensor Core GPU datasheet (SXM5), dense figures (the datasheet's headline ones are 2x sparse):
# FP64 34 TF, FP32 67 TF, TF32 494.5 TF, BF16/FP16 989 TF, FP8 1979 TF, INT8 1979 TOPS; 80 GB HBM3, 3.35 TB/s.
H100_SXM5_80GB = DeviceSpec(
    kind="H100-SXM5-80GB",
    peak_flops=(
        ("float64", 34 * TFLOPS),
        ("float32", 67 * TFLOPS),
        ("tfloat32", 494 * TFLOPS),
        ("bfloat16", 989 * TFLOPS),
        ("float16", 989 * TFLOPS),
        ("float8_e4m3fn", 1979 * TFLOPS),
        ("float8_e5m2", 1979 * TFLOPS),
        ("int8", 1979 * TFLOPS),
    ),
    memory_bytes=80 * GiB,
    memory_bandwidth=3350 * GBps,
)

# NVIDIA DGX-2 datasheet: 16 Tesla V100 32GB, 2 PFLOPS tensor (= 125 TF FP16 per GPU), V100 FP32 15.7 TF,
# FP64 7.8 TF, HBM2 900 GB/s (Tesla V100 datasheet). bfloat16/TF32 do not exist on V100 (fall back to FP32).
V100_SXM3_32GB = DeviceSpec(
    kind="V100-SXM3-32GB",
    peak_flops=(("float64", 7.8 * TFLOPS), ("float32", 15.7 * TFLOPS), ("float16", 125 * TFLOPS)),
    memory_bytes=32 * GiB,
    memory_bandwidth=900 * GBps,
)

# Tesla V100 datasheet (SXM2 32GB, as in Azure NDv2): FP64 7.8 TF, FP32 15.7 TF, tensor FP16 125 TF, 900 GB/s.
V100_SXM2_32GB = DeviceSpec(
    kind="V100-SXM2-32GB",
    peak_flops=(("float64", 7.8 * TFLOPS), ("float32", 15.7 * TFLOPS), ("float16", 125 * TFLOPS)),
    memory_bytes=32 * GiB,
    memory_bandwidth=900 * GBps,
)

# ----- what the devices achieve (cluster.efficiency), from measurements published independently of the systems
# we compare against; a figure without a source stays neutral (fraction 1.0, no overhead) ----------------------

A100_EFFICIENCY = Efficiency(
    gemm=271.2 / 312.0,
    attention_forward=0.73,
    attention_backward=0.63,
    memory=1727.0 / 1935.0,
    intra_node=232.5 / 300.0,
    inter_node=86.0 / 100.0,
    sources=(
        ("gemm", "Bekman, Machine Learning Engineering, Maximum Achievable Matmul FLOPS table (mamf-finder, v2): "
                 "A100 SXM bf16 271.2 of 312 TFLOP/s"),
        ("attention_forward", "Dao, FlashAttention-2 (2023), A100 benchmarks: forward up to 73% of peak"),
        ("attention_backward", "Dao, FlashAttention-2 (2023), A100 benchmarks: backward up to 63% of peak"),
        ("memory", "mli/transformers-benchmarks issue #4: A800 80GB (A100 die, HBM2e) copy 1727 of 1935 GB/s"),
        ("intra_node", "NVIDIA/nccl-tests issue #175: 8x A100 SXM all_reduce_perf bus bandwidth 232.5 of "
                       "300 GB/s NVLink3"),
        ("inter_node", "NVIDIA/nccl-tests issue #175: 2 nodes, 4x 200 Gb/s HDR each, 86 of 100 GB/s"),
    ),
)  # fmt: skip
H100_EFFICIENCY = Efficiency(
    gemm=794.5 / 989.0,
    attention_forward=335.0 / 989.0,
    attention_backward=322.0 / 989.0,
    sources=(
        ("gemm", "Bekman, Machine Learning Engineering, Maximum Achievable Matmul FLOPS table (mamf-finder, v2): "
                 "H100 SXM bf16 794.5 of 989 TFLOP/s"),
        ("attention_forward", "Shah et al., FlashAttention-3 (2024), Fig. 5: FlashAttention-2 forward on H100 SXM5, "
                              "head dim 128, causal (FLOPs counted as half), 16k: 335 TFLOP/s"),
        ("attention_backward", "Shah et al., FlashAttention-3 (2024), Fig. 6: FlashAttention-2 backward on H100 "
                               "SXM5, head dim 128, 16k: 322 TFLOP/s"),
    ),
)  # fmt: skip

# ----- building blocks ---------------------------------------------------------------------------------


def _nvswitch(node: int, per_node: int, port_bandwidth: float, latency: float) -> SwitchSpec:
    first = node * per_node
    return SwitchSpec(
        name=f"n{node}.nvswitch",
        kind="nvswitch",
        port_bandwidth=port_bandwidth,
        latency=latency,
        members=tuple(f"g{r}" for r in range(first, first + per_node)),
    )


def _nics(node: int, per_node: int, gpus_per_nic: int, bandwidth: float, latency: float) -> list[NicSpec]:
    first = node * per_node
    return [
        NicSpec(
            name=f"n{node}.nic{i}",
            node=node,
            devices=tuple(range(first + i * gpus_per_nic, first + (i + 1) * gpus_per_nic)),
            bandwidth=bandwidth,
            latency=latency,
        )
        for i in range(per_node // gpus_per_nic)
    ]


def _fabric(nics: list[NicSpec], port_bandwidth: float) -> SwitchSpec:
    # A non-blocking fat tree: one port per NIC, no latency beyond the NIC's end-to-end figure.
    return SwitchSpec(
        name="ib", kind="ib", port_bandwidth=port_bandwidth, latency=0.0, members=tuple(n.name for n in nics)
    )


def _switched_cluster(
    name: str,
    nodes: int,
    device: DeviceSpec,
    per_node: int,
    nvswitch_bw: float,
    nvswitch_lat: float,
    gpus_per_nic: int,
    nic_bw: float,
    nic_lat: float,
    host_memory: int,
    host_link: float,
    efficiency: Efficiency = PEAK,
) -> ClusterSpec:
    nics = [nic for node in range(nodes) for nic in _nics(node, per_node, gpus_per_nic, nic_bw, nic_lat)]
    switches = [_nvswitch(node, per_node, nvswitch_bw, nvswitch_lat) for node in range(nodes)]
    return ClusterSpec(
        name=name,
        num_nodes=nodes,
        devices_per_node=per_node,
        device=device,
        links=(),
        switches=(*switches, _fabric(nics, nic_bw)),
        nics=tuple(nics),
        host_memory_bytes=host_memory,
        host_link_bandwidth=host_link,
        efficiency=efficiency,
    )


# ----- presets -----------------------------------------------------------------------------------------


def dgx_a100(nodes: int) -> ClusterSpec:
    # DGX A100 (640GB) user guide: 8x A100-SXM4-80GB; 6 NVSwitches, NVLink3 12 links x 25 GB/s = 300 GB/s per
    # direction per GPU; 8x ConnectX-6 200 Gb/s HDR InfiniBand for compute (one per GPU) = 25 GB/s each;
    # 2 TB system memory; GPUs on PCIe Gen4 x16.
    return _switched_cluster(
        f"dgx-a100x{nodes}", nodes, A100_SXM4_80GB, 8,
        nvswitch_bw=300 * GBps, nvswitch_lat=0.7e-6,
        gpus_per_nic=1, nic_bw=200e9 / 8, nic_lat=2.6e-6,
        host_memory=2 * TiB, host_link=PCIE4_X16, efficiency=A100_EFFICIENCY,
    )  # fmt: skip


def dgx_h100(nodes: int) -> ClusterSpec:
    # DGX H100 user guide: 8x H100-SXM5-80GB; 4 NVSwitches, NVLink4 18 links x 25 GB/s = 450 GB/s per direction
    # per GPU (900 GB/s bidirectional); 8x ConnectX-7 400 Gb/s NDR InfiniBand (one per GPU) = 50 GB/s each;
    # 2 TB system memory; GPUs on PCIe Gen5 x16.
    return _switched_cluster(
        f"dgx-h100x{nodes}", nodes, H100_SXM5_80GB, 8,
        nvswitch_bw=450 * GBps, nvswitch_lat=0.7e-6,
        gpus_per_nic=1, nic_bw=400e9 / 8, nic_lat=2.6e-6,
        host_memory=2 * TiB, host_link=PCIE5_X16, efficiency=H100_EFFICIENCY,
    )  # fmt: skip


def dgx2(nodes: int) -> ClusterSpec:
    # DGX-2: 16x V100-SXM3-32GB all-to-all through 12 NVSwitches; 8 IB NICs (one per GPU pair; DGX-2 datasheet:
    # 8x 100 Gb/s EDR), 1.5 TB system memory, PCIe Gen3. Link figures are TACCL's DGX-2 profile (NSDI'23
    # artifact, topo-dgx2-1MB): NVSwitch alpha 0.3 us, beta 8 us/MB per GPU port; IB alpha 2.6 us,
    # beta 105 us/MB (MB = 2**20 bytes).
    return _switched_cluster(
        f"dgx2x{nodes}", nodes, V100_SXM3_32GB, 16,
        nvswitch_bw=_per_mib(8), nvswitch_lat=0.3e-6,
        gpus_per_nic=2, nic_bw=_per_mib(105), nic_lat=2.6e-6,
        host_memory=1536 * GiB, host_link=PCIE3_X16,
    )  # fmt: skip


# The DGX-1 (V100) hybrid cube-mesh that Azure NDv2 uses: two fully connected quads 0-3 and 4-7 plus links
# i <-> i+4; each V100 has 6 NVLink2 bricks, so 4 of its neighbours get one link and 2 get a double link.
# Which pairs are doubled is a hardware fact (DGX-1 V100 system architecture; TACCL's NDv2 profile).
NDV2_DOUBLE_NVLINKS = ((0, 1), (0, 4), (1, 3), (2, 3), (2, 6), (4, 5), (5, 7), (6, 7))
NDV2_SINGLE_NVLINKS = ((0, 2), (0, 3), (1, 2), (1, 5), (3, 7), (4, 6), (4, 7), (5, 6))
# TACCL NDv2 profile: NVLink alpha 0.3 us, beta 46 us/MB per single link (23 us/MB for a double link).
NDV2_NVLINK_ALPHA = 0.3e-6
NDV2_NVLINK_SINGLE_BW = _per_mib(46)


def ndv2(nodes: int) -> ClusterSpec:
    # Azure NDv2 (ND40rs_v2): 8x V100-SXM2-32GB in the hybrid cube-mesh above, ONE 100 Gb/s EDR InfiniBand NIC
    # per node shared by all 8 GPUs, 672 GiB host memory, PCIe Gen3. IB figures: TACCL's NDv2 profile,
    # alpha 2.6 us, beta 105 us/MB.
    links: list[LinkSpec] = []
    for node in range(nodes):
        base = node * 8
        for lanes, pairs in ((2, NDV2_DOUBLE_NVLINKS), (1, NDV2_SINGLE_NVLINKS)):
            for a, b in pairs:
                for src, dst in ((a, b), (b, a)):
                    links.append(
                        LinkSpec(
                            src=f"g{base + src}",
                            dst=f"g{base + dst}",
                            bandwidth=lanes * NDV2_NVLINK_SINGLE_BW,
                            latency=NDV2_NVLINK_ALPHA,
                            kind="nvlink",
                        )
                    )
    links.sort(key=lambda link: (int(link.src[1:]), int(link.dst[1:])))
    nics = [nic for node in range(nodes) for nic in _nics(node, 8, 8, _per_mib(105), 2.6e-6)]
    return ClusterSpec(
        name=f"ndv2x{nodes}",
        num_nodes=nodes,
        devices_per_node=8,
        device=V100_SXM2_32GB,
        links=tuple(links),
        switches=(_fabric(nics, _per_mib(105)),),
        nics=tuple(nics),
        host_memory_bytes=672 * GiB,
        host_link_bandwidth=PCIE3_X16,
    )


def _host_ram() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 8 * GiB


# Defaults for a CPU process; `shardwise calibrate` (cluster.calibrate) measures and replaces them.
CPU_PROCESS_FLOPS = 50e9  # fp32 GFLOP/s of one process on a few cores of a current x86 machine
CPU_PROCESS_MEMORY_BANDWIDTH = 10 * GBps  # one process's share of DRAM bandwidth
CPU_GLOO_LATENCY = 30e-6  # gloo over loopback TCP, small message one way
CPU_GLOO_BANDWIDTH = 2 * GBps  # gloo over loopback TCP, large message


# How a CPU process runs the generated program, whatever its speed: it computes its own ops (no device to run
# ahead of the host, so dispatch and compute add up) and runs a fused group's ops one by one (codegen: Triton on
# CUDA, the eager PyTorch equivalent on CPU).
CPU_EFFICIENCY = Efficiency(
    overhead_hidden=False,
    fused_kernels=False,
    sources=(
        ("overhead_hidden", "a CPU process dispatches and computes its own ops in turn"),
        ("fused_kernels", "codegen runs fused groups as their eager PyTorch ops on CPU"),
    ),
)


def cpu_cluster(
    n: int,
    *,
    flops: float = CPU_PROCESS_FLOPS,
    memory_bandwidth: float = CPU_PROCESS_MEMORY_BANDWIDTH,
    latency: float = CPU_GLOO_LATENCY,
    bandwidth: float = CPU_GLOO_BANDWIDTH,
    name: str | None = None,
    efficiency: Efficiency = CPU_EFFICIENCY,
) -> ClusterSpec:
    """One node of ``n`` local processes joined by loopback (gloo) — the ``cpu:N`` preset or a calibration."""
    ram = _host_ram()
    return ClusterSpec(
        name=name or f"cpu:{n}",
        num_nodes=1,
        devices_per_node=n,
        device=DeviceSpec(
            kind="cpu",
            peak_flops=(("float32", flops),),
            memory_bytes=max(1, ram // n),
            memory_bandwidth=memory_bandwidth,
        ),
        links=(),
        switches=(
            SwitchSpec(
                name="n0.loopback",
                kind="loopback",
                port_bandwidth=bandwidth,
                latency=latency,
                members=tuple(f"g{r}" for r in range(n)),
            ),
        ),
        nics=(),
        host_memory_bytes=ram,
        # offloading from a CPU "device" to the host is a copy within RAM
        host_link_bandwidth=memory_bandwidth,
        efficiency=efficiency,
    )


_MULTI_NODE: dict[str, Callable[[int], ClusterSpec]] = {
    "dgx-a100": dgx_a100,
    "dgx-h100": dgx_h100,
    "dgx2": dgx2,
    "ndv2": ndv2,
}
_PRESET = re.compile(r"^(dgx-a100|dgx-h100|dgx2|ndv2)(?:x([0-9]+))?$")
_CPU = re.compile(r"^cpu:([0-9]+)$")
MAX_NODES = 4096
MAX_CPU_PROCESSES = 1024


def preset_names() -> list[str]:
    """The accepted forms, for help texts."""
    return ["dgx-a100xN", "dgx-h100xN", "dgx2xN", "ndv2xN", "cpu:N", "<path to a cluster .yaml file>"]


def _unknown(name: str) -> ClusterSpecError:
    return ClusterSpecError(
        f"unknown cluster {name!r}: use a preset ({', '.join(preset_names()[:-1])}; N >= 1, e.g. "
        "'dgx-a100x2', 'cpu:4'; 'dgx-a100' alone means one node) or the path of a cluster YAML file"
    )


def get_cluster(name_or_path: str | os.PathLike[str] | ClusterSpec) -> ClusterSpec:
    """A ClusterSpec from a preset name, a YAML path, or a ClusterSpec (returned as is)."""
    if isinstance(name_or_path, ClusterSpec):
        return name_or_path
    if isinstance(name_or_path, os.PathLike):
        return ClusterSpec.from_yaml(name_or_path)
    if not isinstance(name_or_path, str):
        raise ClusterSpecError(
            f"cluster: {name_or_path!r} is not allowed: must be a preset name, a YAML path or a ClusterSpec"
        )
    text = name_or_path.strip()
    key = text.lower()
    match = _PRESET.match(key)
    if match is not None:
        nodes = int(match.group(2)) if match.group(2) is not None else 1
        if not 1 <= nodes <= MAX_NODES:
            raise ClusterSpecError(
                f"cluster {text!r}: {nodes} nodes is not allowed: N must be 1..{MAX_NODES}"
            )
        return _MULTI_NODE[match.group(1)](nodes)
    match = _CPU.match(key)
    if match is not None:
        n = int(match.group(1))
        if not 1 <= n <= MAX_CPU_PROCESSES:
            raise ClusterSpecError(
                f"cluster {text!r}: {n} processes is not allowed: N must be 1..{MAX_CPU_PROCESSES}"
            )
        from shardwise.cluster.machine import cpu_mode, measured_cpu_cluster

        return cpu_cluster(n) if cpu_mode() == "nominal" else measured_cpu_cluster(n)
    if key.endswith((".yaml", ".yml")) or os.sep in text or Path(text).is_file():
        return ClusterSpec.from_yaml(text)
    raise _unknown(text)
