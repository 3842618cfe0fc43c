"""The torchrun entry point, run for real by torchrun with two gloo ranks."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from shardwise.runtime.torchrun import main, rank_environment

ROOT = Path(__file__).resolve().parents[2]

PKG = """
import torch
import torch.distributed as dist


class Model:
    def __init__(self, rank, world_size):
        self.rank, self.scale = rank, 1.0

    def set_scale(self, scale):
        self.scale = scale

    def step(self, n, fail_on=-1):
        if self.rank == fail_on:
            raise RuntimeError(f"step failed on rank {self.rank}")
        t = torch.full((n,), (self.rank + 1) * self.scale)
        dist.all_reduce(t)
        return {"rank": self.rank, "sum": t}


def build(rank, world_size):
    return Model(rank, world_size)
"""


def _torchrun(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "shardwise.runtime.torchrun",
        *args,
    ]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        stdout, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.terminate()  # torchrun forwards SIGTERM to its workers (a SIGKILL would orphan them)
        stdout, stderr = proc.communicate(timeout=30)
        pytest.fail(f"torchrun did not finish within 120 s:\n{stderr}")
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


@pytest.mark.multiproc
def test_torchrun_runs_method_on_every_rank_and_reports_failures(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent(PKG))
    out = tmp_path / "out"
    done = _torchrun(
        str(pkg),
        "step",
        "--kwargs",
        '{"n": 3}',
        "--init",
        "set_scale",
        "--init-kwargs",
        '{"scale": 2.0}',
        "--out",
        str(out),
    )
    assert done.returncode == 0, done.stderr
    assert "[shardwise rank 0/2] step ->" in done.stdout
    for rank in (0, 1):
        result = torch.load(out / f"rank{rank}.pt")
        assert result["rank"] == rank and torch.equal(result["sum"], torch.full((3,), 6.0))
    failed = _torchrun(str(pkg), "step", "--kwargs", '{"n": 3, "fail_on": 1}')
    assert failed.returncode != 0
    assert "[shardwise rank 1/2] step failed" in failed.stderr
    assert "RuntimeError: step failed on rank 1" in failed.stderr


def test_outside_torchrun_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert main(["pkg", "forward"]) == 2
    assert "run this under torchrun" in capsys.readouterr().err
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    assert rank_environment(env) == (3, 8, 1)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    assert main(["pkg", "forward", "--kwargs", "[1]"]) == 2
    assert "--kwargs must be a JSON object" in capsys.readouterr().err
