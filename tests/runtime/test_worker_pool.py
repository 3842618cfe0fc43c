"""WorkerPool against real spawned gloo workers. One pool (4 ranks) is shared by the whole module, because
every start costs seconds; tests that break it come last and the next load() restarts it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from shardwise.errors import RuntimeFault, UserInputError
from shardwise.runtime import WorkerFault, WorkerPool

pytestmark = pytest.mark.multiproc

WORLD = 4
TIMEOUT_S = 6.0
GRACE_S = 2.0

PKG_A = """
import os
import time

import torch
import torch.distributed as dist

from .helpers import scale_of


class Model(torch.nn.Module):
    def __init__(self, rank, world_size):
        super().__init__()
        self.rank = rank
        self.weight = torch.nn.Parameter(torch.full((3,), float(rank + 1)))

    def forward(self, x):
        local = x * self.weight  # still attached to autograd
        total = local.detach().clone()
        dist.all_reduce(total)
        return {"local": local, "total": total, "rank": self.rank, "world": dist.get_world_size(),
                "pid": os.getpid(), "threads": torch.get_num_threads()}

    def load_weights(self, path, scale):
        self.weight.data = torch.load(path)[self.rank] * scale_of(scale)

    def get_weight(self):
        return self.weight

    def raise_if(self, ranks):
        if self.rank in ranks:
            raise ValueError(f"bad input on rank {self.rank}")
        return self.rank

    def raise_then_collective(self, bad_rank):
        if self.rank == bad_rank:
            raise KeyError("missing shard")
        t = torch.ones(1)
        dist.all_reduce(t)
        return t

    def exit_during_collective(self, bad_rank, code):
        if self.rank == bad_rank:
            time.sleep(0.3)  # let the others enter the collective first
            os._exit(code)
        t = torch.ones(1)
        dist.all_reduce(t)
        return t

    def sleep_during_collective(self, bad_rank, seconds):
        if self.rank == bad_rank:
            time.sleep(seconds)
        t = torch.ones(1)
        dist.all_reduce(t)
        return t


def build(rank, world_size):
    return Model(rank, world_size)
"""

PKG_B = """
import torch
import torch.distributed as dist

VERSION = "B1"


class Gather:
    def __init__(self, rank, world_size):
        self.rank, self.world_size = rank, world_size

    def ranks_seen(self):
        out = [torch.zeros(1, dtype=torch.long) for _ in range(self.world_size)]
        dist.all_gather(out, torch.tensor([self.rank * 10]))
        return VERSION, torch.cat(out)


def build(rank, world_size):
    return Gather(rank, world_size)
"""


# tensors of dtypes torch's pickling cannot load (complex32, uint16/32/64, float8), both ways
PKG_DTYPES = """
import torch


class Echo:
    def __init__(self, rank, world_size):
        self.rank = rank

    def echo(self, given):
        made = {
            "uint64": torch.tensor([2**64 - 1 - self.rank, 2**63 + 5], dtype=torch.uint64),
            "complex32": torch.tensor([[1 + 2j * self.rank, -0.5j]]).to(torch.complex32).t(),
            "uint16": (torch.arange(6, dtype=torch.int32).reshape(2, 3) + self.rank).to(torch.uint16),
        }
        return {"given": given, "made": made, "dtypes": [str(t.dtype) for t in given]}


def build(rank, world_size):
    return Echo(rank, world_size)
