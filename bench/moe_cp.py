"""Context parallelism and DeepSeek-V3 against published figures: ``python bench/moe_cp.py`` (issue 17, item 5).

**1. torchtitan's context-parallel rows** (pytorch/torchtitan, ``benchmarks/llama3_h100_202412_torchtitan.md``,
Table 2: "FSDP + CP + torch.compile + Float8. Llama 3.1 8B model. 8 GPUs. Local batch size 1. Full activation
checkpointing"): FSDP 8 / CP 1 at 32K tokens, 3,890 tokens/s/GPU; FSDP 4 / CP 2 at 64K, 2,540; FSDP 2 / CP 4 at
128K, 1,071; FSDP 1 / CP 8 at 256K, 548. The cluster is ``bench/clusters/grand-teton-h100.yaml``.

The workload, fixed from the published source before any error was looked at (the same torchtitan version as
``bench/torchtitan_h100.py``, commit 9dec370, whose model, attention, FSDP and torch.compile settings it reuses;
see that file's docstring):

- *Model*: torchtitan's Llama 3.1 8B configuration as ``bench/torchtitan_h100.py`` builds it (bf16 on the
  meta device), one sequence per data-parallel rank (local batch 1): the global batch is the FSDP degree, each
  sequence of the row's length, split over ``cp`` ranks. Attention is torchtitan's call exactly as
  ``bench/torchtitan_h100.py`` traces it (``torchtitan_sdpa``): the key/value heads repeated to the 32 query
  heads (``repeat_kv``: an expand and a copying reshape) and a causal SDPA with no mask tensor
  (``is_causal=True``: FlashAttention-2's causal kernel, priced at half the full FLOPs). Since this session's
  ring rules (below), so that the ring moves what torch moved: PyTorch's ring receives the repeated keys and
  values (32 heads, 4 x the bytes of the 8 key/value heads) and all-gathers, packs, accumulates and passes
  them and their gradients at that size; the repeat's copies are priced as ops. (Until then this file traced
  ``enable_gqa=True``, the 8 heads inside the kernel, because the cp split did not follow the sequence through
  the expand + reshape; it does now, with no redistribution there. Before the cp split of ``is_causal`` calls
  landed, it traced transformers' own SDPA call, which under tracing materializes the S x S causal mask: a
  masked call, priced as a full attention. The JSON keeps those runs.)
- *Parallelism*: FSDP over the FSDP degree = ``dp=F, zero=3``; ``cp=C`` with ring attention (torchtitan runs
  PyTorch's experimental ``context_parallel``: ring attention passing key/value shards,
  ``cp_attention="ring"``). torchtitan's FSDP shards the parameters over ``dp x cp`` (its ``dp_shard_cp``
  mesh); shardwise's ZeRO does too since ZeRO over dp x cp landed (issue 17: the optimizer state and gradients
  over the one dp x cp group, the weights split over dp and cp where the placement ILP finds it pays), so
  FSDP 1 / CP 8 is ``zero=3`` as well. (The first runs, in the JSON's history, sharded over ``dp`` only.)
- *Full activation checkpointing*: every TransformerBlock is recomputed whole in the backward (its input
  saved): ``plan.recompute`` ranges covering each block.
- *torch.compile*: per block, Inductor's kernels as ``bench/torchtitan_h100.py`` models them
  (``inductor_groups``), forward and backward fused (``fused_backward=True``).
- *Float8*: ``precision="fp8"``: torchao's Float8Linear on every ``nn.Linear`` but the output projection
  (torchtitan's ``module_filter_fn``), priced at the H100 FP8 dense peak (1,979 TFLOP/s, NVIDIA H100 Tensor Core
  GPU datasheet) times the matmuls' achieved fraction. Until this session the casts were not priced; since then
  (the assumptions written here before the rerun) each float8 linear layer also pays torchao's tensorwise
  scaling and casting kernels as torchao's own roofline model counts their bytes
  (``torchao/testing/float8/roofline_utils.py``: the input and the output's gradient 6 bytes an element each,
  the weight 5 + 3; ``costs.compute.FLOAT8_CAST_BYTES``) at the memory's bandwidth, and the cluster's matmul
  and memory fractions are torchao's figures for Meta's H100 variant (0.78 of peak, 0.92 of 2.4 TB/s, the same
  file; they were MAMF's 700 W figure and an A800's copy fraction). Checked apart from Table 2 against
  torchao's published microbenchmark (``torchao/float8/README.md``, "Performance", Example 2: a Float8Linear's
  forward and backward at M, K, N = 4096, 8192, 16384 run 1.39x as fast as bf16 on H100): the price list's
  ratio for that layer is printed and stored (``float8_linear_check``).
- *Ring attention*: PyTorch's experimental ``context_parallel`` at torch 1963fc8 (torchtitan's Table 2 run):
  ``rotate_method`` all-gather by default, load balance by chunk pairs (``enable_load_balance``), per block the
  FlashAttention-2 kernel (``_scaled_dot_product_flash_attention``: cuDNN attention was opt-in, pytorch#138522,
  and context parallelism supported it only from torchtitan#1000, 2025), the blocks' outputs merged in float32
  (``convert_to_f32=True``) and the gradients accumulated and passed in float32. Since this session those float32
  passes are priced (``costs.attention.TORCH_RING_*``, one fused kernel per step). Written down before this
  session's rerun, read from that source (``_templated_ring_attention`` and its backward; the same loop from
  torch 2.5 to the December 2024 nightly): the keys and values move by the default all-gather rotater, once
  per call, launched before the first block and waited for before the second (only what exceeds one block is
  exposed, in the forward, in the recomputed forward and again in the backward); the float32 key/value
  gradients move by an all-to-all rotater, one hop per step, each waited for after the next block's backward
  is launched, the last after the loop (until this session every gradient hop was charged in full). Blocks:
  with load balance the first block is the causal one over the rank's two chunks, every later one a
  non-causal block of half the rank's rows or keys. (First written here as "all priced at the causal rates";
  corrected before the second rerun of this session, from the same published figures:) the causal block's
  forward runs at FlashAttention-2's causal rate (335 TFLOP/s at 16K, FlashAttention-3's paper, Fig. 5) and
  the non-causal blocks' forward at its rate without a mask (370 TFLOP/s at 16K, the same figure;
  ``efficiency.attention_forward_full`` of the cluster); the backward of every block at the one published
  backward figure (322: the paper gives FlashAttention-2's backward in one figure per head dimension). The same rate
  applies to any fused attention call without a mask on this cluster.

*What we looked for and did not find* (this session, before the rerun): a published measurement of an H100
at torchtitan's 500 W limit against 700 W (dense bf16/fp8 matmuls, FlashAttention or LLM training; sustained
clock or throughput), to state the limit as a property of the cluster, applied to every row alike. Searched
(the ``search`` tool's stored pages, issues, docs and code): power-capping and energy work (Zeus / Perseus /
ML.ENERGY, POLCA and Patel et al.'s "Characterizing Power Management Opportunities for LLMs in the Cloud":
no H100 throughput-by-power-limit figure in our copies); Ujeniya et al. 2026 (arXiv 2604.11391: H100 HBM2e
94 GB under power caps of 200-700 W, but FP64 DGEMM and a triad only, and its figures are not in our copy);
Mayr et al. 2026 (arXiv 2603.16164: LLM continued pre-training throughput under power limits on H100, H200
and MI300X, the kind of figure needed, but only its abstract is in our copy: the first thing to read next);
MLPerf Training power results (node energy per run, not throughput by power limit); NVIDIA's datasheets (TDP
only); torchtitan's docs and benchmarks (only "tuning it up to 700W TDP can potentially provide further
speedups"); tritonbench (its CI's power and clock settings, 500 W as the H100 default, no throughput by power
limit; issue #141 compares attention kernels on a Meta "devgpu" H100 and a GCP H100, and only the devgpu
figures are in our copy); torchao (``roofline_utils.py``: its matmul fraction 0.78 was observed on Meta's H100
variant itself, so a power derating on top of it would count the limit twice). A copy of torchao's table in
an unnamed public repository splits it into bf16 0.69 and float8 0.78; it is in no torchao branch or pull
request in our copy of torchao, so it is not used. Nothing was derated: the common factor of Table 1 and of
the CP 1 row stays without a published explanation.

Columns: the published tokens/s/GPU (measured by torchtitan), ours **predicted** by the price list for the
published layout, the error. Goal: each within 20%.

**2. DeepSeek-V3** (its technical report, arXiv 2412.19437, 3.2: 2048 H800s, PP 16, EP 64 across 8 nodes,
ZeRO-1 data parallelism; 671B parameters, 37B active; FP8 training): its configuration on the meta device
(``bench/big_models.py:deepseek_v3``, sequence 4096, global batch 15360) on ``bench/clusters/h800-deepseek.yaml``
through ``shardwise.compile`` (bf16 and fp8): our layout, its **predicted** step, the planning time (< 120 s);
then the published layout pinned (``pp=16, dp=128, ep=64, zero=1``): its predicted step, or why the planner
cannot make it.

Writes ``bench/results/moe_cp.json``. Timings are wall-clock on a shared machine (load recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))

GPUS = 8
# (FSDP degree, CP degree, sequence length) -> published tokens/s/GPU: torchtitan Table 2
CP_ROWS = {(8, 1, 32768): 3890.0, (4, 2, 65536): 2540.0, (2, 4, 131072): 1071.0, (1, 8, 262144): 548.0}
# the same rows' published peak memory (GiB per GPU), torchtitan's Table 2
CP_MEMORY_GIB = {(8, 1, 32768): 83.9, (4, 2, 65536): 84.2, (2, 4, 131072): 84.0, (1, 8, 262144): 84.5}
DEEPSEEK_CLUSTER = ROOT / "clusters" / "h800-deepseek.yaml"
DEEPSEEK_PUBLISHED = {"pp": 16, "dp": 128, "ep": 64, "zero": 1}


def _llama(batch: int, seq: int, layers: int | None) -> tuple[Any, Any]:
    """Llama 3.1 8B with torchtitan's attention call (``torchtitan_h100.ATTENTION``: repeat the key/value heads,
    causal SDPA without a mask; see the module docstring) and a batch of ids."""
    import torch
    from torchtitan_h100 import ATTENTION, LLAMA31_8B, _register_attention
    from transformers import LlamaConfig, LlamaForCausalLM

    _register_attention()
    cfg = LlamaConfig(
        **{**LLAMA31_8B, "max_position_embeddings": max(seq, LLAMA31_8B["max_position_embeddings"]),
           **({"num_hidden_layers": layers} if layers else {})}, use_cache=False,
    )  # fmt: skip
    with torch.device("meta"):
        model = LlamaForCausalLM._from_config(cfg, attn_implementation=ATTENTION, dtype=torch.bfloat16)
    return model, torch.empty(batch, seq, dtype=torch.long, device="meta")


def full_ranges(graph: Any) -> tuple[tuple[str, str], ...]:
    """Full activation checkpointing: each TransformerBlock's ops, first to last, run again in the backward."""
    from torchtitan_h100 import _layer_of

    first: dict[int, str] = {}
    last: dict[int, str] = {}
    for n in graph.nodes:
        layer = _layer_of(n.module_path)
        if layer is not None:
            first.setdefault(layer, n.name)
            last[layer] = n.name
    return tuple((first[k], last[k]) for k in sorted(first))


