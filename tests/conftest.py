"""Shared fixtures: built-in models are cheap to build; worker pools are not (share one per module)."""

from __future__ import annotations

import os

# Two worker processes on two cores: one intra-op thread each, so they do not oversubscribe.
os.environ.setdefault("SHARDWISE_THREADS_PER_WORKER", "1")
# `cpu:N` is this machine as calibrated (shardwise.cluster.machine) for users and benchmarks; the tests plan
# against the preset's fixed nominal figures, so that no plan depends on the machine or on a measurement.
# Tests of the calibrated path set SHARDWISE_CPU_CLUSTER themselves (monkeypatch).
os.environ["SHARDWISE_CPU_CLUSTER"] = "nominal"
