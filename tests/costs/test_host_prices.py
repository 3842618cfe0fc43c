"""The price list's host-side rules: per-op dispatch, autograd recording and backward nodes, the matmul's fixed
cost, cache-resident streaming, measured math ops, a measured optimizer step, and gradient reductions that
do not overlap the backward (figures as `shardwise calibrate` measures them on CPUs)."""

from __future__ import annotations

import dataclasses

import pytest

import shardwise
from shardwise.cluster.efficiency import Efficiency
from shardwise.cluster.presets import CPU_EFFICIENCY, cpu_cluster
from shardwise.costs.backward import backward_s
from shardwise.costs.compute import ComputePrices, OpWork
from shardwise.costs.prices import PriceList
from shardwise.costs.step import price_flat
from shardwise.zoo import build_model

HOST = dataclasses.replace(
    CPU_EFFICIENCY, op_overhead_s=2e-6, record_overhead_s=1e-6, backward_op_overhead_s=3e-6, gemm_overhead_s=4e-6,
    cache_bytes=2.0**20, cache_bandwidth=100e9, elementwise_s=(("tanh", 5e-9, 1e-9),),
    optimizer_s=(("adamw", 50e-6, 20e-6, 1e-9),),
)  # fmt: skip
CLUSTER = cpu_cluster(2, flops=50e9, memory_bandwidth=10e9, efficiency=HOST, name="cpu:2-host")


def _prices() -> ComputePrices:
    return ComputePrices(CLUSTER.device, HOST, "fp32")


def test_each_op_pays_the_host_and_a_recorded_op_more() -> None:
    p = _prices()
    tiny = OpWork("memory", 16, 192.0, 0.0, "add", 16)
    assert p.forward_s(tiny) == pytest.approx(2e-6 + 192 / 100e9)
    assert p.forward_s(tiny, recording=True) == pytest.approx(3e-6 + 192 / 100e9)
    assert p.forward_s(OpWork("free", 0, 0, 0, "view")) == 2e-6  # no view figure: a view costs what an op does
    views = ComputePrices(CLUSTER.device, dataclasses.replace(HOST, view_overhead_s=0.5e-6), "fp32")
    assert views.forward_s(OpWork("free", 0, 0, 0, "view")) == 0.5e-6
    assert backward_s(p, tiny) == pytest.approx(3e-6 + 2 * 192 / 100e9)
    # a matmul: its fixed cost once forward, once per gradient backward (two matmuls)
    mm = OpWork("gemm", 2e6, 1e4, 0.0, "mm", 1e3)
    assert p.forward_s(mm) == pytest.approx(2e-6 + 4e-6 + 2e6 / 50e9)
    assert backward_s(p, mm) == pytest.approx(2 * 3e-6 + 2 * 4e-6 + 4e6 / 50e9)
    # N tiny ops cost N times one: the host's cost does not vanish with the work
    assert sum(p.forward_s(tiny) for _ in range(100)) == pytest.approx(100 * p.forward_s(tiny))


def test_cache_resident_bytes_and_measured_math_ops() -> None:
    p = _prices()
    assert p.byte_s(2.0**20) == pytest.approx(2.0**20 / 100e9)  # fits the cache
    assert p.byte_s(2.0**21) == pytest.approx(2.0**21 / 10e9)  # does not
    # tanh on 2**16 elements: 5 ns each forward exceeds streaming its 512 KiB; its backward is 1 ns each
    # against 1 MiB of traffic at the cache's bandwidth
    tanh = OpWork("memory", 2**16, 2.0**19, 0.0, "tanh", 2**16)
    assert p.forward_s(tanh) == pytest.approx(2e-6 + 2**16 * 5e-9)
    assert backward_s(p, tanh) == pytest.approx(3e-6 + max(2**16 * 1e-9, 2.0**20 / 100e9))
    # an op nobody measured streams its bytes
    exp = dataclasses.replace(tanh, op="exp")
    assert p.forward_s(exp) == pytest.approx(2e-6 + 2.0**19 / 100e9)


def test_a_measured_optimizer_step() -> None:
    prices = PriceList(CLUSTER)
    assert prices.optimizer_step_s(1e6, 40, "adamw", foreach=False) == pytest.approx(
        50e-6 + 40 * 20e-6 + 1e6 * 1e-9
    )
    # SGD was not measured: its traffic and kernel launches
    assert prices.optimizer_step_s(1e6, 40, "sgd", foreach=False) > 0


@pytest.fixture(scope="module")
def mlp_plans():
    plans = {}
    for layers in (2, 6):
        model, inputs = build_model("mlp", layers=layers)
        for overlap in (0.0, 1.0):
            cluster = dataclasses.replace(CLUSTER, efficiency=dataclasses.replace(HOST, comm_overlap=overlap))
            cm = shardwise.compile(
                model,
                cluster,
                example_inputs=inputs,
                mode="train",
                loss_fn=lambda o: o.sum(),
                constraints={"dp": 2},
            )
            plans[(layers, overlap)] = (cm.plan, cluster)
    return plans


