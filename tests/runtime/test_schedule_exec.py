"""The collective executor's program checks (no processes needed)."""

from __future__ import annotations

import copy

import pytest
import torch

from shardwise.runtime.lib.schedule_exec import FORMAT, check_program, run_collective

PROGRAM = {
    "format": FORMAT,
    "collective": "allgather",
    "nranks": 2,
    "chunks": 1,
    "in_chunks": 1,
    "out_chunks": 2,
    "programs": [
        {
            "nslots": 2,
            "inputs": [[0, 0]],
            "outputs": [[0, 0], [1, 1]],
            "steps": [["send", 1, [0], 0], ["recv", 1, [1], 0]],
        },
        {
            "nslots": 2,
            "inputs": [[0, 1]],
            "outputs": [[0, 0], [1, 1]],
            "steps": [["send", 0, [1], 0], ["recv", 0, [0], 0]],
        },
    ],
}


def test_well_formed_program_passes():
    check_program(PROGRAM)


@pytest.mark.parametrize(
    "path, value, match",
    [
        (("format",), "other", "not a"),
        (("nranks",), 3, "nranks"),
        (("programs", 0, "steps", 0), ["send", 0, [0], 0], "bad peer"),
        (("programs", 1, "steps", 1), ["recv", 0, [7], 0], "bad peer, slot"),
        (("programs", 0, "steps", 0), ["gather", 1, [0], 0], "is not"),
        (("programs", 0, "inputs", 0), [3, 0], "input"),
    ],
)
def test_malformed_programs_are_rejected(path, value, match):
    prog = copy.deepcopy(PROGRAM)
    target = prog
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(ValueError, match=match):
        check_program(prog)


def test_input_that_does_not_split_is_rejected():
    with pytest.raises(ValueError, match="pad it"):
        run_collective({**PROGRAM, "in_chunks": 2}, torch.zeros(3), rank=0, ranks=[0, 1])
