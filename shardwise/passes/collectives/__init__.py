"""Collective communication: topology-aware synthesis (TACCL-style, with open solvers) and baselines.

Entry points: ``best_collective`` (what the planner calls), ``synth_table`` (what ``shardwise synth``
prints), ``synthesize`` (one search, returning the schedule), ``lower`` / ``verify`` / ``simulate`` /
``to_msccl_xml`` for schedules. See ``api``, ``synthesize`` and the module docstrings for the models.
"""

from __future__ import annotations

from shardwise.passes.collectives.api import (
    CollectiveChoice,
    best_collective,
    cache_dir,
    format_synth_table,
    synth_table,
)
from shardwise.passes.collectives.bounds import LowerBound, lower_bound
from shardwise.passes.collectives.chunks import COLLECTIVES, CollectiveSpec
from shardwise.passes.collectives.lower import lower
from shardwise.passes.collectives.msccl import check_msccl_xml, to_msccl_xml
from shardwise.passes.collectives.schedule import Schedule, ScheduleError, Transfer
from shardwise.passes.collectives.simulate import SimResult, simulate
from shardwise.passes.collectives.sketch import Sketch, load_taccl_sketch
from shardwise.passes.collectives.synthesize import SynthResult, synthesize
from shardwise.passes.collectives.topology import TopologyView, topology_view
from shardwise.passes.collectives.verify import verify, verify_program

__all__ = [
    "COLLECTIVES",
    "CollectiveChoice",
    "CollectiveSpec",
    "LowerBound",
    "Schedule",
    "ScheduleError",
    "SimResult",
    "Sketch",
    "SynthResult",
    "TopologyView",
    "Transfer",
    "best_collective",
    "cache_dir",
    "check_msccl_xml",
    "format_synth_table",
    "load_taccl_sketch",
    "lower",
    "lower_bound",
    "simulate",
    "synth_table",
    "synthesize",
    "to_msccl_xml",
    "topology_view",
    "verify",
    "verify_program",
]