def breakdown(plan: Any, step: Any) -> dict[str, float]:
    """The predicted step by part (seconds on one rank, summing to the step): the compute of matmuls, of
    attention and of the other ops, in the forward, the recomputation (full checkpointing) and the backward;
    communication: the ring's key/value exchange (attention ops' own), FSDP's parameter gathers and their
    gradients' reduce-scatters (the redistributions of the ops reading the weights), the other ops'
    redistributions, the bucketed gradient reduction and the optimizer."""
    from shardwise.costs.compute import cost_class

    kind = {n.name: cost_class(n.op) for n in plan.graph.nodes}
    out: dict[str, float] = {}
    for e in step.events:
        cls = kind.get(e.node, "")
        if e.kind == "compute":
            what = {"gemm": "matmuls", "attention": "attention"}.get(cls, "other ops") if e.node else e.label
            key = f"{e.phase}: {what}" if e.phase in ("forward", "backward", "recompute") else f"{e.phase}: {e.label}"
        elif cls == "attention":
            key = f"{e.phase}: ring exchange and float32 merges (not hidden)"
        elif cls == "gemm":
            key = f"{e.phase}: weights gathered / gradients reduce-scattered (FSDP)"
        else:
            key = f"{e.phase}: {'other redistributions' if e.node else e.label}"
        out[key] = out.get(key, 0.0) + e.seconds
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def cp_row(fsdp: int, cp: int, seq: int, published: float, layers: int | None) -> dict[str, Any]:
    from torchtitan_h100 import inductor_groups

    from shardwise.cluster import get_cluster
    from shardwise.costs.prices import price_list
    from shardwise.costs.step import price_flat
    from shardwise.errors import ShardwiseError
    from shardwise.frontend.trace import trace
    from shardwise.planner.auto import plan_auto

    cluster = get_cluster(str(ROOT / "clusters" / "grand-teton-h100.yaml"))
    model, ids = _llama(fsdp, seq, layers)
    t0 = time.perf_counter()
    graph, _ = trace(model, (ids,), example_kwargs={"labels": ids}, loss_fn=lambda out: out.loss)
    # FSDP over dp x cp (dp_shard_cp); full checkpointing pinned so that the memory map is the one it runs with;
    # no host offload (torchtitan keeps everything on the GPU: a plan that does not fit is priced as it is)
    constraints: dict[str, object] = {"dp": fsdp, "tp": 1, "zero": 3, "recompute": "full", "offload": "none"}
    if cp > 1:
        constraints |= {"cp": cp, "cp_attention": "ring"}
    row: dict[str, Any] = {"row": f"FSDP {fsdp}, CP {cp}, seq {seq}", "fsdp": fsdp, "cp": cp, "seq": seq,
                           "published_tokens_per_s_per_gpu": published, "constraints": constraints}  # fmt: skip
    try:
        plan = plan_auto(graph, cluster, mode="train", precision="fp8", constraints=constraints, require_fit=False)
    except ShardwiseError as exc:
        row["error_message"] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
        row["planning_s"] = time.perf_counter() - t0
        return row
    plan = plan.replace(recompute=full_ranges(plan.graph))
    compiled = plan.replace(fused_groups=inductor_groups(plan))
    step = price_flat(compiled, price_list(cluster, "fp8"), fused_backward=True)
    tps = fsdp * seq / step.step_s / GPUS
    row["breakdown_s"] = breakdown(compiled, step)
    row["notes"] = [n for n in plan.notes if n.startswith(("ZeRO", "context parallelism: the sequence"))]
    ways = sorted({st.split for st in plan.strategies if any("@" in label for _, label in st.split)})
    row |= {
        "predicted_step_s": step.step_s, "predicted_tokens_per_s_per_gpu": tps, "error": tps / published - 1,
        "degrees": dict(plan.degrees), "zero": plan.zero_stage, "attention_splits": [str(w) for w in ways],
        "predicted_memory_gib": max(plan.predicted.memory_bytes or (0,)) / 2**30,
        "planning_s": time.perf_counter() - t0,
    }  # fmt: skip
    return row


