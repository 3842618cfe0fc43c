"""Helpers for the CLI tests. ``cli(...)`` runs ``shardwise.cli.main.main`` in this process and captures what it
prints; subprocess tests use ``python_env()``; ``find_chromium()`` locates a headless browser."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from shardwise.cli.main import main

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class CliResult:
    code: int
    out: str
    err: str


@contextlib.contextmanager
def _cwd(path: Path | None) -> Iterator[None]:
    if path is None:
        yield
        return
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def cli(*args: object, cwd: Path | None = None) -> CliResult:
    """Run ``shardwise ARGS`` in this process; returns its exit code and what it printed."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), _cwd(cwd):
        code = main([str(a) for a in args])
    return CliResult(code, out.getvalue(), err.getvalue())


def python_env(**extra: str) -> dict[str, str]:
    """The environment for child Python processes: one thread each (2 cores are shared), importing this
    checkout's shardwise (the repository root first on PYTHONPATH), nothing else inherited that would change
    what they import."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env.update(OMP_NUM_THREADS="1", SHARDWISE_THREADS_PER_WORKER="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.update(extra)
    return env


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def eager_reference(name: str):
    """The zoo model (seed 0, as `shardwise plan` builds it), its example inputs, and its eager outputs."""
    import torch

    from shardwise.zoo import build_model

    model, inputs = build_model(name)
    with torch.no_grad():
        return model, inputs, model(*inputs)
