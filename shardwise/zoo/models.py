"""Zoo builders. Sizes: ``tiny`` (tests), ``small`` (demo), or explicit options ``layers=, hidden=, ...``."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from shardwise.errors import UserInputError

__all__ = ["build_model", "MODEL_NAMES", "model_help", "MLP", "ConvNet"]

Built = tuple[nn.Module, tuple[Any, ...]]

_SIZES: dict[str, dict[str, int]] = {
    "tiny": {"layers": 2, "hidden": 64, "heads": 4, "vocab": 128, "seq": 16, "batch": 4},
    "small": {"layers": 4, "hidden": 128, "heads": 4, "vocab": 512, "seq": 32, "batch": 8},
    "base": {"layers": 12, "hidden": 768, "heads": 12, "vocab": 50257, "seq": 1024, "batch": 8},
}


class MLP(nn.Module):
    """A plain multi-layer perceptron: Linear → GELU blocks with a residual and LayerNorm."""

    def __init__(self, hidden: int = 64, layers: int = 2, inputs: int = 32, outputs: int = 10) -> None:
        super().__init__()
        self.proj_in = nn.Linear(inputs, hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden))
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj_in(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(self.norm(h))


class ConvNet(nn.Module):
    """A small convolutional classifier (conv, batch norm, pooling)."""

    def __init__(self, channels: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, channels, 3, padding=1),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(channels, 2 * channels, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Linear(2 * channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def _opts(size: str, overrides: dict[str, int]) -> dict[str, int]:
    if size not in _SIZES:
        raise UserInputError(
            f"unknown size {size!r}: choose one of {', '.join(_SIZES)} or pass explicit options"
        )
    opts = dict(_SIZES[size])
    for k, v in overrides.items():
        if k not in opts:
            raise UserInputError(f"unknown model option {k!r}: allowed options are {', '.join(opts)}")
        opts[k] = int(v)
    return opts


def _ids(o: dict[str, int], device: str) -> torch.Tensor:
    if device == "meta":
        return torch.empty(o["batch"], o["seq"], dtype=torch.long, device="meta")
    return torch.randint(0, o["vocab"], (o["batch"], o["seq"]), generator=torch.Generator().manual_seed(1))


def _gpt2(o: dict[str, int], device: str) -> Built:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        n_layer=o["layers"], n_embd=o["hidden"], n_head=o["heads"], vocab_size=o["vocab"],
        n_positions=max(o["seq"], 64), attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, use_cache=False,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return GPT2LMHeadModel(cfg), (_ids(o, device),)


def _llama(o: dict[str, int], device: str) -> Built:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        num_hidden_layers=o["layers"], hidden_size=o["hidden"], intermediate_size=int(o["hidden"] * 8 // 3 // 8 * 8),
        num_attention_heads=o["heads"], num_key_value_heads=o["heads"], vocab_size=o["vocab"],
        max_position_embeddings=max(o["seq"], 64), use_cache=False, attention_dropout=0.0,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return LlamaForCausalLM(cfg), (_ids(o, device),)


def _bert(o: dict[str, int], device: str) -> Built:
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        num_hidden_layers=o["layers"], hidden_size=o["hidden"], intermediate_size=4 * o["hidden"],
        num_attention_heads=o["heads"], vocab_size=o["vocab"], max_position_embeddings=max(o["seq"], 64),
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return BertModel(cfg, add_pooling_layer=True), (_ids(o, device),)


def _vit(o: dict[str, int], device: str) -> Built:
    from transformers import ViTConfig, ViTModel

    image = 32
    cfg = ViTConfig(
        num_hidden_layers=o["layers"], hidden_size=o["hidden"], intermediate_size=4 * o["hidden"],
        num_attention_heads=o["heads"], image_size=image, patch_size=8, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    shape = (o["batch"], 3, image, image)
    x = torch.empty(shape, device="meta") if device == "meta" else torch.randn(shape, generator=_gen())
    return ViTModel(cfg), (x,)


def _mlp(o: dict[str, int], device: str) -> Built:
    shape = (o["batch"], 32)
    x = torch.empty(shape, device="meta") if device == "meta" else torch.randn(shape, generator=_gen())
    return MLP(hidden=o["hidden"], layers=o["layers"]), (x,)


def _convnet(o: dict[str, int], device: str) -> Built:
    shape = (o["batch"], 3, 16, 16)
    x = torch.empty(shape, device="meta") if device == "meta" else torch.randn(shape, generator=_gen())
    return ConvNet(channels=8), (x,)


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(2)


_BUILDERS: dict[str, Callable[[dict[str, int], str], Built]] = {
    "gpt2": _gpt2,
    "llama": _llama,
    "bert": _bert,
    "vit": _vit,
    "mlp": _mlp,
    "convnet": _convnet,
}
MODEL_NAMES = tuple(_BUILDERS)


def model_help() -> str:
    opts = ", ".join(_SIZES["tiny"])
    return f"models: {', '.join(MODEL_NAMES)}; sizes: {', '.join(_SIZES)}; options: {opts} (e.g. gpt2:small,layers=6)"


def parse_model_name(text: str) -> tuple[str, str, dict[str, int]]:
    """``"gpt2:small,layers=6"`` → ("gpt2", "small", {"layers": 6})."""
    name, _, rest = text.partition(":")
    size = "tiny"
    overrides: dict[str, int] = {}
    for part in filter(None, rest.split(",")):
        if "=" in part:
            k, _, v = part.partition("=")
            try:
                overrides[k.strip()] = int(v)
            except ValueError:
                raise UserInputError(f"model option {part!r}: the value must be an integer") from None
        else:
            size = part.strip()
    return name, size, overrides


def build_model(
    name: str, size: str = "tiny", *, device: str = "cpu", seed: int = 0, **overrides: int
) -> tuple[nn.Module, tuple[Any, ...]]:
    """Build a zoo model with random weights (seeded) and matching example inputs.

    ``name`` may carry options: ``build_model("gpt2:small,layers=6")``. ``device="meta"`` allocates nothing.
    """
    if ":" in name:
        name, size, parsed = parse_model_name(name)
        overrides = {**parsed, **overrides}
    if name not in _BUILDERS:
        raise UserInputError(f"unknown model {name!r}. {model_help()}")
    opts = _opts(size, overrides)
    torch.manual_seed(seed)
    ctx = torch.device("meta") if device == "meta" else contextlib.nullcontext()
    with ctx:
        model, inputs = _BUILDERS[name](opts, device)
    model.eval()
    return model, inputs
