"""Values of host offload: which kinds of tensors a plan keeps in host memory, and what one choice (tiers
joint with recomputation) is predicted to give.

``Tiers``: optimizer state (AdamW moments and the fp32 master copy, ZeRO-Offload style: gradients go to the
host after the gradient reduction, the optimizer steps there, updated parameters come back), the layers'
parameters (streamed in per layer ahead of use; requires the optimizer on the host, which updates them),
and the layers' saved activations (copied out after a layer's forward, back before its backward).
Invariants: ``parameters`` implies ``optimizer``; every byte and time figure of an ``OffloadChoice`` is
``>= 0``; ``device_peak_bytes`` is the lower bound of the rewritten buffers (what the memory map reaches).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Tiers", "OffloadChoice", "TIER_COMBINATIONS", "HOST", "DEVICE"]

HOST, DEVICE = "host", "device"


@dataclass(frozen=True)
class Tiers:
    """What lives in host memory (True) rather than on the device."""

    optimizer: bool = False
    parameters: bool = False
    activations: bool = False

    def __post_init__(self) -> None:
        if self.parameters and not self.optimizer:
            raise ValueError("parameters in host memory need the optimizer there too (it updates them)")

    @property
    def any(self) -> bool:
        return self.optimizer or self.parameters or self.activations

    def __str__(self) -> str:
        names = [n for n in ("optimizer", "parameters", "activations") if getattr(self, n)]
        return "+".join(names) if names else "none"


# every combination the chooser tries (parameters only with the optimizer)
TIER_COMBINATIONS = tuple(
    Tiers(o, p, a) for o in (False, True) for p in (False, True) for a in (False, True) if o or not p
)


@dataclass(frozen=True)
class OffloadChoice:
    """One (tiers, recomputed layers) combination and its predicted cost.

    ``ranges``: recomputed node ranges ``[start, stop)`` (as ``RematChoice.ranges``); ``units``: their
    names; ``offloaded_units``: layers whose saved activations go to the host; ``streamed``: state_dict
    keys of parameters streamed from the host; ``transfer_bytes``: host-link bytes per step (both ways);
    ``exposed_s``: the part of the transfers no compute hides; ``host_optimizer_s``: the host's optimizer
    step; ``cost_s``: recompute + exposed + host optimizer time added to the step."""

    tiers: Tiers
    units: tuple[str, ...]
    ranges: tuple[tuple[int, int], ...]
    offloaded_units: tuple[str, ...]
    streamed: tuple[str, ...]
    device_peak_bytes: int
    baseline_bytes: int
    host_bytes: int
    transfer_bytes: int
    exposed_s: float
    host_optimizer_s: float
    recompute_s: float

    @property
    def cost_s(self) -> float:
        return self.recompute_s + self.exposed_s + self.host_optimizer_s
