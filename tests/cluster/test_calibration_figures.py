"""Calibration without processes: measurements -> figures (spec_from_measurements), the cache of `cpu:N` and
the environment switch between the calibrated machine and the nominal preset."""

from __future__ import annotations

import importlib
import statistics
import time

import pytest

from shardwise.cluster import ClusterSpec, get_cluster
from shardwise.cluster.machine import (
    CPU_CLUSTER_ENV,
    cache_file,
    calibration_note,
    measured_cpu_cluster,
    provisional,
    read_cached,
    write_cached,
)
from shardwise.cluster.presets import cpu_cluster
from shardwise.errors import ClusterSpecError

calibrate_module = importlib.import_module("shardwise.cluster.calibrate")

# the "machine" the synthetic measurements describe
RATE, GEMM_FIXED = 80e9, 6e-6
DISPATCH, VIEW, RECORD, BACKWARD = 2e-6, 1e-6, 0.5e-6, 3e-6
CACHE_BW, MEMORY_BW = 80e9, 15e9
ALPHA, BANDWIDTH = 40e-6, 2e9
AR_OVERHEAD, AG_OVERHEAD, RS_OVERHEAD = 50e-6, 30e-6, 70e-6
AR_FRACTION = 0.5  # all-reduce and reduce-scatter reach half of point-to-point's bandwidth, all-gather all of it
ADAM = (20e-6, 30e-6, 2e-9)  # per step, per tensor, per element
OBJECT = (300e-6, 3e-9)  # an object gather: fixed, per byte
ATTENTION_FIXED = 40e-6  # a fused attention call's fixed cost beyond the dispatch


def _measurement(slow: float = 1.0) -> dict:
    """What one process would report on the synthetic machine (``slow`` stretches its compute)."""
    n = 2
    p2p = {"small": (4.0, ALPHA + 4 / BANDWIDTH), "large": (2.0**22, ALPHA + 2**22 / BANDWIDTH)}
    sizes = calibrate_module.COLLECTIVE_SIZES
    allreduce = [(float(m), AR_OVERHEAD + 2 * (n - 1) * ALPHA + m / BANDWIDTH / AR_FRACTION) for m in sizes]
    allgather = [(float(m), AG_OVERHEAD + (n - 1) * ALPHA + (n - 1) / n * m / BANDWIDTH) for m in sizes]
    scatter = [(m, t - AR_OVERHEAD + RS_OVERHEAD) for m, t in allreduce]  # gloo: an all-reduce and a slice
    probes = (*calibrate_module.CACHE_PROBES, calibrate_module.MEMORY_PROBE_BYTES)
    # the first three working sets stream at the cache's bandwidth, the 24 MiB one half-way, then memory
    bandwidths = (CACHE_BW, CACHE_BW, CACHE_BW, (CACHE_BW + MEMORY_BW) / 2 - 1e9, MEMORY_BW)
    return {
        "dispatch_s": DISPATCH * slow,
        "view_s": VIEW * slow,
        "record_s": RECORD * slow,
        "backward_node_s": BACKWARD * slow,
        "gemm": [(2.0 * k**3, slow * (GEMM_FIXED + 2.0 * k**3 / RATE)) for k in calibrate_module.GEMM_SIZES],
        "attention": {
            "flops": 1e8,
            "forward_s": DISPATCH + 1e8 / (0.5 * RATE),
            "backward_s": BACKWARD + 2.5e8 / (0.25 * RATE),
            # forward calls of four lengths: the dispatch, a fixed cost of its own, the FLOPs at half the matmuls'
            "forward_points": [
                (f, slow * (DISPATCH + ATTENTION_FIXED + f / (0.5 * RATE))) for f in (1e5, 1e6, 4e6, 1.6e7)
            ],
        },
        "stream": [(float(b), b / bw) for b, bw in zip(probes, bandwidths, strict=True)],
        "elementwise": {"tanh": (2e-9, 1e-9), "exp": (1e-9, 0.5e-9)},
        "optimizer": {
            "adamw": [
                (t, t * e, ADAM[0] + t * ADAM[1] + t * e * ADAM[2])
                for t, e in calibrate_module.OPTIMIZER_POINTS
            ]
        },
        "p2p": p2p,
        "allreduce": allreduce,
        "allgather": allgather,
        "reduce_scatter": scatter,
        "object_gather": [(float(m), OBJECT[0] + m * OBJECT[1]) for m in calibrate_module.OBJECT_SIZES],
        "overlap": {"compute": 1e-3, "comm": 0.5e-3, "both": 1.4e-3},
    }


