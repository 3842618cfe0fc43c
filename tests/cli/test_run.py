"""`shardwise run` and `shardwise demo` on real processes, compared with eager PyTorch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import cli, eager_reference, python_env

from shardwise.cli.models import default_loss

pytestmark = pytest.mark.multiproc


def test_run_on_local_processes_equals_eager(gpt2_plan: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.pt"
    result = cli("run", gpt2_plan, "--json", "-o", out, "--atol", "1e-4")
    assert result.code == 0, result.err
    data = json.loads(result.out)
    assert data["world_size"] == 2 and data["where"] == "local processes"
    assert data["max_abs_diff"] < 1e-4 and data["within_atol"] is True
    # the saved outputs are the model's own output structure, equal to eager PyTorch computed here
    _, _, expected = eager_reference("gpt2:tiny")
    saved = torch.load(out, weights_only=False)
    torch.testing.assert_close(saved.logits, expected.logits, atol=1e-4, rtol=0)


def test_run_training_steps(mlp_train_plan: Path) -> None:
    result = cli("run", mlp_train_plan, "--steps", "3", "--json")
    assert result.code == 0, result.err
    data = json.loads(result.out)
    model, inputs, _ = eager_reference("mlp:tiny")
    model.train()
    with torch.no_grad():
        eager_loss = float(default_loss(model(*inputs)))
    assert len(data["losses"]) == 3
    assert data["losses"][0] == pytest.approx(eager_loss, abs=1e-5)
    assert data["losses"][2] < data["losses"][0]  # the optimizer steps do their job


def test_run_under_torchrun(tmp_path: Path) -> None:
    """`shardwise run` started by torchrun: every rank runs its part; rank 0 compares with eager."""
    plan = tmp_path / "mlp2.json"
    assert cli("plan", "mlp:tiny", "-c", "cpu:2", "-C", "dp=2", "-o", plan, "-q").code == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "shardwise.cli.main", "run", str(plan), "--json", "-o", str(tmp_path / "out.pt")]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=python_env(), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    data = json.loads(run.stdout[run.stdout.index("{") :])  # rank 0 alone prints the result
    assert data["where"] == "torchrun" and data["world_size"] == 2
    assert data["max_abs_diff"] < 1e-5
    _, _, expected = eager_reference("mlp:tiny")
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected, atol=1e-5, rtol=0)


def test_run_refuses_what_cannot_run_here(tmp_path: Path) -> None:
    dgx = tmp_path / "dgx.json"
    assert cli("plan", "mlp:tiny", "-c", "dgx-a100x1", "-o", dgx, "-q").code == 0
    result = cli("run", dgx)
    assert result.code == 2 and "torchrun" in result.err and "Traceback" not in result.err
    meta = tmp_path / "meta.json"
    assert cli("plan", "mlp:tiny", "--meta", "-o", meta, "-q").code == 0
    result = cli("run", meta)
    assert result.code == 2 and "meta device" in result.err


def test_demo() -> None:
    """What `make demo` runs (`python -m shardwise.cli.main demo`), with the tiny GPT-2 to keep it quick."""
    result = cli("demo", "--model", "gpt2:tiny")
    assert result.code == 0, result.err
    assert "plan: GPT2LMHeadModel on cpu:2" in result.out
    line = next(x for x in result.out.splitlines() if x.startswith("largest absolute difference"))
    assert float(line.rsplit(" ", 1)[1]) < 1e-4


def test_calibrate_writes_a_cluster_file_plans_accept(tmp_path: Path) -> None:
    cluster = tmp_path / "cluster.yaml"
    result = cli("calibrate", "-o", cluster, "-n", "1", "--json")
    assert result.code == 0, result.err
    spec = json.loads(result.out)["spec"]
    assert spec["world_size"] == 1 and spec["device"]["kind"] == "cpu"
    assert spec["device"]["peak_flops"]["float32"] > 0
    plan = tmp_path / "plan.json"
    assert cli("plan", "mlp:tiny", "--cluster", cluster, "-o", plan, "-q").code == 0
    assert json.loads(cli("show", plan, "--json").out)["overview"]["cluster"] == "cpu:1-calibrated"