def float8_linear_check() -> dict[str, Any]:
    """The price list's float8 speedup of one Float8Linear (forward and backward) against torchao's published
    microbenchmark on H100 (``torchao/float8/README.md``, Example 2: M, K, N = 4096, 8192, 16384, 1.39x)."""
    import torch
    from torch import nn

    from shardwise.cluster import get_cluster
    from shardwise.costs.backward import backward_s
    from shardwise.costs.prices import price_list
    from shardwise.frontend.trace import trace

    m, k, n = 4096, 8192, 16384
    with torch.device("meta"):
        layer = nn.Linear(k, n, bias=False, dtype=torch.bfloat16)
    graph, _ = trace(layer, (torch.empty(m, k, dtype=torch.bfloat16, device="meta"),))
    node = next(x for x in graph.nodes if x.op == "aten.linear.default")
    params = {p.name: p.spec.nbytes for p in graph.params}
    cluster = get_cluster(str(ROOT / "clusters" / "grand-teton-h100.yaml"))
    times = {}
    for precision in ("bf16", "fp8"):
        prices = price_list(cluster, precision)
        work = prices.work(node, 1, params, 1.0)
        times[precision] = prices.compute.forward_s(work) + backward_s(prices.compute, work)
    speedup = times["bf16"] / times["fp8"]
    return {"mkn": [m, k, n], "published_speedup": 1.39, "predicted_speedup": speedup,
            "predicted_bf16_s": times["bf16"], "predicted_fp8_s": times["fp8"],
            "source": "torchao/float8/README.md, Performance, Example 2 (H100 microbenchmark, compiled)"}  # fmt: skip