"""


def _write(root: Path, files: dict[str, str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (root / name).write_text(textwrap.dedent(text))
    return root


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("packages")
    return {
        "a": _write(
            root / "pkg_a", {"__init__.py": PKG_A, "helpers.py": "def scale_of(s):\n    return 2 * s\n"}
        ),
        "b": _write(root / "pkg_b", {"__init__.py": PKG_B}),
        "dtypes": _write(root / "pkg_dtypes", {"__init__.py": PKG_DTYPES}),
    }


@pytest.fixture(scope="module")
def pool():
    pool = WorkerPool(WORLD, timeout_s=TIMEOUT_S, fault_grace_s=GRACE_S, kill_timeout_s=4.0)
    yield pool
    pids = pool.pids
    pool.close()
    pool.close()  # idempotent
    assert not pool.alive
    assert all(_gone(pid) for pid in pids)


def test_all_reduce_gives_rank_dependent_results(pool: WorkerPool, packages: dict[str, Path]) -> None:
    pool.load(packages["a"])
    results = pool.call("forward", torch.ones(3))
    assert [r["rank"] for r in results] == [0, 1, 2, 3]
    assert {r["world"] for r in results} == {WORLD}
    assert len({r["pid"] for r in results}) == WORLD and set(pool.pids) == {r["pid"] for r in results}
    total = sum(range(1, WORLD + 1))
    for r in results:
        assert torch.equal(r["local"], torch.full((3,), float(r["rank"] + 1)))
        assert torch.equal(r["total"], torch.full((3,), float(total)))
        assert not r["local"].requires_grad and r["local"].grad_fn is None
    # 4 workers on a machine with fewer than 8 cores: one thread each, never oversubscribed.
    assert {r["threads"] for r in results} == {max(1, len(os.sched_getaffinity(0)) // WORLD)}
    assert pool.resolved_backend == "gloo"


def test_rank0_result_only(pool: WorkerPool, packages: dict[str, Path]) -> None:
    pool.load(packages["a"])
    x = torch.arange(3.0, requires_grad=True) * 1.0  # a non-leaf input travels detached
    result = pool.call("forward", x=x, ranks="rank0")
    assert result["rank"] == 0
    assert torch.equal(result["total"], torch.arange(3.0) * sum(range(1, WORLD + 1)))
    with pytest.raises(UserInputError, match="ranks must be"):
        pool.call("forward", torch.ones(3), ranks="rank1")


def test_tensors_of_every_dtype_travel_both_ways_bit_exact(pool: WorkerPool, packages: dict[str, Path]) -> None:
    pool.load(packages["dtypes"])
    given = [
        torch.tensor([2**64 - 1, 0, 2**63], dtype=torch.uint64),
        torch.randn(3, 4).to(torch.complex32)[:, 1:],  # a view: offset and strides kept
        torch.tensor([1.5, -448.0, 0.0]).to(torch.float8_e4m3fn),
        torch.tensor([7, 65535], dtype=torch.int32).to(torch.uint16),
        torch.tensor([4_000_000_000], dtype=torch.int64).to(torch.uint32),
    ]
    results = pool.call("echo", given)
    for rank, r in enumerate(results):
        assert r["dtypes"] == [str(t.dtype) for t in given]  # they arrived as what was sent
        for got, sent in zip(r["given"], given, strict=True):
            assert got.dtype == sent.dtype and got.shape == sent.shape and got.stride() == sent.stride()
            assert torch.equal(got.contiguous().view(torch.uint8), sent.contiguous().view(torch.uint8))  # same bits
        made = r["made"]
        assert made["uint64"].dtype == torch.uint64
        assert made["uint64"].tolist() == [2**64 - 1 - rank, 2**63 + 5]
        assert made["complex32"].dtype == torch.complex32 and made["complex32"].shape == (2, 1)
        assert made["complex32"].to(torch.complex64).flatten().tolist() == [complex(1, 2 * rank), complex(0, -0.5)]
        assert made["uint16"].dtype == torch.uint16
        assert made["uint16"].to(torch.int32).tolist() == [[rank, rank + 1, rank + 2], [rank + 3, rank + 4, rank + 5]]


def test_init_method_loads_weights(pool: WorkerPool, packages: dict[str, Path], tmp_path: Path) -> None:
    weights = tmp_path / "weights.pt"
    torch.save(torch.arange(WORLD * 3, dtype=torch.float32).reshape(WORLD, 3), weights)
    pool.load(
        packages["a"],
        package_name="my_generated_model",
        init="load_weights",
        init_kwargs={"path": str(weights), "scale": 0.5},
    )
    got = pool.call("get_weight")
    for rank, weight in enumerate(got):
        assert torch.equal(weight, torch.arange(rank * 3, rank * 3 + 3, dtype=torch.float32))
        assert not weight.requires_grad


def test_new_packages_load_into_the_same_workers(
    pool: WorkerPool, packages: dict[str, Path], tmp_path: Path
) -> None:
    pool.load(packages["a"])
    pids = pool.pids
    pool.load(packages["b"])
    results = pool.call("ranks_seen")
    for version, seen in results:
        assert version == "B1"
        assert seen.tolist() == [0, 10, 20, 30]
    # The fuzzer rewrites one directory in place: the new contents must win over any cached import.
    pkg_c = _write(tmp_path / "pkg_c", {"__init__.py": PKG_B})
    pool.load(pkg_c)
    assert pool.call("ranks_seen", ranks="rank0")[0] == "B1"
    (pkg_c / "__init__.py").write_text(textwrap.dedent(PKG_B).replace('"B1"', '"B2"'))
    pool.load(pkg_c)
    assert pool.call("ranks_seen", ranks="rank0")[0] == "B2"
    assert pool.pids == pids and pool.alive


PKG_GROUPS = """
import os

