"""``shardwise synth``: options, sizes in TACCL's units, the JSON rows and the table (issue 5, item 6)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_helpers import cli

from shardwise.cli.synth import parse_sizes


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARDWISE_CACHE_DIR", str(tmp_path))


def test_sizes_are_binary_like_taccl() -> None:
    assert parse_sizes("1KB,1MB,1GB") == [2**10, 2**20, 2**30]
    assert parse_sizes("64KiB, 2MB ,4096") == [64 * 2**10, 2 * 2**20, 4096]


def test_json_rows_have_the_issue_keys() -> None:
    result = cli("synth", "--cluster", "cpu:4", "--collective", "allgather", "--sizes", "1KB,1MB", "--json")
    assert result.code == 0, result.err
    rows = json.loads(result.out)
    assert [r["size_bytes"] for r in rows] == [1024, 2**20]
    for r in rows:
        assert r["collective"] == "allgather"
        assert {"ring", "rhd"} <= set(r["baselines"])
        assert r["synthesized_us"] <= min(r["baselines"].values()) + 1e-6
        assert 0 < r["lower_bound_us"] <= r["synthesized_us"] + 1e-6
        assert r["synthesis_s"] >= 0
    # the same call again is answered from the cache
    again = json.loads(cli("synth", "cpu:4", "allgather", "--sizes", "1KB", "--json").out)
    assert again[0]["cached"] and again[0]["synthesized_us"] == rows[0]["synthesized_us"]


def test_table_names_every_baseline_and_the_bound() -> None:
    result = cli("synth", "--cluster", "cpu:4", "--collective", "reduce-scatter", "--sizes", "64KB")
    assert result.code == 0, result.err
    for word in ("64KB", "ring", "rhd", "lower bound", "synthesis"):
        assert word in result.out


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("--cluster", "cpu:4", "--sizes", "1KB"), "no collective given"),
        (("cpu:4", "allgather", "--collective", "alltoall"), "two collectives given"),
        (("--cluster", "cpu:4", "--collective", "allsorts"), "unknown collective"),
        (("--cluster", "cpu:4", "--collective", "allgather", "--sizes", "1XB"), "give sizes like"),
    ],
)
def test_bad_arguments_say_what_to_do(args: tuple[str, ...], says: str) -> None:
    result = cli("synth", *args)
    assert result.code == 2
    assert says in result.err
    assert "Traceback" not in result.err
