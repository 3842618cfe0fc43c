"""The routed experts of a mixture-of-experts layer as one op: ``shardwise.moe_experts``.

transformers 5 writes the experts of its MoE models (Mixtral, Qwen3-MoE, OLMoE, ...) as one module that takes
the tokens, the experts each token is routed to and their weights, and holds every expert's weights in two
3-D parameters (``gate_up_proj``: experts x 2 intermediate x hidden, ``down_proj``: experts x hidden x
intermediate). Traced as it is, that module becomes a sort of the rows by expert and one matmul per expert over
a number of rows read from the routing at run time: ops no planner can split. While torch.export traces,
:func:`experts_as_one_op` calls the custom op ``shardwise::moe_experts`` in place of the module's forward
instead, so the IR holds one node per layer's experts, whose annotation (``ir.registry``) lets the tokens be
split like any batch and whose expert-parallel form (``passes.sharding.experts``) splits the experts.

The op computes what the module computes, dropless (``runtime.lib.moe.moe_experts``, also the code generated
programs call). A module is replaced only when its computation is that one: gated experts (``act(gate) * up``,
the default gate of transformers' experts interface) without biases, post-expert norms or transposed weights,
with an activation the runtime knows; any other experts module is traced as it is.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch
from torch import nn

from shardwise.runtime.lib.moe import ACTIVATIONS, moe_experts

__all__ = ["OP", "experts_as_one_op", "activation_of", "replaceable"]

OP = "shardwise.moe_experts.default"  # the IR's name of the op


@torch.library.custom_op("shardwise::moe_experts", mutates_args=())
def _moe_experts(
    hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
    activation: str,
) -> torch.Tensor:  # fmt: skip
    return moe_experts(hidden, index, weights, gate_up, down, activation)


@_moe_experts.register_fake
def _(hidden, index, weights, gate_up, down, activation):  # noqa: ANN001, ANN202
    return torch.empty_like(hidden)


# activation modules by class name (transformers' ACT2FN classes and torch's) -> the runtime's name
_ACTIVATION_CLASSES = {
    "SiLU": "silu", "SiLUActivation": "silu", "GELU": "gelu", "GELUActivation": "gelu",
    "GELUTanh": "gelu_tanh", "PytorchGELUTanh": "gelu_tanh", "NewGELUActivation": "gelu_tanh", "ReLU": "relu",
}  # fmt: skip


def activation_of(module: nn.Module) -> str | None:
    """The runtime's name of the experts' activation (``module.act_fn``), None when it is not one it knows."""
    act = getattr(module, "act_fn", None)
    if isinstance(act, nn.GELU):
        return "gelu" if act.approximate == "none" else "gelu_tanh"
    name = _ACTIVATION_CLASSES.get(type(act).__name__)
    return name if name in ACTIVATIONS else None


def replaceable(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers experts module whose computation ``moe_experts`` is (see the module
    docstring)."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not (isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor)):
        return False
    if gate_up.dim() != 3 or down.dim() != 3 or gate_up.shape[0] != down.shape[0]:
        return False
    if gate_up.shape[1] != 2 * down.shape[2] or gate_up.shape[2] != down.shape[1]:
        return False
    flags = (getattr(module, "has_gate", False), not getattr(module, "has_bias", True),
             not getattr(module, "is_transposed", True), not getattr(module, "has_post_expert_norm", True),
             getattr(module, "is_concatenated", True))  # fmt: skip
    if not all(flags):
        return False
    gate = getattr(type(module), "_apply_gate", None)
    if gate is None or getattr(gate, "__name__", "") != "_default_apply_gate":
        return False
    return activation_of(module) is not None


def _forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
             top_k_weights: torch.Tensor) -> torch.Tensor:  # fmt: skip
    activation = activation_of(self)
    assert activation is not None
    return torch.ops.shardwise.moe_experts(
        hidden_states, top_k_index, top_k_weights, self.gate_up_proj, self.down_proj, activation
    )


@contextlib.contextmanager
def experts_as_one_op(model: nn.Module) -> Iterator[int]:
    """While the context is open, every replaceable experts module of ``model`` calls ``shardwise::moe_experts``;
    yields how many were replaced. The modules are restored afterwards."""
    replaced = [m for m in model.modules() if replaceable(m)]
    saved = [m.__dict__.get("forward") for m in replaced]
    for m in replaced:
        m.forward = types.MethodType(_forward, m)
    try:
        yield len(replaced)
    finally:
        for m, old in zip(replaced, saved, strict=True):
            if old is None:
                del m.forward
            else:
                m.forward = old
