"""The loop a local worker process runs: rendezvous once, then load packages and call methods on request.

Protocol (parent <-> worker, one duplex pipe, every message a pickled tuple sent with ``send_bytes``):
the worker first sends ``(0, "ready", info)`` or ``(0, "err", info)``; then for each request
``(op, seq, *payload)`` it answers exactly one ``(seq, "ok", value)`` or ``(seq, "err", info)`` with
``info = {"error": "Type: message", "traceback": text}``. ``op`` is ``"load"``, ``"call"``, ``"probe"`` or
``"close"``. Values are detached CPU tensors (or plain data); pickling is by value, never shared memory
(``wire``: tensors of every dtype, complex32 and uint64 included).

A worker is a fresh interpreter, ``python -m shardwise.runtime.worker_main RANK FD SENTINEL NAME``
(``launch.start_worker``): ``FD`` is its end of the pipe, whose first message is ``(WorkerConfig, the
caller's sys.path)``. This module does not import torch at import time; the pool also puts the thread budget
and the user's ``env`` into the environment the worker is created with, so both are in place before torch
starts.
"""

from __future__ import annotations

import atexit
import contextlib
import faulthandler
import gc
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from shardwise.runtime import wire

__all__ = ["WorkerConfig", "entry", "main", "stack_file", "thread_env"]



@dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker needs to join the pool; identical for every rank."""

    world_size: int
    backend: str
    master_addr: str
    master_port: int
    pg_timeout_s: float
    threads: int
    stack_dir: str
    env: dict[str, str] = field(default_factory=dict)


def thread_env(threads: int) -> dict[str, str]:
    """Environment variables that cap the OpenMP/BLAS thread pools of a worker at ``threads``."""
    return {name: str(threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}


def stack_file(stack_dir: str | Path, rank: int) -> Path:
    """Where rank ``rank`` writes its Python stacks when it receives SIGUSR1."""
    return Path(stack_dir) / f"rank{rank}.stack"


def _error_info(exc: BaseException) -> dict[str, str]:
    """Type, message and traceback text of ``exc``, without this module's own frames at the top."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    return {
        "error": f"{type(exc).__name__}: {exc}",
        "traceback": "".join(traceback.format_exception(type(exc), exc, tb)),
    }


def _watch_parent(parent_pid: int) -> None:
    """Exit this worker if its parent disappears, even while the main thread is blocked in a collective."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(70)


def _subgroups() -> list[Any]:
    """The process groups other than the default one (each gloo group keeps threads until destroyed)."""
    try:
        import torch.distributed as dist
        from torch.distributed.distributed_c10d import _world

        if not (dist.is_available() and dist.is_initialized()):
            return []
        default = dist.group.WORLD
        return [g for g in list(_world.pg_map) if g is not default]
    except Exception:  # private torch structure: without it groups are only leaked, not wrong
        return []


def _destroy_groups(groups: list[Any]) -> None:
    """Destroy the process groups a replaced package made: a pool that takes thousands of programs (the
    fuzzer) would otherwise keep every group's threads alive. A gloo group's threads end when its last
    reference goes too: the package's objects must be gone (``gradients._weak_hook``)."""
    import torch.distributed as dist

    for g in groups:
        with contextlib.suppress(Exception):  # already gone with a torn-down default group
            dist.destroy_process_group(g)


class _State:
    def __init__(self, rank: int, config: WorkerConfig, backend: str) -> None:
        self.rank = rank
        self.config = config
        self.backend = backend
        self.module: Any = None
        self.package_name: str | None = None

    def load(self, package_dir: str, module_name: str, init: str | None, init_kwargs: dict) -> None:
        from shardwise.runtime.package import build_module, import_package, rank_device, unload_package

        self.module = None
        if self.package_name is not None:
            unload_package(self.package_name)
            self.package_name = None
        gc.collect()
        # every group but the default one is the replaced package's, also those it made after its build
        # (every rank loads in step, so every rank destroys the same groups)
        _destroy_groups(_subgroups())
        package = import_package(package_dir, module_name)
        self.package_name = module_name
        self.module = build_module(package, self.rank, self.config.world_size, rank_device(self.backend))
        if init is not None:
            getattr(self.module, init)(**init_kwargs)

    def call(self, method: Any, args: tuple, kwargs: dict, want_result: bool) -> Any:
        from shardwise.runtime.package import rank_device, to_cpu_detached, to_device

        if self.module is None:
            raise RuntimeError("no package is loaded in this worker; call WorkerPool.load() first")
        args, kwargs = to_device((args, kwargs), rank_device(self.backend))  # CPU tensors arrive
        if callable(method):  # WorkerPool.call_function: a module-level function applied to the module
            result = method(self.module, *args, **kwargs)
        else:
            result = getattr(self.module, method)(*args, **kwargs)
        return to_cpu_detached(result) if want_result else None

    def probe(self, token: int) -> bool:
        import torch
        import torch.distributed as dist

        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        value = torch.tensor([1.0, float(token)], dtype=torch.float64, device=device)
        dist.all_reduce(value)
        expected = [float(self.config.world_size), float(token * self.config.world_size)]
        got = value.cpu().tolist()
        if got != expected:
            raise RuntimeError(
                f"probe all_reduce returned {got}, expected {expected}: collectives are out of step"
            )
        return True


