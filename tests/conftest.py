"""Shared fixtures: built-in models are cheap to build; worker pools are not (one per size for the session)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest

from shardwise.runtime import WorkerPool

# Two worker processes on two cores: one intra-op thread each, so they do not oversubscribe.
os.environ.setdefault("SHARDWISE_THREADS_PER_WORKER", "1")
# Under pytest-xdist (`make test` runs the suite in two test processes on two cores) each test process computes
# with one intra-op thread too: two processes of two threads each would oversubscribe the cores.
# And its worker processes start with COLUMNS=80 in their environment, which a one-process run does not have:
# the CLI's piped tables (shardwise.cli.console) would be cut to 80 columns and the CLI tests read them whole.
if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    torch.set_num_threads(1)
    os.environ.pop("COLUMNS", None)
# `cpu:N` is this machine as calibrated (shardwise.cluster.machine) for users and benchmarks; the tests plan
# against the preset's fixed nominal figures, so that no plan depends on the machine or on a measurement.
# Tests of the calibrated path set SHARDWISE_CPU_CLUSTER themselves (monkeypatch).
os.environ["SHARDWISE_CPU_CLUSTER"] = "nominal"


@pytest.fixture(scope="session")
def worker_pools() -> Iterator[Callable[..., WorkerPool]]:
    """``worker_pools(n, timeout_s=300.0)``: the session's pool of ``n`` gloo workers, started on first use.

    Starting a pool costs about ten seconds here (each worker a fresh interpreter importing torch), and a pool
    is made to take one program after another (the fuzzer loads thousands into one): each load replaces the
    previous package and destroys its process groups, and a pool a fault left dead restarts on its next load.
    So a test sees no other test's program, whichever ran before it. ``timeout_s`` (a plain attribute of the
    pool) is set to the caller's value on every call. Tests of the pool itself (start-up, faults, its
    environment) start their own.
    """
    made: dict[int, WorkerPool] = {}

    def get(n: int, timeout_s: float = 300.0) -> WorkerPool:
        pool = made.get(n)
        if pool is None or pool._closed:  # a test that closed it must not break the next one
            pool = made[n] = WorkerPool(n, backend="gloo", timeout_s=timeout_s)
        pool.timeout_s = timeout_s
        return pool

    yield get
    for pool in made.values():
        pool.close()
