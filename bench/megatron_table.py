"""Predictions against Megatron-LM's published Table 1: ``python bench/megatron_table.py [--row ...]``.

Rows are GPT configurations from Narayanan et al., "Efficient Large-Scale Language Model Training on GPU
Clusters Using Megatron-LM" (SC'21), Table 1 (``--row params_b,hidden,layers,gpus,global_batch,published_tflops
[,tp,pp]``, repeatable; the defaults are five of its rows), on DGX-A100 (80 GB) clusters of ``gpus / 8`` nodes.

**The workload, fixed from Megatron-LM's source before any error was looked at** (NVIDIA/Megatron-LM at
8cfef1b, 2021-04-08, the release the paper describes; ``megatron/arguments.py``, ``megatron/model/
transformer.py``, ``fused_softmax.py``, ``gpt_model.py``, ``examples/pretrain_gpt3_175B.sh``):

- *Model*: Megatron's GPT: pre-LayerNorm blocks, learned positions, tied input/output embedding, GeLU MLP of
  4h, biases, sequence 2048, vocabulary 51200 (GPT-2's, padded to a multiple of 128), hidden and attention
  dropout 0.1 (``--hidden-dropout``/``--attention-dropout`` defaults; the scripts set neither). Built as
  HuggingFace's GPT-2 architecture (the same parameters: 12 l h^2 + 13 l h + (V + s) h) on the meta device at
  full depth (its parameters are counted); a two-block copy is traced in training mode (dropout kept) and the
  search repeats the block (``SearchOptions.repeat_blocks``). GeLU is the tanh form in both (Megatron's
  ``bias_gelu_impl``, HF's ``gelu_new``). The dropout ops are traced with p = 0 (they stay in the graph as
  ``aten.dropout`` in training mode and are priced like any dropout: their kernels' traffic does not depend
  on p): Megatron-LM drops out each tensor-parallel rank's own piece (its model-parallel RNG tracker), while
  shardwise's own programs run a drawing dropout whole on every rank to reproduce eager's numbers (issue 16),
  which would place Megatron's dropouts as gathers it never ran.
- *Precision*: fp16 (the example scripts' ``--fp16``; on A100 fp16 and bf16 have the same peak and width).
- *Kernels each row runs* (the same for all five rows; ``megatron_kernels``): the QKV, projection and MLP
  GEMMs; the attention scores as an unfused batched GEMM (``torch.baddbmm`` with the 1/sqrt(d) scale as its
  alpha: every row materializes the s x s scores; there was no fused attention kernel) and a second one with
  V; the **fused scale-mask-softmax** (``ScaledUpperTriangMaskedSoftmax``, one kernel forward and one backward:
  ``--masked-softmax-fusion`` is on by default and its constraints hold in every row: 16 < s = 2048 <= 2048,
  s % 4 == 0, and micro-batch x heads per tensor-parallel rank % 4 == 0 because those heads are 24, 8, 8, 12
  and 16); the **attention dropout as its own kernel** (``torch.nn.Dropout`` on the probabilities, never
  fused); the **fused bias-GeLU** (``bias_gelu_impl``, a jit-scripted forward and backward) and the **fused
  bias-dropout-add** (``bias_dropout_add_fused_train``, jit-scripted) after both projections; the **fused
  LayerNorm** (``MixedFusedLayerNorm``, its own CUDA kernels). The embedding sum, its dropout, the final
  LayerNorm and the fp32 cross-entropy (``vocab_parallel_cross_entropy(output.float())``) run op by op. On the
  traced HF graph these are fused groups (``bench/kernel_models.connected_groups``: the memory-bound ops of a
  block joined when no GEMM lies between them, the attention dropout and the LayerNorms kept apart), each
  group's backward one kernel as well (``SearchOptions(fused_backward=True)``); HF's scale (``mul``) and
  additive mask (``add``) join the softmax's kernel, as Megatron folds them into the GEMM and the softmax.
- *Recomputation*: ``--checkpoint-activations`` (every example script; the paper's FLOPs formula counts it):
  each transformer layer runs its forward again in the backward (``recompute="full"``).
- *Parallelism*: the row's tensor and pipeline degrees, data parallelism over the rest, no sequence
  parallelism (it came in 2022); Table 1 gives no micro-batch size or schedule, so the search picks them
  (1F1B, GPipe or interleaved) for the pinned layout under the same prices.
- *Not modeled*: Megatron 2021 all-reduces fp16 gradients (``--accumulate-allreduce-grads-in-fp32`` off); the
  price list reduces float32 gradients (at most ~2% of a row's step here).

**Figures** (per row): the published TFLOP/s per GPU (Megatron's formula, recomputation included:
F = 96 B s l h^2 (1 + s / (6 h) + V / (16 l h))), the same formula over the *predicted* step of the published
configuration, the error, and the MFU of the FLOPs the plan executes (forward x3, plus the recomputed forward
where the plan recomputes: no recomputation is credited to a plan that does not recompute). **Our plan** is
the unconstrained search with shardwise's own program (its fusion pass in the forward, the per-op backward its
generated code runs, dropout kept); "ours vs published layout" prices the published layout with that same
program, so both sides of that ratio are under our own prices.

Planning time: tracing plus the searches, wall-clock on this machine, and the CPU seconds they used (this
process and the ILP solver's; on a shared machine the wall-clock time also counts others' work).
``--front-door`` also times ``shardwise.compile`` with the published layout pinned (the pipeline path of the
front door) for each row. The efficiencies come from independent published measurements (the DGX-A100
preset, each with its source), not from these results. Writes bench/results/megatron_table.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
sys.path.insert(0, str(ROOT.parent))

SEQ = 2048
VOCAB = 51200
# Table 1 rows: params_b, hidden, layers, gpus, global batch, published TFLOP/s per GPU, tp, pp
DEFAULT_ROWS = (
    (1.7, 2304, 24, 32, 512, 137.0, 1, 1),
    (7.5, 4096, 36, 128, 512, 142.0, 4, 1),
    (39.1, 8192, 48, 512, 1536, 138.0, 8, 2),
    (145.6, 12288, 80, 1536, 2304, 148.0, 8, 8),
    (529.6, 20480, 105, 2520, 2520, 163.0, 8, 35),
)
# attention heads of Table 1's rows by hidden size (the --row format has none; others: hidden / 128)
HEADS = {1536: 16, 1920: 20, 2304: 24, 3072: 32, 4096: 32, 6144: 48, 8192: 64, 10240: 80, 12288: 96,
         16384: 128, 20480: 128, 25600: 160}  # fmt: skip


def megatron_flops(batch: int, layers: int, hidden: int, seq: int = SEQ, vocab: int = VOCAB) -> float:
    """Model FLOPs per iteration with full recomputation (Narayanan et al., 2021, appendix)."""
    return 96 * batch * seq * layers * hidden**2 * (1 + seq / (6 * hidden) + vocab / (16 * layers * hidden))


def megatron_params(layers: int, hidden: int, seq: int = SEQ, vocab: int = VOCAB) -> float:
    return 12 * layers * hidden**2 * (1 + 13 / (12 * hidden) + (vocab + seq) / (12 * layers * hidden))


def parse_row(text: str) -> tuple:
    parts = [p.strip() for p in text.split(",")]
    if len(parts) not in (6, 8):
        raise argparse.ArgumentTypeError(
            f"--row {text!r}: give params_b,hidden,layers,gpus,global_batch,published_tflops[,tp,pp]"
        )
    try:
        params_b, published = float(parts[0]), float(parts[5])
        hidden, layers, gpus, batch = (int(p) for p in parts[1:5])
        tp, pp = (int(parts[6]), int(parts[7])) if len(parts) == 8 else (None, None)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--row {text!r}: {exc}") from None
    if gpus % 8:
        raise argparse.ArgumentTypeError(f"--row {text!r}: gpus must be a multiple of 8 (DGX-A100 nodes)")
    return (params_b, hidden, layers, gpus, batch, published, tp, pp)


MEGATRON_DROPOUT = 0.1  # Megatron-LM's --hidden-dropout and --attention-dropout defaults
TRACED_DROPOUT = 0.0  # the dropout ops' p in the trace: kept, priced, placed per piece (see the module docstring)
PRECISION = "fp16"  # the example scripts' --fp16 (A100: the same peak and width as bf16)


def build_traced_gpt(hidden: int, heads: int, layers: int):
    """Megatron's GPT as HF GPT-2 on the meta device, in training mode (its dropout ops kept, traced with
    ``TRACED_DROPOUT``), with the attention written out (HF's "eager" attention: scores GEMM, scale, mask,
    softmax, dropout, GEMM), and one sequence."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        n_layer=layers, n_embd=hidden, n_head=heads, vocab_size=VOCAB, n_positions=SEQ, attn_pdrop=TRACED_DROPOUT,
        resid_pdrop=TRACED_DROPOUT, embd_pdrop=TRACED_DROPOUT, activation_function="gelu_new",
        layer_norm_epsilon=1e-5, use_cache=False, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    with torch.device("meta"):
        model = GPT2LMHeadModel._from_config(cfg, attn_implementation="eager")
    model.train(True)
    return model, torch.empty(1, SEQ, dtype=torch.long, device="meta")


