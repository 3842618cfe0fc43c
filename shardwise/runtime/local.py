"""A pool of persistent local worker processes that run generated packages on torch.distributed.

Start-up is the expensive part (a fresh interpreter importing torch), so a ``WorkerPool`` starts its
``world_size`` processes once and keeps them across calls and across packages: ``load()`` imports a package
under a fresh module name, so thousands of plans can run one after another in the same workers.

Fault policy (what ``load()``/``call()`` do when something goes wrong; all raise ``WorkerFault``, a
``shardwise.errors.RuntimeFault``, naming the rank(s), the method and the step ``call #n``):

* **A rank raises** and every rank answers: a probe ``all_reduce`` checks that the process group is still in
  step. If it is (the usual case: the exception happened before any collective on every rank, or after
  matching collectives), the workers are kept and ``fault.pool_usable`` is ``True``; otherwise the workers
  are terminated.
* **A rank raises and others do not answer within ``fault_grace_s``**: they are taken to be blocked in a
  collective waiting for the failed rank; all workers are terminated.
* **A rank dies** (killed, segfault, ``os._exit``): detected at once through its process sentinel; every other
  rank is terminated (SIGTERM, SIGKILL after ``kill_timeout_s / 2``, reaped within ``kill_timeout_s``).
* **No answer within ``timeout_s``**: the Python stacks of the silent ranks are dumped (SIGUSR1 and
  ``faulthandler``); ranks blocked inside torch.distributed are reported as victims, the others as hung;
  all workers are terminated.

After the workers were terminated the pool is *dead*: ``call()`` raises ``RuntimeFault`` (the loaded module
and its state are gone), while ``load()`` **restarts the workers automatically** and then loads the package.
With ``respawn=True`` (the default) replacement workers are spawned right after the fault, so they start
while the caller handles it (the fuzzer compiles its next plan meanwhile); the pool stays dead — ``alive``
is false and ``call()`` raises — until the next ``load()``.
``close()`` (also ``__exit__``, a ``weakref`` finaliser and interpreter exit) stops every worker; a closed
pool cannot be reused. Workers also exit by themselves when the parent process disappears.

Workers are fresh interpreters running ``python -m shardwise.runtime.worker_main`` (``launch``), as torchrun
starts its workers: the caller's main module is not imported again, so scripts, notebook cells and
``python -c`` create pools without an ``if __name__ == "__main__":`` guard.

Not thread-safe for concurrent callers beyond a lock that serialises them.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pickle
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Sequence
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, Literal

from shardwise.errors import RuntimeFault, UserInputError
from shardwise.runtime import _worker, wire
from shardwise.runtime.faults import RankFailure, WorkerFault
from shardwise.runtime.launch import WorkerProcess, start_worker
from shardwise.runtime.package import to_cpu_detached
from shardwise.runtime.process_group import BACKENDS, find_free_port, threads_per_worker

__all__ = ["WorkerPool"]

_PICKLE = pickle.HIGHEST_PROTOCOL
_MASTER_ADDR = "127.0.0.1"
_STACK_HEADER = re.compile(r"^(?:Current thread|Thread) 0x([0-9a-f]+)", re.MULTILINE)
_FRAME = re.compile(r'^\s+File "([^"]+)", line (\d+) in (\S+)', re.MULTILINE)


class _Workers:
    """One generation of worker processes. Holds no reference to the pool, so it can be its finaliser.

    Every generation not yet stopped is in ``_LIVE`` and is stopped at interpreter exit, before
    multiprocessing's own exit hook (registered earlier, so run later) would wait for the processes forever.
    """

    def __init__(self, procs: list[WorkerProcess], conns: list[Connection], stack_dir: str) -> None:
        self.procs = procs
        self.conns = conns
        self.stack_dir = stack_dir
        self.main_threads: dict[int, int] = {}
        self.backend: str | None = None
        self.ready = False
        self.stopped = False
        _LIVE.add(self)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid is not None]

    def all_alive(self) -> bool:
        return not self.stopped and all(p.is_alive() for p in self.procs)

    def stop(self, kill_timeout_s: float, polite: bool = False) -> None:
        """Stop every process and reap it; bounded by about ``kill_timeout_s`` (twice that when polite)."""
        if self.stopped:
            return
        self.stopped = True
        _LIVE.discard(self)
        if polite and self.ready:  # workers still starting up read no requests: stop them directly
            for conn in self.conns:
                with contextlib.suppress(OSError, ValueError):
                    conn.send_bytes(pickle.dumps(("close", -1), protocol=_PICKLE))
            _join_all(self.procs, time.monotonic() + kill_timeout_s)
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
        _join_all(self.procs, time.monotonic() + kill_timeout_s / 2)
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
        _join_all(self.procs, time.monotonic() + kill_timeout_s / 2 + 5.0)
        for conn in self.conns:
            conn.close()
        for proc in self.procs:
            if not proc.is_alive():
                proc.close()
        shutil.rmtree(self.stack_dir, ignore_errors=True)

    def dump_stacks(self, ranks: Sequence[int], settle_s: float = 2.0) -> dict[int, str]:
        """Ask ``ranks`` for their Python stacks (faulthandler on SIGUSR1); return each main thread's stack."""
        if not hasattr(signal, "SIGUSR1"):
            return {}
        offsets: dict[int, int] = {}
        for rank in ranks:
            path = _worker.stack_file(self.stack_dir, rank)
            proc = self.procs[rank]
            if proc.pid is None or not proc.is_alive():
                continue
            offsets[rank] = path.stat().st_size if path.exists() else 0
            try:
                os.kill(proc.pid, signal.SIGUSR1)
            except ProcessLookupError:
                offsets.pop(rank)
        texts: dict[int, str] = {}
        deadline = time.monotonic() + settle_s
        while offsets and time.monotonic() < deadline:
            time.sleep(0.05)
            for rank, offset in list(offsets.items()):
                with open(_worker.stack_file(self.stack_dir, rank)) as f:
                    f.seek(offset)
                    text = f.read()
                if text and text.endswith("\n") and _main_thread_stack(text, self.main_threads.get(rank)):
                    texts[rank] = _main_thread_stack(text, self.main_threads.get(rank))
                    offsets.pop(rank)
        return texts


