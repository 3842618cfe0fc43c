"""A long-lived worker pool that trains one generated program after another (the fuzzer loads hundreds)
keeps a bounded number of threads: the process groups of a replaced program, with their gloo threads, go
with it. Real compiled training programs of different layouts (data, tensor and pipeline parallel, ZeRO)
on one shared pool of two gloo workers."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

import shardwise
from shardwise.runtime import WorkerPool
from shardwise.zoo import build_model

pytestmark = pytest.mark.multiproc

# one program per layout, then the first again: it must find the workers as it left them
LAYOUTS = [
    {"dp": 2, "tp": 1},
    {"dp": 1, "tp": 2},
    {"pp": 2, "microbatches": 2},
    {"dp": 2, "tp": 1, "zero": 1},
    {"dp": 2, "tp": 1, "zero": 3},
    {"dp": 2, "tp": 1},
]


def _gloo_threads(pid: int) -> int:
    """How many of process ``pid``'s threads are gloo's (event loops and worker threads of its groups)."""
    count = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
        except OSError:  # the thread ended meanwhile
            continue
        count += "gloo" in name
    return count


def _loss(output: torch.Tensor) -> torch.Tensor:
    return output.pow(2).mean()


@pytest.fixture(scope="module")
def pool(worker_pools):  # the session's pool of two (tests/conftest.py): long-lived, as here
    return worker_pools(2)


def test_training_programs_one_after_another_keep_the_threads_bounded(pool: WorkerPool) -> None:
    if not Path("/proc/self/task").is_dir():
        pytest.skip("counting a process's threads needs /proc (Linux)")
    counts = []
    for layout in LAYOUTS:
        model, inputs = build_model("mlp", "tiny", layers=4, batch=8)
        compiled = shardwise.compile(
            model,
            "cpu:2",
            example_inputs=inputs,
            constraints=layout,
            workers=pool,
            mode="train",
            loss_fn=_loss,
            optimizer=functools.partial(torch.optim.SGD, lr=0.1),
        )
        loss = compiled.train_step(*inputs)
        assert torch.isfinite(torch.as_tensor(loss)).all()
        counts.append([_gloo_threads(pid) for pid in pool.pids])
    # the same program and layout as the first: the same groups, so no more threads than the first time
    # (when every program's groups stayed alive: the first's plus one more group per program in between)
    assert all(last <= first for last, first in zip(counts[-1], counts[0])), counts