def _block(node) -> int | None:
    parts = node.module_path.split(".")
    if len(parts) >= 3 and parts[:2] == ["transformer", "h"] and parts[2].isdigit():
        return int(parts[2])
    return None


_CASTS = ("aten.to.dtype", "aten._to_copy.default", "aten.clone.default")


def _kept_apart(graph) -> frozenset[str]:
    """The ops Megatron-LM runs as kernels of their own inside a block: the LayerNorms and the attention
    dropout (a dropout whose input comes from a softmax, through casts and views)."""
    from shardwise.costs.compute import cost_class

    by_name = {n.name: n for n in graph.nodes}
    out = set()
    for n in graph.nodes:
        if "layer_norm" in n.op:
            out.add(n.name)
        elif "dropout" in n.op and n.inputs:
            v = by_name.get(n.inputs[0])
            while v is not None and (v.op in _CASTS or cost_class(v.op) == "free") and v.inputs:
                v = by_name.get(v.inputs[0])
            if v is not None and "softmax" in v.op:
                out.add(n.name)
    return frozenset(out)


def megatron_kernels(placed) -> tuple:
    """Megatron-LM's 2021 kernels of a placed unit (see the module docstring) as fused groups."""
    from kernel_models import connected_groups

    apart = _kept_apart(placed.graph)
    return connected_groups(placed.graph, placed.strategies, placed.mesh, _block, lambda n: n.name in apart)


