"""Plain data views of an ExecutionPlan, shared by ``show``, ``explain``, ``diff``, ``report`` and ``--json``.

Everything here reads the plan defensively (``getattr`` with defaults) so that the views keep working as
plans gain fields (pipeline stages, micro-batches, synthesized collectives).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from shardwise.ir.plan import ExecutionPlan, NodeStrategy

__all__ = [
    "ModuleGroup",
    "CollectiveRow",
    "CollectiveTotal",
    "describe_spec",
    "describe_split",
    "layer_key",
    "module_groups",
    "collective_rows",
    "collective_totals",
    "memory_rows",
    "prediction",
    "stages",
    "overview",
    "FREE_COLLECTIVES",
    "chunk_plans",
    "source_of",
    "plan_command",
]

FREE_COLLECTIVES = ("none", "slice", "to_partial")
OUTPUT_MODULE = "(outputs)"
TOP_MODULE = "(top level)"


def describe_spec(spec: Any, mesh: Any) -> str:
    """``S(0)@dp`` for a spec split on dp only, ``R`` when whole everywhere, ``-`` for no tensor."""
    if spec is None:
        return "-"
    placements = getattr(spec, "placements", ())
    names = getattr(mesh, "axis_names", ())
    parts = [f"{p}@{a}" for p, a in zip(placements, names, strict=False) if str(p) != "R"]
    return ",".join(parts) if parts else "R"


def describe_split(split: Iterable[tuple[str, str]]) -> str:
    """``dp:b0`` (the dimops label split on each mesh axis); ``whole`` when the op is not split."""
    parts = [f"{axis}:{label}" for axis, label in split]
    return ",".join(parts) if parts else "whole"


def layer_key(module_path: str) -> str:
    """The layer a module belongs to: the path up to its first numeric part (``transformer.h.3``), else its
    first two parts (``transformer.wte``)."""
    if not module_path:
        return TOP_MODULE
    parts = module_path.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:2])


def _natural(text: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


@dataclass
class ModuleGroup:
    """The ops of one module path (or of one layer, when grouped by layer), in first-op order."""

    module: str
    module_type: str = ""
    ops: int = 0
    nodes: list[str] = field(default_factory=list)
    splits: list[str] = field(default_factory=list)  # distinct, in order
    outputs: list[str] = field(default_factory=list)  # distinct output placements
    collectives: list[str] = field(default_factory=list)  # "allgather@dp" per redistribution, in order
    compute_s: float = 0.0
    comm_s: float = 0.0
    flops: int = 0
    source: str = ""
    chunk: int | None = None  # the pipeline chunk (stage) holding the module, for pipelined plans

    @property
    def signature(self) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
        """What ``diff`` compares: the splits, the output placements and the collectives."""
        return tuple(self.splits), tuple(self.outputs), tuple(self.collectives)


def _node_index(plan: ExecutionPlan) -> dict[str, Any]:
    return {n.name: n for n in plan.graph.nodes}


def _add_unique(items: list[str], value: str) -> None:
    if value not in items:
        items.append(value)


def chunk_plans(plan: ExecutionPlan) -> list[tuple[int, ExecutionPlan]]:
    """(chunk, intra-op plan) of a pipelined plan (``plan.pipeline``); empty for other plans."""
    pipe = getattr(plan, "pipeline", None)
    out = []
    for st in getattr(pipe, "stages", ()) or ():
        sub = getattr(st, "plan", None)
        if sub is not None:
            out.append((int(getattr(st, "chunk", len(out))), sub))
    return out


def module_groups(plan: ExecutionPlan, cluster: Any | None = None, *, by_layer: bool = False) -> list[ModuleGroup]:
    """Strategies grouped by module path (or by :func:`layer_key` with ``by_layer``), in graph order; for a
    pipelined plan, its chunks' groups in chunk order (``ModuleGroup.chunk`` says which). With ``cluster``,
    ``compute_s``/``comm_s`` are each op's share of a step (forward, backward, recomputation: the price list's
    ``costs.step.node_prices``); without it, the forward times the plan records."""
    chunks = chunk_plans(plan)
    if chunks:
        groups = []
        for c, sub in chunks:
            for g in module_groups(sub, cluster, by_layer=by_layer):
                g.chunk = c
                groups.append(g)
        return groups
    nodes = _node_index(plan)
    groups: dict[str, ModuleGroup] = {}
    priced = None
    if cluster is not None:
        from shardwise.costs.prices import price_list
        from shardwise.costs.step import node_prices

        priced = node_prices(plan, price_list(cluster, plan.precision))
    for s in plan.strategies:
        node = nodes.get(s.node)
        if node is None:
            path, mtype = OUTPUT_MODULE, ""
        else:
            path, mtype = node.module_path or TOP_MODULE, node.module_type
        if node is not None and node.op == "getitem":
            continue
        key = layer_key(path) if by_layer and node is not None else path
        g = groups.get(key)
        if g is None:
            g = groups[key] = ModuleGroup(module=key, module_type="" if by_layer else mtype)
            g.source = getattr(node, "source", "") if node is not None else ""
        g.ops += 1 if node is not None else 0
        g.nodes.append(s.node)
        if node is not None:
            _add_unique(g.splits, describe_split(s.split))
            for o in s.outputs:
                _add_unique(g.outputs, describe_spec(o, plan.mesh))
            g.flops += int(getattr(node, "flops", 0) or 0)
        for r in s.redistributes:
            if r.collective not in FREE_COLLECTIVES:
                g.collectives.append(f"{r.collective}@{r.axis}")
        if priced is not None and s.node in priced:
            g.compute_s += priced[s.node].compute_s
            g.comm_s += priced[s.node].comm_s
        else:
            g.compute_s += float(s.compute_s or 0.0)
            g.comm_s += float(s.comm_s or 0.0)
    return list(groups.values())


@dataclass(frozen=True)
class CollectiveRow:
    node: str
    module: str
    value: str
    collective: str
    axis: str
    nbytes: int
    time_s: float
    algorithm: str
    phase: str = "forward"  # "forward" | "gradients" | "transfers" (pipeline, per step)


def _train_factor(plan: ExecutionPlan) -> int:
    return 2 if plan.mode == "train" else 1


def collective_rows(plan: ExecutionPlan) -> list[CollectiveRow]:
    """Every redistribution that moves data, in program order; in training, one more row for the gradient
    reduction after backward (its time is what the prediction leaves over for it). A pipelined plan lists its
    chunks' collectives and the point-to-point transfers between chunks (bytes per step)."""
    chunks = chunk_plans(plan)
    if chunks:
        pipe = plan.pipeline  # type: ignore[attr-defined]
        rows = [r for _, sub in chunks for r in collective_rows(sub)]
        train = plan.mode == "train"
        for t in getattr(pipe, "transfers", ()) or ():
            nbytes = int(t.spec.nbytes) * int(pipe.microbatches) * (2 if train and t.grad else 1)
            rows.append(
                CollectiveRow(
                    node="(between stages)",
                    module=f"chunk {t.src} -> {t.dst}",
                    value=t.value,
                    collective="send/recv",
                    axis="pp",
                    nbytes=nbytes,
                    time_s=0.0,
                    algorithm="p2p",
                    phase="transfers",
                )  # fmt: skip
            )
        return rows
    nodes = _node_index(plan)
    rows: list[CollectiveRow] = []
    for s in plan.strategies:
        node = nodes.get(s.node)
        module = (node.module_path or TOP_MODULE) if node is not None else OUTPUT_MODULE
        for r in s.redistributes:
            if r.collective in FREE_COLLECTIVES:
                continue
            rows.append(
                CollectiveRow(
                    node=s.node,
                    module=module,
                    value=r.value,
                    collective=r.collective,
                    axis=r.axis,
                    nbytes=int(r.nbytes),
                    time_s=float(r.time_s or 0.0),
                    algorithm=str(getattr(r, "algorithm", "") or "library"),
                )  # fmt: skip
            )
    grad = tuple(getattr(plan, "param_grad_reduce", ()) or ())
    if plan.mode == "train" and grad:
        sizes = {p.key: p.spec.nbytes for p in plan.graph.params}
        by_axes: dict[tuple[str, ...], int] = {}
        for key, axes in grad:
            by_axes[tuple(axes)] = by_axes.get(tuple(axes), 0) + int(sizes.get(key, 0))
        forward = sum(r.time_s for r in rows) * _train_factor(plan)
        left = max(0.0, float(plan.predicted.comm_s) - forward)
        total = sum(by_axes.values()) or 1
        for axes, nbytes in by_axes.items():
            rows.append(
                CollectiveRow(
                    node="(after backward)",
                    module="(gradients)",
                    value=f"{len(grad)} parameter gradients",
                    collective="allreduce",
                    axis="+".join(axes),
                    nbytes=nbytes,
                    time_s=left * nbytes / total,
                    algorithm="library",
                    phase="gradients",
                )  # fmt: skip
            )
    return rows


