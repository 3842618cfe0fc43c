"""The per-model figures of the serving prices (``costs.serving.ServingModel``), from a HuggingFace configuration.

The model is built from its configuration on the meta device (nothing is allocated or downloaded) and its
parameters are counted: one decoder layer's parameters, its matmul weights (2-D weights: ``nn.Linear`` and
GPT-2's ``Conv1D``) with their input and output widths, the token and position embeddings and whether the
output head is tied to the token embedding. Heads, key/value heads (GQA), head width, MLP width and
vocabulary come from the configuration.

The kernels one pass launches (what a host that dispatches every op pays for, ``efficiency.op_overhead_s``)
are counted on a **meta-device trace** of a one-layer copy of the configuration (``frontend.trace``): the ops
of the layer by the price list's cost class (matmuls, attention, other kernels, views) and the ops outside it.

MODEL is a published configuration we know by name (``PUBLISHED``: the figures of each model's
``config.json`` on the HuggingFace hub, or of its paper where the hub has none), a zoo name
(``gpt2:small``, ``llama:tiny``) or a path to a ``config.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from shardwise.costs.serving import ServingModel
from shardwise.errors import UserInputError

__all__ = ["PUBLISHED", "serving_model", "serving_model_from_config"]

#: published configurations (config.json of each model on the HuggingFace hub; OPT-175B from Zhang et al.,
#: OPT (2022), Table 1, with the OPT family's vocabulary and positions)
_OPT = {
    "model_type": "opt",
    "vocab_size": 50272,
    "max_position_embeddings": 2048,
    "do_layer_norm_before": True,
}
PUBLISHED: dict[str, dict[str, Any]] = {
    "facebook/opt-13b": {**_OPT, "hidden_size": 5120, "num_hidden_layers": 40, "num_attention_heads": 40,
                         "ffn_dim": 20480, "word_embed_proj_dim": 5120},
    "facebook/opt-66b": {**_OPT, "hidden_size": 9216, "num_hidden_layers": 64, "num_attention_heads": 72,
                         "ffn_dim": 36864, "word_embed_proj_dim": 9216},
    "facebook/opt-175b": {**_OPT, "hidden_size": 12288, "num_hidden_layers": 96, "num_attention_heads": 96,
                          "ffn_dim": 49152, "word_embed_proj_dim": 12288},
    "meta-llama/Llama-2-7b-hf": {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32,
                                 "num_attention_heads": 32, "num_key_value_heads": 32, "intermediate_size": 11008,
                                 "vocab_size": 32000, "max_position_embeddings": 4096},
    "meta-llama/Llama-2-70b-hf": {"model_type": "llama", "hidden_size": 8192, "num_hidden_layers": 80,
                                  "num_attention_heads": 64, "num_key_value_heads": 8, "intermediate_size": 28672,
                                  "vocab_size": 32000, "max_position_embeddings": 4096},
    "meta-llama/Meta-Llama-3-8B": {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32,
                                   "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336,
                                   "vocab_size": 128256, "max_position_embeddings": 8192, "rope_theta": 500000.0},
    "openai-community/gpt2": {"model_type": "gpt2"},
}  # fmt: skip
_SHORT = {name.split("/")[-1].lower(): name for name in PUBLISHED}


def _first(config: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def _layer_list(model: Any, layers: int) -> Any:
    from torch import nn

    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == layers]
    if not lists:
        raise UserInputError(
            f"{type(model).__name__} has no list of {layers} decoder layers: serve-plan prices "
            "decoder-only transformers (a model with a ModuleList of its layers)"
        )
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


#: tokens of the one-layer trace the per-token figures are divided by
TRACE_TOKENS = 8


def _op_counts(config: Any) -> dict[str, Any]:
    """Kernels and views of one decoder layer and of the rest of a pass, on a meta-device trace of a one-layer
    copy of ``config`` (see the module docstring), and the layer's memory-bound ops per token (their price-list
    name, float32 bytes and elements); {} when the copy does not trace."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    from shardwise.costs.compute import cost_class, op_work
    from shardwise.frontend.trace import trace

    one = copy.deepcopy(config)
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        if getattr(one, name, None) is not None:
            setattr(one, name, 1)
    one.use_cache = False
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(one).eval()
        blocks = _layer_list(model, 1)
        prefix = next(n for n, m in model.named_modules() if m is blocks) + ".0"
        ids = torch.zeros((1, TRACE_TOKENS), dtype=torch.long, device="meta")
        graph, _ = trace(model, (ids,))
    except Exception:  # a model the frontend cannot trace keeps the default counts
        return {}
    counts: dict[str, Any] = {"layer_kernels": 0, "layer_views": 0, "edge_kernels": 0, "edge_views": 0}
    memory_ops = []
    for node in graph.nodes:
        where = "layer" if node.module_path == prefix or node.module_path.startswith(prefix + ".") else "edge"
        cls = cost_class(node.op)
        if cls == "free":
            counts[f"{where}_views"] += 1
        elif where == "edge" or cls == "memory":
            counts[f"{where}_kernels"] += 1
        if where == "layer" and cls == "memory":
            work = op_work(node, 1, "fp32")
            memory_ops.append((work.op, work.bytes / TRACE_TOKENS, work.elements / TRACE_TOKENS))
        if cls == "gemm":  # the matmuls' kind (a layer's first; the head: the pass's last matmul outside the layers)
            kind = op_work(node, 1, "fp32").op
            if where == "layer":
                counts.setdefault("matmul_op", kind)
            else:
                counts["head_op"] = kind
    counts["layer_memory_ops"] = tuple(memory_ops)
    return counts


