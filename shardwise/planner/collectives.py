"""Choosing each collective's algorithm for a plan: the library's, or a synthesized schedule when it is
predicted faster (issue 5: the planner uses synthesized collectives and the plan records which).

For every redistribution of a plan that runs one collective (allgather, reduce_scatter, allreduce,
alltoall) over a mesh axis, ``choose_collectives`` asks ``passes.collectives.best_collective`` for the first
group of that axis (the groups of an axis are alike on every preset: the same links, one node apart) and
compares the best schedule's simulated time with the price list's time for the library's own algorithm on
that group (``costs.prices.PriceList.axis_collective_s``). When a synthesized schedule (``synth:<digest>``) or
a named baseline the library does not run is faster, the redistribution records that ``algorithm`` (a
baseline's name gets its program's digest, e.g. ``rhd:3fa2c1d0e9``, since its program depends on the group and
size) and its time: the price list's library time scaled by the simulated speedup (the simulator compares both
algorithms on the links' own figures; the price list applies the achieved bandwidth to both), the plan keeps its lowered point-to-point program in ``collective_programs`` (the generated program runs it
with sends and receives); otherwise it keeps ``library:<name>``, the library's best algorithm there. The plan
is then priced again (``costs.step.predict_flat``: a redistribution that runs a schedule costs its recorded
time), and a note says how many collectives changed. Results are cached (``passes.collectives.api``), so
re-planning costs nothing.

Groups larger than ``max_ranks`` keep the library (synthesis time grows with the group); a collective made
of several steps (``allreduce+to_partial``) keeps its recorded algorithm; so does one the generated program
could not run by schedule (uneven pieces, or a buffer the program cannot cut into its equal chunks), so that
what the plan records is what runs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace

from shardwise.cluster import ClusterSpec
from shardwise.ir.placement import Shard
from shardwise.ir.plan import ExecutionPlan, NodeStrategy, Redistribute
from shardwise.ir.tensor import TensorSpec

__all__ = ["choose_collectives", "SYNTHESIZED_COLLECTIVES"]

SYNTHESIZED_COLLECTIVES = ("allgather", "reduce_scatter", "allreduce", "alltoall")


def choose_collectives(
    plan: ExecutionPlan,
    cluster: ClusterSpec,
    *,
    time_limit_s: float = 2.0,
    max_ranks: int = 64,
    cache: str = "auto",
) -> ExecutionPlan:
    """``plan`` with every collective's algorithm chosen (see the module docstring)."""
    from shardwise.costs.prices import price_list
    from shardwise.costs.step import predict_flat
    from shardwise.passes.collectives import best_collective

    prices = price_list(cluster, plan.precision)
    choices: dict[tuple[str, int, str], tuple[str, float | None]] = {}
    programs: dict[str, str] = dict(plan.collective_programs)

    def runnable(r: Redistribute, program: dict) -> bool:
        return _runs_by_schedule(plan, r, program["in_chunks"])

    def choose(r: Redistribute) -> Redistribute:
        if r.collective not in SYNTHESIZED_COLLECTIVES or r.nbytes <= 0 or r.time_s <= 0:
            return r
        groups = plan.mesh.groups(r.axis)
        group = groups[0] if groups else ()
        if not 2 <= len(group) <= max_ranks:
            return r
        key = (r.collective, r.nbytes, r.axis)
        if key not in choices:
            c = best_collective(
                cluster, r.collective, r.nbytes, group, time_limit_s=time_limit_s, cache=cache
            )
            library = prices.axis_collective_s(r.collective, r.nbytes, plan.mesh, r.axis)
            if c.uses_library or c.predicted_s >= c.library_s or c.library_s <= 0 or library <= 0:
                _, name = prices.comm.choose(r.collective, r.nbytes, group)
                choices[key] = (f"library:{name or 'ring'}", None)
            else:
                program = json.dumps(c.program(), separators=(",", ":"))
                name = c.algorithm
                if not name.startswith("synth:"):  # a baseline's program depends on the group and size
                    name = f"{name}:{hashlib.sha256(program.encode()).hexdigest()[:10]}"
                # the simulator compared both algorithms on the links' own figures; the schedule's time is the
                # library's price times that ratio (the price list's achieved bandwidth applied to both)
                choices[key] = (name, library * c.predicted_s / c.library_s)
                programs.setdefault(name, program)
        algorithm, seconds = choices[key]
        if seconds is None:
            return replace(r, algorithm=algorithm)
        if algorithm in programs and not runnable(r, json.loads(programs[algorithm])):
            return r
        return replace(r, algorithm=algorithm, time_s=seconds)

    saved = 0.0
    changed = total = 0
    strategies: list[NodeStrategy] = []
    for s in plan.strategies:
        if not s.redistributes:
            strategies.append(s)
            continue
        new = tuple(choose(r) for r in s.redistributes)
        gain = sum(a.time_s - b.time_s for a, b in zip(s.redistributes, new, strict=True))
        total += sum(1 for r in new if r.collective in SYNTHESIZED_COLLECTIVES)
        changed += sum(1 for r in new if not r.algorithm.startswith("library:"))
        saved += gain
        strategies.append(replace(s, redistributes=new, comm_s=max(0.0, s.comm_s - gain)))
    used = {r.algorithm for s in strategies for r in s.redistributes}
    programs = {name: text for name, text in programs.items() if name in used}
    note = (
        f"collectives: {changed} of {total} use a synthesized schedule or a non-library algorithm, predicted "
        f"{saved * 1e3:.3f} ms faster per step (forward) than the library's"
    )
    out = replace(
        plan,
        strategies=tuple(strategies),
        collective_programs=tuple(sorted(programs.items())),
        notes=(*plan.notes, note),
        passes=(*plan.passes, "collectives.choose"),
    )
    return replace(out, predicted=predict_flat(out, cluster)) if plan.memory else out


def _runs_by_schedule(plan: ExecutionPlan, r: Redistribute, in_chunks: int) -> bool:
    """Whether the generated program runs ``r`` with a point-to-point program of ``in_chunks`` input chunks:
    the pieces on the axis are even and this rank's input buffer cuts into that many equal chunks."""
    try:
        spec = plan.graph.spec_of(r.value)
    except KeyError:
        return False
    if not isinstance(spec, TensorSpec):
        return False
    a = plan.mesh.axis_names.index(r.axis)
    n = plan.mesh.shape[a]
    for placement in (r.src.placements[a], r.dst.placements[a]):
        if isinstance(placement, Shard) and spec.shape[placement.dim] % n:
            return False
    local = spec.numel
    for size, placement in zip(plan.mesh.shape, r.src.placements, strict=True):
        if isinstance(placement, Shard):
            local //= size
    return local > 0 and local % in_chunks == 0
