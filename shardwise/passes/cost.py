"""The analytic cost model: roofline per op, alpha-beta per collective (docs/architecture.md, "The price list").

Backward ≈ 2x forward FLOPs. Collective times come from the ClusterSpec for the ranks of one group on
the mesh axis (the slowest link in a ring over them); a plan may replace them by synthesized schedules.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shardwise.cluster import ClusterSpec
from shardwise.cluster.costmodel import ring_collective_time
from shardwise.ir.graph import Node
from shardwise.ir.placement import DeviceMesh

__all__ = ["CostModel", "PRECISION_DTYPE"]

PRECISION_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass(frozen=True)
class CostModel:
    cluster: ClusterSpec
    mesh: DeviceMesh
    precision: str = "fp32"
    _cache: dict[tuple[str, ...] | tuple[str, int, str], float] = field(
        default_factory=dict, compare=False, repr=False
    )

    @property
    def peak_flops(self) -> float:
        return self.cluster.device.flops(PRECISION_DTYPE.get(self.precision, "float32"))

    def compute_s(self, node: Node, split: int = 1) -> float:
        """Roofline time of one op on one device when the op's work is divided ``split`` ways."""
        flops = node.flops / split
        nbytes = node.bytes_moved / split
        return max(flops / self.peak_flops, nbytes / self.cluster.device.memory_bandwidth)

    def collective_s(self, collective: str, nbytes: int, axis: str) -> float:
        """Time of a library collective over one group of mesh axis ``axis``; ``nbytes`` = the full buffer."""
        if collective in ("slice", "to_partial", "none") or nbytes <= 0:
            return 0.0
        key = (collective, int(nbytes), axis)
        if key not in self._cache:
            size, alpha, beta = self._axis_alpha_beta(axis)
            self._cache[key] = (
                0.0 if size <= 1 else ring_collective_time(collective, int(nbytes), size, alpha, beta)
            )
        return self._cache[key]

    def _axis_alpha_beta(self, axis: str) -> tuple[int, float, float]:
        """(group size, alpha, beta) of a ring over one group of ``axis``.

        A group spanning many nodes is measured on its members in its first two nodes: on a cluster whose
        nodes are alike (every preset) each node-to-node hop of the ring looks the same, so the figures
        are those of the whole ring, at a fraction of the routing work (1024-GPU meshes plan in seconds).
        """
        key = ("axis", axis)
        if key not in self._cache:
            groups = self.mesh.groups(axis)
            ranks = groups[0] if groups else (0,)
            sample = list(ranks)
            per_node = self.cluster.devices_per_node
            nodes = sorted({r // per_node for r in ranks})
            if len(nodes) > 2:
                sample = [r for r in ranks if r // per_node in nodes[:2]]
            alpha, beta = self.cluster.group_alpha_beta(sample) if len(sample) > 1 else (0.0, 0.0)
            self._cache[key] = (len(ranks), alpha, beta)  # type: ignore[assignment]
        return self._cache[key]  # type: ignore[return-value]