import torch
import torch.distributed as dist


class Groups:
    def __init__(self, rank, world_size):
        self.pair = dist.new_group([0, 1])  # every rank takes part in making it
        self.rank = rank

    def threads(self):
        t = torch.ones(1)
        if self.rank in (0, 1):
            dist.all_reduce(t, group=self.pair)
        return len(os.listdir("/proc/self/task")), float(t)  # threads of this process, native ones too


def build(rank, world_size):
    return Groups(rank, world_size)
"""


def test_process_groups_of_a_replaced_package_are_destroyed(pool: WorkerPool, tmp_path: Path) -> None:
    """A pool that takes one program after another (the fuzzer) must not keep every program's groups (each
    gloo group holds threads)."""
    if not Path("/proc/self/task").is_dir():
        pytest.skip("counting a process's threads needs /proc (Linux)")
    pkg = _write(tmp_path / "pkg_groups", {"__init__.py": PKG_GROUPS})
    counts = []
    for _ in range(6):
        pool.load(pkg)
        got = pool.call("threads")
        assert [v for _, v in got] == [2.0, 2.0, 1.0, 1.0]
        counts.append(max(n for n, _ in got))
    assert counts[-1] <= counts[1] < counts[0] + 6, counts  # without destroying: +3 threads per load


def test_exception_names_rank_and_traceback_and_keeps_pool(
    pool: WorkerPool, packages: dict[str, Path]
) -> None:
    pool.load(packages["a"])
    pids = pool.pids
    steps = pool.steps
    with pytest.raises(RuntimeFault) as info:
        pool.call("raise_if", [2])
    fault = info.value
    assert isinstance(fault, WorkerFault)
    text = str(fault)
    assert "rank 2 raised ValueError: bad input on rank 2" in text
    assert f"call #{steps + 1} raise_if" in text
    assert "Traceback (most recent call last)" in text and 'raise ValueError(f"bad input on rank' in text
    assert fault.culprits == (2,) and fault.pool_usable and "still usable" in text
    # Same workers, same package, still in step.
    assert pool.pids == pids
    assert pool.call("raise_if", []) == [0, 1, 2, 3]
    with pytest.raises(RuntimeFault) as info:
        pool.call("raise_if", [0, 3])
    assert info.value.culprits == (0, 3) and info.value.pool_usable
    assert "--- traceback of rank 3 ---" in str(info.value)
    # Every rank raising the same error: one line and one traceback section naming all of them.
    with pytest.raises(RuntimeFault) as info:
        pool.call("no_such_method")
    text = str(info.value)
    assert text.startswith("ranks 0, 1, 2, 3 raised AttributeError: ")
    assert "--- traceback of ranks 0, 1, 2, 3 ---" in text
    assert info.value.pool_usable and pool.pids == pids
    assert pool.call("forward", torch.ones(3), ranks="rank0")["rank"] == 0


def test_bad_package_is_a_clear_error(pool: WorkerPool, tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="does not exist"):
        pool.load(tmp_path / "nope")
    no_build = _write(tmp_path / "no_build", {"__init__.py": "X = 1\n"})
    with pytest.raises(RuntimeFault, match=r"has no build\(rank, world_size\)") as info:
        pool.load(no_build)
    assert info.value.pool_usable
    with pytest.raises(UserInputError, match="no package is loaded"):
        pool.call("forward")


def test_raise_while_others_wait_in_collective_stops_workers(
    pool: WorkerPool, packages: dict[str, Path]
) -> None:
    pool.load(packages["a"])
    pids = pool.pids
    start = time.monotonic()
    with pytest.raises(RuntimeFault) as info:
        pool.call("raise_then_collective", 1)
    elapsed = time.monotonic() - start
    fault = info.value
    assert fault.culprits == (1,) and not fault.pool_usable
    assert "rank 1 raised KeyError: 'missing shard'" in str(fault)
    assert "other ranks: ranks 0, 2, 3 did not answer (blocked in a collective)" in str(fault)
    assert elapsed < TIMEOUT_S  # the grace period, not the full timeout
    assert not pool.alive and all(_gone(pid) for pid in pids)
    with pytest.raises(RuntimeFault, match="call load"):
        pool.call("forward", torch.ones(3))


def test_rank_that_exits_mid_collective(pool: WorkerPool, packages: dict[str, Path]) -> None:
    pool.load(packages["a"])  # restarts the workers stopped by the previous test
    pids = pool.pids
    assert pool.alive and len(pids) == WORLD
    steps = pool.steps
    start = time.monotonic()
    with pytest.raises(RuntimeFault) as info:
        pool.call("exit_during_collective", 3, 7)
    elapsed = time.monotonic() - start
    fault = info.value
    assert f"rank 3 died (exit code 7) during call #{steps + 1} exit_during_collective" in str(fault)
    assert fault.culprits == (3,) and not fault.pool_usable
    assert elapsed < TIMEOUT_S
    assert not pool.alive and all(_gone(pid) for pid in pids)
    # Replacements are already starting; the pool stays dead until the next load().
    assert len(pool.pids) == WORLD and set(pool.pids).isdisjoint(pids)
    with pytest.raises(RuntimeFault, match="dead"):
        pool.call("forward", torch.ones(3))


def test_rank_that_hangs_is_named_after_the_timeout(pool: WorkerPool, packages: dict[str, Path]) -> None:
    pool.load(packages["a"])
    pids = pool.pids
    pool.respawn = False  # the module's last fault: replacements would only compete with the next tests
    start = time.monotonic()
    with pytest.raises(RuntimeFault) as info:
        pool.call("sleep_during_collective", 2, 120.0)
    elapsed = time.monotonic() - start
    fault = info.value
    text = str(fault)
    assert "rank 2 hung" in text and "sleep_during_collective" in text
    assert f"no answer within timeout_s={TIMEOUT_S}" in text
    assert fault.culprits == (2,)
    assert {f.rank: f.kind for f in fault.failures} == {0: "stuck", 1: "stuck", 2: "hung", 3: "stuck"}
    assert "time.sleep(seconds)" in text or "in sleep_during_collective" in text  # its stack is shown
    assert TIMEOUT_S <= elapsed < TIMEOUT_S + 15
    assert all(_gone(pid) for pid in pids) and pool.pids == []


ORPHAN_SCRIPT = """
import json, os, sys, threading, time
import torch
from shardwise.runtime import WorkerPool