def test_more_ops_cost_more_and_a_reduction_that_does_not_overlap_is_exposed(mlp_plans) -> None:
    def step(layers: int, overlap: float):
        plan, cluster = mlp_plans[(layers, overlap)]
        return plan, price_flat(plan, PriceList(cluster))

    small_plan, small = step(2, 1.0)
    large_plan, large = step(6, 1.0)
    extra_ops = len(large_plan.graph.nodes) - len(small_plan.graph.nodes)
    assert extra_ops > 0
    # every extra op costs at least its dispatch forward (a view costs exactly that)
    assert large.step_s - small.step_s >= extra_ops * HOST.op_overhead_s
    # the reduction of the gradients: hidden up to what outlasts the backward with full overlap, all of it
    # without; the copies into and out of the bucket are the host's either way
    _, hidden = step(6, 1.0)
    _, exposed = step(6, 0.0)

    def gradient(price, kind):
        return sum(e.seconds for e in price.events if e.phase == "gradients" and e.kind == kind)

    assert gradient(exposed, "comm") > gradient(hidden, "comm") >= 0.0
    assert gradient(exposed, "compute") == gradient(hidden, "compute") > 0.0
    accumulated = [e for e in exposed.events if e.label == "parameter gradients accumulated"]
    trainable = [p for p in large_plan.graph.params if p.requires_grad]
    assert accumulated and accumulated[0].seconds == pytest.approx(
        len(trainable) * HOST.backward_op_overhead_s
    )


def test_efficiency_tables_are_validated() -> None:
    with pytest.raises(Exception, match="elementwise_s"):
        Efficiency(elementwise_s=(("tanh", 1e-9),))
    with pytest.raises(Exception, match="comm_overlap"):
        Efficiency(comm_overlap=1.5)


def test_a_kernel_pays_its_kinds_fixed_cost_once() -> None:
    """efficiency.kernel_overhead_s: a memory-bound op of a measured kind pays the launch and its kind's fixed
    cost once beside its bytes; a group run op by op (CPUs) pays each op's; a fused kernel pays one launch and
    none of its ops' kinds'; an op of another kind, or of another class, pays the launch alone."""
    fixed = dataclasses.replace(HOST, kernel_overhead_s=(("index_copy", 5e-6), ("layer_norm", 3e-6)))
    p = ComputePrices(CLUSTER.device, fixed, "fp32")
    write = OpWork("memory", 0, 1024.0, 0.0, "index_copy", 128)
    norm = OpWork("memory", 640, 2048.0, 0.0, "layer_norm", 256)
    add = OpWork("memory", 256, 3072.0, 0.0, "add", 256)
    assert p.forward_s(write) == pytest.approx(2e-6 + 5e-6 + 1024 / 100e9)
    assert p.forward_s(write, recording=True) == pytest.approx(3e-6 + 5e-6 + 1024 / 100e9)
    assert p.forward_s(add) == pytest.approx(2e-6 + 3072 / 100e9)
    # a matmul pays gemm_overhead_s, and a matmul kind measured beyond a plain mm (linear) its own once more
    mm = OpWork("gemm", 2e5, 4096.0, 16384.0, "mm", 256)
    linear = dataclasses.replace(mm, op="linear")
    measured = ComputePrices(CLUSTER.device, dataclasses.replace(fixed, kernel_overhead_s=(("linear", 4e-6),)), "fp32")
    assert measured.forward_s(mm) == pytest.approx(_prices().forward_s(mm))
    assert measured.device_s(mm) == pytest.approx(max(2e5 / 50e9, 20480 / 100e9) + 4e-6)  # gemm_overhead_s in it
    assert measured.forward_s(mm) == pytest.approx(2e-6 + measured.device_s(mm))
    assert measured.forward_s(linear) == pytest.approx(measured.forward_s(mm) + 4e-6)
    # op by op (fused_kernels false): the sum of the ops, each kind's fixed cost once
    assert p.group_forward_s([write, norm, add], 4096.0) == pytest.approx(
        p.forward_s(write) + p.forward_s(norm) + p.forward_s(add)
    )
    assert p.group_forward_s([write, norm, add], 4096.0) - _prices().group_forward_s(
        [write, norm, add], 4096.0
    ) == pytest.approx(8e-6)
    # one fused kernel: one launch (2 us), no kind's fixed cost, its boundary bytes
    fused = ComputePrices(CLUSTER.device, dataclasses.replace(fixed, fused_kernels=True), "fp32")
    assert fused.group_forward_s([write, norm, add], 4096.0) == pytest.approx(2e-6 + 4096 / 100e9)
    # a device that measured none (every GPU preset): the launch alone
    assert _prices().forward_s(write) == pytest.approx(2e-6 + 1024 / 100e9)


def test_gpu_presets_have_no_kernel_fixed_costs() -> None:
    from shardwise.cluster import get_cluster

    for name in ("dgx-a100x1", "dgx-h100x1"):
        assert get_cluster(name).efficiency.kernel_overhead_s == ()


def test_an_op_split_over_threads_pays_their_fork_and_join_once() -> None:
    """efficiency.parallel_overhead_s: a memory-bound op of PARALLEL_GRAIN elements or more (PyTorch splits it over
    the intra-op threads) pays it once beside its launch and its kind's fixed cost; a smaller one does not."""
    from shardwise.cluster.efficiency import PARALLEL_GRAIN

    eff = dataclasses.replace(HOST, kernel_overhead_s=(("layer_norm", 3e-6),), parallel_overhead_s=20e-6)
    p = ComputePrices(CLUSTER.device, eff, "fp32")
    big = OpWork("memory", 0, 2.0**21, 0.0, "layer_norm", PARALLEL_GRAIN)
    small = dataclasses.replace(big, elements=PARALLEL_GRAIN - 1)
    assert p.forward_s(big) == pytest.approx(2e-6 + 3e-6 + 20e-6 + p.device_s(big))
    assert p.forward_s(small) == pytest.approx(2e-6 + 3e-6 + p.device_s(small))
