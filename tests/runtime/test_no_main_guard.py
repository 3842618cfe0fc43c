"""Workers are fresh interpreters running a shardwise module (issue 19, point 4): code that compiles and runs
a plan needs no ``if __name__ == "__main__":`` guard, whether it is a script file or ``python -c`` (a
notebook cell, like ``-c``, has a main module without a file). Each run compiles the zoo MLP for two local
processes, runs it and one training step, and compares with eager PyTorch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.multiproc

ROOT = Path(__file__).resolve().parents[2]
CODE = """
import copy
import torch
import shardwise
from shardwise.zoo import build_model

model, inputs = build_model("mlp")
reference = copy.deepcopy(model)
loss_fn = lambda out: out.float().sin().mean()
with shardwise.compile(model, "cpu:2", example_inputs=inputs, mode="train", loss_fn=loss_fn,
                       constraints={"dp": 2}) as cm:
    loss = cm.train_step(*inputs)
    state = cm.state_dict()
expected = loss_fn(reference(*inputs))
expected.backward()
torch.optim.AdamW(reference.parameters()).step()
torch.testing.assert_close(torch.tensor(loss), expected.detach(), rtol=1e-4, atol=1e-5)
for key, value in reference.state_dict().items():
    torch.testing.assert_close(state[key], value, rtol=1e-4, atol=1e-5)
print("equal to eager on", cm.plan.world_size, "processes")
"""


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("how", ["script", "-c"])
def test_code_without_a_main_guard_runs_plans(tmp_path, how):
    if how == "script":
        (tmp_path / "train.py").write_text(CODE)
        done = _run(["train.py"], tmp_path)
    else:
        done = _run(["-c", CODE], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "equal to eager on 2 processes" in done.stdout
    assert "RuntimeWarning" not in done.stderr  # the workers' entry module runs once, as __main__
