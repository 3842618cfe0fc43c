"""Fixtures of the end-to-end tests: one pool of two gloo worker processes per test module (spawning one
costs about ten seconds here). A module that needs another size defines its own ``pool``."""

from __future__ import annotations

import pytest

from shardwise.runtime import WorkerPool


@pytest.fixture(scope="module")
def pool():
    made = WorkerPool(2, backend="gloo")
    yield made
    made.close()