def deepseek(precision: str) -> dict[str, Any]:
    import big_models
    import torch

    import shardwise
    from shardwise.cluster import get_cluster
    from shardwise.errors import ShardwiseError
    from shardwise.planner.constraints import parse_constraints

    out: dict[str, Any] = {"precision": precision, "load_before": os.getloadavg()}
    with torch.device("meta"):
        model, inputs, loss = big_models.deepseek_v3()
    model.train()
    for name, constraints in (("ours", None), ("published layout", DEEPSEEK_PUBLISHED)):
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            if constraints is not None:  # refused before tracing when the planner cannot make the layout
                parse_constraints(constraints, get_cluster(str(DEEPSEEK_CLUSTER)))
            cm = shardwise.compile(model, str(DEEPSEEK_CLUSTER), example_inputs=inputs, mode="train",
                                   precision=precision, loss_fn=loss, constraints=constraints)  # fmt: skip
            plan = cm.plan
            out[name] = {
                "planning_s": time.perf_counter() - t0, "planning_cpu_s": time.process_time() - c0,
                "degrees": dict(plan.degrees),
                "layout": next((a.note for a in plan.alternatives if a.chosen), ""),
                "predicted_step_s": plan.predicted.step_time_s, "predicted_mfu": plan.predicted.mfu,
                "predicted_memory_gib": max(plan.predicted.memory_bytes or (0,)) / 2**30,
                "notes": [n for n in plan.notes if n.startswith(("planning time", "search:", "balanced", "precision"))],
            }  # fmt: skip
        except ShardwiseError as exc:
            out[name] = {"planning_s": time.perf_counter() - t0, "constraints": constraints,
                         "error_message": f"{type(exc).__name__}: {str(exc)[:600]}"}  # fmt: skip
    out["load_after"] = os.getloadavg()
    return out


