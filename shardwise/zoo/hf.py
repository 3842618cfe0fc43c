"""Tiny random-weight models of transformers' causal-LM architectures, by model type (``"mixtral"``).

One generic recipe shrinks any architecture's default configuration: 2 layers, hidden 64, 4 heads (2 key/value
heads), vocabulary 128, 4 experts (2 per token), sliding windows of 4 tokens, every dropout 0; attributes an
architecture lacks are left alone, and ``_OVERRIDES`` adds what a few architectures need on top. Nothing is
downloaded. ``ARCHITECTURES`` names the architectures shardwise's tests compile by default, by family, and
``MORE_ARCHITECTURES`` others the recipe configures.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from shardwise.errors import UserInputError

__all__ = ["ARCHITECTURES", "MORE_ARCHITECTURES", "FAMILIES", "tiny_causal_lm", "all_causal_lm_types"]

# model type -> family: the architectures tests/e2e/test_hf_architectures.py runs by default
ARCHITECTURES: dict[str, str] = {
    **dict.fromkeys(
        ("gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma", "phi", "phi3", "opt", "bloom", "falcon", "gpt_neox",
         "gptj", "ctrl", "olmo2", "starcoder2", "cohere"),
        "dense",
    ),
    **dict.fromkeys(("gemma2", "gemma3_text", "cohere2", "gpt_neo", "qwen2_sw"), "sliding-window"),
    **dict.fromkeys(
        ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "phimoe", "granitemoe", "jetmoe", "dbrx"), "moe"
    ),
    **dict.fromkeys(("deepseek_v3", "minicpm3"), "mla"),
    **dict.fromkeys(("bart", "marian", "pegasus"), "encoder-decoder"),
    **dict.fromkeys(("mamba", "jamba"), "hybrid"),
}
# more architectures the recipe configures (the test runs them with SHARDWISE_HF_ARCHITECTURES=more)
MORE_ARCHITECTURES: dict[str, str] = {
    **dict.fromkeys(
        ("biogpt", "olmo", "stablelm", "granite", "gpt_bigcode", "xglm", "persimmon", "helium", "glm", "smollm3",
         "nemotron", "codegen"),
        "dense",
    ),
    "deepseek_v2": "mla",
    **dict.fromkeys(("mbart", "blenderbot"), "encoder-decoder"),
    "recurrent_gemma": "hybrid",
}
FAMILIES = ("dense", "sliding-window", "moe", "mla", "encoder-decoder", "hybrid")

_LAYERS = ("num_hidden_layers", "num_layers", "n_layer", "n_layers", "encoder_layers", "decoder_layers",
           "num_decoder_layers")  # fmt: skip
_HIDDEN = ("hidden_size", "n_embd", "d_model")
_HEADS = ("num_attention_heads", "n_head", "num_heads", "n_heads", "encoder_attention_heads",
          "decoder_attention_heads")  # fmt: skip
_KV_HEADS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")
_FFN = ("intermediate_size", "ffn_hidden_size", "dff", "encoder_ffn_dim", "decoder_ffn_dim", "n_inner", "d_ff",
        "ffn_dim")  # fmt: skip
_POSITIONS = ("max_position_embeddings", "n_positions", "n_ctx")
_FIXED: dict[str, Any] = {
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64, "num_local_experts": 4, "num_experts": 4,
    "n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1, "n_group": 1, "topk_group": 1,
    "first_k_dense_replace": 1, "kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8, "v_head_dim": 8, "sliding_window": 4, "window_size": 4, "use_cache": False,
    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 2, "rotary_dim": 8,
}  # fmt: skip
# what single architectures need besides the generic recipe (config attributes)
_OVERRIDES: dict[str, dict[str, Any]] = {
    "qwen2_sw": {"use_sliding_window": True, "max_window_layers": 0},
    "deepseek_v2": {"head_dim": 8, "num_key_value_heads": 4, "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1},
    "deepseek_v3": {"head_dim": 8, "num_key_value_heads": 4},
    "minicpm3": {"head_dim": 8, "num_key_value_heads": 4},
    "nemotron": {"num_key_value_heads": 2},
    "dbrx": {"attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
             "ffn_config": {"ffn_hidden_size": 64, "moe_num_experts": 4, "moe_top_k": 2}},
}  # fmt: skip
_ALIASES = {"qwen2_sw": "qwen2"}  # test names of a second configuration of one model type


def all_causal_lm_types() -> tuple[str, ...]:
    """Every model type transformers maps to a causal-LM class."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return tuple(sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES))


def _config(model_type: str, layers: int, hidden: int, heads: int, vocab: int, positions: int) -> Any:
    from transformers import AutoConfig

    base = _ALIASES.get(model_type, model_type)
    try:
        defaults = AutoConfig.for_model(base).to_dict()
    except ValueError as exc:
        raise UserInputError(f"transformers has no architecture {base!r}: {exc}") from None
    sizes: dict[str, Any] = {**dict.fromkeys(_LAYERS, layers), **dict.fromkeys(_HIDDEN, hidden),
                             **dict.fromkeys(_HEADS, heads), **dict.fromkeys(_KV_HEADS, max(1, heads // 2)),
                             **dict.fromkeys(_FFN, 2 * hidden), **dict.fromkeys(_POSITIONS, positions),
                             "head_dim": hidden // heads, "kv_channels": hidden // heads, "vocab_size": vocab,
                             **_FIXED}  # fmt: skip
    kw = {k: v for k, v in sizes.items() if k in defaults and (defaults[k] is not None or k == "head_dim")}
    for k, v in defaults.items():
        if isinstance(v, float) and not isinstance(v, bool) and ("dropout" in k or "pdrop" in k):
            kw[k] = 0.0
    types = defaults.get("layer_types")
    if isinstance(types, list) and types:  # keep each kind of layer once (sliding and full attention, ...)
        kinds = list(dict.fromkeys(types))
        kw["layer_types"] = (kinds * layers)[:layers]
    if isinstance(defaults.get("attention_types"), list):  # GPT-Neo: global and local layers
        kw["attention_types"] = [[["global", "local"], max(1, layers // 2)]]
    kw.update(_OVERRIDES.get(model_type, {}))
    return AutoConfig.for_model(base, **kw)


def tiny_causal_lm(
    model_type: str, *, layers: int = 2, hidden: int = 64, heads: int = 4, vocab: int = 128, seq: int = 8,
    batch: int = 2, seed: int = 0,
) -> tuple[nn.Module, tuple[torch.Tensor]]:  # fmt: skip
    """The architecture ``model_type`` (a transformers model type, or a name of ``ARCHITECTURES``) with random
    weights (seeded), in eval mode, and example token ids ``[batch, seq]``."""
    from transformers import AutoModelForCausalLM

    config = _config(model_type, layers, hidden, heads, vocab, max(64, seq))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
    return model, (ids,)
