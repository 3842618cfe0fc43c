"""Bytes: per parameter element (weights, gradients, master copy, optimizer state) and saved activations.

**Per parameter element**, what a generated training program keeps for one trainable element on the device
that holds it:

* the weight in float32 (bf16/fp16 runs use autocast: matmuls read 2-byte copies of the weights, made per
  step and priced by the memory map as activations, not here); inference at bf16/fp16 stores 2-byte weights;
* its gradient in float32 (4 bytes);
* the optimizer's float32 state: ``OPTIMIZER_STATE[optimizer]`` values (AdamW's two moments: 8 bytes);
* ZeRO (over the data-parallel ranks that hold the same weights: ``dp``, and ``cp`` and, for the dense weights,
  ``ep`` where the mesh has them, ``ir.placement.zero_group``; ``dp`` below is that group's size): stage 1
  shards the optimizer state and keeps a float32 master
  slice beside it (the rank steps its slice, then gathers the update); stage 2 also shards the gradients
  (reduce-scattered, each rank keeps its slice); stage 3 also shards the weights (gathered before use).
  A pipeline stage (``accumulates``) adds every micro-batch's gradients into whole ones and reduce-scatters a
  bucket only after its last micro-batch's backward (``passes.memory.pipeline``): through the backward phase,
  where its activations peak, it holds them whole, so stage 2 shards no gradient bytes of its peak.

Frozen parameters and buffers keep only their weight.

**Saved activations**: what an op's backward reads is the op registry's one saves-for-backward rule
(``ir.registry.saves_of``); :func:`saved_operands` turns it into the operands and output a node keeps.
"""

from __future__ import annotations

from dataclasses import dataclass

from shardwise.costs.compute import is_low
from shardwise.ir.graph import Node
from shardwise.ir.registry import saves_of, tensor_operands

__all__ = [
    "OPTIMIZER_STATE", "ElementBytes", "element_bytes", "optimizer_state", "saved_operands", "experts_saved_elements",
    "ZERO_STAGES",
]

#: float32 state values per parameter element, by optimizer name (AdamW/Adam: two moments; SGD: momentum)
OPTIMIZER_STATE = {"adamw": 2, "adam": 2, "sgd": 1, "none": 0}
ZERO_STAGES = (0, 1, 2, 3)


def optimizer_state(optimizer: str) -> int:
    """float32 state values per element for the optimizer a plan records (AdamW's 2 when unknown)."""
    return OPTIMIZER_STATE.get(optimizer.lower(), 2)


@dataclass(frozen=True)
class ElementBytes:
    """Bytes per parameter element on one device, by what they hold (see the module docstring)."""

    weights: float
    grads: float
    master: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.master + self.optimizer


def element_bytes(
    *, train: bool, trainable: bool, precision: str, state: int = 2, zero: int = 0, dp: int = 1,
    accumulates: bool = False,
) -> ElementBytes:
    """Bytes one parameter element costs on a device at its peak (see the module docstring); ``state`` is the
    optimizer's float32 values per element (``optimizer_state``); ``accumulates``: the gradients are summed over
    micro-batches before they are reduced (pipeline stages)."""
    if zero not in ZERO_STAGES:
        raise ValueError(f"ZeRO stage {zero} does not exist: use one of {ZERO_STAGES}")
    if not train or not trainable:
        low = not train and is_low(precision)
        return ElementBytes(2.0 if low else 4.0, 0.0, 0.0, 0.0)
    shard = max(dp, 1)
    return ElementBytes(
        weights=4.0 / (shard if zero >= 3 else 1),
        grads=4.0 / (shard if zero >= 2 and not accumulates else 1),
        master=4.0 / shard if zero >= 1 and shard > 1 else 0.0,
        optimizer=4.0 * state / (shard if zero >= 1 else 1),
    )


def saved_operands(node: Node) -> tuple[list[str], bool, bool]:
    """(tensor operands the backward of ``node`` reads, whether it reads the output, whether it keeps a
    1-byte mask per element), by the registry's saves-for-backward rule."""
    saves = saves_of(node.op)
    operands = tensor_operands(node)
    if saves == "output":
        return [], True, False
    if saves == "both":
        return operands, True, False
    if saves == "inputs" or (saves == "factors" and len(operands) >= 2):
        return operands, False, False
    return [], False, saves == "mask"


def experts_saved_elements(rows: int, hidden: int, intermediate: int) -> int:
    """Elements the backward of an experts op (``runtime.lib.moe``) keeps beyond its operands, for ``rows``
    routed rows (tokens x k) through experts of ``hidden`` and ``intermediate`` (this rank's part of it): each row
    gathered by expert (hidden), its gate and up projections (2 intermediate, read by the activation and the
    product), the activation (intermediate), the product the down projection reads (intermediate) and its
    result, which the routing weights multiply (hidden)."""
    return rows * (2 * hidden + 4 * intermediate)
