"""Predictions against torchtitan's published H100 measurements: ``python bench/torchtitan_h100.py``.

The published figures (pytorch/torchtitan, ``benchmarks/llama3_h100_202412_torchtitan.md``, Table 1): Llama 3.1
8B on 8 H100s (one Grand Teton host), bf16, sequence 8192, local batch 2 (global 16), FSDP over the 8 GPUs,
selective activation checkpointing: 5,762 tokens/s/GPU in eager mode, 6,667 with torch.compile, 8,532 with
torch.compile and Float8 (torchao's Float8Linear, priced with ``precision="fp8"`` as ``bench/moe_cp.py`` prices it;
this row was added as a check of the float8 price apart from the context-parallel rows). The cluster is
``bench/clusters/grand-teton-h100.yaml`` (its figures and their sources are in its comments).

**The workload, fixed from torchtitan's source before any error was looked at** (commit 9dec370, 2024-12-26,
the version the benchmark names; ``train_configs/llama3_8b.toml``, ``torchtitan/models/llama/model.py``,
``torchtitan/parallelisms/parallelize_llama.py``):

- *Model*: Llama 3.1 8B as torchtitan's "8B" flavour: dim 4096, 32 layers, 32 heads, 8 KV heads (head dim
  128), FFN 14336 (``ffn_dim_multiplier`` 1.3, ``multiple_of`` 1024), vocabulary 128256, RMSNorm eps 1e-5,
  output projection not tied. Built as HuggingFace's ``LlamaForCausalLM`` from that configuration, in bfloat16
  on the meta device: FSDP2's ``MixedPrecisionPolicy(param_dtype=bf16)`` runs the forward and backward in bf16,
  and the model's own float32 upcasts (RMSNorm's ``x.float()``, the loss's ``logits.float()``) then move 4-byte
  values (the price list counts a bf16 trace's bytes as traced).
- *Attention*: torchtitan repeats the KV heads (``repeat_kv``: an expand and a copying reshape) and calls
  ``F.scaled_dot_product_attention(q, k, v, is_causal=True)``; PyTorch ran it with FlashAttention-2 on H100 at
  the time (cuDNN attention was opt-in, pytorch#138522). The traced model does the same (the attention
  function ``torchtitan_sdpa`` registered below: repeat, then causal SDPA, no mask tensor), priced as a causal
  fused attention (half its FLOPs) at FlashAttention-2's published H100 rates.
- *Differences from torchtitan's model code* (HuggingFace's Llama, not torchtitan's): RoPE is HF's
  ``rotate_half`` form in bf16 where torchtitan multiplies complex float32 values (both are elementwise chains
  moving about the same bytes: ~1.35 GB per layer for the queries at this batch); HF computes the rotary
  cos/sin per step at the model's top, torchtitan keeps them as a buffer (tiny).
- *Parallelism*: FSDP over 8 GPUs = ``dp=8, tp=1, zero=3``; parameters all-gathered in bf16 and gathered again
  for the backward (``reshard_after_forward``), gradients reduce-scattered in float32
  (``mixed_precision_reduce`` float32); AdamW with ``foreach`` (``optimizer.fused`` false); gradient clipping
  is not priced (one norm over the local gradients).
- *Selective activation checkpointing* (``mode='selective'``, ``selective_ac_option='op'``): each
  TransformerBlock is checkpointed with a policy that saves the outputs of ``aten.mm`` (except every second mm
  of the block), of the flash-attention op and of reduce-scatters, and recomputes everything else; PyTorch's
  non-reentrant checkpoint stops recomputing once the last needed tensor is back (early stop). The block's
  matmuls run in the order q, k, v, o, gate, up, down, so q, v, gate and down are saved and k, o and up are
  recomputed, with every elementwise op up to the down projection's input. Modeled with what shardwise
  offers: ``plan.recompute``, the ranges of ops a plan runs again in the backward, set to exactly those ops
  (shardwise's own ``recompute="selective"`` chooses whole layers, which is not what torchtitan does).
- *Eager*: every ATen op is its own kernel, forward and backward (``fusion=False``).
- *torch.compile*: torchtitan compiles each TransformerBlock (``fullgraph=True``); the embedding, final norm,
  output projection and loss stay eager. Inductor calls the matmuls and the attention as library kernels and
  generates Triton kernels for everything between them; modeled as: within each block, every connected set of
  memory-bound ops (elementwise, reductions, casts, copies, concatenations) not separated by a matmul or the
  attention is one kernel (:func:`inductor_groups`; shardwise's own fusion pass fuses less: it leaves RoPE's
  ``cat`` and the attention output's copy unfused, because codegen lowers only what it can write in Triton).
  Each group's backward is one kernel as well (``price_flat(..., fused_backward=True)``: AOTAutograd compiles
  the backward too) and a recomputed group runs its kernel once more (conservative: Inductor can fold a
  recomputation into the backward kernel that reads it). Eager and compiled differ by these rules of the price
  list only (fused kernels move only their boundary bytes, forward and backward).

**Our plan**: ``shardwise.compile`` on the same cluster, batch and model with no constraints
(``recompute="auto"``), priced as shardwise's generated program runs it (its fusion groups in the forward, the
per-op rule in the backward). It is compared with the published layout priced the same way (FSDP 8 with
torchtitan's selective checkpointing, shardwise's fusion): "our plan >= the published configuration under our
own prices".

Writes ``bench/results/torchtitan_h100.json``. Planning is wall-clock on this machine (noisy when shared).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
CLUSTER = ROOT / "clusters" / "grand-teton-h100.yaml"
sys.path.insert(0, str(ROOT.parent))

SEQ = 8192
LOCAL_BATCH = 2
GPUS = 8
# Llama 3.1 8B: torchtitan's "8B" flavour (torchtitan/models/llama/__init__.py at 9dec370)
LLAMA31_8B = {
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "max_position_embeddings": 131072, "tie_word_embeddings": False,
}  # fmt: skip
PUBLISHED = {"eager": 5762.0, "compiled": 6667.0, "float8": 8532.0}  # tokens/s/GPU, Table 1
PUBLISHED_MEMORY_GIB = {"eager": 82.4, "compiled": 77.0, "float8": 76.8}
NVL_BF16 = 835e12  # H100 NVL datasheet, BF16 dense (1,671 TFLOP/s with sparsity): the other bound torchtitan names
ATTENTION = "torchtitan_sdpa"


def _register_attention() -> None:
    """``torchtitan_sdpa``: torchtitan's attention call (repeat the KV heads, causal SDPA without a mask)."""
    import torch
    import torch.nn.functional as F
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:  # [b, kv_heads, s, d] -> [b, heads, s, d]
        b, kv, s, d = x.shape
        return x[:, :, None].expand(b, kv, n_rep, s, d).reshape(b, kv * n_rep, s, d)

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        rep = query.shape[1] // key.shape[1]
        out = F.scaled_dot_product_attention(query, repeat_kv(key, rep), repeat_kv(value, rep), is_causal=True,
                                             scale=scaling)  # fmt: skip
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register(ATTENTION, attention)
    AttentionMaskInterface.register(ATTENTION, lambda *args, **kwargs: None)  # causal by the kernel's flag


