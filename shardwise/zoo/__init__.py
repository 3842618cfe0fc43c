"""Built-in models: small HuggingFace configs with random weights (nothing is downloaded) and plain nets.

Each builder returns ``(model, example_inputs)``; the model is in eval mode with dropout off so that
eager PyTorch and the generated programs are deterministic and comparable.
"""

from __future__ import annotations

from shardwise.zoo.models import MODEL_NAMES, build_model, model_help

__all__ = ["build_model", "MODEL_NAMES", "model_help"]
