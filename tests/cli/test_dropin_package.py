"""The drop-in package from `shardwise codegen` runs with torch alone: under torchrun on one machine, and
across two torchrun "nodes" with c10d rendezvous; importing shardwise is made to fail in those processes."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import cli, eager_reference, python_env

pytestmark = pytest.mark.multiproc

TIMEOUT = 600  # generous: the machine may be shared; a healthy run takes seconds


def _no_shardwise_env(tmp: Path) -> dict[str, str]:
    """An environment in which `import shardwise` raises: a stub module first on PYTHONPATH."""
    stub = tmp / "stub"
    stub.mkdir(exist_ok=True)
    (stub / "shardwise.py").write_text('raise ImportError("generated packages must not import shardwise")\n')
    return python_env(PYTHONPATH=str(stub))


def _package(plan: Path, where: Path, name: str) -> Path:
    """`shardwise codegen`, then the package copied alone into a fresh directory (as a user would take it)."""
    result = cli("codegen", plan, "-o", where / "gen" / name, "--json")
    assert result.code == 0, result.err
    data = json.loads(result.out)
    assert data["weights"] and data["module"] == name
    run_dir = where / "run"
    run_dir.mkdir()
    shutil.copytree(where / "gen" / name, run_dir / name)
    return run_dir


@pytest.fixture(scope="module")
def gpt2_package(gpt2_plan: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _package(gpt2_plan, tmp_path_factory.mktemp("dropin"), "gpt2_pkg") / "gpt2_pkg"


def test_package_contents_are_portable(gpt2_package: Path) -> None:
    files = {p.name for p in gpt2_package.iterdir()}
    assert {
        "__init__.py",
        "__main__.py",
        "program.py",
        "README.md",
        "plan.json",
        "model.safetensors",
    } <= files
    roots = {
        str(Path.home()),
        str(Path(sys.executable).parent),
        str(Path.cwd()),
        "/tmp/",
        str(Path(__file__).resolve().parents[3]),  # the directory holding this checkout
        "site-packages",
    }
    for f in gpt2_package.glob("*.py"):
        text = f.read_text()
        assert not re.search(r"^\s*(from|import)\s+shardwise\b", text, re.M), f.name
        for root in roots:
            assert root not in text, (f.name, root)
        # a comment with the module path (relative inside a layer's function) and a repository-relative source
        # line with its code precedes the ops
    program = (gpt2_package / "program.py").read_text()
    assert re.search(r"# attn\.c_attn\b.* — transformers/pytorch_utils\.py:\d+: \S", program)


def test_module_help_without_shardwise(gpt2_package: Path, tmp_path: Path) -> None:
    env = _no_shardwise_env(tmp_path)
    cwd = gpt2_package.parent
    probe = subprocess.run(
        [sys.executable, "-c", "import shardwise"], capture_output=True, text=True, env=env, cwd=cwd
    )
    assert probe.returncode != 0 and "must not import shardwise" in probe.stderr  # the stub is in force
    run = subprocess.run(
        [sys.executable, "-m", "gpt2_pkg", "--help"],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=TIMEOUT,
    )
    assert run.returncode == 0, run.stderr
    assert "--weights" in run.stdout and "torchrun" not in run.stderr


def _inputs_file(name: str, where: Path) -> tuple[Path, object]:
    _, inputs, expected = eager_reference(name)
    path = where / "inputs.pt"
    torch.save(tuple(inputs), path)
    return path, expected


def test_torchrun_two_processes_equals_eager(gpt2_package: Path, tmp_path: Path) -> None:
    inputs, expected = _inputs_file("gpt2:tiny", tmp_path)
    out = tmp_path / "out.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += [
        "-m",
        "gpt2_pkg",
        "--weights",
        "gpt2_pkg/model.safetensors",
        "--inputs",
        str(inputs),
        "--output",
        str(out),
    ]
    run = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        env=_no_shardwise_env(tmp_path),
        cwd=gpt2_package.parent,
        timeout=TIMEOUT,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    got = torch.load(out, weights_only=True)
    got = got[0] if isinstance(got, tuple | list) else got
    torch.testing.assert_close(got, expected.logits, atol=1e-4, rtol=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_torchrun_nodes_with_c10d_rendezvous(mlp4_plan: Path, tmp_path: Path) -> None:
    """Two torchrun agents (as on two machines), 2 processes each, meet at a c10d rendezvous on 127.0.0.1 and
    run one 4-rank plan."""
    run_dir = _package(mlp4_plan, tmp_path, "mlp_dp4")
    inputs, expected = _inputs_file("mlp:tiny", tmp_path)
    out = tmp_path / "out.pt"
    endpoint = f"127.0.0.1:{_free_port()}"
    env = _no_shardwise_env(tmp_path)
    nodes = []
    for node in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2"]
        cmd += ["--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "shardwise-two-nodes"]
        cmd += ["-m", "mlp_dp4", "--weights", "mlp_dp4/model.safetensors", "--inputs", str(inputs)]
        cmd += ["--output", str(out)]
        log = (tmp_path / f"node{node}.log").open("w")
        nodes.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=run_dir), log))
    try:
        codes = [p.wait(timeout=TIMEOUT) for p, _ in nodes]
    finally:
        for p, log in nodes:
            if p.poll() is None:
                p.kill()
                p.wait()
            log.close()
    logs = "\n".join((tmp_path / f"node{n}.log").read_text()[-2000:] for n in range(2))
    assert codes == [0, 0], logs
    torch.testing.assert_close(torch.load(out, weights_only=True), expected, atol=1e-5, rtol=0)