if __name__ == "__main__":
    pool = WorkerPool(1, env={"SHARDWISE_THREADS_PER_WORKER": "2"}, timeout_s=60)
    pool.load(sys.argv[1])
    result = pool.call("forward", torch.ones(3), ranks="rank0")
    print(json.dumps({"pids": pool.pids, "threads": result["threads"]}), flush=True)
    threading.Thread(target=pool.call, args=("sleep_during_collective", 0, 120.0), daemon=True).start()
    time.sleep(1.0)
    os._exit(0)  # no close(), no atexit: the busy worker must notice on its own
"""


def _gone_or_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # dead, waiting for init to reap it
    except FileNotFoundError:
        return True
    except OSError:
        return _gone(pid)


def test_workers_exit_when_their_parent_dies(packages: dict[str, Path], tmp_path: Path) -> None:
    script = tmp_path / "orphan.py"
    script.write_text(ORPHAN_SCRIPT)
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, str(script), str(packages["a"])], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout.strip().splitlines()[-1])
    assert info["threads"] == 2  # SHARDWISE_THREADS_PER_WORKER from env= reached the worker
    deadline = time.monotonic() + 15.0
    while time.monotonic() < deadline and not all(_gone_or_zombie(pid) for pid in info["pids"]):
        time.sleep(0.2)
    assert all(_gone_or_zombie(pid) for pid in info["pids"])


def test_close_right_after_construction(packages: dict[str, Path]) -> None:
    with WorkerPool(2) as fresh:
        pids = fresh.pids
        assert len(pids) == 2
    assert not fresh.alive and fresh.pids == []
    assert all(_gone(pid) for pid in pids)
    with pytest.raises(RuntimeFault, match="closed"):
        fresh.load(packages["a"])
    with pytest.raises(RuntimeFault, match="closed"):
        fresh.call("forward", torch.ones(3))