def _cpu_s() -> float:
    """CPU seconds of this process and its finished children (the ILP solver runs as a child process):
    the planning work, whatever else the machine is running."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _plan_dict(c) -> dict:
    return {
        "tp": c.tp, "pp": c.pp, "dp": c.dp, "sequence_parallel": c.sp, "microbatch": c.microbatch,
        "microbatches": c.microbatches, "schedule": c.schedule, "virtual": c.virtual, "recompute": c.recompute,
        "predicted_step_s": c.step_s, "predicted_bubble_s": c.bubble_s,
        "predicted_peak_memory_gib": c.peak_bytes / 2**30,
    }  # fmt: skip


def executed_flops(result, candidate) -> float:
    """FLOPs a plan executes in one step on all devices: forward x3 (the search's model FLOPs), plus the
    forward once more when it recomputes (its "full" recomputation runs every unit again)."""
    return result.model_flops * (4 / 3 if candidate.recompute == "full" else 1.0)


def front_door_s(row: tuple) -> float:
    """Wall-clock seconds of ``shardwise.compile`` for the row's model with the published layout pinned."""
    import shardwise

    params_b, hidden, layers, gpus, batch, published, tp, pp = row
    model, ids = build_traced_gpt(hidden, HEADS.get(hidden, max(1, hidden // 128)), layers)
    import torch

    ids = torch.empty(batch, SEQ, dtype=torch.long, device="meta")
    t0 = time.perf_counter()
    shardwise.compile(
        model, f"dgx-a100x{gpus // 8}", example_inputs=(ids,), example_kwargs={"labels": ids}, mode="train",
        precision=PRECISION, loss_fn=lambda o: o.loss,
        constraints={"tp": tp, "pp": pp, "sp": 1, "recompute": "full"} if pp > 1 else {"tp": tp, "pp": 1},
    )  # fmt: skip
    return time.perf_counter() - t0


def run_row(row: tuple) -> dict:
    import dataclasses

    from shardwise.cluster import get_cluster
    from shardwise.frontend.trace import trace
    from shardwise.planner.search import SearchOptions, search
    from shardwise.zoo import build_model

    params_b, hidden, layers, gpus, batch, published, tp, pp = row
    heads = HEADS.get(hidden, max(1, hidden // 128))
    shape = {"hidden": hidden, "heads": heads, "vocab": VOCAB, "seq": SEQ, "batch": 1}
    full, _ = build_model("gpt2", device="meta", layers=layers, **shape)
    counted = sum(p.numel() for p in full.parameters())
    del full
    t0 = time.perf_counter()
    cpu0 = _cpu_s()
    model, ids = build_traced_gpt(hidden, heads, 2)
    graph, _ = trace(model, (ids,), example_kwargs={"labels": ids}, loss_fn=lambda o: o.loss)
    trace_s = time.perf_counter() - t0
    cluster = get_cluster(f"dgx-a100x{gpus // 8}")
    base = SearchOptions(mode="train", precision=PRECISION, global_batch=batch, repeat_blocks=layers)
    megatron = dataclasses.replace(base, kernels=megatron_kernels, fused_backward=True)
    flops = megatron_flops(batch, layers, hidden)
    peak = cluster.device.flops("float16") * gpus
    ours = search(graph, cluster, {}, base)
    out = {
        "params_b": params_b, "params_counted_b": counted / 1e9, "params_formula_b": megatron_params(layers, hidden) / 1e9,
        "hidden": hidden, "layers": layers, "heads": heads, "gpus": gpus, "global_batch": batch,
        "published_tflops": published, "our_plan": _plan_dict(ours.best),
        "ours_predicted_mfu_executed": executed_flops(ours, ours.best) / ours.best.step_s / peak,
        "ours_predicted_tflops_megatron_formula": flops / ours.best.step_s / gpus / 1e12,
        "search_s": ours.planning_s, "evaluated": ours.evaluated, "placements": ours.placements,
    }  # fmt: skip
    if tp is not None:
        pins = {"tp": tp, "pp": pp, "sp": 1, "recompute": "full"}
        pub = search(graph, cluster, pins, megatron)
        layout = search(graph, cluster, pins, base)
        step = pub.best.step_s
        out.update({
            "published_config": {"tp": tp, "pp": pp, "dp": gpus // (tp * pp)},
            "published_config_plan": _plan_dict(pub.best),
            "published_config_predicted_tflops": flops / step / gpus / 1e12,
            "published_config_error": (flops / step / gpus / 1e12) / published - 1,
            "published_config_predicted_mfu_executed": executed_flops(pub, pub.best) / step / peak,
            "published_layout_ours_plan": _plan_dict(layout.best),
            "ours_over_published_layout": layout.best.step_s / ours.best.step_s,
            "published_search_s": pub.planning_s + layout.planning_s,
        })  # fmt: skip
    out["planning_s"] = time.perf_counter() - t0
    out["planning_cpu_s"] = _cpu_s() - cpu0
    out["trace_s"] = trace_s
    return out


def _fmt_plan(p: dict) -> str:
    sched = p["schedule"] + (f"x{p['virtual']}" if p["virtual"] > 1 else "")
    sp = "+sp" if p["sequence_parallel"] else ""
    return (
        f"tp{p['tp']}{sp} pp{p['pp']} dp{p['dp']} mb{p['microbatch']}x{p['microbatches']} {sched} "
        f"rc={p['recompute']}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--row", action="append", type=parse_row, help="params_b,hidden,layers,gpus,global_batch,"
                        "published_tflops[,tp,pp] (repeatable; default: five rows of Megatron-LM's Table 1)")  # fmt: skip
    parser.add_argument("--front-door", action="store_true",
                        help="also time shardwise.compile with each row's published layout pinned")  # fmt: skip
    parser.add_argument("--output", default=str(RESULTS / "megatron_table.json"))
    args = parser.parse_args(argv)
    rows = args.row or list(DEFAULT_ROWS)
    from shardwise.cluster import get_cluster

    load = os.getloadavg()[0]
    eff = get_cluster("dgx-a100x1").efficiency
    print(
        f"efficiencies (published, independent): GEMM {eff.gemm:.3f}, attention fwd/bwd {eff.attention_forward:.2f}/"
        f"{eff.attention_backward:.2f}, HBM {eff.memory:.3f}, NVLink {eff.intra_node:.3f}, IB {eff.inter_node:.3f}"
    )
    results = []
    header = (f"{'params':>7} {'GPUs':>5} {'batch':>5}  {'published config (predicted: mb, schedule)':<44} "
              f"{'pub.':>5} {'pred.':>5} {'err':>6} {'MFU':>5}  {'our plan (predicted)':<44} {'MFU':>5} "
              f"{'x pub':>5} {'plan s':>6} {'cpu s':>6}")  # fmt: skip
    print(header)
    print("-" * len(header))
    for row in rows:
        r = run_row(row)
        if args.front_door and row[6] is not None:
            r["front_door_s"] = front_door_s(row)
        results.append(r)
        pc = r.get("published_config_plan")
        pub = f"{_fmt_plan(pc):<44}" if pc else f"{'-':<44}"
        pred = r.get("published_config_predicted_tflops")
        err = f"{100 * r['published_config_error']:+.0f}%" if pc else "-"
        mfu = f"{r['published_config_predicted_mfu_executed']:.2f}" if pc else "-"
        ratio = f"{r['ours_over_published_layout']:.2f}" if pc else "-"
        print(
            f"{r['params_b']:>6.1f}B {r['gpus']:>5} {r['global_batch']:>5}  {pub} {r['published_tflops']:>5.0f} "
            f"{(f'{pred:.0f}' if pred else '-'):>5} {err:>6} {mfu:>5}  {_fmt_plan(r['our_plan']):<44} "
            f"{r['ours_predicted_mfu_executed']:>5.2f} {ratio:>5} {r['planning_s']:>6.1f} {r['planning_cpu_s']:>6.1f}",
            flush=True,
        )
        if "front_door_s" in r:
            print(f"{'':>21}front door (shardwise.compile, published layout pinned): {r['front_door_s']:.1f} s")
    print("pub./pred.: TFLOP/s per GPU by Megatron's formula (recomputation included) over the published and the "
          "predicted step of the published configuration (Megatron-LM's kernels); err = predicted vs published; "
          "MFU = FLOPs the plan executes / predicted step / peak; x pub = the published layout's predicted step over "
          f"ours, both as shardwise's program runs them. Load {load:.1f}")  # fmt: skip
    doc = {
        "benchmark": "megatron_table",
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_at_start": load},  # fmt: skip
        "source": "Narayanan et al. (SC'21) Table 1; workload from NVIDIA/Megatron-LM 8cfef1b (2021-04-08)",
        "cluster": "dgx-a100xN (A100-SXM4-80GB, NVSwitch, 8x HDR 200 Gb/s per node)",
        "precision": PRECISION, "sequence": SEQ, "vocabulary": VOCAB, "dropout": MEGATRON_DROPOUT,
        "kernels": "Megatron-LM 2021: unfused attention GEMMs, fused scale-mask-softmax, separate attention dropout, "
                   "fused bias-GeLU, fused bias-dropout-add, fused LayerNorm (fused backward too); full recomputation",
        "efficiency": {k: getattr(eff, k) for k in ("gemm", "attention_forward", "attention_backward", "memory",
                                                    "intra_node", "inter_node")} | {"sources": dict(eff.sources)},
        "rows": results,
    }  # fmt: skip
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
