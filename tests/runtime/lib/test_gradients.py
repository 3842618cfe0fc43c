"""The runtime library's one gradient path (``shardwise.runtime.lib``: gradients, optim, training).

Buckets are checked in one process; the reduction, ZeRO's slices and whole training runs on two real gloo
processes (one pool for the module): gradients are summed over "dp" (the semantics every program uses), a
sharded bucket leaves this rank's slice of the sum, and a Trainer at ZeRO stage 0, 1 or 2 on two halves of a
batch, each rank's loss its share of the batch's mean, trains exactly as eager PyTorch on the whole batch.
"""

from __future__ import annotations

import copy
import os
import sys

import pytest
import torch

from shardwise.runtime.lib import Mesh, make_buckets

sys.path.insert(0, os.path.dirname(__file__))
import _lib_cases  # noqa: E402  (imported by name in the workers too)

SIZES = [torch.Size(s).numel() for s in _lib_cases.SHAPES]


def test_buckets_follow_the_backward_order_and_cut_slices_for_zero():
    mesh = Mesh(0, (2, 3), ("dp", "tp"), tuple(range(6)))  # no process group: sizes and indices only
    params = [torch.nn.Parameter(torch.zeros(n)) for n in (3, 7, 64, 4, 5)]
    axes = [("dp",), ("tp", "dp"), ("dp",), ("dp",), ()]
    buckets = make_buckets(list(zip(params, axes)), mesh, bucket_bytes=64, shard_axis="dp", whole=[params[0]])
    members = [[next(i for i, q in enumerate(params) if q is p) for p in b.params] for b in buckets]
    # reverse order; 64 floats (256 bytes) is a bucket of its own, the others stay open (one per set of axes
    # and sharding); no axes: no bucket; the tied parameter 0 is never sharded
    assert members == [[2], [3], [1], [0]]
    assert [b.shard_axis for b in buckets] == ["dp", "dp", "dp", None]
    assert buckets[2].axes == ("tp", "dp")  # the shard axis last
    assert [(b.padded, b.slice, b.offset) for b in buckets[:3]] == [(64, 32, 0), (4, 2, 32), (8, 4, 34)]


@pytest.fixture(scope="module")
def pool(tmp_path_factory, worker_pools):
    package = tmp_path_factory.mktemp("rank_pkg")
    (package / "__init__.py").write_text(
        "class Rank:\n    def __init__(self, rank):\n        self.rank = rank\n\n\n"
        "def build(rank, world_size):\n    return Rank(rank)\n"
    )
    made = worker_pools(2)  # the session's pool of two (tests/conftest.py)
    made.load(package)
    return made


def _summed(i: int) -> torch.Tensor:
    """Parameter i's gradient summed over the two ranks, per micro-batch: (1 + 2) (i + 1)."""
    return torch.full(_lib_cases.SHAPES[i], 3.0 * (i + 1), dtype=torch.float64)


@pytest.mark.multiproc
@pytest.mark.parametrize("microbatches", [1, 3])
def test_gradients_are_summed_over_their_axes(pool, microbatches):
    results = pool.call_function(_lib_cases.reduce_case, "deferred", False, 100, microbatches)
    for rank, got in enumerate(results):
        for i, g in enumerate(got["grads"][:-1]):
            torch.testing.assert_close(g, microbatches * _summed(i), rtol=0, atol=0)
        local = torch.full(_lib_cases.SHAPES[-1], float((rank + 1) * len(SIZES) * microbatches), dtype=torch.float64)
        torch.testing.assert_close(got["grads"][-1], local, rtol=0, atol=0)  # no axes: not reduced
        assert got["started"] == list(range(len(got["buckets"])))  # every bucket started during the backward


@pytest.mark.multiproc
@pytest.mark.parametrize("scatter", ["deferred", "now"])
def test_sharded_buckets_leave_this_ranks_slice_of_the_sum(pool, scatter):
    results = pool.call_function(_lib_cases.reduce_case, scatter, True, 100, 2)
    for rank, got in enumerate(results):
        expected = []
        for members, offset, size, padded in got["buckets"]:
            flat = torch.cat([2 * _summed(i).reshape(-1) for i in members])
            flat = torch.cat([flat, flat.new_zeros(padded - flat.numel())])
            assert padded % 2 == 0 and offset == sum(len(e) for e in expected)
            expected.append(flat[rank * size : (rank + 1) * size])
        torch.testing.assert_close(got["shard"], torch.cat(expected), rtol=0, atol=0)
        sharded = [i for members, *_ in got["buckets"] for i in members]
        for i in sharded:  # ZeRO-2 keeps no full gradient; ZeRO-1 keeps them until the step
            assert (got["grads"][i] is None) == (scatter == "now")


