"""Generation with a static KV cache in the generated program (issue 18, point 1).

``compile(mode="generate")`` traces a prefill step and a decode step of a HuggingFace causal LM, plans both
(the prefill with the decode plan's placements of the weights and the KV cache) and writes both programs
into one package; ``cm.generate`` runs greedy generation on the workers. The tokens must equal transformers'
``generate(do_sample=False)`` token for token: 32 new tokens, a batch of 4 prompts of different lengths, left
padded (what transformers recommends for decoder-only models; the program left pads whatever it is given).

Tensor-parallel plans (tp=2 on two gloo processes) are made for a cluster whose links are (nearly) free and
without sequence parallelism, as tests/e2e/test_parallel_equals_eager.py does: on the nominal cpu:2 links the
planner rightly runs these tiny models whole on each rank (a collective costs more than the layer), and the
point here is the split program. Each case checks that the plans split the weights, and the KV cache by
key/value heads over tp where they divide (grouped-query attention: 2 key/value heads; with one, multi-query,
the cache stays whole). With a larger model the planner splits the cache by heads on the nominal links as well
(a plan-only check). A tp=1 plan runs as the drop-in package's ``--generate`` entry in a plain process.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import shardwise
from shardwise.cluster.presets import cpu_cluster
from shardwise.errors import ShapeMismatchError, UserInputError
from shardwise.ir.placement import Shard

transformers = pytest.importorskip("transformers")

from shardwise.zoo.hf import tiny_causal_lm  # noqa: E402

pytestmark = pytest.mark.multiproc

NEW_TOKENS = 32
LENGTHS = (5, 9, 3, 12)  # the prompts of the batch (left padded to the longest)
MAX_SEQ, MAX_PROMPT = 48, 16
FREE_LINKS = cpu_cluster(2, latency=1e-9, bandwidth=1e14, name="cpu:2-free-links")
TP2 = {"tp": 2, "sp": 1}


def _prompts(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask of len(LENGTHS) prompts, left padded."""
    g = torch.Generator().manual_seed(seed)
    width = max(LENGTHS)
    ids = torch.zeros((len(LENGTHS), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(LENGTHS):
        ids[row, width - n :] = torch.randint(3, 128, (n,), generator=g)
        mask[row, width - n :] = 1
    return ids, mask


def _reference(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=True)


def _split_by_heads(plan) -> bool:
    """Every cache tensor ``[batch, kv_heads, slots, head_dim]`` split on its heads over tp."""
    tp = plan.mesh.axis_names.index("tp")
    caches = [spec for key, spec in plan.param_placements if key.startswith("kv_cache.")]
    return bool(caches) and all(spec.placements[tp] == Shard(1) for spec in caches)


def _weights_split(plan) -> bool:
    tp = plan.mesh.axis_names.index("tp")
    return any(
        isinstance(spec.placements[tp], Shard) for key, spec in plan.param_placements if not key.startswith("kv_")
    )


CASES = {  # name -> (model type, attention heads, key/value heads divide over tp=2?)
    "gpt2": ("gpt2", 4, True),
    "llama": ("llama", 4, True),  # grouped-query: 4 query heads, 2 key/value heads (zoo.hf's recipe)
    "qwen2": ("qwen2", 4, True),
    "llama-mqa": ("llama", 2, False),  # one key/value head: the cache cannot be split by heads
}


@pytest.mark.parametrize("case", list(CASES))
def test_tensor_parallel_generation_equals_transformers(pool, case):
    name, heads, divides = CASES[case]
    model, _ = tiny_causal_lm(name, heads=heads)
    ids, mask = _prompts()
    expected = _reference(model, ids, mask)
    with shardwise.compile(
        model, FREE_LINKS, mode="generate", max_batch=len(LENGTHS), max_seq=MAX_SEQ, max_prompt=MAX_PROMPT,
        constraints=TP2, workers=pool,
    ) as cm:  # fmt: skip
        assert cm.plan.degrees["tp"] == 2 and cm.prefill_plan.degrees["tp"] == 2
        assert _split_by_heads(cm.plan) == divides and _split_by_heads(cm.prefill_plan) == divides
        assert _weights_split(cm.plan)
        assert dict(cm.plan.param_placements) == dict(cm.prefill_plan.param_placements)
        out, timings = cm.generate(ids, mask, max_new_tokens=NEW_TOKENS, return_timings=True)
        if name == "gpt2":  # the same prompts padded on the right: the program left pads them itself
            right = torch.stack([torch.cat([r[m.bool()], r[~m.bool()]]) for r, m in zip(ids, mask, strict=True)])
            right_mask = torch.stack([torch.cat([m[m.bool()], m[~m.bool()]]) for m in mask])
            again = cm.generate(right, right_mask, max_new_tokens=NEW_TOKENS)
            assert torch.equal(again[:, ids.shape[1] :], out[:, ids.shape[1] :])
        if name == "llama":  # two end-of-sequence tokens: rows finish at different steps, on either token
            ends = (int(expected[0, ids.shape[1] + 5]), int(expected[2, ids.shape[1] + 9]))
            stopped = cm.generate(ids, mask, max_new_tokens=NEW_TOKENS, eos_token_id=ends, pad_token_id=0)
            reference = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                                       eos_token_id=list(ends), pad_token_id=0)  # fmt: skip
            assert torch.equal(stopped, reference)
    assert out.shape == expected.shape
    assert torch.equal(out, expected)
    assert timings["prefill_s"] > 0 and len(timings["decode_s"]) == expected.shape[1] - ids.shape[1] - 1


def test_the_planner_splits_the_cache_with_the_heads_on_nominal_links():
    """On the nominal cpu:2 links a Llama of hidden size 1024 decodes with tensor parallelism (the plan is
    made, not run): its attention is split by heads and each rank keeps its heads' part of the KV cache, in
    the decode and the prefill plan alike."""
    model, _ = tiny_causal_lm("llama", hidden=1024, heads=16, layers=2, vocab=1000, seq=256)
    cm = shardwise.compile(model, "cpu:2", mode="generate", max_batch=4, max_seq=256, max_prompt=128,
                           constraints={"tp": 2})  # fmt: skip
    assert _split_by_heads(cm.plan) and _split_by_heads(cm.prefill_plan)
    placements = dict(cm.plan.param_placements)
    assert placements["model.layers.0.self_attn.k_proj.weight"].placements[1] == Shard(0)  # by output rows
    assert placements["model.layers.0.self_attn.o_proj.weight"].placements[1] == Shard(1)


def test_drop_in_package_generates_with_one_process(tmp_path):
    """A tp=1 plan (one process) saved as a package and run by its ``--generate`` entry, as torchrun would
    start a rank (here WORLD_SIZE=1, no process group), equals transformers."""
    model, _ = tiny_causal_lm("llama")
    ids, mask = _prompts(seed=2)
    expected = _reference(model, ids, mask)
    cm = shardwise.compile(model, "cpu:1", mode="generate", max_batch=len(LENGTHS), max_seq=MAX_SEQ,
                           max_prompt=MAX_PROMPT)  # fmt: skip
    package = cm.save(tmp_path / "llama_gen")
    decode = (package / "decode" / "program.py").read_text()
    assert "w.kv_cache_keys.index_copy_(2, cache_position, " in decode  # written in place, by each layer
    assert "kv_cache_0_keys.copy_(" not in decode  # and needs no write-back
    torch.save((ids, mask), tmp_path / "prompts.pt")
    env = {**os.environ, "WORLD_SIZE": "1", "RANK": "0", "PYTHONPATH": str(tmp_path)}
    command = [sys.executable, "-m", "llama_gen", "--generate", "--weights", str(package / "model.safetensors"),
               "--prompts", str(tmp_path / "prompts.pt"), "--max-new-tokens", str(NEW_TOKENS),
               "--output", str(tmp_path / "out.pt")]  # fmt: skip
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    tokens, seconds = torch.load(tmp_path / "out.pt", weights_only=True)
    assert torch.equal(torch.cat([ids, tokens], dim=1), expected)
    assert seconds["prefill_s"] > 0
    # the package's entry says what it is for
    bare = subprocess.run(command[:3], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert bare.returncode != 0 and "--generate" in bare.stderr
    cm.close()


def test_errors_say_what_to_do():
    model, _ = tiny_causal_lm("gpt2")
    cm = shardwise.compile(model, "cpu:1", mode="generate", max_batch=2, max_seq=24, max_prompt=8)
    ids = torch.ones((2, 10), dtype=torch.long)
    with pytest.raises(ShapeMismatchError, match=r"at most 8 tokens: compile with max_prompt=10 or more"):
        cm.generate(ids)
    with pytest.raises(ShapeMismatchError, match=r"3 prompts, but .* max_batch=2: compile with max_batch=3"):
        cm.generate(torch.ones((3, 4), dtype=torch.long))
    with pytest.raises(ShapeMismatchError, match=r"Compile with max_seq=28 or more, or ask for fewer tokens"):
        cm.generate(torch.ones((2, 4), dtype=torch.long), max_new_tokens=20)
    with pytest.raises(UserInputError, match=r"compiled with mode='generate': call cm.generate"):
        cm.run(ids)
    with pytest.raises(UserInputError, match=r"save_checkpoint: a model compiled with mode='generate' has no state"):
        cm.save_checkpoint("unused")
    assert cm._pool is None  # every refusal came before any worker started
    base = transformers.AutoModel.from_config(model.config)  # the transformer without its language-model head
    with pytest.raises(UserInputError, match=r"has no such head. Load the model with AutoModelForCausalLM"):
        shardwise.compile(base, "cpu:1", mode="generate", max_batch=2, max_seq=16)
    with pytest.raises(UserInputError, match=r"max_seq=100 exceeds the 64 positions .*compile with max_seq <= 64"):
        shardwise.compile(model, "cpu:1", mode="generate", max_batch=2, max_seq=100)
    mistral, _ = tiny_causal_lm("mistral")  # zoo.hf gives it a sliding window of 4 tokens
    with pytest.raises(UserInputError, match=r"sliding window of 4 tokens.*compile with max_seq <= 4"):
        shardwise.compile(mistral, "cpu:1", mode="generate", max_batch=2, max_seq=16)
    with pytest.raises(UserInputError, match=r"needs max_seq, a positive number"):
        shardwise.compile(model, "cpu:1", mode="generate", max_batch=2)