def test_fit_line_recovers_a_line_and_never_a_negative_fixed_cost() -> None:
    xs = [1.0, 2.0, 4.0, 8.0]
    assert calibrate_module.fit_line(xs, [3 + 2 * x for x in xs]) == pytest.approx((3.0, 2.0))
    c, s = calibrate_module.fit_line(xs, [2 * x - 1 for x in xs])
    assert c == 0.0 and s > 0


def test_figures_from_measurements() -> None:
    spec = calibrate_module.spec_from_measurements([_measurement(), _measurement(slow=1.25)], 2, when="now")
    eff = spec.efficiency
    # compute: the slower process's figures
    assert spec.device.flops("float32") == pytest.approx(RATE / 1.25)
    assert eff.op_overhead_s == pytest.approx(1.25 * DISPATCH)
    assert eff.view_overhead_s == pytest.approx(1.25 * VIEW)
    assert eff.record_overhead_s == pytest.approx(1.25 * RECORD)
    assert eff.backward_op_overhead_s == pytest.approx(1.25 * BACKWARD)
    assert eff.gemm_overhead_s == pytest.approx(1.25 * (GEMM_FIXED - DISPATCH))
    assert spec.device.memory_bandwidth == pytest.approx(MEMORY_BW)
    assert eff.cache_bandwidth == pytest.approx(CACHE_BW)
    assert eff.cache_bytes == calibrate_module.CACHE_PROBES[2]  # the 24 MiB working set is below half-way
    assert eff.elementwise("tanh") == (2e-9, 1e-9) and eff.elementwise("sin") is None
    # attention: the slower process's line through the forward calls: its fixed cost beyond the dispatch, its
    # rate over the matmuls'
    assert eff.attention_overhead_s == pytest.approx(1.25 * ATTENTION_FIXED, rel=1e-6)
    assert eff.attention_forward == pytest.approx(0.5, rel=1e-6)
    assert eff.optimizer("AdamW") == pytest.approx(ADAM)
    # communication: the pair's latency and bandwidth, what the collectives add beyond the ring formula
    assert spec.p2p_alpha_beta(0, 1) == pytest.approx((ALPHA, 1 / BANDWIDTH), rel=1e-6)
    assert eff.collective_overhead_s == pytest.approx((AR_OVERHEAD + AG_OVERHEAD + RS_OVERHEAD) / 3, rel=1e-3)
    assert eff.intra_node == pytest.approx((2 * AR_FRACTION + 1) / 3, rel=1e-3)
    assert eff.comm_overlap == pytest.approx(0.1 / 0.5)
    assert (eff.object_overhead_s, eff.object_byte_s) == pytest.approx(OBJECT)
    assert eff.overhead_hidden is False and eff.fused_kernels is False
    assert "measured on this machine at now by shardwise calibrate" in eff.source("op_overhead_s")
    # the YAML form keeps every figure, tables included
    assert ClusterSpec.from_dict(spec.to_dict()) == spec


