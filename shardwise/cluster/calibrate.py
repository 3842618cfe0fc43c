"""Measure this machine and describe it as a ``cpu:N`` ClusterSpec.

``calibrate(n)`` spawns ``n`` local processes (torch.multiprocessing, gloo over 127.0.0.1 on a free port),
each with its share of the cores (``cores // n`` threads, as the runtime gives them). All processes measure
at the same time, as they will run:

* fp32 matmul FLOP/s (square matmuls, 2 n^3 FLOP each),
* memory bandwidth from a large tensor copy (read + write bytes / time),
* gloo point-to-point between ranks 0 and 1: alpha = half a 4-byte round trip, beta from a large message
  (one way time minus alpha, over its size).

The spec keeps the slowest process's compute and memory figures. ``quick`` keeps the whole run to a few
seconds plus process start-up (well under 30 s on 2 cores); ``quick=False`` measures longer and larger.
"""

from __future__ import annotations

import os
import socket
import statistics
import sys
import time
from datetime import timedelta
from typing import Any

from shardwise.cluster.presets import CPU_GLOO_BANDWIDTH, CPU_GLOO_LATENCY, cpu_cluster
from shardwise.cluster.spec import ClusterSpec
from shardwise.errors import DeviceUnavailableError

__all__ = ["calibrate", "Measurement"]

Measurement = dict[str, float]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _timed_rate(run: Any, work: float, min_seconds: float, min_reps: int = 3) -> float:
    """Best rate (work per second) of ``run()`` over repetitions lasting at least ``min_seconds`` in all."""
    run()  # warm-up (allocations, thread pool)
    best = 0.0
    start = time.perf_counter()
    reps = 0
    while reps < min_reps or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        run()
        dt = time.perf_counter() - t0
        if dt > 0:
            best = max(best, work / dt)
        reps += 1
    return best


def _measure_matmul(quick: bool) -> float:
    import torch

    n = 512 if quick else 1024
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    out = torch.empty(n, n)
    return _timed_rate(lambda: torch.mm(a, b, out=out), 2.0 * n**3, 0.3 if quick else 1.5)


def _measure_copy(quick: bool) -> float:
    import torch

    numel = (32 if quick else 128) * 2**20 // 4
    src = torch.ones(numel)
    dst = torch.empty(numel)
    return _timed_rate(lambda: dst.copy_(src), 2.0 * numel * 4, 0.3 if quick else 1.5)


def _pingpong(rank: int, nbytes: int, reps: int) -> float:
    """Median one-way time of a ``nbytes`` message between ranks 0 and 1 (rank 0's view; 0.0 elsewhere)."""
    import torch
    import torch.distributed as dist

    buf = torch.zeros(max(1, nbytes // 4))
    times = []
    for i in range(reps + 1):
        t0 = time.perf_counter()
        if rank == 0:
            dist.send(buf, 1)
            dist.recv(buf, 1)
        else:
            dist.recv(buf, 0)
            dist.send(buf, 0)
        if i > 0:  # the first round trip sets up the pair
            times.append((time.perf_counter() - t0) / 2)
    return statistics.median(times)


def _worker(rank: int, world: int, port: int, quick: bool, queue: Any) -> None:
    import torch
    import torch.distributed as dist

    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # the loopback interface, as init uses 127.0.0.1
    torch.set_num_threads(max(1, _cores() // world))
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    try:
        result: Measurement = {}
        dist.barrier()
        result["flops"] = _measure_matmul(quick)
        dist.barrier()
        result["memory_bandwidth"] = _measure_copy(quick)
        dist.barrier()
        if world >= 2 and rank < 2:
            small = _pingpong(rank, 4, 200 if quick else 1000)
            nbytes = (8 if quick else 64) * 2**20
            large = _pingpong(rank, nbytes, 5 if quick else 20)
            result["latency"] = small
            result["bandwidth"] = nbytes / (large - small) if large > small else nbytes / large
        dist.barrier()
        queue.put((rank, result))
    finally:
        dist.destroy_process_group()


def calibrate(num_processes: int = 2, *, quick: bool = True) -> ClusterSpec:
    """Measure this machine with ``num_processes`` local processes; a ``cpu:N`` spec with those figures."""
    if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
        raise DeviceUnavailableError(
            f"calibrate: num_processes={num_processes!r} is not allowed: give a positive number of processes"
        )
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    try:
        mp.start_processes(
            _worker,
            args=(num_processes, _free_port(), quick, queue),
            nprocs=num_processes,
            join=True,
            start_method="spawn",
        )
    except Exception as err:  # a worker failed: report it as the machine not providing the processes
        raise DeviceUnavailableError(
            f"calibrate: could not run {num_processes} local gloo processes ({type(err).__name__}: {err}); "
            "check that 127.0.0.1 is usable and that the machine has enough memory"
        ) from err
    results: dict[int, Measurement] = {}
    while not queue.empty():
        rank, measured = queue.get()
        results[rank] = measured
    if len(results) != num_processes:
        raise DeviceUnavailableError(
            f"calibrate: only {len(results)} of {num_processes} processes reported; run it again"
        )
    flops = min(r["flops"] for r in results.values())
    memory_bandwidth = min(r["memory_bandwidth"] for r in results.values())
    latency = results[0].get("latency", CPU_GLOO_LATENCY)
    bandwidth = results[0].get("bandwidth", CPU_GLOO_BANDWIDTH)
    return cpu_cluster(
        num_processes,
        flops=flops,
        memory_bandwidth=memory_bandwidth,
        latency=latency,
        bandwidth=bandwidth,
        name=f"cpu:{num_processes}-calibrated",
    )
