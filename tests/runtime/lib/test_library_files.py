"""The runtime library is ordinary code of the repository that every package carries verbatim.

Its modules import torch, the standard library and each other (relative imports) only, so that a package
needs torch alone; codegen finds them without importing them and writes them unchanged into ``_runtime/``.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import torch

from shardwise.codegen.library import DIRECTORY, library_files
from shardwise.codegen.package import write_package
from shardwise.planner.auto import plan_auto

ROOT = Path(__file__).resolve().parents[3]
LIB = ROOT / "shardwise" / "runtime" / "lib"
# third-party modules the library may import (safetensors lazily, to read weight files)
ALLOWED = {"torch", "safetensors"}


def _dp_plan(graph, cluster, **kwargs):
    """A data-parallel (or replicated) flat plan: the planner with tp=1 (what the simple planner made)."""
    constraints = {"tp": 1, **kwargs.pop("constraints", {})}
    return plan_auto(graph, cluster, constraints=constraints, **kwargs)


def test_library_imports_torch_the_standard_library_and_itself_only():
    offenders = []
    for path in sorted(LIB.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                continue  # relative: one of the library's own modules
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for name in names:
                top = name.split(".")[0]
                if top not in ALLOWED and top not in sys.stdlib_module_names and top != "__future__":
                    offenders.append(f"{path.name}: {name}")
    assert offenders == []


def test_codegen_ships_every_library_module_verbatim(tmp_path):
    files = library_files()
    assert set(files) == {f"{DIRECTORY}/{p.name}" for p in LIB.glob("*.py")}
    assert all(text == (LIB / name.split("/")[1]).read_text() for name, text in files.items())
    from shardwise.frontend.trace import trace

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    graph, _ = trace(model, (torch.randn(2, 4),))
    from shardwise.cluster import get_cluster

    package = write_package(_dp_plan(graph, get_cluster("cpu:2"), constraints={"dp": 2}), tmp_path / "pkg")
    for name, text in files.items():
        assert (package / name).read_text() == text
    program = (package / "program.py").read_text()
    assert "from . import _runtime as C" in program
