"""Prices of attention over a sequence split ``cp`` ways (costs/attention.py) and how the planner uses them:
ring attention's messages are hidden behind its blocks' compute where the compute is longer, Ulysses needs
heads divisible by ``cp``, a pinned way that cannot run is a clear error, and the search offers ``cp`` where the
batch does not split over the devices."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shardwise.cluster import get_cluster
from shardwise.costs.attention import AttentionShape, context_attention_s, ulysses_problem
from shardwise.costs.prices import price_list
from shardwise.errors import PlanError
from shardwise.frontend.trace import trace
from shardwise.planner.plan import plan
from shardwise.planner.search import SearchOptions, search

MiB = 2**20


def _shape(causal: bool = False, heads: int = 8) -> AttentionShape:
    return AttentionShape(q_bytes=4 * MiB, kv_bytes=8 * MiB, out_bytes=4 * MiB, mask_bytes=0.0, heads=heads,
                          causal=causal)  # fmt: skip


@pytest.mark.parametrize("cp", [2, 4])
def test_ring_hides_its_messages_behind_the_blocks_compute(cp):
    prices = price_list(get_cluster("dgx-h100x1"))
    ranks = tuple(range(cp))
    hop = prices.p2p_s(8 * MiB, 0, 1)
    assert hop > 0

    def ring(compute: float) -> float:
        return context_attention_s(prices, ranks, "ring", _shape(), compute_forward_s=compute,
                                   compute_backward_s=0.0, train=False)[0]  # fmt: skip

    # a block's compute (the call's share over cp blocks) longer than a hop: nothing exposed
    assert ring(2 * hop * cp) == 0.0
    # no compute to hide behind: every one of the cp - 1 hops is exposed
    assert ring(0.0) == pytest.approx((cp - 1) * hop)
    # half a hop of compute per block: half of each hop is exposed
    assert ring(hop * cp / 2) == pytest.approx((cp - 1) * hop / 2)


def test_ring_charges_the_causal_imbalance_of_contiguous_chunks_and_not_of_chunk_pairs():
    prices = price_list(get_cluster("dgx-h100x1"))
    hop = prices.p2p_s(8 * MiB, 0, 1)
    compute = 1.0  # far above any hop: only the imbalance and the backward's gradient hops remain

    def ring(shape: AttentionShape) -> tuple[float, float]:
        return context_attention_s(prices, (0, 1), "ring", shape, compute_forward_s=compute,
                                   compute_backward_s=compute, train=True)  # fmt: skip

    plain = ring(_shape(False))
    # the backward waits for each block's gradient: one hop following the block, one more home
    assert plain == pytest.approx((0.0, 2 * hop))
    # cp=2, chunk 0 on rank 0, chunk 1 on rank 1: rank 1 attends 1.5 blocks' worth, the average is 1
    assert ring(_shape(True)) == pytest.approx((0.5 * compute, 2 * hop + 0.5 * compute))
    # chunk pairs (rank 0: chunks 0 and 3, rank 1: chunks 1 and 2) leave both ranks the same work
    paired = AttentionShape(q_bytes=4 * MiB, kv_bytes=8 * MiB, out_bytes=4 * MiB, mask_bytes=0.0, heads=8,
                            causal=True, balanced=True)  # fmt: skip
    assert ring(paired) == pytest.approx(plain)


def test_ulysses_and_allgather_move_what_they_say():
    prices = price_list(get_cluster("dgx-h100x1"))
    ranks = (0, 1, 2, 3)
    shape = _shape()
    f, b = context_attention_s(prices, ranks, "ulysses", shape, compute_forward_s=1.0, compute_backward_s=1.0,
                               train=True)  # fmt: skip
    a2a = sum(prices.collective_s("alltoall", n, ranks) for n in (shape.q_bytes, shape.kv_bytes, shape.out_bytes))
    assert f == pytest.approx(a2a) and b == pytest.approx(a2a)  # hidden behind nothing
    f, b = context_attention_s(prices, ranks, "allgather", shape, compute_forward_s=1.0, compute_backward_s=1.0,
                               train=False)  # fmt: skip
    assert f == pytest.approx(prices.collective_s("allgather", shape.kv_bytes * 4, ranks)) and b == 0.0
    with pytest.raises(ValueError, match="unknown context-parallel attention way 'sideways'"):
        context_attention_s(prices, ranks, "sideways", shape, compute_forward_s=0.0, compute_backward_s=0.0,
                            train=False)  # fmt: skip


def test_ulysses_needs_heads_divisible_by_cp():
    assert ulysses_problem(8, 2, 2) == ""
    assert ulysses_problem(8, 1, 2) == ""  # one key/value head: repeated to the query heads
    assert "3 attention heads" in ulysses_problem(3, 3, 2)
    assert "3 key/value heads" in ulysses_problem(6, 3, 2)


class _Attention(nn.Module):
    """One causal attention layer (mask from arange inside the forward) with ``heads`` heads."""

    def __init__(self, heads: int, dim: int = 24) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, s, self.heads, d // self.heads).transpose(1, 2)

        pos = torch.arange(s, device=x.device)
        mask = pos[None, :] <= pos[:, None]
        y = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)), attn_mask=mask)
        return self.o(y.transpose(1, 2).reshape(b, s, d))


def _graph(heads: int, batch: int):
    torch.manual_seed(0)
    graph, _ = trace(_Attention(heads), (torch.randn(batch, 16, 24),))
    return graph


def test_a_pinned_way_that_cannot_run_is_a_clear_error():
    graph = _graph(heads=3, batch=1)
    with pytest.raises(PlanError, match=r"by ulysses: the 3 attention heads .* do not divide by cp=2.*pin another"):
        plan(graph, get_cluster("cpu:2"), {"cp": 2, "cp_attention": "ulysses"})
    # left to the planner, the same model splits its sequence another way
    made = plan(graph, get_cluster("cpu:2"), {"cp": 2})
    assert made.degrees.get("cp") == 2
    assert any("ulysses not possible (the 3 attention heads" in n for n in made.notes)


def test_the_search_offers_cp_where_the_batch_does_not_split():
    cluster = get_cluster("cpu:2")
    options = SearchOptions(mode="inference")
    one = search(_graph(heads=4, batch=1), cluster, None, options)
    assert any(c.cp == 2 and c.dp == 1 for c in one.ranked)
    two = search(_graph(heads=4, batch=2), cluster, None, options)
    assert all(c.cp == 1 for c in two.ranked)  # the batch takes dp=2: a batch split needs no attention messages


def test_explain_prices_every_way_of_a_context_parallel_attention():
    from shardwise.cli.explain import explain_ops

    cluster = get_cluster("cpu:2")
    made = plan(_graph(heads=4, batch=1), cluster, {"cp": 2})
    (op,), _ = explain_ops(made, "scaled_dot_product_attention", cluster)
    by_split = {c.split: c for c in op.candidates}
    assert {"cp:s", "cp:s@ulysses", "cp:s@ring"} <= set(by_split)
    chosen = [c for c in op.candidates if c.chosen]
    assert len(chosen) == 1 and chosen[0].split.startswith("cp:s")
    ways = [by_split[k].time_s for k in ("cp:s", "cp:s@ulysses", "cp:s@ring")]
    assert chosen[0].time_s == pytest.approx(min(ways))  # the placement took the way the price list says is cheapest


def test_ring_charges_the_programs_block_kernels():
    """The program's ring attention computes every block with separate kernels (no fused kernel returns the
    log-sum-exp): on a CPU their launches and passes over the scores are charged, more the more blocks."""
    prices = price_list(get_cluster("cpu:2"))
    base = dict(q_bytes=MiB, kv_bytes=2 * MiB, out_bytes=MiB, mask_bytes=0.0, heads=4, causal=True)

    def ring(fused_blocks: bool = False, **more: object) -> tuple[float, float]:
        return context_attention_s(prices, (0, 1), "ring", AttentionShape(**base, **more), compute_forward_s=1.0,
                                   compute_backward_s=1.0, train=True, fused_blocks=fused_blocks)  # fmt: skip

    fused = ring(balanced=True)  # no scores: what a fused kernel would leave
    # a published system's program (fused attention kernels per block) pays no such charges: its price does not
    # depend on the scores' bytes (it pays PyTorch's merges instead: test_published_ring_pays_pytorchs_merges)
    assert ring(True, balanced=True, score_bytes=4 * MiB) == ring(True, balanced=True)
    unfused = ring(balanced=True, score_bytes=4 * MiB)
    assert unfused[0] > fused[0] and unfused[1] > fused[1]
    extra = unfused[0] - fused[0]
    # cp=2 chunk pairs under a causal mask: 5 blocks of a quarter, 11 passes over their scores, 21 kernels each
    assert extra >= prices.compute.byte_s(11 * 4 * MiB * 0.25 * 5)


def test_published_ring_pays_pytorchs_merges():
    """A published compiled system's ring (PyTorch's context_parallel, fused blocks) merges each step's output into
    a float32 running output and accumulates the gradients in float32, passing the key/value gradients in float32:
    memory-bound passes charged beyond the hops, on a GPU whose hops hide behind the blocks."""
    prices = price_list(get_cluster("dgx-h100"))
    cp = 4
    shape = AttentionShape(q_bytes=64 * MiB, kv_bytes=32 * MiB, out_bytes=64 * MiB, mask_bytes=0.0, heads=32,
                           causal=True, balanced=True, flagged=True, value_bytes=2.0)  # fmt: skip

    def ring(fused_blocks: bool) -> tuple[float, float]:
        return context_attention_s(prices, tuple(range(cp)), "ring", shape, compute_forward_s=1.0,
                                   compute_backward_s=2.5, train=True, fused_blocks=fused_blocks)  # fmt: skip

    (f0, b0), (f1, b1) = ring(False), ring(True)
    assert f0 == 0.0  # every hop hidden behind a block (no scores: nothing else on a GPU)
    # forward: cp - 1 merges of the output (10 bytes an element) and packs of the keys and values (2 x their bytes)
    el = 32 * MiB  # elements of the output (and of the queries): 64 MiB of 16-bit values
    assert f1 == pytest.approx(prices.compute.byte_s((cp - 1) * (10 * el + 2 * 32 * MiB)))
    # backward: cp accumulations (10 bytes an element of q, k, v), packs of the float32 key/value gradients (8),
    # cp - 1 packs of the keys and values, and of the gradients' cp hops at float32 (twice the 16-bit bytes) the
    # last one only: PyTorch waits for each other hop after launching the next block's backward, which hides it
    kv_el = 16 * MiB
    merges = cp * (10 * (el + kv_el) + 8 * kv_el) + (cp - 1) * 2 * 32 * MiB
    hop = lambda n: max(prices.p2p_s(n, i, (i + 1) % cp) for i in range(cp))  # noqa: E731
    assert b0 == pytest.approx(cp * hop(32 * MiB))  # shardwise's own program waits for all cp hops
    assert b1 == pytest.approx(prices.compute.byte_s(merges) + hop(64 * MiB))


def test_published_ring_exposes_what_exceeds_its_blocks():
    """PyTorch's ring (torch 2.5 to December 2024, ``_templated_ring_attention``): the keys and values are
    all-gathered once per call (the default rotate method), launched before the first block and waited for
    before the second, so only what the gather takes beyond one block is exposed, in the forward and again in
    the backward; each float32 key/value gradient hop is waited for after the next block's backward is
    launched, the last one after the loop."""
    prices = price_list(get_cluster("dgx-h100"))
    cp = 4
    ranks = tuple(range(cp))
    shape = AttentionShape(q_bytes=64 * MiB, kv_bytes=32 * MiB, out_bytes=64 * MiB, mask_bytes=0.0, heads=32,
                           causal=True, balanced=True, flagged=True, value_bytes=2.0)  # fmt: skip
    gather = prices.collective_s("allgather", 32 * MiB * cp, ranks)
    grad_hop = max(prices.p2p_s(64 * MiB, i, (i + 1) % cp) for i in range(cp))
    assert gather > 0 and grad_hop > 0

    def exposed(compute: float) -> tuple[float, float]:
        f, b = context_attention_s(prices, ranks, "ring", shape, compute_forward_s=compute,
                                   compute_backward_s=compute, train=True, fused_blocks=True)  # fmt: skip
        merges = context_attention_s(prices, ranks, "ring", shape, compute_forward_s=1e3, compute_backward_s=1e3,
                                     train=True, fused_blocks=True)  # fmt: skip
        return f - merges[0], b - (merges[1] - grad_hop)  # beyond the memory-bound passes (and one hop)

    # no compute to hide behind: the whole gather, and every gradient hop
    assert exposed(0.0) == pytest.approx((gather, gather + cp * grad_hop))
    # blocks (the call's share over cp) longer than the gather and the hops: all hidden but the last hop
    assert exposed(cp * 2 * max(gather, grad_hop)) == pytest.approx((0.0, grad_hop))
    # blocks of half the gather: half of it exposed, forward and backward alike
    block = gather / 2
    assert exposed(cp * block)[0] == pytest.approx(gather / 2)


def test_published_ring_moves_the_heads_its_call_receives():
    """The ring passes the keys and values as the attention call receives them: a model that repeats its 2
    key/value heads to the 8 query heads before the call (torchtitan's ``repeat_kv``) moves, packs and
    accumulates 4 times the bytes of a call that takes the 2 heads itself (``enable_gqa``)."""
    from shardwise.costs.attention import attention_shape
    from shardwise.ir.placement import DeviceMesh

    class Grouped(nn.Module):
        def __init__(self, repeat: bool) -> None:
            super().__init__()
            self.repeat = repeat

        def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            if self.repeat:
                k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    q, kv = torch.randn(1, 8, 32, 16), torch.randn(1, 2, 32, 16)
    mesh = DeviceMesh((2,), ("cp",), (0, 1))
    shapes = {}
    for repeat in (False, True):
        graph, _ = trace(Grouped(repeat), (q, kv, kv.clone()))
        node = next(n for n in graph.nodes if n.op == "aten.scaled_dot_product_attention.default")
        ins = [graph.spec_of(v) for v in node.inputs[:3]]
        shapes[repeat] = attention_shape(node, ins, node.outputs[0], [], mesh, "cp")
    assert shapes[True].kv_bytes == 4 * shapes[False].kv_bytes
    assert shapes[True].q_bytes == shapes[False].q_bytes
    prices = price_list(get_cluster("dgx-h100"))

    def backward(shape: AttentionShape) -> float:
        return context_attention_s(prices, (0, 1), "ring", shape, compute_forward_s=1.0, compute_backward_s=1.0,
                                   train=True, fused_blocks=True)[1]  # fmt: skip

    assert backward(shapes[True]) > backward(shapes[False])


def test_published_ring_runs_its_later_blocks_without_a_mask():
    """PyTorch's ring over chunk pairs: the first of cp equal steps is a causal block, every later one a block
    without a mask, at the cluster's rate without a mask (``efficiency.attention_forward_full``, where listed):
    the forward takes 1/cp at the causal rate and (cp - 1)/cp at the other; a cluster listing no such rate, or a
    call that is not causal, keeps the call's own rate."""
    import dataclasses

    from shardwise.costs.attention import ring_causal_share, ring_forward_factor

    teton = get_cluster("bench/clusters/grand-teton-h100.yaml")
    eff = teton.efficiency
    assert eff.attention_forward_full > eff.attention_forward  # FlashAttention-2: 370 vs 335 TFLOP/s at 16K
    prices = price_list(teton)
    for cp in (2, 4, 8):
        assert ring_causal_share(cp, balanced=True) == pytest.approx(1 / cp)
        expected = 1 / cp + (cp - 1) / cp * eff.attention_forward / eff.attention_forward_full
        assert ring_forward_factor(prices, cp, causal=True, balanced=True) == pytest.approx(expected)
    # contiguous chunks: the last rank's diagonal half block of its cp - 1/2 blocks' work runs causal
    assert ring_causal_share(4, balanced=False) == pytest.approx(0.5 / 3.5)
    assert ring_forward_factor(prices, 4, causal=False, balanced=True) == 1.0
    plain = dataclasses.replace(teton, efficiency=dataclasses.replace(eff, attention_forward_full=0.0))
    assert ring_forward_factor(price_list(plain), 4, causal=True, balanced=True) == 1.0


def test_an_unmasked_call_runs_at_the_rate_without_a_mask():
    """A fused attention call with neither is_causal nor a mask tensor runs its forward at
    ``attention_forward_full`` where the cluster lists it; a causal call, a masked call and every backward keep
    their rates; 0 (the default) means the same rate as ``attention_forward``."""
    from shardwise.costs.backward import backward_s
    from shardwise.costs.compute import op_work

    class Call(nn.Module):
        def __init__(self, kind: str) -> None:
            super().__init__()
            self.kind = kind

        def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            if self.kind == "causal":
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
            if self.kind == "masked":
                mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            return F.scaled_dot_product_attention(q, k, v)

    x = torch.empty(1, 4, 2048, 64, device="meta")  # long enough to be bound by its FLOPs, even causal
    prices = price_list(get_cluster("bench/clusters/grand-teton-h100.yaml"))
    eff = prices.compute.efficiency
    works = {}
    for kind in ("causal", "masked", "full"):
        graph, _ = trace(Call(kind), (x, x.clone(), x.clone()))
        node = next(n for n in graph.nodes if n.op == "aten.scaled_dot_product_attention.default")
        works[kind] = op_work(node)
    full, masked, causal = works["full"], works["masked"], works["causal"]
    assert full.unmasked and not masked.unmasked and not causal.unmasked
    compute = prices.compute
    assert compute.device_s(full) == pytest.approx(full.flops / (compute.peak_flops * eff.attention_forward_full))
    assert compute.device_s(masked) == pytest.approx(masked.flops / (compute.peak_flops * eff.attention_forward))
    assert compute.device_s(causal) == pytest.approx(causal.flops / (compute.peak_flops * eff.attention_forward))
    assert backward_s(compute, full) == pytest.approx(backward_s(compute, masked))  # one backward rate
    h100 = price_list(get_cluster("dgx-h100")).compute  # lists none: the same rate either way
    assert h100.device_s(full) == pytest.approx(h100.device_s(masked))
