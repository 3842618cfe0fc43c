"""Pipeline stage partitioning: layer units, chunk subgraphs, per-unit costs and the balancing partitioner."""

from __future__ import annotations

from shardwise.passes.stages.extract import Chunks, chunk_owner, extract_chunks, input_derived
from shardwise.passes.stages.units import LayerUnits, layer_units

__all__ = ["Chunks", "LayerUnits", "chunk_owner", "extract_chunks", "input_derived", "layer_units"]
