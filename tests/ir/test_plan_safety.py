"""Safety: plan files are JSON data; reading one never executes code and no text in it can become code in the
generated program; weights are read with weights_only=True or safetensors; generated code embeds no absolute
path or environment value."""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import pickle
import re
import socket
import sys
from pathlib import Path

import pytest
import torch

import shardwise
from shardwise.codegen.package import write_package
from shardwise.errors import PlanFileError, ShardwiseError
from shardwise.ir.plan import ExecutionPlan
from shardwise.zoo import build_model

ROOT = Path(shardwise.__file__).resolve().parent
PAYLOADS = (  # close a comment, a docstring (across lines, or on the same line), a string literal
    'x\nPWNED()\n#', 'x"""\nPWNED()\n"""', 'x""";PWNED();"""', 'x"; PWNED(); "', "float32; PWNED() #", "x\rPWNED()",
)  # fmt: skip


@pytest.fixture(scope="module")
def plans() -> list[ExecutionPlan]:
    mlp, inputs = build_model("mlp:tiny,layers=1")
    out = [shardwise.compile(mlp, "cpu:2", example_inputs=inputs, constraints={"dp": 1, "tp": 2}).plan]
    out.append(
        shardwise.compile(
            mlp,
            "cpu:2",
            example_inputs=inputs,
            mode="train",
            loss_fn=lambda o: o.sum(),
            constraints={"dp": 2},
        ).plan  # fmt: skip
    )
    assert any(p.fused_groups for p in out)  # kernels.py is generated too
    return out


def _string_paths(obj, path=()):
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            yield from _string_paths(getattr(obj, f.name), path + ((type(obj).__name__, f.name),))
    elif isinstance(obj, tuple):
        for i, item in enumerate(obj):
            yield from _string_paths(item, path + (i,))
    elif isinstance(obj, str):
        yield path


def _replace(obj, path, value):
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(head, tuple):
        return dataclasses.replace(obj, **{head[1]: _replace(getattr(obj, head[1]), rest, value)})
    items = list(obj)
    items[head] = _replace(items[head], rest, value)
    return tuple(items)


def _injected_calls(directory: Path) -> list[str]:
    found = []
    for f in directory.rglob("*.py"):
        tree = ast.parse(f.read_text(), filename=f.name)  # a program that does not parse cannot run either
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "PWNED":
                found.append(f"{f.name}: {ast.unparse(node)}")
    return found


def test_crafted_text_in_any_field_never_becomes_code(plans: list[ExecutionPlan], tmp_path: Path) -> None:
    """Every kind of string in a plan, replaced by text that tries to close a comment, a docstring or a literal:
    the plan is refused when read, or generates a program in which that text is inert."""
    kinds: dict[tuple, tuple[ExecutionPlan, list]] = {}
    for i, plan in enumerate(plans):
        for path in _string_paths(plan):
            key = (i, *tuple(p for p in path if isinstance(p, tuple))[-2:])
            kinds.setdefault(key, (plan, []))[1].append(path)
    assert len(kinds) > 50
    outcomes = {"refused": 0, "inert": 0}
    for n, (plan, paths) in enumerate(kinds.values()):
        for m, payload in enumerate(PAYLOADS):
            crafted = plan
            for path in paths:
                crafted = _replace(crafted, path, payload)
            try:
                loaded = ExecutionPlan.from_json(crafted.to_json())
            except PlanFileError:
                outcomes["refused"] += 1
                continue
            target = tmp_path / f"p{n}_{m}"
            try:
                write_package(loaded, target)
            except ShardwiseError:
                outcomes["refused"] += 1
                continue
            except Exception:  # inconsistent data the checks do not catch: no program, nothing runs
                continue
            assert not _injected_calls(target), (paths[0], payload)
            outcomes["inert"] += 1
    assert outcomes["refused"] > 100 and outcomes["inert"] > 30, outcomes


def test_plan_files_are_json_and_never_unpickled(plans: list[ExecutionPlan], tmp_path: Path) -> None:
    text = plans[0].to_json()
    doc = json.loads(text)
    assert set(doc) == {"shardwise_plan", "plan"} and doc["plan"]["@"] == "ExecutionPlan"
    assert ExecutionPlan.from_json(text) == plans[0]
    evil = pickle.dumps({"shardwise_plan": 1})
    with pytest.raises(PlanFileError, match="not valid JSON"):
        ExecutionPlan.from_json(evil.decode("latin-1"))
    # records name only the plan's own data classes; nothing else is constructed or imported
    doc["plan"]["graph"]["@"] = "os.system"
    with pytest.raises(PlanFileError, match="unknown record type 'os.system'"):
        ExecutionPlan.from_json(json.dumps(doc))
    doc = json.loads(text)
    doc["plan"]["model_name"] = {"@": "Graph", "__reduce__": "os.system", "nodes": []}
    with pytest.raises(PlanFileError, match="bad Graph record"):
        ExecutionPlan.from_json(json.dumps(doc))


