"""Testing helpers shipped with shardwise: the differential fuzzer (``fuzz`` makes random models,
``differential`` compiles them and compares with eager PyTorch)."""

from __future__ import annotations

__all__: list[str] = []
