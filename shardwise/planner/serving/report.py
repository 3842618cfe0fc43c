"""A serving plan as data (the ``--json`` keys) and as launch commands of an existing serving engine (vLLM).

vLLM's flags (docs.vllm.ai, engine arguments): ``--tensor-parallel-size``, ``--pipeline-parallel-size``,
``--port``, and the scheduler's limits the simulation used (``--max-num-batched-tokens``, ``--max-num-seqs``:
``EngineMemory``; the V1 engine chunks prefills, as the ``vllm`` engine is simulated); prefill/decode disaggregation: every instance started with ``--kv-transfer-config
'{"kv_connector":"NixlConnector","kv_role":"kv_both"}'`` and its own ``VLLM_NIXL_SIDE_CHANNEL_PORT``, requests
routed through a proxy that sends each prompt to a prefill instance and then to a decode instance (vLLM's
NixlConnector usage guide). Devices are numbered as the plan places instances: prefill instances first, then
decode instances, ``tp x pp`` consecutive devices each, 8 per node on DGX machines.
"""

from __future__ import annotations

from typing import Any

from shardwise.cluster.spec import ClusterSpec
from shardwise.costs.serving import EngineMemory, ServingPrices
from shardwise.planner.serving.search import SLO, Scored, ServeSearch
from shardwise.planner.serving.simulator import Colocated, Phase
from shardwise.planner.serving.workload import Workload

__all__ = ["layout_data", "launch_commands", "plan_data"]

NIXL = """'{"kv_connector":"NixlConnector","kv_role":"kv_both"}'"""


def _phase(phase: Phase) -> dict[str, int]:
    return {"tp": phase.tp, "pp": phase.pp, "instances": phase.instances}


def layout_data(scored: Scored) -> dict[str, Any]:
    layout = scored.layout
    if isinstance(layout, Colocated):
        return {"kind": "colocated", **_phase(layout.phase), "devices": layout.devices}
    return {
        "kind": "disaggregated", "prefill": _phase(layout.prefill), "decode": _phase(layout.decode),
        "devices": layout.devices,
    }  # fmt: skip


def _capacity(prices: ServingPrices, scored: Scored) -> int | dict[str, int]:
    layout = scored.layout
    if isinstance(layout, Colocated):
        return prices.kv_capacity_tokens(layout.phase.tp, layout.phase.pp)
    return {
        "prefill": prices.kv_capacity_tokens(layout.prefill.tp, layout.prefill.pp),
        "decode": prices.kv_capacity_tokens(layout.decode.tp, layout.decode.pp),
    }


def _devices(first: int, count: int, per_node: int) -> tuple[int, str]:
    """(node, CUDA_VISIBLE_DEVICES) of ``count`` devices from global device ``first``."""
    node = first // per_node
    local = [str((first + k) % per_node) for k in range(count)]
    return node, ",".join(local)


def launch_commands(
    model: str, scored: Scored, cluster: ClusterSpec, engine: EngineMemory | None = None
) -> list[str]:
    """Shell lines starting every instance of the plan with vLLM (see the module docstring); with ``engine``,
    each passes the scheduling limits the plan was simulated with."""
    layout = scored.layout
    limits = "" if engine is None else (
        f" --max-num-batched-tokens {engine.max_batched_tokens} --max-num-seqs {engine.max_seqs}"
    )  # fmt: skip
    per = cluster.devices_per_node
    lines: list[str] = []
    groups = [("", layout.phase)] if isinstance(layout, Colocated) else [
        ("prefill", layout.prefill), ("decode", layout.decode)
    ]  # fmt: skip
    first = 0
    port = 8000
    for role, phase in groups:
        size = phase.tp * phase.pp
        for i in range(phase.instances):
            node, visible = _devices(first, size, per)
            env = f"CUDA_VISIBLE_DEVICES={visible} "
            extra = ""
            if role:
                env += f"VLLM_NIXL_SIDE_CHANNEL_PORT={5600 + port - 8000} "
                extra = f" --kv-transfer-config {NIXL}"
            where = f"# node {node}, {role or 'instance'} {i}\n" if cluster.num_nodes > 1 or role else ""
            lines.append(
                f"{where}{env}vllm serve {model} --tensor-parallel-size {phase.tp} "
                f"--pipeline-parallel-size {phase.pp}{limits} --port {port}{extra}"
            )
            first += size
            port += 1
    if not isinstance(layout, Colocated):
        lines.append(
            "# route requests through a prefill/decode proxy (prefill instances on ports "
            f"8000-{8000 + layout.prefill.instances - 1}, decode on {8000 + layout.prefill.instances}-"
            f"{port - 1}); see vLLM's NixlConnector usage guide"
        )
    elif layout.phase.instances > 1:
        lines.append(
            f"# balance requests over the {layout.phase.instances} instances (ports 8000-{port - 1})"
        )
    return lines


def plan_data(
    model: str, prices: ServingPrices, cluster: ClusterSpec, workload: Workload, slo: SLO, result: ServeSearch,
    alternatives: int = 5,
) -> dict[str, Any]:  # fmt: skip
    """The plan's ``--json`` data: ``layout``, ``goodput_rps_per_gpu``, ``kv_capacity_tokens`` (per instance),
    ``alternatives`` and ``launch_command``, with the model, cluster, targets and workload they are for."""
    best = result.best
    prompt_mean, output_mean = workload.means()

    def entry(s: Scored) -> dict[str, Any]:
        return {
            "layout": layout_data(s), "goodput_rps_per_gpu": s.per_device, "goodput_rps": s.goodput_rps,
            "attainment": s.attainment, "kv_capacity_tokens": _capacity(prices, s),
            "goodput_is_lower_bound": s.capped,
        }  # fmt: skip

    return {
        "model": model,
        "cluster": cluster.name,
        "predicted": True,
        **entry(best),
        "launch_command": "\n".join(launch_commands(model, best, cluster, prices.engine)),
        "alternatives": [entry(s) for s in result.ranked[1 : 1 + alternatives]],
        "slo": {"ttft_s": slo.ttft, "tpot_s": slo.tpot, "attainment": slo.attainment},
        "workload": {
            "name": workload.name,
            "mean_prompt_tokens": prompt_mean,
            "mean_output_tokens": output_mean,
            "source": workload.source,
            "simulated_requests": result.requests,
        },  # fmt: skip
        "engine": prices.engine.name,
        "model_source": prices.model.source,
    }
