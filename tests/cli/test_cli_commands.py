"""The inspection commands (plan, show, explain, diff), --json output, exit codes and user errors."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from cli_helpers import cli

from shardwise.cli.planning import load_plan


def test_plan_records_how_it_was_made(gpt2_plan: Path) -> None:
    plan = load_plan(gpt2_plan)
    assert plan.world_size == 2 and plan.degrees["dp"] == 2
    assert dict(plan.source) == {"model": "gpt2:tiny", "cluster": "cpu:2", "seed": "0"}


def test_plan_json_output(cli_dir: Path) -> None:
    path = cli_dir / "mlp-json.json"
    result = cli("plan", "mlp:tiny,hidden=32", "-c", "cpu:2", "--batch", "6", "-o", path, "--json")
    assert result.code == 0, result.err
    data = json.loads(result.out)  # nothing but JSON on stdout
    assert data["plan"] == str(path)
    assert data["overview"]["source"]["batch"] == "6"
    assert data["overview"]["command"] == "shardwise plan mlp:tiny,hidden=32 --cluster cpu:2 --batch 6"
    assert load_plan(path).graph.inputs[0].spec.shape == (6, 32)
    assert data["predicted"]["step_time_s"] > 0


def test_plan_with_synthesized_collectives(cli_dir: Path) -> None:
    path = cli_dir / "gpt2-synth.json"
    args = ("plan", "gpt2:tiny", "-c", "cpu:4", "-C", "tp=4", "--collectives", "synthesize")
    result = cli(*args, "-o", path, "--json")
    assert result.code == 0, result.err
    plan = load_plan(path)
    programs = dict(plan.collective_programs)
    chosen = [r.algorithm for s in plan.strategies for r in s.redistributes if r.algorithm in programs]
    assert chosen and set(programs) == set(chosen)
    assert json.loads(result.out)["overview"]["command"].endswith("--collectives synthesize")
    refused = cli("plan", "gpt2:tiny", "--collectives", "fastest", "-o", cli_dir / "no.json")
    assert refused.code == 2 and "fastest" in refused.err


def test_show_tables_and_json(gpt2_plan: Path) -> None:
    text = cli("show", gpt2_plan)
    assert text.code == 0
    for title in (
        "Predicted step time",
        "Mesh",
        "Stages",
        "Strategies by module",
        "Collectives",
        "Memory per rank",
    ):
        assert title in text.out
    assert "transformer.h.0.attn.c_attn" in text.out
    data = json.loads(cli("show", gpt2_plan, "--json").out)
    plan = load_plan(gpt2_plan)
    assert [m["rank"] for m in data["memory"]] == [0, 1]
    assert all(m["total"] <= m["capacity"] for m in data["memory"])
    modules = {m["module"]: m for m in data["modules"]}
    assert modules["transformer.h.0.mlp.c_fc"]["outputs"] == ["S(0)@dp"]  # data parallel: batch split on dp
    # every op is in exactly one module group; the groups' times add up to the plan's per-op times
    assert sum(m["ops"] for m in data["modules"]) == sum(1 for n in plan.graph.nodes if n.op != "getitem")
    assert sum(m["compute_s"] for m in data["modules"]) == pytest.approx(
        sum(s.compute_s for s in plan.strategies)
    )
    # the collectives table agrees with the redistributions in the plan
    moved = [
        r
        for s in plan.strategies
        for r in s.redistributes
        if r.collective not in ("none", "slice", "to_partial")
    ]
    assert sum(c["count"] for c in data["collective_totals"]) == len(moved)
    by_layer = json.loads(cli("show", gpt2_plan, "--json", "--by-layer").out)
    assert "transformer.h.1" in {m["module"] for m in by_layer["modules"]}


def test_explain_ranks_alternatives_and_op_candidates(gpt2_plan: Path) -> None:
    data = json.loads(cli("explain", gpt2_plan, "--json").out)
    alts = data["alternatives"]
    assert alts[0]["chosen"] and alts[0]["degrees"]["dp"] == 2
    assert [a["step_time_s"] for a in alts] == sorted(a["step_time_s"] for a in alts)
    text = cli("explain", gpt2_plan)
    assert "Why this plan" in text.out and "chosen" in text.out

    ops = json.loads(cli("explain", gpt2_plan, "--op", "transformer.h.0.mlp.c_fc", "--json").out)["ops"]
    addmm = next(o for o in ops if o["op"] == "aten.addmm.default")
    chosen = [c for c in addmm["candidates"] if c["chosen"]]
    assert len(chosen) == 1 and chosen[0]["split"] == addmm["chosen_split"]
    assert {c["split"] for c in addmm["candidates"]} >= {"whole", addmm["chosen_split"]}
    # running the matmul whole makes every rank gather its input first: slower than the chosen split
    whole = next(c for c in addmm["candidates"] if c["split"] == "whole")
    assert whole["time_s"] > chosen[0]["time_s"]
    assert any(c.startswith("allgather@dp") for c in whole["collectives"])
    assert cli("explain", gpt2_plan, "--op", "addmm").code == 0


def test_diff_by_module(gpt2_plan: Path, gpt2_tp_plan: Path) -> None:
    same = json.loads(cli("diff", gpt2_plan, gpt2_plan, "--json").out)
    assert same["same"] and not same["modules"]["changed"]
    d = json.loads(cli("diff", gpt2_plan, gpt2_tp_plan, "--json").out)
    assert not d["same"]
    assert d["fields"]["degrees"][0]["dp"] == 2 and d["fields"]["degrees"][1]["tp"] == 2
    changed = {m["module"]: m for m in d["modules"]["changed"]}
    a, b = changed["transformer.h.0.mlp.c_fc"]["outputs"]
    assert a == ["S(0)@dp"] and b != a and all("@tp" in x or x == "R" for x in b)
    # the collective rows are the difference of the two plans' own totals
    totals = {
        side: {
            (c["collective"], c["axis"]): c["count"]
            for c in json.loads(cli("show", p, "--json").out)["collective_totals"]
        }
        for side, p in (("a", gpt2_plan), ("b", gpt2_tp_plan))
    }
    for row in d["collectives"]:
        for side in ("a", "b"):
            want = totals[side].get((row["collective"], row["axis"]))
            assert (row[side] or {}).get("count") == want
    text = cli("diff", gpt2_plan, gpt2_tp_plan).out
    assert "transformer.h.[0,1].mlp.c_fc" in text  # repeated layers collapse into one row


def test_model_from_a_file_and_fingerprint_check(tmp_path: Path) -> None:
    model_file = tmp_path / "net.py"
    source = textwrap.dedent(
        """
        import torch

        def make(batch=4):
            model = torch.nn.Sequential(torch.nn.Linear(8, {hidden}), torch.nn.ReLU(), torch.nn.Linear({hidden}, 3))
            return model, (torch.randn(batch, 8),)
        """
    )
    model_file.write_text(source.format(hidden=16))
    result = cli("plan", "net.py:make", "-c", "cpu:2", "-o", "net.json", "-q", cwd=tmp_path)
    assert result.code == 0, result.err
    assert dict(load_plan(tmp_path / "net.json").source)["model"] == "net.py:make"
    # the model changed since the plan was made: run refuses before starting any process
    model_file.write_text(source.format(hidden=24))
    bad = cli("run", tmp_path / "net.json", cwd=tmp_path)
    assert bad.code == 2
    assert "fingerprint" in bad.err and "Traceback" not in bad.err


@pytest.mark.parametrize(
    ("args", "code", "says"),
    [
        (("show", "missing.json"), 2, "not found"),
        (("plan", "nosuchmodel"), 2, "unknown model"),
        (("plan", "mlp:tiny", "-c", "cpu:banana"), 2, "cpu"),
        (("plan", "mlp:tiny", "-C", "dp"), 2, "KEY=VALUE"),
        (("plan", "nofile.py:make"), 2, "not found"),
        (("plan", "mlp:tiny", "--mode", "sideways"), 2, "sideways"),
        (("plan",), 2, "Missing argument"),
        (("frobnicate",), 2, "No such command"),
    ],
)
def test_user_errors_exit_2_without_traceback(
    args: tuple[str, ...], code: int, says: str, tmp_path: Path
) -> None:
    result = cli(*args, cwd=tmp_path)
    assert result.code == code
    assert says.lower() in (result.err + result.out).lower()
    assert "Traceback" not in result.err


def test_bad_plan_files(tmp_path: Path) -> None:
    (tmp_path / "half.json").write_text('{"shardwise_plan": 1, "plan": {"@": "Exec')
    (tmp_path / "other.json").write_text('{"hello": 1}')
    for name, says in (("half.json", "not valid JSON"), ("other.json", "not a shardwise plan")):
        result = cli("show", tmp_path / name, "--json")
        assert result.code == 2
        assert says in result.err
        assert json.loads(result.out)["type"] == "PlanFileError"  # scripts get the error as JSON too


def test_synth_reports_missing_synthesizer_or_prints_a_table() -> None:
    from shardwise.passes import collectives

    result = cli("synth", "cpu:4", "allreduce", "--sizes", "1KiB,1MiB", "--json")
    if not callable(getattr(collectives, "synth_table", None)):
        assert result.code == 1
        assert "not available yet" in result.err
        return
    assert result.code == 0, result.err
    rows = json.loads(result.out)
    assert len(rows) >= 2
    assert cli("synth", "cpu:4", "allsorts").code == 2


def test_version_and_help() -> None:
    assert cli("--version").out.startswith("shardwise ")
    text = cli("--help").out
    for command in (
        "plan",
        "show",
        "explain",
        "diff",
        "report",
        "codegen",
        "run",
        "calibrate",
        "synth",
        "demo",
    ):
        assert f"  {command} " in text