def entry(argv: list[str]) -> None:
    """The worker's command line (see the module docstring): read the config, take the caller's import
    path, run ``main``."""
    rank, fd, sentinel = int(argv[0]), int(argv[1]), int(argv[2])
    for inherited in (fd, sentinel):  # the worker's own: not for processes it may start
        os.set_inheritable(inherited, False)
    conn = Connection(fd)
    config, path = pickle.loads(conn.recv_bytes())
    sys.path[:] = list(path) + [p for p in sys.path if p not in path]
    main(rank, config, conn)
    _exit_now(0)


def _exit_now(code: int) -> None:
    """End the process at once, after the exit functions and the output buffers: the interpreter's own
    teardown (unloading torch, collecting every object it made) takes seconds per worker, and nothing in it
    matters to a worker whose process group is gone (multiprocessing's forked children end the same way)."""
    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


def main(rank: int, config: WorkerConfig, conn: Connection) -> None:
    """Worker ``rank``'s loop: join the process group, then answer requests until ``close``."""
    os.environ.update({**config.env, **thread_env(config.threads)})
    # Ctrl-C reaches the whole foreground process group; the parent decides what to do with the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The fuzzer rewrites package directories in place; stale bytecode must never be picked up.
    sys.dont_write_bytecode = True
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True, name="parent-watch").start()
    stacks = open(stack_file(config.stack_dir, rank), "w")  # noqa: SIM115 - open for the process lifetime
    if hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)

    def send(message: tuple) -> None:
        try:
            data = wire.dumps(message)
        except Exception as exc:  # an unpicklable result is the method's fault, report it as such
            data = wire.dumps((message[0], "err", _error_info(exc)))
        conn.send_bytes(data)

    from shardwise.runtime.process_group import destroy_process_group, init_process_group, set_thread_budget

    try:
        set_thread_budget(config.threads)
        backend = init_process_group(
            rank,
            config.world_size,
            backend=config.backend,
            master_addr=config.master_addr,
            master_port=config.master_port,
            timeout_s=config.pg_timeout_s,
        )
    except BaseException as exc:
        send((0, "err", _error_info(exc)))
        return
    # What exists now (torch, the process group) lives as long as the worker: out of the collector's sight, the
    # full collection on every load (which frees a replaced program's cycles) takes milliseconds, not ~0.3 s.
    gc.freeze()
    send((0, "ready", {"pid": os.getpid(), "main_thread": threading.main_thread().ident, "backend": backend}))

    state = _State(rank, config, backend)
    try:
        while True:
            try:
                request = wire.loads(conn.recv_bytes())
            except (EOFError, OSError):  # the parent went away
                break
            op, seq = request[0], request[1]
            if op == "close":
                destroy_process_group()
                send((seq, "ok", None))
                break
            try:
                if op == "load":
                    value = state.load(*request[2:])
                elif op == "call":
                    method, args_blob, want_result = request[2:]
                    args, kwargs = wire.loads(args_blob)
                    value = state.call(method, args, kwargs, want_result)
                elif op == "probe":
                    value = state.probe(*request[2:])
                else:
                    raise RuntimeError(f"unknown request {op!r}")
                reply: tuple = (seq, "ok", value)
            except BaseException as exc:  # SystemExit from generated code is a fault too, not an exit
                reply = (seq, "err", _error_info(exc))
            send(reply)
    finally:
        destroy_process_group()
        stacks.close()
