"""Making plans from CLI arguments, reading plan files, and rebuilding the model a plan was made for.

A plan made by ``shardwise plan`` records its MODEL/--cluster/--batch/--mode arguments in
``ExecutionPlan.source``; :func:`rebuild` builds that model again (same seed, so the same weights), traces
it and checks the graph fingerprint against the plan's, so a plan never runs on a model it was not made for.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shardwise.cli.console import Steps
from shardwise.cli.models import LoadedModel, default_loss, load_model
from shardwise.cli.summary import plan_command, source_of
from shardwise.errors import PlanFileError, UserInputError
from shardwise.ir.plan import ExecutionPlan

__all__ = [
    "Planned",
    "Rebuilt",
    "make_plan",
    "load_plan",
    "rebuild",
    "parse_constraints",
    "source_of",
    "resolve_cluster",
    "plan_command",
    "check_runnable",
]

SEED = 0


@dataclass
class Planned:
    plan: ExecutionPlan
    loaded: LoadedModel
    compiled: Any  # shardwise.api.CompiledModel


@dataclass
class Rebuilt:
    loaded: LoadedModel
    out_spec: Any  # the output TreeSpec from tracing (None when not verified)
    cluster: Any  # ClusterSpec
    verified: bool


def parse_constraints(items: list[str] | None) -> dict[str, object]:
    """``["dp=2", "recompute=full"]`` → ``{"dp": 2, "recompute": "full"}`` (the planner's one constraint
    parser, ``planner.constraints``, checks names and values)."""
    from shardwise.planner.constraints import from_cli

    return from_cli(items)


def _loss_for(loaded: LoadedModel, mode: str) -> Callable[[Any], Any] | None:
    if mode != "train":
        return None
    return loaded.loss_fn or default_loss


def make_plan(
    model: str,
    cluster: str,
    *,
    mode: str = "inference",
    batch: int | None = None,
    precision: str = "fp32",
    constraints: Mapping[str, object] | None = None,
    meta: bool = False,
    collectives: str = "library",
    steps: Steps,
) -> Planned:
    """Build the model, trace and plan it (``shardwise.compile``), and record how in ``plan.source``.

    ``meta`` builds the model on the meta device: nothing is allocated (plan models larger than this machine),
    and the plan has no weights to run or export.
    """
    import shardwise
    from shardwise.cluster import get_cluster

    with steps.step(f"building {model}"):
        loaded = load_model(model, batch=batch, seed=SEED, device="meta" if meta else "cpu")
    with steps.step(f"reading cluster {cluster}"):
        spec = get_cluster(cluster)
    with steps.step(f"tracing and planning for {spec.name} ({spec.world_size} devices)"):
        compiled = shardwise.compile(
            loaded.model, spec, example_inputs=loaded.inputs, mode=mode, precision=precision,
            loss_fn=_loss_for(loaded, mode), constraints=dict(constraints or {}) or None, collectives=collectives,
            progress=not steps.quiet,
        )  # fmt: skip
    source = [("model", model), ("cluster", cluster), ("seed", str(SEED))]
    if batch is not None:
        source.append(("batch", str(batch)))
    if meta:
        source.append(("device", "meta"))
    plan = compiled.plan.replace(source=tuple(source))
    compiled.plan = plan
    return Planned(plan, loaded, compiled)


def load_plan(path: str | os.PathLike[str]) -> ExecutionPlan:
    """Read a plan file (or the plan.json inside a generated package directory)."""
    p = Path(path)
    if p.is_dir():
        if not (p / "plan.json").is_file():
            raise PlanFileError(
                f"{p} is a directory without plan.json: give a plan file made by `shardwise plan`"
            )
        p = p / "plan.json"
    if not p.is_file():
        raise PlanFileError(
            f"plan file {p} not found: make one with `shardwise plan MODEL --cluster C -o {p}`"
        )
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PlanFileError(f"cannot read {p}: {exc}") from None
    return ExecutionPlan.from_json(text)


def check_runnable(
    plan: ExecutionPlan, *, local: bool, plan_path: str | os.PathLike[str] | None = None
) -> None:
    """Fail early (before building anything) for plans that cannot run here."""
    if plan.graph.meta_device or source_of(plan).get("device") == "meta":
        raise UserInputError(
            "this plan was made on the meta device (--meta): it has no weights to run. Make it without --meta "
            "to run it, or export the program (shardwise codegen) and load real weights into it"
        )
    if not local:
        return
    try:
        kind = resolve_cluster(plan, plan_path).device.kind
    except UserInputError:
        return  # the runtime checks again with what it can tell
    if kind != "cpu":
        from shardwise.errors import DeviceUnavailableError

        raise DeviceUnavailableError(
            f"this plan is for {plan.world_size} {kind} devices of {plan.cluster_name}; `shardwise run` starts local "
            f"CPU processes. Plan for cpu:N to run here, or export it (shardwise codegen) and start it with "
            "torchrun on the cluster (or run `shardwise run` under torchrun there)"
        )


def resolve_cluster(plan: ExecutionPlan, plan_path: str | os.PathLike[str] | None = None) -> Any:
    """The plan's ClusterSpec: from its recorded --cluster argument, else its cluster name (a preset)."""
    from shardwise.cluster import get_cluster

    recorded = source_of(plan).get("cluster") or plan.cluster_name
    candidates = [recorded]
    if plan_path is not None and not Path(recorded).is_absolute() and recorded.endswith((".yaml", ".yml")):
        candidates.append(str(Path(plan_path).resolve().parent / recorded))
    last: Exception | None = None
    for c in candidates:
        try:
            return get_cluster(c)
        except UserInputError as exc:
            last = exc
    assert last is not None
    raise last


