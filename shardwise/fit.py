"""Where a model that fits nowhere on the given cluster would fit: the smallest preset cluster it plans on.

Used by ``shardwise.compile`` to complete a ``DoesNotFitError`` with a suggestion. Candidates are the
multi-node presets (DGX-A100, DGX-H100, DGX-2, NDv2 with 1..128 nodes) in order of total device memory;
those below a lower bound (the parameters, and in training their gradients and optimizer state, spread over
every device) are skipped without planning, the rest are planned in order until one fits, within a small
wall-time and attempt budget (the planning runs in a forked process, ended when the time is spent).
"""

from __future__ import annotations

import multiprocessing as mp
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection

from shardwise.cluster import ClusterSpec, get_cluster
from shardwise.errors import DoesNotFitError, PlanError
from shardwise.ir.graph import Graph
from shardwise.ir.plan import ExecutionPlan

__all__ = ["Fit", "FitSearch", "smallest_fitting_preset", "FAMILIES", "NODES"]

FAMILIES = ("dgx-a100", "dgx-h100", "dgx2", "ndv2")
NODES = (1, 2, 4, 8, 16, 32, 64, 128)
_STATE_FACTOR = {"train": 4, "inference": 1}  # params (+ grads + two optimizer moments) in training


@dataclass(frozen=True)
class Fit:
    cluster: str  # the preset name
    world_size: int
    device_memory_bytes: int
    plan: ExecutionPlan


def _candidates() -> list[tuple[int, str, ClusterSpec]]:
    out = []
    for family in FAMILIES:
        for nodes in NODES:
            name = f"{family}x{nodes}"
            spec = get_cluster(name)
            out.append((spec.world_size * spec.device.memory_bytes, name, spec))
    return sorted(out, key=lambda c: (c[0], c[2].world_size, c[1]))


@dataclass(frozen=True)
class FitSearch:
    """What looking for a preset found: the fit (None: none found), the presets planned in order (the last one
    unfinished when the time ran out), and whether the time budget stopped the search."""

    fit: Fit | None
    tried: tuple[str, ...]
    out_of_time: bool = False


def _attempts(
    graph: Graph, mode: str, plan: Callable[[Graph, ClusterSpec], ExecutionPlan], max_attempts: int,
    trying: Callable[[str], bool],
) -> Fit | None:  # fmt: skip
    """Plan the candidates in order until one fits; ``trying(name)`` is told each preset before it is planned
    and answers False to stop."""
    need = graph.param_bytes * _STATE_FACTOR.get(mode, 1)
    attempts = 0
    for total, name, spec in _candidates():
        if total < need:
            continue
        if attempts >= max_attempts or not trying(name):
            return None
        attempts += 1
        try:
            made = plan(graph, spec)
        except (DoesNotFitError, PlanError):
            continue
        return Fit(name, spec.world_size, spec.device.memory_bytes, made)
    return None


def _in_child(conn: Connection, graph: Graph, mode: str, plan: Callable, max_attempts: int) -> None:
    """The forked process: each preset's name before it is planned, then ("done", the fit or None)."""

    def trying(name: str) -> bool:
        conn.send(("trying", name))
        return True

    try:
        conn.send(("done", _attempts(graph, mode, plan, max_attempts, trying)))
    except Exception as exc:  # noqa: BLE001 (a failure of the suggestion must not replace the user's error)
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
    conn.close()


def smallest_fitting_preset(
    graph: Graph,
    mode: str,
    plan: Callable[[Graph, ClusterSpec], ExecutionPlan],
    *,
    budget_s: float = 60.0,
    max_attempts: int = 6,
) -> FitSearch:
    """The first preset, by total memory, that ``plan(graph, spec)`` fits, looked for within ``budget_s``
    seconds of wall time.

    The planning runs in a forked process (where the platform forks) that is ended when the budget is spent,
    so one long plan (a 671B-parameter graph on a 256-device preset plans for many minutes) cannot hold the
    caller past the budget. Without fork the budget is checked between presets only.
    """
    deadline = time.monotonic() + budget_s
    tried: list[str] = []
    if "fork" not in mp.get_all_start_methods():

        def trying(name: str) -> bool:
            if time.monotonic() > deadline:
                return False
            tried.append(name)
            return True

        fit = _attempts(graph, mode, plan, max_attempts, trying)
        return FitSearch(fit, tuple(tried), fit is None and time.monotonic() > deadline)
    ctx = mp.get_context("fork")
    ours, theirs = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_in_child, args=(theirs, graph, mode, plan, max_attempts), daemon=True)
    child.start()
    theirs.close()
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not ours.poll(left):
                return FitSearch(None, tuple(tried), out_of_time=True)
            try:
                what, value = ours.recv()
            except EOFError:  # the process died without an answer
                return FitSearch(None, tuple(tried))
            if what == "trying":
                tried.append(value)
            else:
                return FitSearch(value if what == "done" else None, tuple(tried))
    finally:
        ours.close()
        if child.is_alive():
            child.kill()
        child.join()
