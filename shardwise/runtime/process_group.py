"""Process-group set-up shared by the local worker pool and the torchrun entry point.

Invariants: ``init_process_group`` is called at most once per process by these helpers; the backend is
``"nccl"`` only when this rank has a CUDA device of its own (``local_rank < torch.cuda.device_count()``),
otherwise ``"gloo"``. ``torch`` is imported lazily so that merely importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import os
import socket
from datetime import timedelta

from shardwise.errors import DeviceUnavailableError, UserInputError

__all__ = [
    "BACKENDS",
    "THREADS_ENV",
    "choose_backend",
    "destroy_process_group",
    "find_free_port",
    "init_process_group",
    "set_thread_budget",
    "threads_per_worker",
]

BACKENDS = ("auto", "gloo", "nccl")
THREADS_ENV = "SHARDWISE_THREADS_PER_WORKER"
_THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the caller must tolerate the small race of reusing it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def threads_per_worker(world_size: int, env: dict[str, str] | None = None) -> int:
    """Intra-op threads per local worker: ``$SHARDWISE_THREADS_PER_WORKER`` if set, else cores // world_size.

    Keeps ``world_size`` processes on one machine from oversubscribing its cores (2 workers on 2 cores get
    one thread each).
    """
    source = os.environ if env is None else env
    raw = source.get(THREADS_ENV)
    if raw:
        try:
            value = int(raw)
        except ValueError:
            raise UserInputError(
                f"{THREADS_ENV}={raw!r} is not an integer; set it to a thread count"
            ) from None
        if value < 1:
            raise UserInputError(f"{THREADS_ENV}={value} must be at least 1")
        return value
    return max(1, _cpu_count() // max(1, world_size))


def set_thread_budget(threads: int) -> None:
    """Limit OpenMP/MKL/torch threads of this process. Call before torch is imported for full effect."""
    for name in _THREAD_ENV_VARS:
        os.environ[name] = str(threads)
    import torch

    torch.set_num_threads(threads)
    # Inter-op threads can be set only once, before any inter-op work; skipping it later is harmless.
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(threads)


def choose_backend(requested: str, local_rank: int) -> str:
    """Resolve ``"auto"``/``"gloo"``/``"nccl"`` for the rank whose local index is ``local_rank``."""
    if requested not in BACKENDS:
        raise UserInputError(f"unknown backend {requested!r}; use one of {', '.join(BACKENDS)}")
    if requested == "gloo":
        return "gloo"
    import torch

    has_own_gpu = torch.cuda.is_available() and local_rank < torch.cuda.device_count()
    if requested == "nccl" and not has_own_gpu:
        raise DeviceUnavailableError(
            f"backend 'nccl' needs one CUDA device per local rank, but local rank {local_rank} has none "
            f"({torch.cuda.device_count()} visible); use backend='gloo' or 'auto'"
        )
    return "nccl" if has_own_gpu else "gloo"


def init_process_group(
    rank: int,
    world_size: int,
    *,
    backend: str = "auto",
    local_rank: int | None = None,
    master_addr: str | None = None,
    master_port: int | None = None,
    timeout_s: float = 300.0,
) -> str:
    """Initialise the default process group and return the backend actually used.

    With ``master_addr``/``master_port`` given a TCP rendezvous is used; otherwise the ``env://`` variables
    (``MASTER_ADDR``, ``MASTER_PORT`` as torchrun sets them). ``timeout_s`` bounds the rendezvous and is the
    default timeout of every collective. On nccl the rank's device becomes the current CUDA device.
    """
    import torch
    import torch.distributed as dist

    local = rank if local_rank is None else local_rank
    chosen = choose_backend(backend, local)
    kwargs: dict[str, object] = {}
    if chosen == "nccl":
        torch.cuda.set_device(local)
        kwargs["device_id"] = torch.device("cuda", local)
    if master_addr is not None and master_port is not None:
        init_method = f"tcp://{master_addr}:{master_port}"
    else:
        init_method = "env://"
    dist.init_process_group(
        backend=chosen,
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
        **kwargs,
    )
    return chosen


def destroy_process_group() -> None:
    """Destroy the default process group if one exists; never raises (used on shutdown paths)."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # shutting down anyway; a broken group must not mask the real error
        pass
