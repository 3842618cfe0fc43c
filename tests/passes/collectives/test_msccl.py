"""MSCCL XML export: required attributes, and every exported algorithm executes correctly (symbolically)."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from shardwise.cluster import get_cluster
from shardwise.passes.collectives.baselines import baseline_schedules
from shardwise.passes.collectives.lower import lower
from shardwise.passes.collectives.msccl import check_msccl_xml, to_msccl_xml
from shardwise.passes.collectives.pipeline import pipelined_schedule
from shardwise.passes.collectives.routing import solve_routing
from shardwise.passes.collectives.schedule import ScheduleError
from shardwise.passes.collectives.simulate import simulate
from shardwise.passes.collectives.sketch import sketch_view
from shardwise.passes.collectives.topology import topology_view

N = 2**20


@pytest.fixture(scope="module")
def ndv2():
    return topology_view(get_cluster("ndv2x2"))


def _xml(sched, topo):
    return to_msccl_xml(lower(sched, simulate(sched, topo, N).start), check_limits=False)


@pytest.mark.parametrize("kind", ["allgather", "reduce_scatter", "allreduce", "alltoall", "broadcast"])
def test_exported_algorithms_run_correctly(ndv2, kind):
    scheds = dict(baseline_schedules(kind, ndv2, N))
    routing = solve_routing(sketch_view(ndv2), kind, 1, time_limit=0.2)
    scheds["pipelined"] = pipelined_schedule(routing, ndv2, N, 2)
    for name, sched in scheds.items():
        assert check_msccl_xml(_xml(sched, ndv2)) > 0, name


def test_attributes_current_executors_require(ndv2):
    xml = _xml(baseline_schedules("allreduce", ndv2, N)["ring"], ndv2)
    algo = ET.fromstring(xml)
    for attr in (
        "coll",
        "ngpus",
        "nchunksperloop",
        "nchannels",
        "proto",
        "inplace",
        "outofplace",
        "minBytes",
        "maxBytes",
    ):
        assert attr in algo.attrib
    assert (
        algo.get("coll") == "allreduce" and algo.get("ngpus") == "16" and algo.get("nchunksperloop") == "16"
    )
    gpus = algo.findall("gpu")
    assert len(gpus) == 16 and all({"i_chunks", "o_chunks", "s_chunks"} <= set(g.attrib) for g in gpus)
    for tb in gpus[0].findall("tb"):
        assert {"id", "send", "recv", "chan"} <= set(tb.attrib)
        for st in tb.findall("step"):
            assert {
                "s",
                "type",
                "srcbuf",
                "srcoff",
                "dstbuf",
                "dstoff",
                "cnt",
                "depid",
                "deps",
                "hasdep",
            } <= set(st.attrib)
            assert 0 <= int(st.get("cnt")) < 72


def test_checker_catches_broken_xml(ndv2):
    algo = ET.fromstring(_xml(baseline_schedules("allgather", ndv2, N)["ring"], ndv2))
    tb = next(t for t in algo.find("gpu").findall("tb") if t.get("send") != "-1")
    tb.remove(tb.findall("step")[-1])  # one message never sent
    with pytest.raises(ScheduleError, match="deadlock|needs"):
        check_msccl_xml(ET.tostring(algo, encoding="unicode"))