@dataclass(frozen=True)
class CollectiveTotal:
    collective: str
    axis: str
    algorithm: str
    count: int
    nbytes: int
    time_s: float  # per step: forward, plus the backward counterpart in training


def collective_totals(plan: ExecutionPlan, rows: list[CollectiveRow] | None = None) -> list[CollectiveTotal]:
    """Communication by collective (and mesh axis, algorithm), most time first. In training a forward
    collective counts twice (its backward counterpart moves the same bytes)."""
    rows = collective_rows(plan) if rows is None else rows
    acc: dict[tuple[str, str, str], list[float]] = {}
    for r in rows:
        factor = _train_factor(plan) if r.phase == "forward" else 1
        if r.phase == "forward" and chunk_plans(plan):
            factor *= int(getattr(plan.pipeline, "microbatches", 1) or 1)  # type: ignore[attr-defined]
        a = acc.setdefault((r.collective, r.axis, r.algorithm), [0, 0, 0.0])
        a[0] += factor
        a[1] += r.nbytes * factor
        a[2] += r.time_s * factor
    totals = [
        CollectiveTotal(c, ax, alg, int(v[0]), int(v[1]), float(v[2])) for (c, ax, alg), v in acc.items()
    ]
    return sorted(totals, key=lambda t: (-t.time_s, -t.nbytes))


