"""Large published model configurations for planning on the meta device (no weights are allocated).

Each factory returns ``(model, example_inputs, loss_fn)`` and can be named on the command line:
``shardwise plan bench/big_models.py:mixtral_8x7b --meta -c dgx-h100x4 --mode train --precision bf16``.
Built under ``torch.device("meta")`` by the CLI; the factories also work when called directly inside such a
context (``with torch.device("meta"): ...``).

- ``gpt3_175b``: GPT-3 175B (Brown et al. 2020, Table 2.1: 96 layers, d_model 12288, 96 heads, context 2048,
  batch 3.2M tokens; issue 15 plans it at batch 1536 x 2048, Megatron-LM's 2021 setting), as the zoo's GPT-2
  architecture at that size (vocabulary 50257).
- ``mixtral_8x7b``: transformers' ``MixtralConfig()`` defaults, which are Mixtral-8x7B's published
  configuration (32 layers, hidden 4096, 8 experts, 2 per token, expert FFN 14336, 32 heads, 8 KV heads,
  vocabulary 32000). Sequence 4096; the global batch (128 sequences) is our choice: none is published.
- ``deepseek_v3``: transformers' ``DeepseekV3Config()`` defaults, which are DeepSeek-V3's published
  configuration (61 layers, the first 3 dense, hidden 7168, MLA with q/kv LoRA ranks 1536/512, 128 heads,
  256 routed experts + 1 shared, 8 per token, expert FFN 2048, vocabulary 129280). Sequence 4096 and global
  batch 15360 sequences (DeepSeek-V3 technical report, 4.2: the batch size is raised to 15360 in training).
  The multi-token-prediction module is not part of transformers' model and is not planned.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["gpt3_175b", "mixtral_8x7b", "deepseek_v3", "MODELS"]


def _loss(out: Any) -> torch.Tensor:
    return out.logits.float().mean()


def _ids(batch: int, seq: int) -> torch.Tensor:
    return torch.zeros(batch, seq, dtype=torch.long)


def gpt3_175b(batch: int = 1536, layers: int = 96) -> tuple[torch.nn.Module, tuple[torch.Tensor], Any]:
    from shardwise.zoo import build_model

    model, inputs = build_model(
        "gpt2", device="meta", layers=layers, hidden=12288, heads=96, vocab=50257, seq=2048, batch=batch
    )
    return model, tuple(inputs), _loss


def _hf(config: Any, batch: int, seq: int) -> tuple[torch.nn.Module, tuple[torch.Tensor], Any]:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        ids = _ids(batch, seq)
    return model, (ids,), _loss


def mixtral_8x7b(batch: int = 128, seq: int = 4096) -> tuple[torch.nn.Module, tuple[torch.Tensor], Any]:
    from transformers import MixtralConfig

    return _hf(MixtralConfig(), batch, seq)


def deepseek_v3(batch: int = 15360, seq: int = 4096) -> tuple[torch.nn.Module, tuple[torch.Tensor], Any]:
    from transformers import DeepseekV3Config

    return _hf(DeepseekV3Config(), batch, seq)


MODELS = {"gpt3_175b": gpt3_175b, "mixtral_8x7b": mixtral_8x7b, "deepseek_v3": deepseek_v3}
