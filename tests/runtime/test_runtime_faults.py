"""Runtime faults through CompiledModel on cpu:4: a rank killed mid-step (inference and training) or hung.

The victim is stopped (SIGSTOP) so that the other ranks reach a collective and wait for it, then killed
(SIGKILL) while the call is in flight. Every other rank must be stopped within the pool's bounded timeouts,
the error must name the rank and the step, and no worker process may be left behind.
"""

from __future__ import annotations

import functools
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

import shardwise
from shardwise.errors import RuntimeFault
from shardwise.runtime import WorkerFault, WorkerPool
from shardwise.testing.differential import supported_degrees
from shardwise.zoo import build_model

pytestmark = [
    pytest.mark.multiproc,
    pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="needs POSIX signals"),
]

TIMEOUT_S = 30.0  # any step; the hang test lowers it
KILL_TIMEOUT_S = 4.0  # stopping the surviving workers
SLACK_S = 6.0  # process bookkeeping on a loaded 2-core machine


@pytest.fixture(scope="module")
def pool():
    with WorkerPool(
        4, timeout_s=TIMEOUT_S, start_timeout_s=300, fault_grace_s=2.0, kill_timeout_s=KILL_TIMEOUT_S
    ) as p:
        yield p


def _gone(pid: int) -> bool:
    """The process no longer exists (exited and reaped: not even a zombie)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "X"
    except OSError:
        return True


def _kill_in_flight(pid: int, after_s: float) -> threading.Timer:
    os.kill(pid, signal.SIGSTOP)  # the victim stops; the others run into a collective and wait for it
    timer = threading.Timer(after_s, os.kill, (pid, signal.SIGKILL))
    timer.start()
    return timer


def _loss(out):
    return out.float().pow(2).mean()


def test_rank_killed_mid_inference(pool: WorkerPool) -> None:
    model, inputs = build_model("mlp")
    with torch.no_grad():
        want = model(*inputs)
    with shardwise.compile(model, "cpu:4", example_inputs=inputs, constraints={"dp": 4}, workers=pool) as cm:
        torch.testing.assert_close(cm.run(*inputs), want)
        pids = list(pool.pids)
        timer = _kill_in_flight(pids[2], after_s=0.5)
        start = time.monotonic()
        with pytest.raises(WorkerFault) as info:
            cm.run(*inputs)
        elapsed = time.monotonic() - start
        timer.join()
        fault = info.value
        assert fault.culprits == (2,) and not fault.pool_usable
        assert f"rank 2 died (killed by signal {signal.SIGKILL.value}) during call #" in str(fault)
        assert "infer" in fault.step
        assert elapsed < 0.5 + KILL_TIMEOUT_S + SLACK_S, elapsed
        assert all(_gone(pid) for pid in pids), [p for p in pids if not _gone(p)]
        # an inference program is simply loaded again, on fresh workers
        torch.testing.assert_close(cm.run(*inputs), want)
        assert not set(pool.pids) & set(pids)


def test_rank_killed_mid_training_then_resumed_from_a_checkpoint(pool: WorkerPool, tmp_path: Path) -> None:
    model, inputs = build_model("mlp")
    sgd = functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9)
    constraints = {"dp": 2, "tp": 2} if "tp" in supported_degrees() else {"dp": 4}
    with shardwise.compile(
        model, "cpu:4", example_inputs=inputs, mode="train", loss_fn=_loss, optimizer=sgd,
        constraints=constraints, workers=pool,
    ) as cm:  # fmt: skip
        cm.train_step(*inputs)
        cm.save_checkpoint(tmp_path / "step1")
        saved = cm.state_dict()
        pids = list(pool.pids)
        timer = _kill_in_flight(pids[1], after_s=0.5)
        start = time.monotonic()
        with pytest.raises(WorkerFault) as info:
            cm.train_step(*inputs)
        elapsed = time.monotonic() - start
        timer.join()
        assert info.value.culprits == (1,)
        assert "rank 1 died" in str(info.value) and "train_step" in info.value.step
        assert elapsed < 0.5 + KILL_TIMEOUT_S + SLACK_S, elapsed
        assert all(_gone(pid) for pid in pids)
        # the trained state died with the workers: say so, and resume from the checkpoint
        with pytest.raises(RuntimeFault, match=r"load a checkpoint \(cm.load_checkpoint\(directory\)\)"):
            cm.train_step(*inputs)
        cm.load_checkpoint(tmp_path / "step1")
        state = cm.state_dict()
        assert all(torch.equal(state[k], saved[k]) for k in saved)
        assert cm.train_step(*inputs) > 0


def test_hung_rank_is_named_after_the_timeout(pool: WorkerPool) -> None:
    model, inputs = build_model("mlp")
    with shardwise.compile(model, "cpu:4", example_inputs=inputs, constraints={"dp": 4}, workers=pool) as cm:
        cm.run(*inputs)
        pids = list(pool.pids)
        pool.timeout_s = 3.0
        try:
            os.kill(pids[3], signal.SIGSTOP)  # alive but never answers
            start = time.monotonic()
            with pytest.raises(WorkerFault) as info:
                cm.run(*inputs)
            elapsed = time.monotonic() - start
        finally:
            pool.timeout_s = TIMEOUT_S
        fault = info.value
        assert fault.culprits == (3,)
        text = str(fault)
        assert text.startswith("rank 3 hung (no answer, not inside a collective) during call #")
        assert "no answer within timeout_s=3.0" in text
        assert 3.0 <= elapsed < 3.0 + KILL_TIMEOUT_S + SLACK_S, elapsed
        assert all(_gone(pid) for pid in pids)