@pytest.mark.multiproc
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("zero", [0, 1, 2])
def test_training_on_two_halves_equals_eager_on_the_whole_batch(pool, zero, optimizer):
    results = pool.call_function(_lib_cases.train_case, zero, optimizer, 3)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    x = torch.randn(8, 6)
    opt = torch.optim.SGD(net.parameters(), lr=0.1) if optimizer == "sgd" else torch.optim.AdamW(net.parameters(), lr=0.01)
    for _ in range(3):
        net(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    total = sum(p.numel() for p in net.parameters())
    for got in results:
        for key, value in net.state_dict().items():
            torch.testing.assert_close(got["state"][key], value, rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")
        assert got["shard"] == (0 if zero == 0 else -(-total // 2))  # ZeRO: half of the state on each rank
    torch.testing.assert_close(
        torch.tensor(results[0]["losses"]) + torch.tensor(results[1]["losses"]),
        torch.tensor(_eager_losses(copy.deepcopy, optimizer)),
        rtol=1e-5, atol=1e-6,
    )  # fmt: skip


def _eager_losses(_copy, optimizer: str) -> list[float]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    x = torch.randn(8, 6)
    opt = torch.optim.SGD(net.parameters(), lr=0.1) if optimizer == "sgd" else torch.optim.AdamW(net.parameters(), lr=0.01)
    out = []
    for _ in range(3):
        loss = net(x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        out.append(loss.item())
    return out


def test_data_parallel_axes_are_reduced_and_sharded_as_one_group():
    # dp x cp (context parallelism) and dp/ep x ep (expert parallelism below dp): the ranks of the data axes
    # hold the same weights, so a gradient summed over several of them is one reduction over their combined
    # group, and ZeRO shards it over all of them; an expert's gradient (over the dp/ep replicas only) over those
    mesh = Mesh(0, (2, 2, 2), ("dp", "cp", "tp"), tuple(range(8)), combined=(("dp", "cp"),))
    assert mesh.size(("dp", "cp")) == 4 and mesh.group_ranks[("dp", "cp")] == (0, 2, 4, 6)
    assert Mesh(6, (2, 2, 2), ("dp", "cp", "tp"), tuple(range(8)), combined=(("dp", "cp"),)).index(("dp", "cp")) == 3
    params = [torch.nn.Parameter(torch.zeros(n)) for n in (10, 6)]
    buckets = make_buckets([(params[0], ("dp", "cp")), (params[1], ("tp", "cp", "dp"))], mesh, 1 << 20, ("dp", "cp"))
    assert [(b.axes, b.shard_axis, b.padded, b.slice) for b in buckets] == [  # reverse order
        (("tp", ("dp", "cp")), ("dp", "cp"), 8, 2),
        ((("dp", "cp"),), ("dp", "cp"), 12, 3),
    ]
    unsharded = make_buckets([(params[0], ("dp", "cp"))], mesh, 1 << 20, None, combine=("dp", "cp"))
    assert [(b.axes, b.shard_axis) for b in unsharded] == [((("dp", "cp"),), None)]  # one all-reduce, no shard
    alone = Mesh(0, (2, 2, 2), ("dp", "cp", "tp"), tuple(range(8)))  # no combined group: one axis after the other
    assert [(b.axes, b.shard_axis) for b in make_buckets([(params[0], ("dp", "cp"))], alone, 1 << 20, "dp")] == [
        (("cp", "dp"), "dp")
    ]
    experts = Mesh(0, (2, 2, 1), ("dp", "ep", "tp"), tuple(range(4)), combined=(("dp", "ep"),))
    got = make_buckets([(params[0], ("dp", "ep")), (params[1], ("dp",))], experts, 1 << 20, ("dp", "ep"))
    assert [(b.shard_axis, b.slice) for b in got] == [("dp", 3), (("dp", "ep"), 3)]
