"""``shardwise serve-plan``: the issue's options and JSON keys, the printed plan, and errors that say what to do."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from cli_helpers import cli

from shardwise.cluster import get_cluster
from shardwise.cluster.schema import write_yaml


@pytest.fixture(scope="module")
def one_a100(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One A100 (the preset's device and efficiencies) as a cluster file: one layout to search, quickly."""
    a100 = get_cluster("dgx-a100x1")
    spec = dataclasses.replace(
        get_cluster("cpu:1"), name="a100x1", device=a100.device, efficiency=a100.efficiency
    )
    path = tmp_path_factory.mktemp("serve") / "a100.yaml"
    write_yaml(spec, path)
    return path


ARGS = ("--ttft", "0.5", "--tpot", "0.05", "--attainment", "0.9", "--workload", "fixed:256,32")


def test_serve_plan_json(one_a100: Path) -> None:
    result = cli("serve-plan", "facebook/opt-13b", "--cluster", one_a100, *ARGS, "--json")
    assert result.code == 0, result.err
    data = json.loads(result.out)
    assert data["layout"] == {"kind": "colocated", "tp": 1, "pp": 1, "instances": 1, "devices": 1}
    assert data["goodput_rps_per_gpu"] > 0 and data["attainment"] >= 0.9
    assert 10_000 < data["kv_capacity_tokens"] < 100_000  # OPT-13B on one 80 GB device
    assert data["alternatives"] == []  # one device: one layout
    assert data["launch_command"].startswith("CUDA_VISIBLE_DEVICES=0 vllm serve facebook/opt-13b")
    assert "--tensor-parallel-size 1 --pipeline-parallel-size 1" in data["launch_command"]
    assert data["slo"] == {"ttft_s": 0.5, "tpot_s": 0.05, "attainment": 0.9}
    assert data["predicted"] is True


def test_serve_plan_prints_the_plan(one_a100: Path) -> None:
    result = cli("serve-plan", "opt-13b", "--cluster", one_a100, *ARGS)
    assert result.code == 0, result.err
    assert "layout: colocated: 1 x (tp 1, pp 1)" in result.out
    assert "predicted goodput" in result.out and "vllm serve facebook/opt-13b" in result.out
    assert "req/s per instance (predicted)" in result.err  # search progress


def test_serve_plan_bad_input_says_what_to_do(tmp_path: Path) -> None:
    bad = tmp_path / "w.yaml"
    bad.write_text("prompt: {distribution: lognormal}\noutput: 10\n")
    result = cli("serve-plan", "opt-13b", "--workload", bad, "--json")
    assert result.code == 2
    assert "needs 'mean'" in result.err and "workload file holds" in result.err
    assert json.loads(result.out)["type"] == "UserInputError"
    result = cli("serve-plan", "opt-13b", "--workload", "nothing-here")
    assert result.code == 2 and "neither a known name" in result.err
    result = cli("serve-plan", "opt-13b", "--attainment", "1.5")
    assert result.code == 2 and "--attainment 1.5" in result.err
    result = cli("serve-plan", "bert:tiny")
    assert result.code == 2 and "decoder-only" in result.err
