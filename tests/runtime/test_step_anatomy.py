"""``shardwise.testing.timing.step_anatomy``: a step's wall time split into the thread's CPU time, its wait for
a CPU (run queue) and the rest (blocked), checked on steps whose split is known by construction."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from shardwise.testing.timing import run_queue_s, step_anatomy


def _spin(seconds: float) -> None:
    """Run on the CPU until this thread has used ``seconds`` of CPU time."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_blocked_time_is_neither_cpu_nor_run_queue() -> None:
    a = step_anatomy(time.sleep, 0.05)
    assert a["wall"] >= 0.05
    assert a["cpu"] < 0.01  # sleeping uses no CPU
    if a["run_queue"] is not None:
        assert a["wall"] - a["cpu"] - a["run_queue"] >= 0.04  # the sleep is what is left: blocked


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs os.sched_setaffinity (Linux)")
def test_run_queue_counts_the_time_another_process_holds_the_cpu() -> None:
    if run_queue_s() is None:
        pytest.skip("this kernel gives no per-thread scheduler statistics (/proc/thread-self/schedstat)")
    cpu = sorted(os.sched_getaffinity(0))[0]
    before = os.sched_getaffinity(0)
    # another process spinning on the same CPU as this thread: they take turns, so this thread waits in the run
    # queue for about as long as it runs
    code = f"import os, time\nos.sched_setaffinity(0, {{{cpu}}})\nend = time.time() + 5\nwhile time.time() < end: pass"
    rival = subprocess.Popen([sys.executable, "-c", code])
    try:
        os.sched_setaffinity(0, {cpu})
        time.sleep(0.2)  # the rival is running
        a = step_anatomy(_spin, 0.1)
    finally:
        os.sched_setaffinity(0, before)
        rival.kill()
        rival.wait()
    assert a["cpu"] >= 0.1
    assert a["run_queue"] >= 0.3 * a["cpu"]  # about 1x under fair sharing; more on a loaded machine
    assert a["cpu"] + a["run_queue"] >= 0.9 * a["wall"]  # a spinning thread is never blocked