def test_a_crafted_plan_file_is_inert_on_the_command_line(
    plans: list[ExecutionPlan], tmp_path: Path, capsys
) -> None:
    from shardwise.cli.main import main as cli_main

    marker = tmp_path / "pwned"
    crafted = plans[0].replace(model_name=f'M"""\n__import__("pathlib").Path({str(marker)!r}).touch()\n"""')
    (tmp_path / "plan.json").write_text(crafted.to_json())
    for command in (["show"], ["codegen", "-o", str(tmp_path / "pkg")], ["run"]):
        code = cli_main([command[0], str(tmp_path / "plan.json"), *command[1:]])
        assert code == 2 and "cannot be written into a program safely" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "pkg").exists()


def _calls(tree: ast.AST, name: str) -> list[ast.Call]:
    return [
        n for n in ast.walk(tree)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == name
    ]  # fmt: skip


def test_weights_load_with_weights_only_or_safetensors() -> None:
    """Every torch.load in shardwise and in the program templates passes weights_only=True; pickle is read only
    from the worker pipes (the parent and its own workers), never from files."""
    checked = 0
    for path in ROOT.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for call in _calls(tree, "load"):
            if isinstance(call.func.value, ast.Name) and call.func.value.id == "torch":
                checked += 1
                kw = {k.arg: k.value for k in call.keywords}
                assert (
                    isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                ), f"{path.relative_to(ROOT)}:{call.lineno}"
        for call in _calls(tree, "load") + _calls(tree, "loads"):
            if isinstance(call.func.value, ast.Name) and call.func.value.id == "pickle":
                # the worker pipes' transport (runtime/wire.py: dtypes pickle cannot carry) and its two ends
                assert path.relative_to(ROOT).as_posix() in (
                    "runtime/local.py", "runtime/_worker.py", "runtime/wire.py"
                ), path  # fmt: skip
    for template in (ROOT / "codegen" / "templates").glob("*.j2"):
        for match in re.finditer(r"torch\.load\((.*)$", template.read_text(), re.MULTILINE):
            checked += 1
            assert "weights_only=True" in match.group(1), template.name
    assert checked >= 2


MODEL_FILE = """
import torch
from torch import nn


class Secretive(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        return torch.relu(self.norm(self.proj(x))) * 2 + 1
"""


def test_generated_code_embeds_no_absolute_path_or_environment_value(tmp_path: Path, monkeypatch) -> None:
    """A model defined in a file far from the working directory, compiled with a secret in the environment:
    the package holds neither the file's absolute path, the working directory, the home or Python prefix,
    the host name, nor the value of any environment variable."""
    secret = "s3cr3t-value-81724"
    monkeypatch.setenv("SHARDWISE_TEST_SECRET", secret)
    source_dir = tmp_path / "models" / "private"
    source_dir.mkdir(parents=True)
    (source_dir / "secretive.py").write_text(MODEL_FILE)
    monkeypatch.syspath_prepend(str(source_dir))
    import secretive

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    model, x = secretive.Secretive(), torch.randn(4, 8)
    for mode in ("inference", "train"):
        kwargs = {"loss_fn": lambda o: o.sum()} if mode == "train" else {}
        cm = shardwise.compile(
            model, "cpu:2", example_inputs=(x,), mode=mode, constraints={"dp": 2}, **kwargs
        )
        package = cm.save(tmp_path / f"pkg_{mode}")
        texts = {p.name: p.read_text() for p in package.iterdir() if p.suffix in (".py", ".json", ".md")}
        assert {"program.py", "plan.json", "__init__.py", "__main__.py"} <= set(texts)
        assert "secretive.py:" in texts["program.py"]  # the source line is there, relative
        forbidden = {
            str(tmp_path),
            str(source_dir),
            str(work),
            str(Path.home()),
            sys.prefix,
            str(ROOT.parent),
        }
        forbidden |= {socket.gethostname()} if len(socket.gethostname()) > 3 else set()
        forbidden |= {v for v in os.environ.values() if len(v) >= 8 and "/" in v or v == secret}
        for name, text in texts.items():
            for bad in forbidden:
                assert bad not in text, (name, bad)
