"""Our serving prices of a decoder layer against a modern engine's measured kernels: ``python
bench/serving_kernels.py --vidur DIR`` (DIR: Vidur's ``data/profiling/compute``, microsoft/vidur at 7d47513; not
shipped here). Writes bench/results/serving_kernels.json.

**What is compared** (fixed before the first run, 2026-12-07 03:45 UTC): Vidur (Agrawal et al., MLSys'24)
publishes per-kernel times of Llama layers on A100 and H100, run with Sarathi-Serve's vLLM-derived model code
and timed on the device by the PyTorch profiler (``vidur/profiling/mlp``, ``vidur/profiling/common/
cuda_timer.py``), per number of tokens in the batch and tensor-parallel degree. A layer's kernels besides
attention and the tensor-parallel all-reduces: the two norms, the QKV projection, rotary embedding, the
output projection, the MLP's up (gate and up) and down projections, its activation and two residual adds
(``time_stats.*.median``, the ``add`` row counted twice: the layer times it twice). Ours: the same layer on
one of ``tp`` devices by ``ServingPrices`` (the matmuls as one ``gemm``-class roofline, the norms, activation
and adds as ``memory``-class bytes; no rotary kernel), the all-reduces left out, on the ``dgx-a100`` and
``dgx-h100`` presets. Vidur's device is an A100 80GB or an H100 80GB (its ``a100`` / ``h100`` directories); the
presets' device figures are SXM parts. Rows: tokens 1, 8, 64, 512, 2048 (decode batches and prefill chunks),
tp 1, 2, 4, 8, every Llama model of Vidur's we know the configuration of. Our figures are predicted, Vidur's
measured. This is a check of the prices, not an input to them: nothing is fitted.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shardwise.cluster import get_cluster  # noqa: E402
from shardwise.costs.prices import PriceList  # noqa: E402
from shardwise.costs.serving import ServingPrices  # noqa: E402
from shardwise.planner.serving.model import serving_model  # noqa: E402

RESULTS = ROOT / "bench" / "results"
#: Vidur device directory -> our preset
DEVICES = {"a100": "dgx-a100x1", "h100": "dgx-h100x1"}
#: Vidur model directories whose configurations serving_model knows
MODELS = ("meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-70b-hf", "meta-llama/Meta-Llama-3-8B")
#: a layer's kernels in Vidur's profile (attention and all-reduces excluded); ``add`` runs twice a layer
KERNELS = ("input_layernorm", "attn_pre_proj", "attn_rope", "attn_post_proj", "post_attention_layernorm",
           "mlp_up_proj", "mlp_act", "mlp_down_proj", "add", "add")  # fmt: skip
TOKENS = (1, 8, 64, 512, 2048)


def measured_layers(path: Path) -> dict[tuple[int, int], float]:
    """(tokens, tp) -> seconds of one layer's kernels (first row of each pair in the file)."""
    out: dict[tuple[int, int], float] = {}
    with path.open() as f:
        for row in csv.DictReader(f):
            key = (int(row["num_tokens"]), int(row["num_tensor_parallel_workers"]))
            if key[0] in TOKENS and key not in out:
                out[key] = sum(float(row[f"time_stats.{k}.median"]) for k in KERNELS) / 1e3
    return out


def predicted_layer_s(prices: ServingPrices, tp: int, tokens: int) -> float:
    """Our price of the same kernels: the layer without attention, less its two all-reduces."""
    m = prices.model
    t = prices._layer_base_s(tp, float(tokens))  # the layer's matmuls, memory kernels and all-reduces
    if tp > 1:
        t -= 2 * prices.prices.collective_s("allreduce", tokens * m.hidden * m.act_bytes, prices.tp_ranks(tp))
    return t


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vidur", required=True, help="Vidur's data/profiling/compute directory")
    parser.add_argument("--output", default=str(RESULTS / "serving_kernels.json"))
    args = parser.parse_args(argv)
    rows = []
    for device, preset in DEVICES.items():
        cluster = get_cluster(preset)
        for name in MODELS:
            path = Path(args.vidur) / device / name / "mlp.csv"
            if not path.exists():
                continue
            prices = ServingPrices(serving_model(name), PriceList(cluster, "bf16"), "vllm")
            for (tokens, tp), measured in sorted(
                measured_layers(path).items(), key=lambda kv: (kv[0][1], kv[0][0])
            ):
                ours = predicted_layer_s(prices, tp, tokens)
                rows.append({"device": device, "preset": preset, "model": name, "tp": tp, "tokens": tokens,
                             "measured_us": measured * 1e6, "predicted_us": ours * 1e6,
                             "ratio": ours / measured})  # fmt: skip
    print(
        f"{'device':<6} {'model':<26}{'tp':>3}{'tokens':>7}{'Vidur us':>10}{'ours us':>9}{'ours/Vidur':>11}"
    )
    for r in rows:
        print(f"{r['device']:<6} {r['model']:<26}{r['tp']:>3}{r['tokens']:>7}{r['measured_us']:>10.1f}"
              f"{r['predicted_us']:>9.1f}{r['ratio']:>11.2f}")  # fmt: skip
    summary = {}
    for device in DEVICES:
        ratios = [r["ratio"] for r in rows if r["device"] == device]
        # what one token's layer takes beyond our price, per kernel of the layer (an observation, not a price)
        gaps = [(r["measured_us"] - r["predicted_us"]) / len(KERNELS) for r in rows
                if r["device"] == device and r["tokens"] == 1]  # fmt: skip
        if ratios:
            summary[device] = {"rows": len(ratios), "median_ratio": statistics.median(ratios),
                               "min_ratio": min(ratios), "max_ratio": max(ratios),
                               "one_token_gap_us_per_kernel": [min(gaps), statistics.median(gaps), max(gaps)]}  # fmt: skip
            s = summary[device]
            print(f"{device}: ours/Vidur median {s['median_ratio']:.2f} (min {s['min_ratio']:.2f}, max "
                  f"{s['max_ratio']:.2f}) over {s['rows']} rows (predicted / measured); at 1 token the layer "
                  f"takes {min(gaps):.1f}-{max(gaps):.1f} us (median {statistics.median(gaps):.1f}) per kernel "
                  "more than our price")  # fmt: skip
    out = {"note": "our layer prices (predicted) against Vidur's measured kernels (see the docstring)",
           "source": "microsoft/vidur 7d47513 data/profiling/compute/{a100,h100}/*/mlp.csv", "kernels": KERNELS,
           "summary": summary, "rows": rows, "loadavg": os.getloadavg()}  # fmt: skip
    Path(args.output).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