def build_llama(layers: int | None = None):
    """Llama 3.1 8B in bf16 on the meta device with torchtitan's attention, and a global batch of ids."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    _register_attention()
    cfg = LlamaConfig(**{**LLAMA31_8B, **({"num_hidden_layers": layers} if layers else {})}, use_cache=False)
    with torch.device("meta"):
        model = LlamaForCausalLM._from_config(cfg, attn_implementation=ATTENTION, dtype=torch.bfloat16)
    ids = torch.empty(LOCAL_BATCH * GPUS, SEQ, dtype=torch.long, device="meta")
    return model, ids


def _layer_of(module_path: str) -> int | None:
    parts = module_path.split(".")
    if len(parts) >= 3 and parts[0] == "model" and parts[1] == "layers" and parts[2].isdigit():
        return int(parts[2])
    return None


def selective_ranges(graph) -> tuple[tuple[str, str], ...]:
    """torchtitan's op-level selective checkpointing as ``plan.recompute`` ranges (see the module docstring):
    per block, every op that runs a kernel except the 1st, 3rd, 5th and 7th matmul and the attention, up to
    (not including) the block's last matmul (early stop)."""
    from shardwise.costs.compute import cost_class

    by_layer: dict[int, list] = {}
    for n in graph.nodes:
        layer = _layer_of(n.module_path)
        if layer is not None:
            by_layer.setdefault(layer, []).append(n)
    names = [n.name for n in graph.nodes]
    index = {n: k for k, n in enumerate(names)}
    recomputed: list[int] = []
    for nodes in by_layer.values():
        mms = [n for n in nodes if cost_class(n.op) == "gemm"]
        if len(mms) != 7:
            raise ValueError(f"a Llama block has 7 matmuls, found {len(mms)}")
        saved = {mms[k].name for k in (0, 2, 4, 6)}
        stop = index[mms[-1].name]
        for n in nodes:
            cls = cost_class(n.op)
            if index[n.name] < stop and cls != "free" and cls != "attention" and n.name not in saved:
                recomputed.append(index[n.name])
    ranges: list[tuple[str, str]] = []
    for k in sorted(recomputed):  # runs of consecutive ops (views in between belong to a run: they are free)
        if ranges and all(cost_class(graph.nodes[j].op) == "free" for j in range(index[ranges[-1][1]] + 1, k)):
            ranges[-1] = (ranges[-1][0], names[k])
        else:
            ranges.append((names[k], names[k]))
    return tuple(ranges)


