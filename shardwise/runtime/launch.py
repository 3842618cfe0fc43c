"""Start a local worker as a fresh interpreter running ``python -m shardwise.runtime.worker_main``, as
torchrun starts its workers: the caller's main module is never imported again, so a plain script, a
notebook cell and ``python -c`` can start workers without an ``if __name__ == "__main__":`` guard.

A worker gets, before its interpreter starts: its environment (the caller's plus ``env``: thread budgets
and the user's variables are in place before torch is imported), the directory holding this ``shardwise``
package at the front of ``PYTHONPATH`` (it runs the caller's shardwise), one end of a socket pair as its
request pipe and the write end of a sentinel pipe. Its first message on the request pipe is its
``WorkerConfig`` and the caller's ``sys.path`` (modules the caller imports by path, e.g. the functions
``WorkerPool.call_function`` sends by name, import there too). The sentinel's read end becomes readable
when the worker exits, however it exits. POSIX only (file descriptors are inherited by number).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import socket
import subprocess
import sys
from multiprocessing.connection import Connection
from pathlib import Path

__all__ = ["WorkerProcess", "start_worker"]

_PICKLE = pickle.HIGHEST_PROTOCOL
_ROOT = str(Path(__file__).resolve().parents[2])  # the directory holding the shardwise package


class WorkerProcess:
    """A started worker: ``pid``, ``sentinel`` (a file descriptor readable once it has exited),
    ``exitcode`` (None while it runs; minus the signal number when a signal ended it), and the process
    verbs ``is_alive``, ``join``, ``terminate``, ``kill``, ``close``."""

    def __init__(self, popen: subprocess.Popen, sentinel: int) -> None:
        self._popen = popen
        self.sentinel = sentinel

    @property
    def pid(self) -> int | None:
        return self._popen.pid

    @property
    def exitcode(self) -> int | None:
        return self._popen.poll()

    def is_alive(self) -> bool:
        return self._popen.poll() is None

    def join(self, timeout: float | None = None) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._popen.wait(timeout)

    def terminate(self) -> None:
        if self.is_alive():
            self._popen.terminate()

    def kill(self) -> None:
        if self.is_alive():
            self._popen.kill()

    def close(self) -> None:
        """Release the sentinel (after the process has exited)."""
        if self.sentinel >= 0:
            os.close(self.sentinel)
            self.sentinel = -1


def start_worker(
    rank: int, config: object, env: dict[str, str], name: str
) -> tuple[WorkerProcess, Connection]:
    """Start worker ``rank`` (see the module docstring); returns the process and the parent's end of its
    pipe. ``name`` is shown in the worker's command line (``ps``)."""
    parent, child = socket.socketpair()
    sentinel_read, sentinel_write = os.pipe()
    path = os.pathsep.join([_ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    command = [sys.executable, "-m", "shardwise.runtime.worker_main", str(rank), str(child.fileno()),
               str(sentinel_write), name]  # fmt: skip
    try:
        popen = subprocess.Popen(
            command, env={**os.environ, **env, "PYTHONPATH": path}, stdin=subprocess.DEVNULL,
            pass_fds=(child.fileno(), sentinel_write),
        )  # fmt: skip
    except BaseException:
        for fd in (sentinel_read, sentinel_write):
            os.close(fd)
        parent.close()
        raise
    finally:
        child.close()
    os.close(sentinel_write)
    conn = Connection(parent.detach())
    conn.send_bytes(pickle.dumps((config, list(sys.path)), protocol=_PICKLE))
    return WorkerProcess(popen, sentinel_read), conn
