"""Shared fixtures: built-in models are cheap to build; worker pools are not (share one per module)."""

from __future__ import annotations

import os

# Two worker processes on two cores: one intra-op thread each, so they do not oversubscribe.
os.environ.setdefault("SHARDWISE_THREADS_PER_WORKER", "1")