def _earlier_runs(previous: dict[str, Any] | None, note: str) -> list[dict[str, Any]]:
    """The earlier runs' rows (published, predicted, error) kept beside a new run, the newest last."""
    if not previous:
        return []
    earlier = list(previous.get("earlier_runs", []))
    earlier += [v for k, v in previous.items() if k.startswith("first_run")]
    keep = ("row", "predicted_tokens_per_s_per_gpu", "error", "predicted_memory_gib", "zero")
    earlier.append({"note": note, "rows": [{k: r[k] for k in keep if k in r} for r in previous.get("rows", [])]})
    return earlier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=None, help="Llama layers (default: all 32; for a quick run)")
    parser.add_argument("--skip-cp", action="store_true")
    parser.add_argument("--skip-deepseek", action="store_true")
    parser.add_argument("--precisions", nargs="*", default=["bf16", "fp8"], help="DeepSeek-V3's planning runs")
    parser.add_argument("--output", default=str(RESULTS / "moe_cp.json"))
    parser.add_argument("--previous-note", default="the previous run",
                        help="what the previous run's rows (kept in the JSON's earlier_runs) were made with")
    args = parser.parse_args()
    output = Path(args.output)
    # a part skipped keeps its results of the previous run
    result: dict[str, Any] = json.loads(output.read_text()) if output.exists() else {}
    result |= {
        "benchmark": "context parallelism (torchtitan Table 2) and DeepSeek-V3's layout; ours are predicted",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
    }  # fmt: skip
    if not args.skip_cp:
        print(f"{'row':>28} {'published':>9} {'predicted':>9} {'error':>7}   (tokens/s/GPU; predicted by shardwise; "
              "memory: predicted GiB / published GiB)")
        rows = []
        for (fsdp, cp, seq), published in CP_ROWS.items():
            row = cp_row(fsdp, cp, seq, published, args.layers)
            row["published_memory_gib"] = CP_MEMORY_GIB[(fsdp, cp, seq)]
            rows.append(row)
            if "error" in row:
                print(f"{row['row']:>28} {published:>9,.0f} {row['predicted_tokens_per_s_per_gpu']:>9,.0f} "
                      f"{row['error']:>+7.1%}   step {row['predicted_step_s']:.3f} s, "
                      f"{row['predicted_memory_gib']:.1f} / {row['published_memory_gib']:.1f} GiB, "
                      f"planned in {row['planning_s']:.1f} s", flush=True)  # fmt: skip
                for note in row["notes"]:
                    print(f"{'':>30}{note[:150]}")
                for part, seconds in row["breakdown_s"].items():
                    if seconds >= 0.005 * row["predicted_step_s"]:
                        print(f"{'':>30}{seconds:8.3f} s  {part}")
            else:
                print(f"{row['row']:>28} {published:>9,.0f} {'-':>9} {'-':>7}   {row['error_message']}", flush=True)
        check = float8_linear_check()
        print(f"float8 linear (M, K, N = 4096, 8192, 16384), forward + backward over bf16: predicted "
              f"{check['predicted_speedup']:.2f}x, published {check['published_speedup']:.2f}x (torchao README)")
        earlier = _earlier_runs(result.get("torchtitan_cp"), args.previous_note)
        result["torchtitan_cp"] = {"layers": args.layers or 32, "rows": rows, "load_after": os.getloadavg(),
                                   "float8_linear_check": check, "earlier_runs": earlier}  # fmt: skip
    if not args.skip_deepseek:
        result["deepseek_v3"] = {}
        for precision in args.precisions:
            got = deepseek(precision)
            result["deepseek_v3"][precision] = got
            for name in ("ours", "published layout"):
                r = got[name]
                what = (f"{r['layout']}: predicted step {r['predicted_step_s']:.2f} s, {r['predicted_memory_gib']:.1f} GiB"
                        if "layout" in r else r["error_message"][:300])  # fmt: skip
                print(f"DeepSeek-V3 {precision} {name}: {what} (planned in {r['planning_s']:.1f} s)", flush=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
