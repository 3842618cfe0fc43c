"""The layer rules of docs/architecture.md, kept as import-linter contracts in pyproject.toml."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    result = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "broken" in result.stdout.lower() or "kept" in result.stdout.lower()


def test_generated_code_and_runtime_do_not_import_compiler_layers():
    runtime = (ROOT / "shardwise" / "runtime").rglob("*.py")
    for path in runtime:
        text = path.read_text()
        for layer in ("shardwise.ir", "shardwise.passes", "shardwise.planner", "shardwise.frontend"):
            assert f"import {layer}" not in text and f"from {layer}" not in text, f"{path.name} imports {layer}"
    for path in (ROOT / "shardwise" / "codegen" / "templates").glob("*.j2"):
        text = path.read_text()
        assert "import shardwise" not in text and "from shardwise" not in text, path.name
