"""Expert parallelism on real gloo processes (issue 17, items 1 and 4): Mixtral and Qwen3-MoE tiny configurations
(4 experts per layer, 2 per token) with ``ep=2`` on cpu:2 and ``ep=2, tp=2`` on cpu:4 (Mixtral's training with
the experts split by tp inside each expert too) equal eager PyTorch, for inference and for three SGD training
steps (losses and every final parameter, float32), and so does Mixtral with ``ep=2`` below ``dp=4``; a checkpoint
saved under an ``ep=2`` plan loads bit-identically under an ``ep=1`` plan and back.

The experts really are split: each rank's checkpoint file holds its two experts of each layer and nothing of the
other two, and the generated program runs each layer's experts as ``C.moe_experts(..., mesh, 'dp')``, the
all-to-all dispatch and combine. Equality with eager is itself a check that the tokens moved: a rank holds
only half the experts, so a token whose expert lives on the other rank gets its result only through the
exchange. One pool of two and one of four gloo processes serve the module."""

from __future__ import annotations

import copy
import functools
import json
import re
import tempfile
from pathlib import Path

import pytest
import torch

import shardwise
from shardwise.cluster.presets import cpu_cluster
from shardwise.testing.eager import assert_training_equal, eager_training

pytest.importorskip("transformers")

from shardwise.zoo.hf import tiny_causal_lm  # noqa: E402

pytestmark = pytest.mark.multiproc

MODELS = ["mixtral", "qwen3_moe"]
NOMINAL4 = cpu_cluster(4)
# cpu:4 with the nominal figures (not this machine's measured ones): there the planner also splits Mixtral's
# experts by tensor parallelism inside each expert (etp: gate and up by rows, down by columns, partial sums
# all-reduced over tp), which the Mixtral training case checks it ran
LAYOUTS = {"cpu2-ep2": ("cpu:2", {"dp": 2, "ep": 2}), "cpu4-ep2-tp2": (NOMINAL4, {"dp": 2, "ep": 2, "tp": 2})}
# ep below dp: the experts split over pairs of ranks and replicated over the two pairs (training only: it runs
# the forward too)
BELOW_DP = {"cpu4-dp4-ep2": ("cpu:4", {"dp": 4, "ep": 2})}
POOL = {"cpu:2": 2, "cpu:4": 4, NOMINAL4: 4}
SGD = functools.partial(torch.optim.SGD, lr=0.1)
EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


@pytest.fixture(scope="module")
def pools(worker_pools):  # the session's pools (tests/conftest.py)
    return {2: worker_pools(2), 4: worker_pools(4)}


def _loss(out) -> torch.Tensor:  # noqa: ANN001
    return out.logits.float().sin().mean()


def _program(cm) -> str:  # noqa: ANN001
    with tempfile.TemporaryDirectory() as tmp:
        return (cm.save(tmp, weights=False) / "program.py").read_text()


def _expert_parallel(cm, layers: int = 2) -> None:
    """The plan splits every layer's experts over its expert axis (dp, or ep below dp) and the program dispatches
    by all-to-all over it."""
    assert cm.plan.degrees.get("ep") == 2
    axis = "ep" if "ep" in cm.plan.mesh.axis_names else "dp"
    a = cm.plan.mesh.axis_names.index(axis)
    experts = {k: spec for k, spec in cm.plan.param_placements if ".mlp.experts." in k}
    assert len(experts) in (2 * layers, 3 * layers)  # gate_up and down, or gate and up apart (etp)
    assert all(str(spec.placements[a]) == "S(0)" for spec in experts.values()), experts
    calls = re.findall(r"C\.moe_experts\(([^)]*)\)", _program(cm))
    assert calls and all(re.search(rf"mesh,\s*'{axis}'(,|$)", c.strip()) for c in calls)  # each dispatches over it


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name", MODELS)
def test_inference_equals_eager(pools, name, layout):
    cluster, constraints = LAYOUTS[layout]
    model, inputs = tiny_causal_lm(name)
    with shardwise.compile(model, cluster, example_inputs=inputs, constraints=constraints, workers=pools[POOL[cluster]]) as cm:
        _expert_parallel(cm)
        out = cm.run(*inputs)
    with torch.no_grad():
        ref = model(*inputs)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("name", "layout"), [(n, lay) for n in MODELS for lay in LAYOUTS] + [("mixtral", "cpu4-dp4-ep2")])