def _prepare(model: Any, mode: str) -> None:
    """Put the model in the state ``shardwise.compile`` traces it in: training mode with dropout off for
    train plans (eval mode otherwise, as built)."""
    if mode != "train":
        return
    import torch

    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


def _shape_fingerprint(graph: Any) -> str:
    """The graph's fingerprint with every node's source location left out."""
    from shardwise.planner.identity import graph_fingerprint

    return graph_fingerprint(graph.replace(nodes=tuple(n.replace(source="") for n in graph.nodes)))


def rebuild(
    plan: ExecutionPlan, plan_path: str | os.PathLike[str] | None, *, verify: bool = True, steps: Steps
) -> Rebuilt:
    """Build the plan's model again and (``verify``) check that it traces to the plan's fingerprint."""
    source = source_of(plan)
    if "model" not in source:
        raise PlanFileError(
            "this plan does not record which model it was made for (it was made with the Python API): run it "
            "with shardwise.compile(...).run(), or make it with `shardwise plan MODEL --cluster C`"
        )
    search = [Path.cwd()]
    if plan_path is not None:
        search.append(
            Path(plan_path).resolve().parent if Path(plan_path).is_file() else Path(plan_path).resolve()
        )
    batch = int(source["batch"]) if source.get("batch", "").isdigit() else None
    seed = int(source["seed"]) if source.get("seed", "").lstrip("-").isdigit() else SEED
    with steps.step(f"building {source['model']}"):
        loaded = load_model(
            source["model"], batch=batch, seed=seed, search=search, device=source.get("device", "cpu")
        )
    cluster = resolve_cluster(plan, plan_path)
    if verify:  # a cluster YAML edited after planning: the plan's placements may no longer be valid
        from shardwise.planfile import check_cluster

        check_cluster(plan, cluster)
    _prepare(loaded.model, plan.mode)
    out_spec = None
    if verify:
        from shardwise.frontend.trace import trace
        from shardwise.planner.identity import graph_fingerprint

        with steps.step("tracing it to check the plan's model fingerprint"):
            graph, out_spec = trace(loaded.model, loaded.inputs, loss_fn=_loss_for(loaded, plan.mode))
        if graph_fingerprint(graph) != plan.model_fingerprint:
            # Source locations depend on where the model was traced from (the working directory): compare
            # the graphs without them, so that only a change of the model itself fails the check.
            want, got = _shape_fingerprint(plan.graph), _shape_fingerprint(graph)
            if got != want:
                raise PlanFileError(
                    f"the plan was made for a model with fingerprint {plan.model_fingerprint}, but "
                    f"{source['model']} now traces to {graph_fingerprint(graph)}: the model (or its code) changed. "
                    "Make the plan again with `shardwise plan`, or pass --no-verify to run it anyway"
                )
    return Rebuilt(loaded, out_spec, cluster, verify)
