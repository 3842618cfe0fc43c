"""Attention over a sequence split across a mesh axis (``shardwise.runtime.lib.attention``): Ulysses and ring
attention on two real gloo processes equal ``F.scaled_dot_product_attention`` of the whole sequence, output
and gradients of q, k and v (float64), with a causal mask tensor and with ``is_causal``, on contiguous chunks
and on chunk pairs (rank r holds chunks r and 2n-1-r); the chunk pairs' cut and join are inverse."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from shardwise.runtime.lib import Mesh
from shardwise.runtime.lib.mesh import chunk_ids, join, pieces

sys.path.insert(0, os.path.dirname(__file__))
import _attention_cases  # noqa: E402  (imported by name in the workers too)


def test_chunk_pairs_cut_and_join():
    mesh = Mesh(0, (1, 3), ("dp", "cp"), tuple(range(3)), paired=("cp",))  # no process group: indices only
    x = torch.arange(12).view(1, 12)
    parts = pieces(x, 1, mesh, "cp")
    assert [p.tolist()[0] for p in parts] == [[0, 1, 10, 11], [2, 3, 8, 9], [4, 5, 6, 7]]
    assert torch.equal(join(parts, 1, mesh, "cp"), x)
    assert chunk_ids(mesh, "cp", 1) == (1, 4)
    with pytest.raises(ValueError, match="does not split into 6 chunks"):
        pieces(torch.arange(9), 0, mesh, "cp")


@pytest.mark.multiproc
def test_ulysses_and_ring_equal_whole_attention(tmp_path, worker_pools):
    package = tmp_path / "rank_pkg"
    package.mkdir()
    (package / "__init__.py").write_text(
        "class Rank:\n    def __init__(self, rank):\n        self.rank = rank\n\n\n"
        "def build(rank, world_size):\n    return Rank(rank)\n"
    )
    pool = worker_pools(2)  # the session's pool of two (tests/conftest.py)
    pool.load(package)
    results = pool.call_function(_attention_cases.attention_case)
    for rank, got in enumerate(results):
        assert len(got) == 8
        for case, (out_err, grad_err) in got.items():
            assert out_err < 1e-12 and grad_err < 1e-12, (rank, case, out_err, grad_err)
