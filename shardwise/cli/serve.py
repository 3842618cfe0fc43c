"""``shardwise serve-plan MODEL --cluster C --ttft S --tpot S --attainment F --workload FILE|NAME [--json]``.

Searches colocated and disaggregated (prefill/decode) serving layouts of a decoder-only language model with a
simulation of continuous batching priced by the price list (``planner/serving/``, docs/serving.md), and
prints the layout with the highest goodput per device within the latency targets, its runner-ups and the
vLLM commands that start it. Every figure is predicted.
"""

from __future__ import annotations

from typing import Annotated

import typer

__all__ = ["serve_plan"]


def serve_plan(
    model: Annotated[
        str,
        typer.Argument(
            help="a decoder-only LM: facebook/opt-13b, opt-66b, opt-175b, Llama-2-7b-hf, Llama-2-70b-hf, "
            "Meta-Llama-3-8B, gpt2; a zoo LM (gpt2:small, llama:tiny); or a HuggingFace config.json path"
        ),
    ],
    cluster: Annotated[
        str,
        typer.Option("--cluster", "-c", help="a preset (dgx-a100xN, dgx-h100xN, cpu:N, ...) or a YAML file"),
    ] = "dgx-a100x1",
    ttft: Annotated[float, typer.Option(help="time-to-first-token target, seconds")] = 0.2,
    tpot: Annotated[float, typer.Option(help="time-per-output-token target, seconds")] = 0.1,
    attainment: Annotated[
        float, typer.Option(help="share of requests that must meet both targets (0 < F <= 1)")
    ] = 0.9,
    workload: Annotated[
        str,
        typer.Option(
            help="sharegpt (single-turn chat), distserve-sharegpt (DistServe's multi-turn ShareGPT pairs), "
            "fixed:PROMPT,OUTPUT, or a JSON/YAML file with prompt/output length distributions and a Poisson "
            "arrival rate (docs/serving.md)"
        ),
    ] = "sharegpt",
    json_out: Annotated[bool, typer.Option("--json", help="print the result as JSON (for scripts)")] = False,
) -> None:
    """Plan a serving deployment: the layout with the most requests per second per GPU within the targets.

    Searches colocated layouts (tp x pp, replicated) and disaggregated ones (prefill and decode instances,
    each with its own tp x pp and count, the KV cache moved between them), simulating continuous batching
    under Poisson arrivals and bisecting the rate. Prints the layout, its predicted goodput, the runner-ups
    and the vLLM commands that start it.
    """
    from shardwise.cli.console import Steps, err, out, print_json
    from shardwise.cluster import get_cluster
    from shardwise.costs.prices import price_list
    from shardwise.costs.serving import ServingPrices
    from shardwise.errors import UserInputError
    from shardwise.planner.serving.model import serving_model
    from shardwise.planner.serving.report import plan_data
    from shardwise.planner.serving.search import SLO, search
    from shardwise.planner.serving.workload import load_workload

    for name, value in (("--ttft", ttft), ("--tpot", tpot)):
        if not value > 0:
            raise UserInputError(f"{name} {value}: give the target in seconds, > 0 (e.g. {name} 0.2)")
    if not 0 < attainment <= 1:
        raise UserInputError(
            f"--attainment {attainment}: give a share in (0, 1], e.g. 0.9 for 90% of requests"
        )
    steps = Steps(json_out)
    spec = get_cluster(cluster)
    load = load_workload(workload)
    with steps.step(f"counting {model}'s parameters on the meta device"):
        figures = serving_model(model)
    prices = ServingPrices(figures, price_list(spec, "bf16"))
    slo = SLO(ttft, tpot, attainment)

    def progress(text: str) -> None:
        if not json_out:
            err.print(f"  [dim]{text}[/dim]", highlight=False)

    with steps.step(
        f"searching serving layouts of {figures.name} on {spec.name} ({spec.world_size} devices)"
    ):
        result = search(prices, spec, load, slo, progress=progress)
    data = plan_data(figures.name, prices, spec, load, slo, result)
    if json_out:
        print_json(data)
        return
    _render(out, data)


def _describe(layout: dict) -> str:
    if layout["kind"] == "colocated":
        return f"colocated: {layout['instances']} x (tp {layout['tp']}, pp {layout['pp']})"
    p, d = layout["prefill"], layout["decode"]
    return (
        f"disaggregated: prefill {p['instances']} x (tp {p['tp']}, pp {p['pp']}), "
        f"decode {d['instances']} x (tp {d['tp']}, pp {d['pp']})"
    )


def _render(console, data: dict) -> None:
    from rich.table import Table

    slo, w = data["slo"], data["workload"]
    console.print(
        f"{data['model']} on {data['cluster']}: TTFT <= {slo['ttft_s']} s and TPOT <= {slo['tpot_s']} s for "
        f"{slo['attainment']:.0%} of requests; workload {w['name']} (mean prompt {w['mean_prompt_tokens']:.0f}, "
        f"output {w['mean_output_tokens']:.0f} tokens)"
    )
    console.print(f"layout: {_describe(data['layout'])}")
    at_least = "at least " if data["goodput_is_lower_bound"] else ""
    console.print(
        f"predicted goodput: {at_least}{data['goodput_rps_per_gpu']:.3g} requests/s per GPU "
        f"({data['goodput_rps']:.3g} requests/s on {data['layout']['devices']} GPUs)"
    )
    console.print(f"predicted KV cache per instance: {data['kv_capacity_tokens']} tokens")
    table = Table(title="ranked layouts (predicted)")
    for col in ("rank", "layout", "req/s per GPU (predicted)", "attainment (predicted)"):
        table.add_column(col)
    for i, entry in enumerate([data, *data["alternatives"]], 1):
        bound = ">= " if entry["goodput_is_lower_bound"] else ""
        table.add_row(str(i), _describe(entry["layout"]), f"{bound}{entry['goodput_rps_per_gpu']:.3g}",
                      f"{entry['attainment']:.1%}")  # fmt: skip
    console.print(table)
    console.print("launch (vLLM):")
    console.print(data["launch_command"], markup=False, highlight=False, soft_wrap=True)