def memory_rows(plan: ExecutionPlan) -> list[dict[str, Any]]:
    """Per rank: parameters, gradients, optimizer state, activations, total (the memory map's arena, the
    predicted peak), the lower bound of live bytes (0 when the plan has none) and capacity (bytes)."""
    rows = []
    for m in getattr(plan, "memory", ()) or ():
        total = int(getattr(m, "total_bytes", 0))
        cap = int(getattr(m, "capacity_bytes", 0))
        rows.append(
            {
                "rank": int(m.rank),
                "params": int(getattr(m, "params_bytes", 0)),
                "grads": int(getattr(m, "grads_bytes", 0)),
                "optimizer": int(getattr(m, "optimizer_bytes", 0)),
                "activations": int(getattr(m, "activation_bytes", 0)),
                "total": total,
                "lower_bound": int(getattr(m, "lower_bound_bytes", 0)),
                "capacity": cap,
                "used": (total / cap) if cap else None,
            }
        )
    return sorted(rows, key=lambda r: r["rank"])


def prediction(plan: ExecutionPlan) -> dict[str, Any]:
    p = plan.predicted
    mem = tuple(getattr(p, "memory_bytes", ()) or ())
    return {
        "step_time_s": float(p.step_time_s),
        "compute_s": float(p.compute_s),
        "comm_s": float(p.comm_s),
        "bubble_s": float(getattr(p, "bubble_s", 0.0) or 0.0),
        "peak_memory_bytes": max(mem) if mem else 0,
        "tflops_per_device": float(getattr(p, "tflops_per_device", 0.0) or 0.0),
        "mfu": float(getattr(p, "mfu", 0.0) or 0.0),
    }


def _stage_of(strategy: NodeStrategy) -> int | None:
    stage = getattr(strategy, "stage", None)
    return stage if isinstance(stage, int) else None