_LIVE: set[_Workers] = set()


@atexit.register
def _stop_live_workers() -> None:
    for workers in list(_LIVE):
        workers.stop(kill_timeout_s=2.0)


def _join_all(procs: Sequence[WorkerProcess], deadline: float) -> None:
    for proc in procs:
        if proc.is_alive():
            proc.join(max(0.0, deadline - time.monotonic()))


def _main_thread_stack(text: str, ident: int | None) -> str:
    """The block of a faulthandler dump that belongs to thread ``ident`` (the first block if unknown)."""
    headers = list(_STACK_HEADER.finditer(text))
    for i, header in enumerate(headers):
        if ident is None or int(header.group(1), 16) == ident:
            end = headers[i + 1].start() if i + 1 < len(headers) else len(text)
            return text[header.start() : end].strip()
    return ""


def _in_collective(stack: str) -> bool:
    """Whether the innermost Python frame of ``stack`` waits in torch.distributed (or on an async work)."""
    frame = _FRAME.search(stack)
    if frame is None:
        return False
    path = frame.group(1).replace("\\", "/")
    if "/torch/distributed/" in path:
        return True
    import linecache

    line = linecache.getline(frame.group(1), int(frame.group(2)))
    return ".wait(" in line


class WorkerPool:
    """``world_size`` persistent local worker processes, each with torch.distributed initialised.

    The backend is ``"gloo"`` (CPU), ``"nccl"`` (needs one CUDA device per rank) or ``"auto"`` (nccl when
    every rank has its own CUDA device, else gloo). Workers are started (fresh interpreters, ``launch``) at
    construction and finish starting in the background; the first ``load()`` (or ``wait_ready()``) waits for
    them, for at most ``start_timeout_s``. Rendezvous is TCP on 127.0.0.1 at a free port.

    ``env`` is added to every worker's environment before torch is imported there. Each worker runs
    ``$SHARDWISE_THREADS_PER_WORKER`` (from ``env`` or the environment) intra-op threads, by default
    ``max(1, cores // world_size)``.

    ``timeout_s`` bounds every ``load()``/``call()`` (it is a plain attribute: change it between calls if a
    step is known to be long); ``fault_grace_s`` is how long the other ranks may still take once one rank has
    raised; ``kill_timeout_s`` bounds the termination of the workers. See the module docstring for the fault
    policy: ``call()`` on a dead pool raises, ``load()`` on a dead pool restarts the workers.
    """

    def __init__(
        self,
        world_size: int,
        *,
        backend: str = "gloo",
        timeout_s: float = 300.0,
        start_timeout_s: float = 120.0,
        env: dict[str, str] | None = None,
        fault_grace_s: float = 5.0,
        kill_timeout_s: float = 5.0,
        respawn: bool = True,
    ) -> None:
        if world_size < 1:
            raise UserInputError(f"world_size must be at least 1, got {world_size}")
        if backend not in BACKENDS:
            raise UserInputError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
        for name, value in (
            ("timeout_s", timeout_s),
            ("start_timeout_s", start_timeout_s),
            ("fault_grace_s", fault_grace_s),
            ("kill_timeout_s", kill_timeout_s),
        ):
            if value <= 0:
                raise UserInputError(f"{name} must be positive, got {value}")
        self.world_size = world_size
        self.backend = backend
        self.timeout_s = timeout_s
        self.start_timeout_s = start_timeout_s
        self.fault_grace_s = fault_grace_s
        self.kill_timeout_s = kill_timeout_s
        self.respawn = respawn
        self.env = dict(env or {})
        self.threads = threads_per_worker(world_size, {**os.environ, **self.env})
        self._lock = threading.RLock()
        self._workers: _Workers | None = None
        self._finalizer: weakref.finalize | None = None
        self._closed = False
        self._dead_reason: str | None = None
        self._loaded: str | None = None
        self._steps = 0
        self._seq = 0
        self._loads = 0
        self._spawn()

    # -- public API ------------------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        """True when the pool can take calls or loads without a restart: not closed, not dead after a fault,
        and every worker process running (possibly still starting up)."""
        return (
            not self._closed
            and self._dead_reason is None
            and self._workers is not None
            and self._workers.all_alive()
        )

    @property
    def pids(self) -> list[int]:
        """Process ids of the current workers (empty when the pool is dead or closed)."""
        return [] if self._workers is None else self._workers.pids

    @property
    def resolved_backend(self) -> str | None:
        """The backend the workers actually use, once they are ready."""
        return None if self._workers is None else self._workers.backend

    @property
    def steps(self) -> int:
        """How many load()/call() steps were issued so far (the ``#n`` in fault messages)."""
        return self._steps

    def wait_ready(self) -> None:
        """Block until every worker has joined the process group (starting workers if there are none)."""
        with self._lock:
            self._ensure_workers()

    def load(
        self,
        package_dir: str | Path,
        *,
        package_name: str | None = None,
        init: str | None = None,
        init_kwargs: dict | None = None,
    ) -> None:
        """Import the package at ``package_dir`` in every worker, ``build(rank, world_size)`` it, then call
        ``module.<init>(**init_kwargs)`` if ``init`` is given (e.g. to load a weights file).

        The package is imported as ``package_name`` if given, else under a fresh unique module name; the
        previously loaded package is dropped first. Restarts the workers if the pool is dead.
        """
        path = Path(package_dir).resolve()
        if not path.exists():
            raise UserInputError(f"package directory {path} does not exist")
        with self._lock:
            self._ensure_workers()
            self._dead_reason = None
            self._loads += 1
            name = package_name or f"_shardwise_pkg{self._loads}_{re.sub(r'[^0-9A-Za-z_]', '_', path.stem)}"
            self._loaded = None
            self._run(
                "load",
                (str(path), name, init, dict(init_kwargs or {})),
                label=f"load {path.name}",
                method=f"build/{init}" if init else "build",
            )
            self._loaded = name

    def call(
        self,
        method: Any,
        *args: Any,
        ranks: Literal["all", "rank0"] = "all",
        label: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """Call ``module.<method>(*args, **kwargs)`` on every rank with the same arguments.

        Returns the list of per-rank results, or rank 0's result with ``ranks="rank0"`` (the method still runs
        on every rank; the others' results are not sent back). Tensors travel detached and on CPU both ways
        (pickled by value through the pipe); on nccl the workers move the arguments to the rank's CUDA device,
        where its program was built. ``label`` names the step in a ``WorkerFault`` (``call #n <label>``);
        by default the method's (or function's) name.
        """
        if ranks not in ("all", "rank0"):
            raise UserInputError(f"ranks must be 'all' or 'rank0', got {ranks!r}")
        with self._lock:
            self._check_usable()
            if self._loaded is None:
                raise UserInputError("no package is loaded in the worker pool; call load() first")
            if "torch" in sys.modules:  # arguments travel as detached CPU tensors, like results
                args, kwargs = to_cpu_detached((args, kwargs))
            blob = wire.dumps((args, kwargs))
            per_rank = [(method, blob, ranks == "all" or r == 0) for r in range(self.world_size)]
            if label is None:
                label = method if isinstance(method, str) else getattr(method, "__name__", repr(method))
            results = self._run("call", per_rank, label=label, method=label, per_rank=True)
            return results if ranks == "all" else results[0]

    def call_function(
        self,
        function: Any,
        *args: Any,
        ranks: Literal["all", "rank0"] = "all",
        label: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """Call ``function(module, *args, **kwargs)`` on every rank, like :meth:`call` (faults, results).

        ``function`` must be importable by name in the workers (a module-level function of an installed
        module, e.g. ``shardwise.runtime.checkpoint.worker.save_rank``): it travels by reference. A wrapper
        around a program method (``shardwise.runtime.seeded.call_seeded``) passes that method as ``label``, so
        that a fault names the step the user called rather than the wrapper.
        """
        name = getattr(function, "__qualname__", "")
        if not callable(function) or "<" in name or not getattr(function, "__module__", None):
            raise UserInputError(
                f"call_function needs a module-level function, got {function!r}: lambdas and nested "
                "functions cannot be sent to the workers"
            )
        return self.call(function, *args, ranks=ranks, label=label, **kwargs)

    def close(self) -> None:
        """Stop the workers (destroying their process groups) and wait for them; idempotent."""
        with self._lock:
            self._closed = True
            self._stop(polite=True)

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "alive" if self.alive else "dead"
        return f"WorkerPool(world_size={self.world_size}, backend={self.backend!r}, {state})"

    # -- lifecycle -------------------------------------------------------------------------------------

    def _spawn(self) -> None:
        stack_dir = tempfile.mkdtemp(prefix="shardwise-pool-")
        config = _worker.WorkerConfig(
            world_size=self.world_size,
            backend=self.backend,
            master_addr=_MASTER_ADDR,
            master_port=find_free_port(_MASTER_ADDR),
            # Collectives time out inside the workers only as a backstop: the pool's own deadlines come first.
            pg_timeout_s=max(self.start_timeout_s, self.timeout_s + self.fault_grace_s + 30.0),
            threads=self.threads,
            stack_dir=stack_dir,
            env=self.env,
        )
        procs: list[WorkerProcess] = []
        conns: list[Connection] = []
        workers = _Workers(procs, conns, stack_dir)
        self._workers = workers
        self._finalizer = weakref.finalize(self, workers.stop, self.kill_timeout_s)
        child_env = {**self.env, **_worker.thread_env(self.threads)}
        for rank in range(self.world_size):
            proc, conn = start_worker(rank, config, child_env, name=f"shardwise-worker-{rank}")
            procs.append(proc)
            conns.append(conn)

    def _stop(self, polite: bool = False) -> None:
        if self._workers is not None:
            self._workers.stop(self.kill_timeout_s, polite=polite)
            self._workers = None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        self._loaded = None

    def _kill(self, reason: str, respawn: bool = True) -> None:
        """Terminate the workers, mark the pool dead and, if wanted, start replacements in the background."""
        self._stop()
        self._dead_reason = reason
        if respawn and self.respawn and not self._closed:
            self._spawn()

    def _check_usable(self) -> None:
        if self._closed:
            raise RuntimeFault("this WorkerPool is closed; create a new one")
        if self._dead_reason is not None or self._workers is None:
            raise RuntimeFault(
                f"the worker pool is dead ({self._dead_reason}); its loaded package is gone — "
                "call load() to restart the workers and load a package again"
            )

    def _ensure_workers(self) -> None:
        if self._closed:
            raise RuntimeFault("this WorkerPool is closed; create a new one")
        for attempt in range(2):
            if self._workers is None:
                self._spawn()
            try:
                self._wait_ready()
                return
            except WorkerFault as fault:
                port_taken = any("address already in use" in f.error.lower() for f in fault.failures)
                if attempt == 0 and port_taken:  # lost the race for the free port: try another one
                    continue
                raise

    def _wait_ready(self) -> None:
        workers = self._workers
        assert workers is not None
        if workers.ready:
            return
        failures: dict[int, RankFailure] = {}
        pending = set(range(self.world_size))
        deadline = time.monotonic() + self.start_timeout_s
        while pending and not failures:
            ready = wait(
                [workers.conns[r] for r in pending] + [workers.procs[r].sentinel for r in pending],
                timeout=max(0.0, deadline - time.monotonic()),
            )
            if not ready:
                break
            for rank in sorted(pending):
                message = self._receive(rank, workers, failures)
                if message is None:
                    continue
                pending.discard(rank)
                _seq, status, info = message
                if status == "ready":
                    workers.main_threads[rank] = info["main_thread"]
                    workers.backend = info["backend"]
                else:
                    failures[rank] = RankFailure(rank, "raised", info["error"], info["traceback"])
        if not failures and not pending:
            workers.ready = True
            return
        if not failures:
            stacks = workers.dump_stacks(sorted(pending))
            for rank in sorted(pending):
                failures[rank] = RankFailure(rank, "hung", stack=stacks.get(rank, ""))
        ordered = tuple(failures[r] for r in sorted(failures))
        self._kill("its workers failed to start", respawn=False)
        if any(f.kind == "hung" for f in ordered):
            note = f"workers could not join the process group within start_timeout_s={self.start_timeout_s}"
        elif any(f.kind == "died" for f in ordered):
            note = "a worker died while starting (its stderr says why)"
        else:
            note = ""
        raise WorkerFault(
            step="start-up", method="init_process_group", failures=ordered, pool_usable=False, note=note
        )

    # -- one step on every rank ------------------------------------------------------------------------

    def _receive(self, rank: int, workers: _Workers, failures: dict[int, RankFailure]) -> tuple | None:
        """A complete message from ``rank`` if one is waiting; records a death in ``failures``."""
        conn, proc = workers.conns[rank], workers.procs[rank]
        try:
            if conn.poll():
                return wire.loads(conn.recv_bytes())
        except (EOFError, OSError):
            pass
        else:
            if proc.is_alive():
                return None
        proc.join(1.0)
        failures[rank] = RankFailure(rank, "died", exitcode=proc.exitcode)
        return None

    def _run(
        self, op: str, payload: Any, *, label: str, method: str, per_rank: bool = False, probe: bool = False
    ) -> list[Any]:
        workers = self._workers
        assert workers is not None
        if not probe:
            self._steps += 1
        step = f"probe after call #{self._steps}" if probe else f"call #{self._steps} {label}"
        self._seq += 1
        seq = self._seq
        failures: dict[int, RankFailure] = {}
        results: dict[int, Any] = {}
        try:
            for rank in range(self.world_size):
                body = payload[rank] if per_rank else payload
                try:
                    workers.conns[rank].send_bytes(wire.dumps((op, seq, *body)))
                except (OSError, ValueError):
                    self._receive(rank, workers, failures)
                    failures.setdefault(
                        rank, RankFailure(rank, "died", exitcode=workers.procs[rank].exitcode)
                    )
                    break
            if not failures:
                self._collect(seq, workers, results, failures, probe)
        except BaseException:  # KeyboardInterrupt or a bug here: never leave workers mid-step
            self._kill(f"interrupted during {step}", respawn=False)
            raise
        if not failures and len(results) == self.world_size:
            return [results[r] for r in range(self.world_size)]
        return self._fail(step, method, workers, results, failures, probe)

    def _collect(
        self,
        seq: int,
        workers: _Workers,
        results: dict[int, Any],
        failures: dict[int, RankFailure],
        probe: bool,
    ) -> None:
        """Gather one answer per rank until all answered, one died, or a deadline passed."""
        timeout = min(self.timeout_s, max(2.0, self.fault_grace_s)) if probe else self.timeout_s
        deadline = time.monotonic() + timeout
        pending = set(range(self.world_size))
        while pending:
            if any(f.kind == "died" for f in failures.values()):
                return
            now = time.monotonic()
            if now >= deadline:
                return
            waitables: list[Any] = [workers.conns[r] for r in pending]
            waitables += [workers.procs[r].sentinel for r in pending]
            if not wait(waitables, timeout=deadline - now):
                continue
            for rank in sorted(pending):
                message = self._receive(rank, workers, failures)
                if rank in failures:
                    pending.discard(rank)
                if message is None:
                    continue
                got_seq, status, value = message
                if got_seq != seq:  # an answer to an abandoned request cannot happen; be strict anyway
                    raise RuntimeError(f"worker {rank} answered request {got_seq}, expected {seq}")
                pending.discard(rank)
                if status == "ok":
                    results[rank] = value
                else:
                    failures[rank] = RankFailure(rank, "raised", value["error"], value["traceback"])
                    # Once a rank has given up, the others get a short grace, not the whole timeout.
                    deadline = min(deadline, time.monotonic() + self.fault_grace_s)

    def _fail(
        self,
        step: str,
        method: str,
        workers: _Workers,
        results: dict[int, Any],
        failures: dict[int, RankFailure],
        probe: bool,
    ) -> list[Any]:
        silent = [r for r in range(self.world_size) if r not in results and r not in failures]
        died = any(f.kind == "died" for f in failures.values())
        note = ""
        if silent and not died:
            stacks = workers.dump_stacks(silent)
            raised = any(f.kind == "raised" for f in failures.values())
            blocked = {r for r in silent if r in stacks and _in_collective(stacks[r])}
            # With nobody to blame otherwise (e.g. mismatched collectives) every silent rank is hung.
            hung = [r for r in silent if r not in blocked] or ([] if raised else silent)
            for rank in silent:
                kind = "hung" if rank in hung else "stuck"
                failures[rank] = RankFailure(rank, kind, stack=stacks.get(rank, ""))
            if not raised:
                note = f"no answer within timeout_s={self.timeout_s}"
            else:
                note = (
                    f"ranks {silent} did not answer within fault_grace_s={self.fault_grace_s} after the error"
                )
        elif silent:
            for rank in silent:
                failures[rank] = RankFailure(rank, "stuck")
        ordered = tuple(failures[r] for r in sorted(failures))
        usable = False
        if not silent and not died and not probe:
            usable, probe_error = self._probe()
            if not usable:
                note = f"a probe all_reduce after the error failed (the process group was out of step): {probe_error}"
        if not usable and workers is self._workers:  # a failed probe has already replaced them
            self._kill(f"a fault during {step}")
        raise WorkerFault(step=step, method=method, failures=ordered, pool_usable=usable, note=note)

    def _probe(self) -> tuple[bool, str]:
        token = self._seq + 1
        try:
            self._run("probe", (token,), label="probe", method="probe all_reduce", probe=True)
        except WorkerFault as fault:
            return False, str(fault).splitlines()[0]
        return True, ""
