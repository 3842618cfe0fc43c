"""Fixtures of the end-to-end tests: the session's pool of two gloo worker processes (tests/conftest.py's
``worker_pools``: spawning one costs about ten seconds here). A module that needs another size asks
``worker_pools`` for it."""

from __future__ import annotations

import pytest

from shardwise.runtime import WorkerPool


@pytest.fixture(scope="module")
def pool(worker_pools) -> WorkerPool:
    return worker_pools(2)
