"""``cpu:N`` as this machine measures: calibrated once, cached, and read back by every later plan.

``get_cluster("cpu:N")`` returns :func:`measured_cpu_cluster` ``(N)``: the figures ``shardwise calibrate``
measures with N local processes (``cluster.calibrate``), cached in a YAML file keyed by the machine (CPU model,
cores, PyTorch version, N, threads per process, the calibration's version). The first plan for ``cpu:N`` on a
machine calibrates (a few seconds plus process start-up); later ones read the file. ``shardwise calibrate -n N``
measures again and replaces the cached figures.

Environment:

* ``SHARDWISE_CPU_CLUSTER=nominal`` makes ``cpu:N`` the preset's fixed nominal figures
  (``presets.cpu_cluster``) instead: plans that do not depend on this machine or on a measurement (the test
  suite sets it in ``tests/conftest.py``); ``calibrated`` (the default) is the measured machine.
* ``SHARDWISE_CACHE_DIR``: where the cache lives (default ``$XDG_CACHE_HOME/shardwise``, else
  ``~/.cache/shardwise``); calibrations are under ``calibration/``.

Two processes that need the same calibration at once take a file lock: one measures, the other reads its
result. A calibration measured while the machine was busy (a 1-minute load average at or above its core
count, recorded beside the cache file) is provisional: it is used, and measured again the first time
``cpu:N`` is needed on a machine that is no longer busy. A calibration that fails (no local processes can be started) raises ``DeviceUnavailableError``
naming ``SHARDWISE_CPU_CLUSTER=nominal`` as the way to plan without measuring.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from shardwise.cluster.spec import ClusterSpec

__all__ = [
    "CPU_CLUSTER_ENV", "CACHE_ENV", "CALIBRATION_VERSION", "cpu_mode", "cache_dir", "machine_identity",
    "cache_file", "read_cached", "write_cached", "provisional", "load_average", "measured_cpu_cluster",
    "calibration_note",
]  # fmt: skip

CPU_CLUSTER_ENV = "SHARDWISE_CPU_CLUSTER"
CACHE_ENV = "SHARDWISE_CACHE_DIR"
THREADS_ENV = "SHARDWISE_THREADS_PER_WORKER"  # the runtime's thread budget per worker (runtime.process_group)
#: bump when calibration measures something new or differently: older cache files are then measured again
CALIBRATION_VERSION = 11  # 4: compute timed as programs pay it (calibrate.in_program); 5: attention_overhead_s;
# 6: kernel_overhead_s (a memory-bound op kind's fixed cost per kernel); 7: a collective's figure is the median run;
# 8: kernel_overhead_s from one more call in a sequence of kinds, parallel_overhead_s; 9: a collective's figure
# is the least of 3 groups' median runs; 10: the kinds' fixed costs on one thread;
# 11: matmul kinds (addmm, linear) beyond a plain mm
_MODES = ("calibrated", "nominal")
_MEMO: dict[str, ClusterSpec] = {}


def cpu_mode() -> str:
    """``"calibrated"`` or ``"nominal"``: what ``cpu:N`` means in this process (``$SHARDWISE_CPU_CLUSTER``)."""
    from shardwise.errors import ClusterSpecError

    raw = os.environ.get(CPU_CLUSTER_ENV, "").strip().lower() or "calibrated"
    if raw not in _MODES:
        raise ClusterSpecError(
            f"{CPU_CLUSTER_ENV}={raw!r} is not allowed: use 'calibrated' (this machine, measured once and cached) "
            "or 'nominal' (fixed figures that do not depend on the machine)"
        )
    return raw


def cache_dir() -> Path:
    """The directory holding shardwise's cached calibrations (see the module docstring)."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "shardwise"


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def threads_per_process(n: int) -> int:
    """Intra-op threads each of ``n`` local processes runs (the runtime's rule: ``$SHARDWISE_THREADS_PER_WORKER``
    if set, else cores // n)."""
    raw = os.environ.get(THREADS_ENV, "")
    if raw.strip().isdigit() and int(raw) >= 1:
        return int(raw)
    return max(1, _cores() // max(1, n))


def machine_identity(n: int) -> dict[str, object]:
    """What a calibration of ``cpu:n`` depends on: the machine, the software, the processes' thread budget."""
    import torch

    return {
        "cpu": _cpu_model(),
        "cores": _cores(),
        "torch": torch.__version__,
        "processes": n,
        "threads_per_process": threads_per_process(n),
        "calibration": CALIBRATION_VERSION,
    }


def cache_file(n: int) -> Path:
    """The cache file of ``cpu:n`` on this machine (named by the identity's hash)."""
    identity = machine_identity(n)
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    slug = re.sub(r"[^a-z0-9]+", "-", str(identity["cpu"]).lower()).strip("-")[:40] or "cpu"
    return cache_dir() / "calibration" / f"cpu{n}-{slug}-{digest}.yaml"


def read_cached(n: int) -> ClusterSpec | None:
    """The cached calibration of ``cpu:n`` on this machine, or None (none yet, or unreadable)."""
    path = cache_file(n)
    if not path.is_file():
        return None
    try:
        return ClusterSpec.from_yaml(path)
    except Exception:  # noqa: BLE001 - a damaged cache file is measured again, never trusted
        return None


def load_average() -> float | None:
    """The machine's 1-minute load average (None where the OS does not say)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _atomic_write(path: Path, write) -> None:  # noqa: ANN001 - write(tmp_path)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_cached(n: int, spec: ClusterSpec, *, load: float | None = None) -> Path:
    """Store ``spec`` as the calibration of ``cpu:n`` (atomically: a temporary file, then a rename), with the
    load average it was measured under (``load``; now's when not given) beside it."""
    from shardwise.cluster.schema import write_yaml

    path = cache_file(n)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"identity": machine_identity(n), "load_average": load_average() if load is None else load}
    _atomic_write(path, lambda tmp: write_yaml(spec, tmp))
    _atomic_write(path.with_suffix(".json"), lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=1)))
    _MEMO.pop(str(path), None)
    return path


