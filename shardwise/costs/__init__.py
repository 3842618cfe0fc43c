"""The one price list: the only code that turns work into seconds and bytes (compute, collectives,
point-to-point, backward and recomputation, memory per parameter element and saved activations, whole
steps). Planners, passes, the collective chooser, ``explain``, the timeline and the report read these prices.
See docs/costs.md for every constant and its source."""

from __future__ import annotations

from shardwise.costs.comm import CommPrices
from shardwise.costs.compute import ComputePrices, OpWork, cost_class, op_work
from shardwise.costs.memory import (
    OPTIMIZER_STATE,
    ElementBytes,
    element_bytes,
    optimizer_state,
    saved_operands,
)
from shardwise.costs.prices import PriceList, price_list
from shardwise.costs.step import StepPrice, price_flat, simulate

__all__ = [
    "CommPrices", "ComputePrices", "OpWork", "cost_class", "op_work", "OPTIMIZER_STATE", "ElementBytes",
    "element_bytes", "optimizer_state", "saved_operands", "PriceList", "price_list", "StepPrice", "price_flat",
    "simulate",
]  # fmt: skip