def serving_model_from_config(config: Any, name: str, source: str, weight_bytes: int = 2) -> ServingModel:
    """Build ``config``'s causal LM on the meta device and count its parameters (see the module docstring)."""
    import torch
    from transformers import AutoModelForCausalLM

    if _first(config, "num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"):
        raise UserInputError(
            f"{name} is a mixture-of-experts model: serving prices cover dense decoder-only "
            "models for now (a dense model, or plan training/inference with `shardwise plan`)"
        )
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError) as exc:
        raise UserInputError(f"transformers cannot build a causal LM for {name}: {exc}") from None
    layers = int(_first(config, "num_hidden_layers", "n_layer", "num_layers"))
    hidden = int(_first(config, "hidden_size", "n_embd", "d_model"))
    heads = int(_first(config, "num_attention_heads", "n_head"))
    kv_heads = int(_first(config, "num_key_value_heads", "n_kv_heads", default=heads))
    head_dim = int(_first(config, "head_dim", default=hidden // heads))
    ffn = int(_first(config, "intermediate_size", "ffn_dim", "n_inner", default=4 * hidden) or 4 * hidden)
    blocks = _layer_list(model, layers)
    layer = blocks[0]
    weights = [p for p in layer.parameters() if p.dim() == 2]
    gated = any(
        n.endswith(("gate_proj.weight", "w1.weight", "gate_up_proj.weight"))
        for n, _ in layer.named_parameters()
    )
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is None or head.weight is embed
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    layer_params = sum(p.numel() for p in layer.parameters())
    in_layers = sum(p.numel() for p in blocks.parameters())
    positions = sum(
        m.weight.numel() for m in model.modules()
        if isinstance(m, torch.nn.Embedding) and m.weight is not embed and not any(m is x for x in blocks.modules())
    )  # fmt: skip
    head_params = 0 if tied else head.weight.numel()
    final = total - in_layers - embed.numel() - positions - head_params
    counts = _op_counts(config)
    if in_layers != layers * layer_params:  # layers of different sizes: price the average one
        layer_params = round(in_layers / layers)
    return ServingModel(
        name=name, layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads, head_dim=head_dim, ffn=ffn,
        gated=gated, vocab=int(embed.shape[0]), layer_params=layer_params,
        layer_matmul_params=sum(p.numel() for p in weights), layer_matmul_io=sum(p.shape[0] + p.shape[1] for p in weights),
        layer_matmuls=len(weights), embed_params=embed.numel(), position_params=positions, head_params=head_params,
        final_params=max(final, 0), weight_bytes=weight_bytes, kv_bytes=weight_bytes, act_bytes=weight_bytes,
        source=source + (", op counts from a meta-device trace of one layer" if counts else ""), **counts,
    )  # fmt: skip


def serving_model(spec: str, weight_bytes: int = 2) -> ServingModel:
    """The serving figures of MODEL ``spec`` (see the module docstring)."""
    from transformers import AutoConfig

    text = spec.strip()
    key = PUBLISHED.get(text) and text or _SHORT.get(text.lower())
    if key:
        kw = dict(PUBLISHED[key])
        config = AutoConfig.for_model(kw.pop("model_type"), **kw)
        return serving_model_from_config(
            config,
            key,
            f"published config of {key} (HF config.json), parameters counted on the meta device",
            weight_bytes,
        )
    path = Path(text)
    if text.endswith(".json"):
        if not path.is_file():
            raise UserInputError(
                f"config file {text} not found: give a HuggingFace config.json path, a built-in "
                f"name ({', '.join(PUBLISHED)}) or a zoo model (gpt2:small)"
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            model_type = data.pop("model_type")
        except (json.JSONDecodeError, KeyError) as exc:
            raise UserInputError(
                f"{text} is not a HuggingFace config.json with a model_type ({exc})"
            ) from None
        config = AutoConfig.for_model(model_type, **data)
        return serving_model_from_config(config, path.stem, f"{text}, parameters counted on the meta device",
                                         weight_bytes)  # fmt: skip
    from shardwise.zoo import build_model
    from shardwise.zoo.models import parse_model_name

    name, _, _ = parse_model_name(text)
    if name not in ("gpt2", "llama"):
        raise UserInputError(
            f"MODEL {text!r}: serve-plan takes a decoder-only language model: a built-in name "
            f"({', '.join(PUBLISHED)}), a zoo LM (gpt2:small, llama:tiny) or a config.json path"
        )
    model, _ = build_model(text, device="meta")
    return serving_model_from_config(model.config, text, f"zoo model {text}, parameters counted on the meta "
                                     "device", weight_bytes)  # fmt: skip
