"""Lowered schedules run on real gloo processes and match torch.distributed's own collectives.

One spawn of 16 processes runs every check: the whole world (16 ranks, NDv2x2 schedules, among them a
reduce-scatter transposed from an allgather and allreduces composed of reduce-scatter + allgather), a group of 8
(ranks 1, 3, ..., 15, mapped to a DGX-A100 node) and a group of 4 (ranks 2, 5, 11, 12, cpu:4 schedules,
including a CP-SAT timed one). Inputs are tagged (rank * 10000 + position), so any misplaced chunk shows.
"""

from __future__ import annotations

import os
import sys
import tempfile

import pytest

from shardwise.cluster import get_cluster
from shardwise.passes.collectives.baselines import baseline_schedules
from shardwise.passes.collectives.lower import lower
from shardwise.passes.collectives.pipeline import pipelined_schedule
from shardwise.passes.collectives.routing import solve_routing
from shardwise.passes.collectives.simulate import simulate
from shardwise.passes.collectives.sketch import Sketch, sketch_view
from shardwise.passes.collectives.timed import solve_timed
from shardwise.passes.collectives.topology import topology_view
from shardwise.passes.collectives.transpose import compose_allreduce, transpose_allgather
from shardwise.passes.collectives.verify import verify

sys.path.insert(0, os.path.dirname(__file__))
from _gloo_worker import WORLD, worker  # noqa: E402  (light module: children import only it)

pytestmark = pytest.mark.multiproc


def _program(sched, topo, n=2**20):
    sim = simulate(sched, topo, n)
    verify(sched, sim.start)
    return lower(sched, sim.start)


def _cases() -> list[tuple[str, int, dict]]:
    cases: list[tuple[str, int, dict]] = []
    ndv2 = topology_view(get_cluster("ndv2x2"))
    # one solve per kind (deterministic CP-SAT: the allgather below reuses its routing)
    routings = {k: solve_routing(sketch_view(ndv2), k, 1, time_limit=0.2)
                for k in ("allgather", "reduce_scatter", "allreduce", "alltoall", "broadcast")}  # fmt: skip
    for kind, routing in routings.items():
        cases.append((f"pipelined-{kind}", 16, _program(pipelined_schedule(routing, ndv2, 2**20, 1), ndv2)))
    for name, sched in baseline_schedules("allreduce", ndv2, 2**20).items():
        if name not in ("rhd", "recursive_doubling", "hierarchical", "dbtree"):
            continue
        cases.append((f"{name}-allreduce", 16, _program(sched, ndv2)))
    cases.append(
        ("two_step-alltoall", 16, _program(baseline_schedules("alltoall", ndv2, 2**20)["two_step"], ndv2))
    )
    # reduce-scatter = the transposed allgather; allreduce = that reduce-scatter, then the allgather
    ag = pipelined_schedule(routings["allgather"], ndv2, 2**20, 2)
    ag_sim = simulate(ag, ndv2, 2**20)
    rs = transpose_allgather(ag, ag_sim.start, ag_sim.end)
    assert rs is not None
    cases.append(("transposed-reduce_scatter", 16, _program(rs, ndv2)))
    ring_rs = baseline_schedules("reduce_scatter", ndv2, 2**20)["ring2"]
    for name, part in (("transposed", rs), ("ring2", ring_rs)):
        ar = compose_allreduce(part, simulate(part, ndv2, 2**20).start, ag, ag_sim.start)
        assert ar is not None
        cases.append((f"compose-{name}+pipelined-allreduce", 16, _program(ar, ndv2)))
    a100 = topology_view(get_cluster("dgx-a100x1"))
    for kind in ("allgather", "reduce_scatter", "alltoall"):
        routing = solve_routing(sketch_view(a100), kind, 1, time_limit=0.2)
        cases.append((f"pipelined8-{kind}", 8, _program(pipelined_schedule(routing, a100, 2**20, 1), a100)))
    cpu = topology_view(get_cluster("cpu:4"))
    for kind in ("allgather", "allreduce"):
        sv = sketch_view(cpu, Sketch())
        res = solve_timed(sv, kind, 4096, 1e-3, time_limit=0.5)
        assert res is not None
        cases.append((f"timed4-{kind}", 4, _program(res.schedule, cpu, 4096)))
    cases.append(
        ("dbtree4-broadcast", 4, _program(baseline_schedules("broadcast", cpu, 4096)["dbtree"], cpu))
    )
    return cases


def test_lowered_schedules_match_torch_distributed_on_gloo():
    import torch.multiprocessing as mp

    cases = _cases()
    # A fork server imports torch once (preloading the light worker module) and forks the 16 workers from
    # it: 16 spawned interpreters would each import torch again (~30 s of CPU on two cores). The server has
    # started no threads, so forking it is safe; each child still makes its own process group.
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["_gloo_worker"])
    results = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        init = "file://" + os.path.join(tmp, "pg")
        procs = [ctx.Process(target=worker, args=(r, init, cases, results)) for r in range(WORLD)]
        for pr in procs:
            pr.start()
        for pr in procs:
            pr.join(timeout=300)
        alive = [pr for pr in procs if pr.is_alive()]
        for pr in alive:
            pr.kill()
        assert not alive, f"{len(alive)} workers hung"
    reports = dict(results.get() for _ in range(WORLD))
    problems = [msg for r in sorted(reports) for msg in reports[r]]
    assert not problems, "\n".join(problems[:10])
    assert len(cases) >= 15