def inductor_groups(plan) -> tuple:
    """torch.compile's kernels in each TransformerBlock of a flat plan (see the module docstring): the connected
    sets of memory-bound ops of one block (``kernel_models.connected_groups``)."""
    from kernel_models import connected_groups

    return connected_groups(plan.graph, plan.strategies, plan.mesh, lambda n: _layer_of(n.module_path))


def breakdown(plan, prices, step) -> dict[str, float]:
    """Seconds of one rank's step by what they are: matmuls, attention, memory-bound kernels, collectives, the
    optimizer (from the priced events)."""
    from shardwise.costs.compute import cost_class

    out = {"gemm": 0.0, "attention": 0.0, "memory": 0.0, "comm": 0.0, "optimizer": 0.0}
    if not step.events:  # a pipeline plan: its step is the schedule's simulation, not a list of events
        return {}
    for e in step.events:
        if e.kind == "comm":
            out["comm"] += e.seconds
        elif e.phase == "optimizer" or not e.node:
            out["optimizer"] += e.seconds
        else:
            cls = cost_class(plan.graph.node(e.node).op)
            out["memory" if cls == "free" else cls] += e.seconds
    return out


def executed_flops(plan) -> float:
    """FLOPs one step executes on all devices: forward x3 (backward 2x) plus the recomputed forwards, a causal
    attention's device FLOPs at the kernel's count."""
    from shardwise.costs.compute import op_work
    from shardwise.costs.step import _recomputed, grad_values

    grad = grad_values(plan.graph)
    again = _recomputed(plan.graph, plan.recompute)
    if plan.pipeline is not None and plan.pipeline.recompute == "full":
        again = {n.name for n in plan.graph.nodes}
    total = 0.0
    for n in plan.graph.nodes:
        f = op_work(n).flops
        total += f * (3 if n.name in grad else 1) + (f if n.name in again else 0.0)
    return total


def _tps(step_s: float) -> float:
    return LOCAL_BATCH * GPUS * SEQ / step_s / GPUS


