"""A vocabulary that tp does not divide (1001 rows over 2 ranks) is still split: the LM head weight, its
logits and the vocabulary-parallel cross entropy run in torch.chunk pieces (501 + 500 rows), and the
results equal eager PyTorch in float32 (rtol 1e-4, atol 1e-5): inference logits (gathered whole), and 3 AdamW
training steps (losses and the final full state_dict). GPT-2 from the zoo ties its LM head to the token
embedding; the untied model is the one bench/runtime.py trains. One worker pool serves the module.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import shardwise
from shardwise.cluster.presets import cpu_cluster
from shardwise.ir.placement import Shard
from shardwise.testing.eager import assert_training_equal, eager_training
from shardwise.zoo import build_model

pytestmark = pytest.mark.multiproc

VOCAB = 1001  # odd: not a multiple of tp=2
OPTIMIZER = functools.partial(torch.optim.AdamW, lr=1e-3)
# free links and no sequence parallelism, so the plan splits the weights (what these tests are about)
CLUSTER = cpu_cluster(2, latency=1e-9, bandwidth=1e14, name="cpu:2-free-links")
TP = {"tp": 2, "sp": 1}


class _UntiedLM(nn.Module):
    """An embedding, one MLP block and an untied LM head; returns the mean next-token cross entropy."""

    def __init__(self, vocab: int = VOCAB, hidden: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.ln = nn.LayerNorm(hidden)
        self.mlp = nn.Linear(hidden, hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(self.ln(F.gelu(self.mlp(self.embed(ids)))))
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten())


def _vocab_split(plan, module: str = "lm_head") -> None:
    """The plan runs ``module``'s matmul split over tp on the vocabulary: its weight in row pieces, its
    logits in pieces along the last dimension (501 + 500 of them)."""
    tp = plan.mesh.axis_names.index("tp")
    nodes = [n for n in plan.graph.nodes if n.module_path == module and n.op == "aten.linear.default"]
    assert len(nodes) == 1, [n.name for n in nodes]
    strategy = plan.strategy(nodes[0].name)
    assert ("tp", "n") in strategy.split, strategy.split
    assert strategy.inputs[1].placements[tp] == Shard(0)
    logits = nodes[0].outputs[0]
    assert logits.shape[-1] == VOCAB and strategy.outputs[0].placements[tp] == Shard(len(logits.shape) - 1)


def test_gpt2_inference_logits_equal_eager(pool):
    model, inputs = build_model("gpt2", vocab=VOCAB)
    with shardwise.compile(model, CLUSTER, example_inputs=inputs, constraints=TP, workers=pool) as cm:
        _vocab_split(cm.plan)
        out = cm.run(*inputs)
    with torch.no_grad():
        ref = model(*inputs)
    assert out.logits.shape[-1] == VOCAB
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-5)


class _CausalLM(nn.Module):
    """GPT-2 with its own next-token loss (transformers' ForCausalLMLoss: a float copy of the logits, a view
    and cross entropy), so the loss reads the vocabulary-split logits."""

    def __init__(self, gpt: nn.Module) -> None:
        super().__init__()
        self.gpt = gpt

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.gpt(input_ids=ids, labels=labels).loss


def test_gpt2_three_adamw_steps_equal_eager(pool):
    """Tied weights: the vocabulary-split LM head and the token embedding read one parameter."""
    gpt, (ids,) = build_model("gpt2", vocab=VOCAB)
    model = _CausalLM(gpt)
    reference = copy.deepcopy(model)
    with shardwise.compile(
        model, CLUSTER, example_inputs=(ids, ids), mode="train", loss_fn=lambda loss: loss,
        optimizer=OPTIMIZER, constraints=TP, workers=pool,
    ) as cm:  # fmt: skip
        _vocab_split(cm.plan, "gpt.lm_head")
        ce = [s for s in cm.plan.strategies if s.node.startswith("cross_entropy")]
        assert any(("tp", "c") in s.split for s in ce), [s.split for s in ce]
        losses = [cm.train_step(ids, ids) for _ in range(3)]
        state = cm.state_dict()
    assert_training_equal(losses, state, *eager_training(reference, (ids, ids), lambda loss: loss, OPTIMIZER))


def test_untied_lm_head_and_vocabulary_parallel_loss_equal_eager(pool):
    """The bench's shape of model: the LM head split on its 1001 rows feeds the vocabulary-parallel cross
    entropy (classes split 501 + 500, never gathered); ignored targets included."""
    torch.manual_seed(0)
    model = _UntiedLM()
    ids = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(2))
    labels[0, :5] = -100
    reference = copy.deepcopy(model)
    # nominal cpu:2 links: on communication-free ones storing the head split on either dim costs the same (its
    # redistribution is free), and the planner may store it by columns and re-split it by rows before use
    with shardwise.compile(
        model, "cpu:2", example_inputs=(ids, labels), mode="train", loss_fn=lambda loss: loss,
        optimizer=OPTIMIZER, constraints=TP, workers=pool,
    ) as cm:  # fmt: skip
        _vocab_split(cm.plan)
        tp = cm.plan.mesh.axis_names.index("tp")
        assert dict(cm.plan.param_placements)["lm_head.weight"].placements[tp] == Shard(0)  # stored in pieces
        ce = [s for s in cm.plan.strategies if s.node.startswith("cross_entropy")]
        assert any(("tp", "c") in s.split for s in ce), [s.split for s in ce]
        losses = [cm.train_step(ids, labels) for _ in range(3)]
        state = cm.state_dict()
    assert_training_equal(losses, state, *eager_training(reference, (ids, labels), lambda loss: loss, OPTIMIZER))


def test_checkpoint_of_uneven_pieces_loads_under_data_parallel(pool, tmp_path):
    """A checkpoint saved with the LM head in 501 + 500 row pieces (weights and AdamW state) loads under
    dp=2 (whole tensors) bit-identical, and training goes on equal to eager."""
    torch.manual_seed(0)
    model = _UntiedLM()
    ids = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(2))
    reference = copy.deepcopy(model)
    args = dict(example_inputs=(ids, labels), mode="train", loss_fn=lambda loss: loss, optimizer=OPTIMIZER)
    with shardwise.compile(copy.deepcopy(model), CLUSTER, constraints=TP, workers=pool, **args) as cm:
        _vocab_split(cm.plan)
        cm.train_step(ids, labels)
        cm.train_step(ids, labels)
        cm.save_checkpoint(tmp_path / "ckpt")
        state, opt = cm.state_dict(), cm.optimizer_state_dict()
    assert opt is not None
    with shardwise.compile(copy.deepcopy(model), "cpu:2", constraints={"dp": 2}, workers=pool, **args) as cm:
        cm.load_checkpoint(tmp_path / "ckpt")
        loaded, loaded_opt = cm.state_dict(), cm.optimizer_state_dict()
        last = cm.train_step(ids, labels)
        final = cm.state_dict()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key
    assert loaded_opt is not None and loaded_opt["state"].keys() == opt["state"].keys()
    for key, states in opt["state"].items():
        for name, value in states.items():
            other = loaded_opt["state"][key][name]
            assert torch.equal(other, value) if torch.is_tensor(value) else other == value, (key, name)
    expected, want = eager_training(reference, (ids, labels), lambda loss: loss, OPTIMIZER)
    assert_training_equal([last], final, expected[-1:], want)