def provisional(n: int) -> bool:
    """Whether the cached calibration of ``cpu:n`` was measured on a busy machine (see the module docstring)."""
    try:
        meta = json.loads(cache_file(n).with_suffix(".json").read_text())
    except (OSError, ValueError):
        return False
    load = meta.get("load_average")
    return isinstance(load, (int, float)) and load >= _cores()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock beside ``path`` (one calibration at a time per cache file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a+") as handle:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock, at worst two processes measure
            yield
            return
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def measured_cpu_cluster(n: int) -> ClusterSpec:
    """``cpu:n`` as this machine measures (cached; calibrated on first use, see the module docstring)."""
    path = cache_file(n)
    key = str(path)
    if key in _MEMO:
        return _MEMO[key]
    spec = read_cached(n)
    now = load_average()
    stale = spec is not None and provisional(n) and now is not None and now < _cores()
    if spec is None or stale:
        with _locked(path):
            spec = read_cached(n)  # another process may have measured while we waited
            if spec is None or (provisional(n) and stale):
                from shardwise.cluster.calibrate import calibrate

                print(
                    f"shardwise: measuring this machine as cpu:{n} (once: cached in {path})", file=sys.stderr
                )
                before = load_average()
                spec = calibrate(n, quick=True, name=f"cpu:{n}")
                after = load_average()
                loads = [x for x in (before, after) if x is not None]
                write_cached(n, spec, load=max(loads) if loads else None)
    _MEMO[key] = spec
    return spec


def calibration_note(spec: ClusterSpec) -> str | None:
    """A plan note saying that ``spec`` is a measured machine, when it is (its figures' sources say so), and
    where ``cpu:N``'s calibration is cached."""
    source = spec.efficiency.source("op_overhead_s")
    if "by shardwise calibrate" not in source:
        return None
    measured = source.split(" by shardwise calibrate")[0]
    where = ""
    if re.fullmatch(r"cpu:[0-9]+", spec.name):
        where = f", cached in {cache_file(spec.world_size)}"
    return (
        f"cluster {spec.name} is calibrated: {measured} by shardwise calibrate{where}; its predictions vary with "
        f"the machine and the measurement (measure again: `shardwise calibrate -n {spec.world_size}`; fixed "
        f"nominal figures: {CPU_CLUSTER_ENV}=nominal)"
    )
