"""The step module that generation traces: a causal LM with a static KV cache held in buffers.

``StepModule(model, max_batch, max_seq)`` wraps a HuggingFace causal LM. Its ``forward(input_ids,
position_ids, attention_mask, cache_position)`` runs the model on ``T`` new tokens per row (the prompt in the
prefill, one token in a decode step) and returns the logits of the last position, ``[B, vocab]``. The keys
and values of every layer live in buffers ``kv_cache.<layer>.keys`` / ``.values`` of shape
``[max_batch, kv_heads, max_seq, head_dim]``; a step writes its new keys and values at ``cache_position``
in place (``index_copy_``), which torch.export turns into a buffer update. So one trace is one step, the
cache stays with the program between steps, and a planner places the cache buffers as it places weights
(split by heads under tensor parallelism when the heads divide).

Conventions the caller (the program's generation loop) keeps, and why:

* prompts are **left padded** to the traced prompt length: every row then writes the same cache slots at
  every step (``cache_position`` is one vector for the batch), and the last position holds every row's next
  token (what HuggingFace recommends for decoder-only models, and what ``generate`` does with such prompts);
* ``attention_mask`` is ``[B, max_seq]`` over cache slots: 1 for the real prompt tokens and for every slot
  after the prompt window (the causal part of the mask, built here from ``cache_position``, hides the slots
  not written yet); ``position_ids`` are the tokens' positions in their own sequence (pads excluded), as
  HuggingFace computes them from the attention mask;
* every query may attend to its own slot, so the rows of pad tokens are never empty (no NaN is written into
  the cache); no real token ever attends to a pad slot.

The model's weights keep their own state_dict names (the wrapper's prefix ``model.`` is stripped when
tracing), so the weights of the original model load as they are.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from shardwise.errors import UserInputError
from shardwise.ir.graph import Graph, Value

__all__ = [
    "StepModule", "CACHE_PREFIX", "MODEL_PREFIX", "cache_shape", "check_causal_lm", "example_step", "in_place_writes",
]  # fmt: skip

CACHE_PREFIX = "kv_cache."
MODEL_PREFIX = "model."


def check_causal_lm(model: nn.Module) -> None:
    """Raise UserInputError unless ``model`` is a HuggingFace causal LM (a language-model head and a config)."""
    config = getattr(model, "config", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if config is None or head is None or not hasattr(model, "generate"):
        raise UserInputError(
            f"mode='generate' needs a HuggingFace causal language model (a model with a language-model head, "
            f"e.g. from AutoModelForCausalLM); {type(model).__name__} has no such head. Load the model with "
            "AutoModelForCausalLM.from_pretrained / from_config, or compile it with mode='inference'"
        )
    if getattr(config, "is_encoder_decoder", False):
        raise UserInputError(
            f"mode='generate' runs decoder-only models; {type(model).__name__} is an encoder-decoder model: "
            "compile it with mode='inference'"
        )


def cache_shape(model: nn.Module, max_batch: int, max_seq: int) -> tuple[int, int, int, int]:
    """``[max_batch, kv_heads, max_seq, head_dim]``: one layer's key (or value) cache."""
    config = model.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    head_dim = getattr(config, "head_dim", None) or (hidden // heads if hidden and heads else None)
    if not (heads and kv_heads and head_dim):
        raise UserInputError(
            f"{type(model).__name__}: its config names no attention heads / head size (num_attention_heads, "
            "num_key_value_heads, head_dim), so its KV cache cannot be sized; mode='generate' supports "
            "standard multi-head or grouped-query attention models"
        )
    return (max_batch, int(kv_heads), max_seq, int(head_dim))


def _layers(model: nn.Module) -> int:
    config = model.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    raise UserInputError(f"{type(model).__name__}: its config names no number of layers (num_hidden_layers)")


class LayerCache(nn.Module):
    """One layer's keys and values: ``[max_batch, kv_heads, max_seq, head_dim]`` each, zeros at first."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.register_buffer("keys", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("values", torch.zeros(shape, dtype=dtype, device=device), persistent=False)


def _cache_class() -> type:
    """A transformers ``Cache`` over the step module's buffers (made on first use: transformers is imported
    only for generation)."""
    from transformers.cache_utils import Cache, CacheLayerMixin

    class BufferLayer(CacheLayerMixin):
        """transformers' cache-layer interface over two buffers; ``update`` writes at ``cache_position``."""

        is_compileable = True
        is_sliding = False

        def __init__(self, keys: torch.Tensor, values: torch.Tensor, cache_position: torch.Tensor) -> None:
            super().__init__()
            self.keys, self.values = keys, values
            self.cache_position = cache_position
            self.is_initialized = True

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            pass

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
            self.keys.index_copy_(2, self.cache_position, key_states)
            self.values.index_copy_(2, self.cache_position, value_states)
            return self.keys, self.values

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self.keys.shape[2], 0

        def get_seq_length(self) -> int:
            return 0

        def get_max_length(self) -> int:
            return self.keys.shape[2]

    class BufferCache(Cache):
        def __init__(self, layers: list[BufferLayer]) -> None:
            super().__init__(layers=layers)

    return BufferCache, BufferLayer


