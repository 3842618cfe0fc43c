"""Context parallelism (issue 17, points 2 and 4): Llama and Qwen2 tiny configurations (shardwise/zoo/hf.py)
with a sequence of 256 tokens split over ``cp=2`` on cpu:2, attention pinned to each of the three ways
(``allgather``: keys and values gathered; ``ulysses``: all-to-all to a head split and back; ``ring``: key/value
blocks passed around the ring), equal eager PyTorch for inference and for three SGD training steps (losses
and every final parameter, float32). The models build their causal mask and rotary positions from
``arange`` inside the forward: the plan computes them whole and cuts each rank's rows, so positions stay
global. The sequence is cut into chunk pairs (rank r holds chunks r and 2cp-1-r: every split and gather over
cp keeps to it). One pool of two gloo processes serves the module."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

import shardwise
from shardwise.codegen.emit import paired_axes
from shardwise.testing.eager import assert_training_equal, assert_weights_moved, eager_training

pytest.importorskip("transformers")

from shardwise.zoo.hf import tiny_causal_lm  # noqa: E402

pytestmark = pytest.mark.multiproc

MODELS = ["llama", "qwen2"]
WAYS = ["allgather", "ulysses", "ring"]
SEQ = 256
SGD = functools.partial(torch.optim.SGD, lr=0.1)


def _loss(out) -> torch.Tensor:  # noqa: ANN001
    return out.logits.float().sin().mean()


def _check_layout(cm, way: str) -> None:  # noqa: ANN001
    plan = cm.plan
    assert plan.degrees.get("cp") == 2 and plan.world_size == 2
    calls = {n.name for n in cm.graph.nodes if n.op == "aten.scaled_dot_product_attention.default"}
    attention = [s for s in plan.strategies if s.node in calls]
    assert attention, "the model has attention calls"
    for s in attention:
        labels = dict(s.split)
        assert labels.get("cp") == ("s" if way == "allgather" else f"s@{way}"), s.split
    gathered = {r.value for s in attention for r in s.redistributes if r.axis == "cp" and "allgather" in r.collective}
    assert bool(gathered) == (way == "allgather")  # only the allgather way gathers keys and values
    assert any(f"by {way}" in note for note in plan.notes)
    # 256 tokens cut into 4 chunks: rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2 (causal load balance)
    assert paired_axes(plan) == ("cp",)


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("name", MODELS)
def test_inference_equals_eager(pool, name, way):
    model, inputs = tiny_causal_lm(name, seq=SEQ)
    constraints = {"cp": 2, "cp_attention": way}
    with shardwise.compile(model, "cpu:2", example_inputs=inputs, constraints=constraints, workers=pool) as cm:
        _check_layout(cm, way)
        out = cm.run(*inputs)
    with torch.no_grad():
        ref = model(*inputs)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("name", MODELS)
def test_three_sgd_steps_equal_eager(pool, name, way):
    model, inputs = tiny_causal_lm(name, seq=SEQ)
    reference = copy.deepcopy(model)
    with shardwise.compile(
        model, "cpu:2", example_inputs=inputs, mode="train", loss_fn=_loss, optimizer=SGD,
        constraints={"cp": 2, "cp_attention": way}, workers=pool,
    ) as cm:  # fmt: skip
        _check_layout(cm, way)
        losses = [cm.train_step(*inputs) for _ in range(3)]
        state = cm.state_dict()
    expected_losses, expected_state = eager_training(reference, inputs, _loss, SGD)
    assert_weights_moved(model.state_dict(), expected_state)  # well beyond the tolerance
    assert_training_equal(losses, state, expected_losses, expected_state)


class _CausalLM(torch.nn.Module):
    """A language model whose attention is ``scaled_dot_product_attention(q, k, v, is_causal=True)`` with no mask
    tensor (as torchtitan's Llama calls it), grouped-query (4 query heads, 2 key/value heads)."""

    def __init__(self, vocab: int = 64, width: int = 32, heads: int = 4, kv_heads: int = 2, layers: int = 2):
        super().__init__()
        self.heads, self.kv_heads, self.head = heads, kv_heads, width // heads
        self.embed = torch.nn.Embedding(vocab, width)
        self.q = torch.nn.ModuleList(torch.nn.Linear(width, width, bias=False) for _ in range(layers))
        self.kv = torch.nn.ModuleList(torch.nn.Linear(width, 2 * kv_heads * self.head, bias=False) for _ in range(layers))
        self.o = torch.nn.ModuleList(torch.nn.Linear(width, width, bias=False) for _ in range(layers))
        self.out = torch.nn.Linear(width, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        b, s, _ = x.shape
        for q_proj, kv_proj, o_proj in zip(self.q, self.kv, self.o, strict=True):
            q = q_proj(x).view(b, s, self.heads, self.head).transpose(1, 2)
            k, v = kv_proj(x).view(b, s, 2 * self.kv_heads, self.head).transpose(1, 2).chunk(2, dim=1)
            a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            x = x + o_proj(a.transpose(1, 2).reshape(b, s, -1)).tanh()
        return self.out(x)


@pytest.mark.parametrize("way", WAYS)
def test_is_causal_attention_splits_over_cp(pool, way):
    # no mask tensor: each way masks its rows by their global positions (the ring's blocks, the gathered keys)
    # or runs whole sequences (Ulysses); a plain split would mask each rank's rows by local positions
    torch.manual_seed(0)
    model = _CausalLM()
    inputs = (torch.randint(0, 64, (2, 64)),)
    reference = copy.deepcopy(model)

    def loss(out: torch.Tensor) -> torch.Tensor:
        return out.float().sin().mean()

    with shardwise.compile(
        model, "cpu:2", example_inputs=inputs, mode="train", loss_fn=loss, optimizer=SGD,
        constraints={"cp": 2, "cp_attention": way}, workers=pool,
    ) as cm:  # fmt: skip
        calls = {n.name for n in cm.graph.nodes if n.op == "aten.scaled_dot_product_attention.default"}
        labels = [dict(s.split).get("cp") for s in cm.plan.strategies if s.node in calls]
        assert labels == [f"s@{way}"] * 2, labels  # every is_causal call split over cp, by the way pinned
        losses = [cm.train_step(*inputs) for _ in range(3)]
        state = cm.state_dict()
    expected_losses, expected_state = eager_training(reference, inputs, loss, SGD)
    assert_weights_moved(model.state_dict(), expected_state)
    assert_training_equal(losses, state, expected_losses, expected_state)


def test_grouped_query_attention_splits_its_batch_over_dp():
    # (plan only) fewer key/value heads than query heads map the heads many-to-one, not the batch: dp splits the
    # attention's batch as it splits every other op's (before, the call ran whole on every data-parallel rank)
    from shardwise.cluster import get_cluster
    from shardwise.frontend.trace import trace
    from shardwise.planner.auto import plan_auto

    model, ids = _CausalLM(), torch.randint(0, 64, (4, 64))
    graph, _ = trace(model, (ids,), loss_fn=lambda out: out.float().sin().mean())
    plan = plan_auto(graph, get_cluster("cpu:2"), mode="train", constraints={"dp": 2, "tp": 1})
    calls = {n.name for n in graph.nodes if n.op == "aten.scaled_dot_product_attention.default"}
    assert [dict(s.split).get("dp") for s in plan.strategies if s.node in calls] == ["b0", "b0"]
