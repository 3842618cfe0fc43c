"""transformers' causal-LM architectures (issue 16, point 6): a tiny random-weight model of each (2 layers,
hidden 64, vocabulary 128, 2 x 8 tokens; shardwise/zoo/hf.py) compiles for cpu:2 and its logits equal eager
PyTorch's, with the plan the planner picks and with tp=2 pinned. The architectures span the families of
``ARCHITECTURES`` (dense, sliding-window, mixture-of-experts, multi-head latent attention, the decoders of
encoder-decoder models, hybrid/state-space). An architecture torch.export itself cannot capture is skipped,
visibly, with export's reason. ``SHARDWISE_HF_ARCHITECTURES=more`` adds ``MORE_ARCHITECTURES``; ``=all`` runs
every causal-LM type of the installed transformers instead (those the generic tiny recipe cannot configure are
skipped with the reason).

One pool of two gloo processes serves the module (and one of one process for a plan that keeps to one)."""

from __future__ import annotations

import functools
import os

import pytest
import torch

import shardwise
from shardwise.errors import TraceError

transformers = pytest.importorskip("transformers")

from shardwise.zoo.hf import ARCHITECTURES, MORE_ARCHITECTURES, all_causal_lm_types, tiny_causal_lm  # noqa: E402

pytestmark = pytest.mark.multiproc

CHOICE = os.environ.get("SHARDWISE_HF_ARCHITECTURES", "")
ALL = CHOICE == "all"
NAMES = list(all_causal_lm_types()) if ALL else list(ARCHITECTURES) + (list(MORE_ARCHITECTURES) if CHOICE == "more" else [])
PLANS = {"default": None, "tp2": {"tp": 2}}


@pytest.fixture(scope="module")
def pools(worker_pools):  # the session's pools (tests/conftest.py)
    return lambda n: worker_pools(n, timeout_s=120)


@functools.cache
def _built(arch: str) -> tuple[torch.nn.Module, tuple[torch.Tensor], torch.Tensor]:
    """The model, its inputs and eager PyTorch's logits (made once for both plans)."""
    model, inputs = tiny_causal_lm(arch)
    with torch.no_grad():
        ref = model(*inputs).logits
    return model, inputs, ref


@pytest.mark.parametrize("plan", list(PLANS))
@pytest.mark.parametrize("arch", NAMES)
def test_architecture_equals_eager(pools, arch: str, plan: str) -> None:
    try:
        model, inputs, ref = _built(arch)
    except Exception as exc:  # the generic tiny recipe does not fit this architecture's configuration
        if not ALL:
            raise
        pytest.skip(f"{arch}: no tiny configuration ({type(exc).__name__}: {str(exc)[:160]})")
    constraints = PLANS[plan]
    try:
        cm = shardwise.compile(model, "cpu:2", example_inputs=inputs, constraints=constraints, workers=pools(2))
    except TraceError as exc:
        if str(exc).startswith("torch.export could not trace"):
            pytest.skip(f"{arch}: torch.export cannot capture it: {str(exc).splitlines()[0][:300]}")
        raise
    if cm.plan.world_size != 2:  # the planner may keep a tiny model on one process
        cm.close()
        cm = shardwise.compile(model, "cpu:2", example_inputs=inputs, constraints=constraints, workers=pools(1))
    with cm:
        if constraints:
            assert cm.plan.degrees["tp"] == 2, f"{arch}: {cm.plan.degrees}"
        got = cm.run(*inputs).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5, msg=lambda m: f"{arch} ({plan} plan): {m}")