class StepModule(nn.Module):
    """A causal LM and its static KV cache: one prefill or decode step per call (see the module docstring)."""

    def __init__(self, model: nn.Module, max_batch: int, max_seq: int) -> None:
        super().__init__()
        check_causal_lm(model)
        self.model = model
        self.max_batch = max_batch
        self.max_seq = max_seq
        param = next(model.parameters())
        shape = cache_shape(model, max_batch, max_seq)
        self.kv_cache = nn.ModuleList(LayerCache(shape, param.dtype, param.device) for _ in range(_layers(model)))
        forward = inspect.signature(model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in forward else "past_key_values"
        self._keep_kwarg = "logits_to_keep" if "logits_to_keep" in forward else None

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
        cache_position: torch.Tensor,
    ) -> torch.Tensor:  # fmt: skip
        cache_class, layer_class = _cache_class()
        cache = cache_class([layer_class(c.keys, c.values, cache_position) for c in self.kv_cache])
        dtype = self.kv_cache[0].keys.dtype
        slots = torch.arange(self.max_seq, device=input_ids.device)
        written = slots[None, :] <= cache_position[:, None]  # [T, S]: causal over cache slots
        own = slots[None, :] == cache_position[:, None]  # every query sees its own slot (no empty row)
        allowed = (attention_mask[:, None, :].bool() & written[None]) | own[None]  # [B, T, S]
        mask = torch.zeros(allowed.shape, dtype=dtype, device=input_ids.device)
        mask = mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]  # [B, 1, T, S], additive
        kwargs: dict[str, Any] = {self._cache_kwarg: cache, "use_cache": True}
        if self._keep_kwarg:
            kwargs[self._keep_kwarg] = 1
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, **kwargs)
        logits = out.logits if hasattr(out, "logits") else out[0]
        return logits[:, -1, :]


def in_place_writes(graph: Graph) -> Graph:
    """``graph`` with every write into a cache buffer marked ``in_place`` (``Node.in_place``): an
    ``index_copy`` whose value is the update of the buffer it copies into, which no other op reads. Its
    ``bytes_moved`` becomes what an in-place write moves: the new keys (or values) read and written, and the
    index."""
    updates = {v.name: key for key, v in graph.buffer_updates}
    readers: dict[str, int] = {}
    for n in graph.nodes:
        for v in n.inputs:
            readers[v] = readers.get(v, 0) + 1
    keys = {p.name: p.key for p in graph.params}
    nodes = []
    for n in graph.nodes:
        target = n.args[0] if n.args else None
        if (
            n.op == "aten.index_copy.default" and isinstance(target, Value) and target.name in keys
            and updates.get(n.name) == keys[target.name] and readers.get(target.name) == 1
        ):  # fmt: skip
            index, source = (graph.spec_of(a.name) for a in n.args[2:4] if isinstance(a, Value))
            n = n.replace(in_place=True, bytes_moved=index.nbytes + 2 * source.nbytes)
        nodes.append(n)
    return graph.replace(nodes=tuple(nodes))


def example_step(max_batch: int, max_seq: int, tokens: int, device: torch.device | str = "cpu") -> tuple:
    """Example inputs of a step of ``tokens`` new tokens per row (ids 0, positions from 0)."""
    ids = torch.zeros((max_batch, tokens), dtype=torch.long, device=device)
    positions = torch.arange(tokens, device=device).expand(max_batch, tokens).contiguous()
    mask = torch.ones((max_batch, max_seq), dtype=torch.long, device=device)
    cache_position = torch.arange(tokens, device=device)
    return ids, positions, mask, cache_position