def stages(plan: ExecutionPlan) -> list[dict[str, Any]]:
    """Pipeline stages: index, ranks, layers and predicted compute. One stage holding every layer when the
    plan has no pipeline (or records no stage per op)."""
    pipe = getattr(plan, "pipeline", None)
    if pipe is not None and getattr(pipe, "stages", None):
        out_rows = []
        for st in pipe.stages:
            dev = int(st.device_stage)
            ranks = [pipe.rank(dev, d, t, c) for d in range(int(pipe.dp)) for c in range(int(getattr(pipe, "cp", 1)))
                     for t in range(int(pipe.tp))]  # fmt: skip
            out_rows.append(
                {
                    "stage": int(st.chunk),
                    "device_stage": dev,
                    "ranks": ranks,
                    "layers": list(st.units),
                    "compute_s": float(st.forward_s),
                    "backward_s": float(st.backward_s),
                    "memory_bytes": int(getattr(st, "memory_bytes", 0) or 0),
                }  # fmt: skip
            )
        return out_rows
    mesh = plan.mesh
    pp = plan.degrees.get("pp", 1)
    names = tuple(mesh.axis_names)
    ranks_of: dict[int, list[int]] = {}
    for r in mesh.ranks:
        s = mesh.coordinate(r)[names.index("pp")] if "pp" in names else 0
        ranks_of.setdefault(s, []).append(r)
    nodes = _node_index(plan)
    layers: dict[int, list[str]] = {}
    compute: dict[int, float] = {}
    for s in plan.strategies:
        node = nodes.get(s.node)
        stage = _stage_of(s) or 0
        if node is not None:
            _add_unique(layers.setdefault(stage, []), layer_key(node.module_path))
        compute[stage] = compute.get(stage, 0.0) + float(s.compute_s or 0.0)
    out = []
    for stage in sorted(set(ranks_of) | set(layers)):
        out.append(
            {
                "stage": stage,
                "ranks": ranks_of.get(stage, []),
                "layers": layers.get(stage, []),
                "compute_s": compute.get(stage, 0.0),
            }
        )
    if pp > 1 and len(layers) <= 1:
        for row in out:
            row["note"] = "the plan records no stage per op"
    return out


def overview(plan: ExecutionPlan) -> dict[str, Any]:
    """The plan's identity and shape, for headers and ``--json``."""
    return {
        "model": plan.model_name,
        "model_fingerprint": plan.model_fingerprint,
        "cluster": plan.cluster_name,
        "cluster_fingerprint": plan.cluster_fingerprint,
        "mode": plan.mode,
        "precision": plan.precision,
        "world_size": plan.world_size,
        "mesh": {"axes": list(plan.mesh.axis_names), "shape": list(plan.mesh.shape)},
        "degrees": plan.degrees,
        "ops": len(plan.graph.nodes),
        "parameters": int(plan.graph.num_params),
        "optimizer": getattr(plan, "optimizer", ""),
        "passes": list(getattr(plan, "passes", ()) or ()),
        "notes": list(getattr(plan, "notes", ()) or ()),
        "replicated_ops": list(getattr(plan, "replicated_ops", ()) or ()),
        "source": dict(getattr(plan, "source", ()) or ()),
        "command": plan_command(plan),
    }


def source_of(plan: ExecutionPlan) -> dict[str, str]:
    """``plan.source`` as a dict (empty for plans made with the Python API or by an older shardwise)."""
    raw = getattr(plan, "source", ()) or ()
    try:
        return {str(k): str(v) for k, v in raw}
    except (TypeError, ValueError):
        return {}


def plan_command(plan: ExecutionPlan) -> str:
    """The ``shardwise plan ...`` command that made ``plan`` (empty if it was not made by the CLI)."""
    source = source_of(plan)
    if "model" not in source:
        return ""
    parts = ["shardwise plan", source["model"], "--cluster", source.get("cluster", plan.cluster_name)]
    if "batch" in source:
        parts += ["--batch", source["batch"]]
    if plan.mode != "inference":
        parts += ["--mode", plan.mode]
    if plan.precision != "fp32":
        parts += ["--precision", plan.precision]
    if source.get("device") == "meta":
        parts.append("--meta")
    if "collectives.choose" in plan.passes:
        parts += ["--collectives", "synthesize"]
    return " ".join(parts)


def natural_sorted(items: Iterable[str]) -> list[str]:
    return sorted(items, key=_natural)