def test_three_sgd_steps_equal_eager(pools, name, layout):
    cluster, constraints = {**LAYOUTS, **BELOW_DP}[layout]
    model, inputs = tiny_causal_lm(name, batch=constraints["dp"])
    reference = copy.deepcopy(model)
    with shardwise.compile(
        model, cluster, example_inputs=inputs, mode="train", loss_fn=_loss, optimizer=SGD, constraints=constraints,
        workers=pools[POOL[cluster]],
    ) as cm:  # fmt: skip
        _expert_parallel(cm)
        if name == "mixtral" and layout == "cpu4-ep2-tp2":  # etp: each expert's intermediate split over tp
            assert all(("tp", "f") in s.split for s in cm.plan.strategies if s.node.startswith("moe_experts"))
        losses = [cm.train_step(*inputs) for _ in range(3)]
        state = cm.state_dict()
    expected_losses, expected_state = eager_training(reference, inputs, _loss, SGD)
    moved = {k: (expected_state[k] - v).abs().max().item() for k, v in model.state_dict().items()}
    assert max(moved.values()) > 1e-3  # the steps changed the weights well beyond the tolerance (1e-5)
    assert min(v for k, v in moved.items() if k.endswith(EXPERTS)) > 1e-4  # every layer's experts too
    assert_training_equal(losses, state, expected_losses, expected_state)


def _expert_entries(directory: Path) -> dict[str, list[tuple[str, int, int]]]:
    """Per expert weight of a checkpoint: (file, first expert, number of experts) of each piece stored."""
    manifest = json.loads((directory / "manifest.json").read_text())
    out: dict[str, list[tuple[str, int, int]]] = {}
    for e in manifest["entries"]:
        if e["state"] is None and e["key"].endswith(EXPERTS):
            out.setdefault(e["key"], []).append((e["file"], e["offset"][0], e["shape"][0]))
    return out


def test_checkpoint_reshards_between_ep2_and_ep1(pools, tmp_path: Path):
    model, inputs = tiny_causal_lm("mixtral")
    experts = model.config.num_local_experts

    def compile_(ep: int):  # noqa: ANN202
        return shardwise.compile(
            copy.deepcopy(model), "cpu:2", example_inputs=inputs, mode="train", loss_fn=_loss, optimizer=SGD,
            constraints={"dp": 2, "ep": ep, "zero": 0}, workers=pools[2],
        )  # fmt: skip

    with compile_(2) as a:
        _expert_parallel(a)
        a.train_step(*inputs)
        a.save_checkpoint(tmp_path / "ep2")
        state2 = a.state_dict()
    pieces = _expert_entries(tmp_path / "ep2")
    assert len(pieces) == 2 * model.config.num_hidden_layers
    half = experts // 2
    for key, stored in pieces.items():  # each rank wrote its own half of the experts, and only that
        assert sorted(stored) == [("rank0.safetensors", 0, half), ("rank1.safetensors", half, half)], key
    manifest = json.loads((tmp_path / "ep2" / "manifest.json").read_text())
    assert manifest["meta"]["degrees"]["ep"] == 2
    with compile_(1) as b:
        assert "ep" not in b.plan.degrees and not re.search(r"mesh,\s*'dp'\)", _program(b).split("C.moe_experts(")[1])
        b.load_checkpoint(tmp_path / "ep2")
        state1 = b.state_dict()
        b.train_step(*inputs)
        b.save_checkpoint(tmp_path / "ep1")
        after1 = b.state_dict()
    assert state1.keys() == state2.keys()
    for k in state2:
        assert torch.equal(state1[k], state2[k]), k
    with compile_(2) as c:
        c.load_checkpoint(tmp_path / "ep1")
        back = c.state_dict()
    for k in after1:
        assert torch.equal(back[k], after1[k]), k
