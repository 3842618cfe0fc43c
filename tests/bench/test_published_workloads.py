"""The published systems' programs as bench/torchtitan_h100.py and bench/megatron_table.py model them: which
ops torchtitan's selective checkpointing recomputes, which kernels torch.compile and Megatron-LM run (checked
on small copies of the same models: the rules do not depend on the size)."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import megatron_table  # noqa: E402  (bench/ is a directory of scripts)
import torchtitan_h100 as titan  # noqa: E402

from shardwise.cluster import get_cluster  # noqa: E402
from shardwise.costs.compute import cost_class  # noqa: E402
from shardwise.costs.prices import price_list  # noqa: E402
from shardwise.costs.step import _recomputed, price_flat  # noqa: E402
from shardwise.frontend.trace import trace  # noqa: E402
from shardwise.planner.auto import plan_auto  # noqa: E402


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    titan._register_attention()
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, vocab_size=128, use_cache=False)  # fmt: skip
    with torch.device("meta"):
        model = LlamaForCausalLM._from_config(cfg, attn_implementation=titan.ATTENTION, dtype=torch.bfloat16)
    ids = torch.empty(8, 32, dtype=torch.long, device="meta")
    return trace(model, (ids,), example_kwargs={"labels": ids}, loss_fn=lambda o: o.loss)[0]


@pytest.fixture(scope="module")
def fsdp_plan():
    graph = _tiny_llama()
    return plan_auto(graph, get_cluster(str(titan.CLUSTER)), mode="train", precision="bf16",
                     constraints={"dp": 8, "tp": 1, "zero": 3}, require_fit=False)  # fmt: skip


def test_selective_checkpointing_recomputes_what_torchtitans_policy_does(fsdp_plan) -> None:
    graph = fsdp_plan.graph
    again = _recomputed(graph, titan.selective_ranges(graph))
    for layer in (0, 1):
        nodes = [n for n in graph.nodes if titan._layer_of(n.module_path) == layer]
        mms = [n for n in nodes if cost_class(n.op) == "gemm"]
        assert [m.module_path.rsplit(".", 1)[-1] for m in mms] == [
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
        ]  # fmt: skip
        # every second matmul of the block is recomputed, the others and the attention are saved
        assert [m.name in again for m in mms] == [False, True, False, True, False, True, False]
        assert not any(n.name in again for n in nodes if cost_class(n.op) == "attention")
        # the norms and the elementwise ops before the down projection are recomputed; nothing after it
        last = [n.name for n in nodes].index(mms[-1].name)
        memory = [n for n in nodes[:last] if cost_class(n.op) == "memory"]
        assert memory and all(n.name in again for n in memory)
        assert not any(n.name in again for n in nodes[last:])
    assert not any(n.name in again for n in graph.nodes if titan._layer_of(n.module_path) is None)


def test_compiled_blocks_fuse_between_library_kernels(fsdp_plan) -> None:
    plan = fsdp_plan.replace(recompute=titan.selective_ranges(fsdp_plan.graph))
    groups = titan.inductor_groups(plan)
    graph = plan.graph
    assert len(groups) >= 2 * 4  # per block: two norms (with the residual add), RoPE of q and k, SiLU x up
    for g in groups:
        assert all(cost_class(graph.node(n).op) == "memory" for n in g.nodes)
        assert len({titan._layer_of(graph.node(n).module_path) for n in g.nodes}) == 1
    prices = price_list(get_cluster(str(titan.CLUSTER)), "bf16")
    eager = price_flat(plan, prices).step_s
    compiled = price_flat(plan.replace(fused_groups=groups), prices, fused_backward=True).step_s
    assert compiled < eager


def test_megatron_kernels_follow_megatrons_fusions() -> None:
    model, ids = megatron_table.build_traced_gpt(64, 4, 2)
    graph = trace(model, (ids,), example_kwargs={"labels": ids}, loss_fn=lambda o: o.loss)[0]
    placed = types.SimpleNamespace(graph=graph, strategies=(), mesh=None)
    groups = megatron_table.megatron_kernels(placed)
    ops = [tuple(graph.node(n).op.split(".")[1] for n in g.nodes) for g in groups]
    per_block = [("mul", "add", "softmax", "to"), ("dropout", "add"),
                 ("mul", "pow", "mul", "add", "mul", "tanh", "add", "mul"), ("dropout", "add")]  # fmt: skip
    assert ops == per_block * 2  # scale-mask-softmax, bias-dropout-add, bias-GeLU, bias-dropout-add
    grouped = {n for g in groups for n in g.nodes}
    apart = megatron_table._kept_apart(graph)
    assert apart and not apart & grouped  # the LayerNorms and the attention dropout are kernels of their own
    assert sum("dropout" in graph.node(n).op for n in apart) == 2  # one attention dropout per block