def test_cache_and_environment(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SHARDWISE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv(CPU_CLUSTER_ENV, "calibrated")
    assert read_cached(3) is None
    assert cache_file(3) != cache_file(2) and str(cache_file(3)).startswith(str(tmp_path))
    measured = calibrate_module.spec_from_measurements([_measurement()] * 3, 3, when="now", name="cpu:3")
    path = write_cached(3, measured, load=1000.0)  # measured on a busy machine: provisional
    assert path == cache_file(3) and read_cached(3) == measured and provisional(3)
    write_cached(3, measured, load=0.0)
    assert not provisional(3)
    # cpu:3 is now the cached calibration, read without measuring; the plan note says where it is
    assert get_cluster("cpu:3") == measured == measured_cpu_cluster(3)
    note = calibration_note(measured)
    assert note is not None and "calibrated" in note and str(path) in note
    # nominal: the preset's fixed figures, with no note
    monkeypatch.setenv(CPU_CLUSTER_ENV, "nominal")
    assert get_cluster("cpu:3") == cpu_cluster(3) and calibration_note(cpu_cluster(3)) is None
    monkeypatch.setenv(CPU_CLUSTER_ENV, "sometimes")
    with pytest.raises(ClusterSpecError, match="SHARDWISE_CPU_CLUSTER='sometimes' is not allowed"):
        get_cluster("cpu:3")


def test_a_damaged_cache_file_is_not_trusted(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SHARDWISE_CACHE_DIR", str(tmp_path))
    path = cache_file(2)
    path.parent.mkdir(parents=True)
    path.write_text("name: [unclosed")
    assert read_cached(2) is None


def test_a_collective_costs_the_mean_of_a_run_less_the_compute_before_each_call() -> None:
    """run_per_call (how calibrate times collectives): a call that alternately takes 4 ms and nothing costs
    its mean, 2 ms, not its least single call (0); the compute before each call is not counted."""
    state = {"calls": 0}

    def call() -> None:
        state["calls"] += 1
        if state["calls"] % 2:
            time.sleep(4e-3)

    figure = calibrate_module.run_per_call(call, lambda: None, calls=4, samples=3)
    assert figure >= 2e-3 * 0.99
    assert calibrate_module.run_per_call(lambda: None, lambda: time.sleep(2e-3), calls=4, samples=3) < 1e-3


def test_compute_is_timed_in_runs_taking_each_weight_in_turn() -> None:
    """in_program (how calibrate times compute since version 4): the calls of a run take the given calls (one
    per weight operand) in turn, and the figure is their mean, the ops run before each call not counted."""
    import torch

    used: list[int] = []

    def busy(k: int, seconds: float):  # noqa: ANN202 - CPU work, on the clock a one-thread process is timed on
        def call() -> None:
            used.append(k)
            end = time.thread_time() + seconds
            while time.thread_time() < end:
                pass

        return call

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # compute figures of a one-thread process are read on its CPU clock
    try:
        figure = calibrate_module.in_program([busy(0, 1e-3), busy(1, 4e-3)], samples=3)
    finally:
        torch.set_num_threads(threads)
    assert 2.5e-3 * 0.95 <= figure < 3.5e-3  # the mean of a run (2.5 ms), not its least call (1 ms) nor its most
    assert used[1:9] == [1, 0] * 4 and set(used) == {0, 1}  # after the warm-up call, each in turn


def test_a_kernel_kinds_fixed_cost_is_recovered_from_its_timings() -> None:
    """Calibration version 8: each op kind's cost of one more call at the probe's sizes, a fixed cost plus a cost
    per element, gives back its fixed cost beyond a plain kind's (the plain kinds' median intercept), even with
    one sample a load disturbed; the slower process's figure is kept, the per-element math figure of a kind in
    both probes is net of it, and an add split over two threads gives its fork and join's fixed cost."""
    rows = calibrate_module.KERNEL_ROWS
    elements = [float(r * calibrate_module.KERNEL_HIDDEN) for r in rows]
    plain = 2e-6  # what a plain op costs in the sequence
    fixed = {"index_copy": 5e-6, "tanh": 1e-6, **{op: 0.0 for op in calibrate_module.PLAIN_KINDS}}
    per_element = {op: 0.3e-9 for op in fixed} | {"index_copy": 1e-9, "tanh": 3e-9}
    fork = 20e-6  # an add split over the threads: its fork and join

    def kernels(slow: float, disturbed: bool) -> dict:
        out = {op: [(n, slow * (plain + fixed[op] + per_element[op] * n)) for n in elements] for op in fixed}
        out["add"][0] = (elements[0], slow * plain * 0.9)  # a plain kind a little off its line: medians hold
        if disturbed:  # one sample of one kind taken while another process held the core
            n, t = out["index_copy"][1]
            out["index_copy"][1] = (n, 8 * t)
        return out

    quick, slow = _measure_quick_and_slow()
    quick["kernels"], slow["kernels"] = kernels(1.0, True), kernels(1.25, False)
    # matmul kinds: a plain mm, and linear 4 us beyond it (whatever a plain op costs)
    for m, factor in ((quick, 1.0), (slow, 1.25)):
        m["kernels"]["mm"] = [(n, factor * (6e-6 + 2e-9 * n)) for n in elements]
        m["kernels"]["linear"] = [(n, factor * (10e-6 + 2e-9 * n)) for n in elements]
    big = [float(r * calibrate_module.KERNEL_HIDDEN) for r in calibrate_module.PARALLEL_ROWS]
    quick["parallel"] = [(n, plain + fork + 0.15e-9 * n) for n in big]
    slow["parallel"] = [(n, 1.25 * (plain + fork + 0.15e-9 * n)) for n in big]
    spec = calibrate_module.spec_from_measurements([quick, slow], 2, when="now")
    eff = spec.efficiency
    # the slower process's intercept (1.25 x (plain + fixed)) beyond its plain kinds' (1.25 x plain)
    for op, seconds in fixed.items():
        assert eff.kernel_overhead(op) == pytest.approx(1.25 * seconds, rel=1e-6, abs=1e-12), op
    assert eff.kernel_overhead("mean") == 0.0  # not measured: the dispatch alone
    assert eff.kernel_overhead("linear") == pytest.approx(1.25 * 4e-6)  # beyond the mm's, not a plain op's
    assert eff.kernel_overhead("mm") == 0.0  # a plain mm: gemm_overhead_s prices it
    assert eff.parallel_overhead_s == pytest.approx(1.25 * fork, rel=1e-6)
    numel = calibrate_module.ELEMENTWISE_SHAPE[0] * calibrate_module.ELEMENTWISE_SHAPE[1]
    assert eff.elementwise("tanh")[0] == pytest.approx(2e-9 - 1.25e-6 / numel)  # net of the fixed cost
    assert eff.elementwise("exp") == (1e-9, 0.5e-9)
    assert "robust line" in eff.source("kernel_overhead_s") and "add" in eff.source("parallel_overhead_s")
    assert ClusterSpec.from_dict(spec.to_dict()) == spec  # the YAML form keeps the table
    # a one-thread process (no parallel samples) measures no fork and join
    del quick["parallel"], slow["parallel"]
    assert calibrate_module.spec_from_measurements([quick, slow], 2, when="now").efficiency.parallel_overhead_s == 0


def _measure_quick_and_slow() -> tuple[dict, dict]:
    return _measurement(), _measurement(slow=1.25)


def test_fit_line_robust_ignores_one_disturbed_point() -> None:
    xs = [1.0, 4.0, 16.0, 64.0]
    ys = [3 + 2 * x for x in xs]
    assert calibrate_module.fit_line_robust(xs, ys) == pytest.approx((3.0, 2.0))
    for k in range(len(xs)):  # any one point disturbed, at either end or inside
        disturbed = [y * 5 if i == k else y for i, y in enumerate(ys)]
        assert calibrate_module.fit_line_robust(xs, disturbed) == pytest.approx((3.0, 2.0)), k
    assert calibrate_module.fit_line_robust(xs, [2 * x - 1 for x in xs])[0] == 0.0


def test_a_collective_figure_can_be_the_median_run() -> None:
    """run_per_call with statistic=median (how calibrate times collectives since version 7): of runs whose calls
    take 1 ms in every third run and 4 ms in the others, the figure is the median run's (4 ms), neither the least
    run's (1 ms, the default statistic's) nor the mean of the runs (3 ms)."""
    import statistics

    def runs() -> object:
        state = {"calls": 0}

        def call() -> None:
            state["calls"] += 1
            run = (state["calls"] - 2) // 2  # after the warm-up call, runs of 2 calls
            time.sleep(1e-3 if run % 3 == 0 else 4e-3)

        return call

    figure = calibrate_module.run_per_call(runs(), lambda: None, calls=2, samples=6, statistic=statistics.median)
    assert 3.9e-3 <= figure < 4.8e-3
    assert calibrate_module.run_per_call(runs(), lambda: None, calls=2, samples=6) < 1.8e-3


def test_min_of_medians_is_the_typical_sample_of_the_least_disturbed_stretch() -> None:
    """calibrate.min_of_medians (a collective's statistic since version 9): of three stretches of samples, the
    median of the quietest one; neither its least sample nor the median of all samples."""
    busy, quiet, mixed = [9.0, 8.0, 7.0, 9.5, 8.5], [3.0, 1.0, 2.0, 2.5, 2.2], [5.0, 1.5, 6.0, 5.5, 4.0]
    values = busy + quiet + mixed
    assert calibrate_module.min_of_medians(values, 3) == 2.2
    assert statistics.median(values) == 5.0 and min(values) == 1.0
    assert calibrate_module.min_of_medians(values, 1) == statistics.median(values)
