"""Shared plans for the CLI tests: each is made once per session, in-process, through the real CLI entry point."""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_helpers import cli


@pytest.fixture(scope="session")
def cli_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli")


def _plan(cli_dir: Path, name: str, *args: str) -> Path:
    path = cli_dir / f"{name}.json"
    result = cli("plan", *args, "-o", path, "--quiet")
    assert result.code == 0, result.err
    return path


@pytest.fixture(scope="session")
def gpt2_plan(cli_dir: Path) -> Path:
    """GPT-2 (tiny) for cpu:2: data parallel over 2 processes."""
    return _plan(cli_dir, "gpt2", "gpt2:tiny", "--cluster", "cpu:2", "-C", "dp=2")


@pytest.fixture(scope="session")
def gpt2_tp_plan(cli_dir: Path) -> Path:
    """The same model, tensor parallel over the 2 processes."""
    return _plan(cli_dir, "gpt2-tp", "gpt2:tiny", "--cluster", "cpu:2", "-C", "tp=2")


@pytest.fixture(scope="session")
def mlp_train_plan(cli_dir: Path) -> Path:
    return _plan(cli_dir, "mlp-train", "mlp:tiny", "--cluster", "cpu:2", "--mode", "train", "-C", "dp=2")


@pytest.fixture(scope="session")
def mlp4_plan(cli_dir: Path) -> Path:
    """A 4-rank plan (dp=4) for the two-node torchrun test."""
    return _plan(cli_dir, "mlp4", "mlp:tiny", "--cluster", "cpu:4", "-C", "dp=4")