def run(layers: int | None = None) -> dict:
    import shardwise
    from shardwise.cluster import get_cluster
    from shardwise.costs.prices import price_list
    from shardwise.costs.step import price_flat, price_pipeline
    from shardwise.errors import ShardwiseError
    from shardwise.frontend.trace import trace
    from shardwise.passes.fusion import fuse_plan
    from shardwise.planner.auto import plan_auto

    cluster = get_cluster(str(CLUSTER))
    prices = price_list(cluster, "bf16")
    model, ids = build_llama(layers)
    common = {"example_inputs": (ids,), "example_kwargs": {"labels": ids}, "mode": "train", "precision": "bf16",
              "loss_fn": lambda out: out.loss}  # fmt: skip
    t0, c0 = time.perf_counter(), time.process_time()
    # the published layout: FSDP over 8 GPUs, placed by the flat planner, then torchtitan's recomputation.
    # (The front door refuses this layout today: with recompute="auto" or "all" it requires the plan to fit
    # before recomputing and reports that the model "needs at least 14.96 GiB" of the 96 GiB; issue 15.8.)
    graph, _ = trace(model, (ids,), example_kwargs={"labels": ids}, loss_fn=common["loss_fn"])
    pub = plan_auto(graph, cluster, mode="train", precision="bf16", constraints={"dp": GPUS, "tp": 1, "zero": 3},
                    require_fit=False)  # fmt: skip
    published_plan_s = time.perf_counter() - t0
    sac = pub.replace(recompute=selective_ranges(pub.graph))
    eager_step = price_flat(sac, prices)
    fused = fuse_plan(sac)
    compiled = sac.replace(fused_groups=inductor_groups(sac))
    compiled_step = price_flat(compiled, prices, fused_backward=True)
    # Table 1's third row: the compiled program with torchao's Float8Linear (a check of the price list's float8
    # rule apart from the context-parallel rows of bench/moe_cp.py): the same plan priced at precision="fp8"
    float8_step = price_flat(compiled, price_list(cluster, "fp8"), fused_backward=True)
    ours_layout_step = price_flat(fused, prices)  # the published layout as shardwise's program runs it
    t1 = time.perf_counter()
    try:
        ours = shardwise.compile(model, cluster, recompute="auto", **common).plan
        failure = ""
    except ShardwiseError as exc:  # the front door found no plan: that is the result
        ours, failure = None, f"{type(exc).__name__}: {exc}"
    ours_plan_s = time.perf_counter() - t1
    ours_step = price_flat(ours, prices) if ours is not None and ours.pipeline is None else None
    planning_cpu_s = time.process_time() - c0
    peak = cluster.device.flops("bfloat16") * GPUS

    def row(name: str, plan, step, published: float | None) -> dict:
        tps = _tps(step.step_s)
        flops = executed_flops(plan)
        out = {
            "row": name, "predicted_step_s": step.step_s, "predicted_tokens_per_s_per_gpu": tps,
            "published_tokens_per_s_per_gpu": published,
            "error": (tps / published - 1) if published else None,
            "predicted_mfu_executed": flops / step.step_s / peak,
            "predicted_breakdown_s": breakdown(plan, prices, step),
            "degrees": dict(plan.degrees), "zero": plan.zero_stage, "recompute_ranges": len(plan.recompute),
            "fused_groups": len(plan.fused_groups),
        }  # fmt: skip
        return out

    rows = [
        row("FSDP 8, selective AC, eager (published configuration)", sac, eager_step, PUBLISHED["eager"]),
        row("FSDP 8, selective AC, torch.compile (published configuration)", compiled, compiled_step,
            PUBLISHED["compiled"]),
        row("FSDP 8, selective AC, torch.compile + Float8 (published configuration)", compiled, float8_step,
            PUBLISHED["float8"]),
        row("FSDP 8, selective AC, shardwise's program", fused, ours_layout_step, None),
    ]  # fmt: skip
    # sensitivity (not a prediction): the same programs if the power-limited part peaked at the H100 NVL's
    # published BF16 figure, the lower bound torchtitan names for it; every FLOP-bound rate scales with the peak
    low = cluster.device.__class__(
        kind=cluster.device.kind, memory_bytes=cluster.device.memory_bytes,
        memory_bandwidth=cluster.device.memory_bandwidth,
        peak_flops=tuple((d, v * NVL_BF16 / 989e12) for d, v in cluster.device.peak_flops),
    )  # fmt: skip
    low_prices = price_list(dataclasses.replace(cluster, device=low), "bf16")
    sensitivity = [
        {"row": f"{name}, peak {NVL_BF16 / 1e12:.0f} TFLOP/s", "tokens_per_s_per_gpu": _tps(step.step_s),
         "error": _tps(step.step_s) / PUBLISHED[key] - 1}
        for name, key, step in (("eager", "eager", price_flat(sac, low_prices)),
                                ("torch.compile", "compiled", price_flat(compiled, low_prices, fused_backward=True)))
    ]  # fmt: skip
    our_plan: dict = {"failure": failure}
    if ours is not None:
        if ours_step is None:  # a pipeline plan (the front door's fallback)
            ours_step = price_pipeline(ours, prices).step
        rows.append(row("our plan (shardwise.compile, no constraints)", ours, ours_step, None))
        our_plan |= {"degrees": dict(ours.degrees), "zero": ours.zero_stage, "recompute_ranges": len(ours.recompute),
                     "pipeline": ours.pipeline is not None,
                     "predicted_memory_gib": max(ours.predicted.memory_bytes or (0,)) / 2**30}  # fmt: skip
    return {
        "rows": rows,
        "float8_over_compiled": {"published": PUBLISHED["float8"] / PUBLISHED["compiled"],
                                 "predicted": compiled_step.step_s / float8_step.step_s},
        "sensitivity": sensitivity,
        "ours_over_published_layout": ours_layout_step.step_s / ours_step.step_s if ours_step else None,
        "our_plan": our_plan,
        "planning_s": {"published_layout": published_plan_s, "ours": ours_plan_s, "cpu": planning_cpu_s},
        "layers": layers or LLAMA31_8B["num_hidden_layers"],
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=None, help="fewer layers (a quick check; not comparable)")
    parser.add_argument("--output", default=str(RESULTS / "torchtitan_h100.json"))
    args = parser.parse_args(argv)
    load = os.getloadavg()[0]
    result = run(args.layers)
    header = f"{'configuration':<62} {'predicted':>9} {'published':>9} {'error':>7} {'step s':>7} {'MFU':>5}"
    print(f"Llama 3.1 8B, seq {SEQ}, local batch {LOCAL_BATCH}, {GPUS} GPUs, {CLUSTER.name} (tokens/s/GPU)")
    print(header)
    print("-" * len(header))
    for r in result["rows"]:
        pub = r["published_tokens_per_s_per_gpu"]
        err = f"{100 * r['error']:+.1f}%" if r["error"] is not None else "-"
        print(
            f"{r['row']:<62} {r['predicted_tokens_per_s_per_gpu']:>9.0f} {pub if pub else '-':>9} {err:>7} "
            f"{r['predicted_step_s']:>7.3f} {r['predicted_mfu_executed']:>5.2f}"
        )
    for r in result["rows"]:
        b = r["predicted_breakdown_s"]
        if b:
            print(f"  {r['row'][:58]:<58} " + " ".join(f"{k} {v:.3f}" for k, v in b.items()))
    f8 = result["float8_over_compiled"]
    print(f"  Float8 over compiled bf16: predicted {f8['predicted']:.3f}x, published {f8['published']:.3f}x")
    for r in result["sensitivity"]:
        print(f"  sensitivity, not a prediction: {r['row']}: {r['tokens_per_s_per_gpu']:.0f} tokens/s/GPU "
              f"({100 * r['error']:+.1f}%)")  # fmt: skip
    plan = result["our_plan"]
    if plan["failure"]:
        print(f"our plan: none ({plan['failure'][:300]})")
    else:
        print(f"our plan {plan['degrees']} zero {plan['zero']}: {result['ours_over_published_layout']:.3f}x the "
              "published layout's speed under our prices")  # fmt: skip
    p = result["planning_s"]
    print(f"planning: published layout {p['published_layout']:.1f} s, ours {p['ours']:.1f} s wall "
          f"({p['cpu']:.1f} s CPU), load {load:.1f}")  # fmt: skip
    doc = {
        "benchmark": "torchtitan_h100",
        "source": "pytorch/torchtitan benchmarks/llama3_h100_202412_torchtitan.md, Table 1 (torchtitan 9dec370)",
        "cluster": str(CLUSTER.relative_to(ROOT.parent)),
        "model": "Llama 3.1 8B (HF LlamaForCausalLM, bf16, torchtitan's attention call)",
        "sequence": SEQ, "local_batch": LOCAL_BATCH, "gpus": GPUS,
        "published_memory_gib": PUBLISHED_MEMORY_GIB,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "load_at_start": load},
        **result,
    }  # fmt: skip
    if args.layers:
        print("(fewer layers than the published model: not written)")
        return 0
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
