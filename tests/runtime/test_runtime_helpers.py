"""In-process checks of the runtime's pure helpers: fault messages, package import, result transport."""

from __future__ import annotations

import ast
import collections
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from shardwise.errors import DeviceUnavailableError, RuntimeFault, UserInputError
from shardwise.runtime import RankFailure, WorkerFault
from shardwise.runtime.local import _in_collective, _main_thread_stack
from shardwise.runtime.package import import_package, to_cpu_detached, unload_package
from shardwise.runtime.process_group import choose_backend, find_free_port, threads_per_worker

ROOT = Path(__file__).resolve().parents[2]


def test_death_is_blamed_over_the_errors_it_causes() -> None:
    fault = WorkerFault(
        step="call #7 train_step",
        method="train_step",
        failures=(
            RankFailure(0, "raised", "DistBackendError: connection closed by peer", "tb0"),
            RankFailure(1, "died", exitcode=-9),
            RankFailure(2, "stuck"),
        ),
        pool_usable=False,
    )
    text = str(fault)
    assert isinstance(fault, RuntimeFault)
    assert fault.culprits == (1,)
    assert text.splitlines()[0] == "rank 1 died (killed by signal 9) during call #7 train_step"
    assert "other ranks: rank 0 raised DistBackendError" in text and "rank 2 was stopped" in text
    assert "terminated" in text and "tb0" not in text  # only the culprits' tracebacks are quoted


def test_many_distinct_tracebacks_are_capped() -> None:
    failures = tuple(RankFailure(r, "raised", f"E{r}", f"traceback {r}") for r in range(10))
    text = str(WorkerFault(step="call #1 f", method="f", failures=failures, pool_usable=True))
    assert text.count("--- traceback of rank") == 4
    assert "6 more different tracebacks" in text and "still usable" in text


def test_stack_parsing_finds_main_thread_and_collectives(tmp_path: Path) -> None:
    dump = (
        "Thread 0x00007f0000000001 (most recent call first):\n"
        '  File "/x/threading.py", line 1 in wait\n\n'
        "Current thread 0x00007f0000000002 (most recent call first):\n"
        '  File "/site-packages/torch/distributed/distributed_c10d.py", line 2 in all_reduce\n'
        '  File "/pkg/__init__.py", line 3 in forward\n'
    )
    main = _main_thread_stack(dump, 0x7F0000000002)
    assert main.startswith("Current thread") and "all_reduce" in main and "threading" not in main
    assert _in_collective(main)
    assert not _in_collective(_main_thread_stack(dump, 0x7F0000000001))
    src = tmp_path / "gen.py"
    src.write_text("x = 1\nwork.wait()\n")
    assert _in_collective(f'Current thread 0x1 (most recent call first):\n  File "{src}", line 2 in step\n')
    assert not _in_collective(
        f'Current thread 0x1 (most recent call first):\n  File "{src}", line 1 in step\n'
    )


def test_import_package_with_submodules_and_reload(tmp_path: Path) -> None:
    pkg = tmp_path / "gen"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "from .stage import VALUE\ndef build(rank, world_size):\n    return VALUE\n"
    )
    (pkg / "stage.py").write_text("VALUE = 'one'\n")
    name = "_test_sw_pkg"
    try:
        module = import_package(pkg, name)
        assert module.build(0, 1) == "one" and f"{name}.stage" in sys.modules
        (pkg / "stage.py").write_text("VALUE = 'two'\n")
        assert import_package(pkg, name).build(0, 1) == "two"
        (pkg / "stage.py").write_text("VALUE = (\n")
        with pytest.raises(SyntaxError):
            import_package(pkg, name)
        assert name not in sys.modules and f"{name}.stage" not in sys.modules
    finally:
        unload_package(name)
    with pytest.raises(UserInputError, match="__init__.py"):
        import_package(tmp_path, "_test_sw_empty")


class Pair(NamedTuple):
    a: torch.Tensor
    b: int


def test_results_are_detached_cpu_with_containers_kept() -> None:
    w = torch.ones(2, requires_grad=True)
    y = w * 2
    value = {"t": y, "pair": Pair(y, 3), "list": [y, "s"], "od": collections.OrderedDict(k=y)}
    value["dd"] = collections.defaultdict(list, k=[y])
    out = to_cpu_detached(value)
    assert isinstance(out["pair"], Pair) and out["pair"].b == 3
    assert isinstance(out["od"], collections.OrderedDict) and out["list"][1] == "s"
    for t in (out["t"], out["pair"].a, out["list"][0], out["od"]["k"], out["dd"]["k"][0]):
        assert not t.requires_grad and t.device.type == "cpu" and torch.equal(t, torch.full((2,), 2.0))


def test_thread_budget_and_backend_choice() -> None:
    assert threads_per_worker(1, {"SHARDWISE_THREADS_PER_WORKER": "3"}) == 3
    assert threads_per_worker(10_000, {}) == 1
    with pytest.raises(UserInputError, match="SHARDWISE_THREADS_PER_WORKER"):
        threads_per_worker(2, {"SHARDWISE_THREADS_PER_WORKER": "many"})
    assert choose_backend("gloo", 0) == "gloo"
    with pytest.raises(UserInputError, match="unknown backend"):
        choose_backend("mpi", 0)
    if not torch.cuda.is_available():
        assert choose_backend("auto", 0) == "gloo"
        with pytest.raises(DeviceUnavailableError, match="nccl"):
            choose_backend("nccl", 0)
    assert 0 < find_free_port() < 65536


def test_runtime_modules_import_no_compiler_layer() -> None:
    """Every import in shardwise/runtime, including lazy ones inside functions (the import-linter contract
    checks the same; this keeps it checked when only pytest runs)."""
    forbidden = {"ir", "passes", "planner", "codegen", "frontend", "api", "cli"}
    offenders = []
    for path in sorted((ROOT / "shardwise" / "runtime").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            for name in names:
                parts = name.split(".")
                if parts[0] == "shardwise" and len(parts) > 1 and parts[1] in forbidden:
                    offenders.append(f"{path.name}: {name}")
    assert offenders == []
