"""The one planner: ``plan(graph, cluster, constraints, options)`` — what ``shardwise.compile`` and
``shardwise plan`` run.

1. **Search** every layout the constraints allow (``planner.search``: pp x dp x tp x sequence parallelism x ZeRO
   x micro-batch x schedule x recomputation), each estimated by the price list from its layer units.
2. **Realize** the most promising in order (``planner.flat.realize_flat`` for ``pp = 1``,
   ``planner.pipeline.realize_pipeline`` otherwise): the real placement, the memory map of what the generated
   program holds, and the price list's price of that plan. Layouts are taken by estimated step time, first those
   estimated to fit, then (when none of those fits by its memory map) those estimated within ``ESTIMATE_MARGIN``
   of the device; realizing stops after
   ``MAX_REALIZED`` plans that fit (``HARD_MAX_REALIZED`` in all while one fits; while none does, it goes on
   for ``UNFIT_BUDGET_S`` seconds, up to ``UNFIT_MAX_REALIZED`` plans), once the next estimate is more than
   ``REALIZE_SLACK`` slower than the best realized plan that fits, or when the planning time budget is spent
   and one fits. A layout that differs from a realized one only by a choice its estimate says changes nothing
   (sequence parallelism, ZeRO) is not realized again. When a realized plan's memory map exceeds its estimate,
   layouts of its kind (``_kind``) whose estimates, scaled by that ratio, would not fit are taken after the
   others: the realized maps correct the estimates they disagree with. Each realized layout is reported on
   stderr once planning lasts over ``PROGRESS_AFTER_S`` (``PlanOptions.progress``).
3. **Choose** the fastest realized plan that fits its device; among those within ``MEMORY_TOLERANCE`` of it,
   the one with the least memory per device. ``collectives="synthesize"`` gives each realized flat plan's
   collectives a synthesized schedule where one is faster, before the choice. When nothing fits and host
   offload is allowed, the fastest flat layouts are made to fit by offload (``passes.offload``, jointly with
   recomputation).

Every realized plan keeps its realized price; the alternatives list the others with their estimates, marked
as estimated. A plan's price is therefore the same whichever view shows it (``costs.step``).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from shardwise.cluster import ClusterSpec
from shardwise.costs.attention import CP_WAYS
from shardwise.errors import DoesNotFitError, PlanError, ShardwiseError, SolverError
from shardwise.ir.graph import Graph
from shardwise.ir.plan import Alternative, ExecutionPlan
from shardwise.passes.memory.mapping import OPTIMIZER_STATE_FACTOR
from shardwise.passes.sharding.auto import ILPStats
from shardwise.passes.stages.place import PlacementCache
from shardwise.passes.stages.profile import traced_batch
from shardwise.passes.stages.rebatch import RebatchingTracer
from shardwise.planner.assumptions import assumptions
from shardwise.planner.constraints import Constraints, parse_constraints
from shardwise.planner.flat import FlatAnalyses, FlatOptions, realize_flat
from shardwise.planner.pipeline import batch_cut_problem, realize_pipeline, with_exact_memory
from shardwise.planner.search import MEMORY_TOLERANCE, Candidate, SearchOptions, SearchResult, search

__all__ = ["PlanOptions", "plan", "MAX_REALIZED", "REALIZE_SLACK", "MAX_ALTERNATIVES"]

MAX_REALIZED = 3  # plans that fit, realized at most (and HARD_MAX_REALIZED plans in all)
HARD_MAX_REALIZED = 8
REALIZE_SLACK = 0.03
# a layout whose estimated peak is within this factor of the device may still fit by its memory map
ESTIMATE_MARGIN = 1.25
PLANNING_BUDGET_S = 30.0  # after this much realizing, the first plan that fits is kept
# while no realized plan fits, realizing goes on past HARD_MAX_REALIZED for this long (and this many plans)
UNFIT_BUDGET_S = 120.0
UNFIT_MAX_REALIZED = 32
PROGRESS_AFTER_S = 2.0  # planning that lasts longer reports its progress on stderr (PlanOptions.progress)
MAX_ALTERNATIVES = 24


@dataclass(frozen=True)
class PlanOptions:
    mode: str = "inference"
    precision: str = "fp32"
    optimizer: str = "adamw"
    solver: str = "cbc"
    time_limit_s: float = 60.0
    fusion: bool = True
    require_fit: bool = True  # False: the fastest plan even when none fits (with a note): for sizing
    # (state_dict key, ShardingSpec): parameters placed as given (flat plans), e.g. generation's prefill
    # program, which shares its weights and KV cache with the decode step's
    fixed_params: tuple = ()
    progress: bool = True  # a line on stderr per realized layout once planning lasts over PROGRESS_AFTER_S


@dataclass(frozen=True)
class _Realized:
    candidate: Candidate
    plan: ExecutionPlan
    fits: bool
    exact: bool = True  # its memory map is the smallest-arena one (see _exact_where_it_matters)

    @property
    def step_s(self) -> float:
        return self.plan.predicted.step_time_s

    @property
    def peak(self) -> int:
        return max(self.plan.predicted.memory_bytes or (0,))


def _peak_of(plan: ExecutionPlan) -> int:
    return max(plan.predicted.memory_bytes or (0,))


def plan(
    graph: Graph,
    cluster: ClusterSpec,
    constraints: Mapping[str, object] | Constraints | None = None,
    options: PlanOptions | None = None,
    *,
    micro_graph: Callable[[int], Graph] | None = None,
    stats_out: list[ILPStats] | None = None,
) -> ExecutionPlan:
    """Search, realize and choose (see the module docstring)."""
    t0 = time.perf_counter()
    options = options or PlanOptions()
    pinned = constraints if isinstance(constraints, Constraints) else parse_constraints(constraints, cluster)
    train = options.mode == "train"
    if not train and pinned.recompute not in (None, "none", "auto"):
        raise PlanError(f"recompute={pinned.recompute!r} applies to training: compile with mode='train'")
    if not train and pinned.offload not in (None, "none", "auto"):
        raise PlanError(f"offload={pinned.offload!r} applies to training: compile with mode='train'")
    dynamic_batch = any(d.dim == 0 for i in graph.inputs for d in i.dynamic)
    if dynamic_batch and (pinned.pp or 1) > 1:
        raise PlanError(
            "pipeline plans need a static batch size (micro-batches are cut from it): compile without "
            "dynamic_shapes on the batch dimension, or with pp=1"
        )
    tiers = pinned.offload not in (None, "none", "auto")  # explicit host tiers: generated for flat plans
    if tiers and (pinned.pp or 1) > 1:
        raise PlanError(f"offload={pinned.offload!r} applies to flat plans: drop pp or use offload='auto'")
    factor = OPTIMIZER_STATE_FACTOR.get(options.optimizer, 2)
    sopts = SearchOptions(
        mode=options.mode, precision=options.precision, optimizer_factor=factor, optimizer=options.optimizer,
        fusion=options.fusion, pipelines=not dynamic_batch and not tiers,
    )  # fmt: skip
    # explicit tiers choose recomputation jointly with them (passes.offload): the layouts come without it
    searched = pinned.replace(recompute="none") if tiers and pinned.recompute in (None, "auto") else pinned
    result = search(graph, cluster, searched, sopts)
    tracer = None
    if micro_graph is not None:  # one trace at a micro-batch size; the other sizes derived from it (rebatch)
        micro_graph = tracer = RebatchingTracer(graph, micro_graph)
    cut = _Cut(graph, micro_graph)
    flat_options = FlatOptions(
        mode=options.mode, precision=options.precision, optimizer=options.optimizer, solver=options.solver,
        time_limit_s=options.time_limit_s, recompute_budget=pinned.recompute_budget, fusion=options.fusion,
        fixed_params=options.fixed_params,
    )  # fmt: skip
    analyses = FlatAnalyses(graph)
    realized: list[_Realized] = []
    placements: PlacementCache = {}  # pipeline chunks placed so far, shared by every layout realized here
    failed: dict[tuple, str] = {}
    notes: list[str] = []

    def realize(cand: Candidate) -> _Realized | None:
        try:
            if cand.flat:
                made = realize_flat(
                    graph, cluster, dp=cand.dp, tp=cand.tp, sp=cand.sp, zero=cand.zero, recompute=cand.recompute,
                    options=flat_options, analyses=analyses, stats_out=stats_out, ep=cand.ep, cp=cand.cp,
                    cp_ways=(pinned.cp_attention,) if pinned.cp_attention else CP_WAYS,
                )  # fmt: skip
                out = made.plan
                if pinned.collectives == "synthesize":
                    from shardwise.planner.collectives import choose_collectives

                    out = choose_collectives(out, cluster)
                return _Realized(cand, out, made.fits)
            exact: list[bool] = []
            problem = cut.problem(cand)
            if problem:
                failed[cand.key()] = f"the batch cannot be cut ({problem})"
                return None
            out = realize_pipeline(
                graph, cluster, cand, result, micro_graph=micro_graph, mode=options.mode,
                precision=options.precision, optimizer=options.optimizer, fusion=options.fusion,
                placements=placements, exact_memory=False, exact_out=exact,
                cp_ways=(pinned.cp_attention,) if pinned.cp_attention else CP_WAYS,
            )  # fmt: skip
            return _Realized(cand, out, _peak_of(out) <= cluster.device.memory_bytes, exact[-1])
        except (DoesNotFitError, PlanError, SolverError) as exc:  # this layout could not be made: the next one
            failed[cand.key()] = str(exc).splitlines()[0]
            return None

    capacity = cluster.device.memory_bytes
    # first the layouts estimated to fit, fastest first; then those estimated within the margin of the device:
    # all of them if none of the first fits by its memory map, else those estimated faster than the best that does
    # (the estimate is conservative: its map may say it fits)
    fit_first = sorted((c for c in result.ranked if c.fits), key=lambda c: c.step_s)
    margin = sorted(
        (c for c in result.ranked if not c.fits and c.peak_bytes <= capacity * ESTIMATE_MARGIN), key=lambda c: c.step_s
    )  # fmt: skip
    order = [*fit_first, *margin] or list(result.ranked)
    say = _Progress(options.progress, t0)
    say(
        f"search: {result.evaluated} layouts estimated in {result.planning_s:.1f} s, {len(fit_first)} estimated to "
        f"fit; realizing the most promising"
    )
    ratios: dict[tuple, float] = {}  # per kind of layout: the most its memory map exceeded its estimate
    t_realize = time.perf_counter()
    while order:
        fitting = [r for r in realized if r.fits]
        if len(fitting) >= MAX_REALIZED:
            break
        if len(realized) >= HARD_MAX_REALIZED and (
            fitting or time.perf_counter() - t_realize > UNFIT_BUDGET_S or len(realized) >= UNFIT_MAX_REALIZED
        ):
            break  # none fits yet: go on within the budget (the estimates were too low, see _next)
        cand = _next(order, ratios, capacity)
        if any(_variant(cand, r.candidate) for r in realized):
            continue  # the same layout but for a choice the estimate says changes nothing
        if fitting:
            best = min(r.step_s for r in fitting)
            if time.perf_counter() - t0 > PLANNING_BUDGET_S:
                break
            if cand.step_s > best * (1 + REALIZE_SLACK) or (not cand.fits and cand.step_s >= best):
                continue
        t1 = time.perf_counter()
        got = realize(cand)
        n = len(realized) + 1
        if got is None:
            say(f"realizing {n}: {cand.describe()}: could not be built ({failed.get(cand.key(), '')[:120]})")
            continue
        realized.append(got)
        estimated = cand.peak_bytes
        if estimated > 0 and got.peak > estimated:
            kind = _kind(cand)
            ratios[kind] = max(ratios.get(kind, 1.0), got.peak / estimated)
        say(
            f"realizing {n}: {cand.describe()}: {_size(got.peak)} (estimated {_size(estimated)}), "
            f"{'fits' if got.fits else 'does not fit'}, {got.step_s:.4g} s per step predicted "
            f"[{time.perf_counter() - t1:.1f} s]"
        )
    notes.extend(assumptions(graph))
    if options.precision == "fp8":
        notes.append(
            "precision fp8: bf16 values, linear layers priced on float8 tensor cores at the device's float8 peak "
            "times the achieved fraction of 16-bit matmuls, plus their scaling and casting kernels (torchao's "
            "tensorwise recipe); the output head and attention in bf16"
        )
    if cut.note:
        notes.append(cut.note)
    if tracer is not None and tracer.derived:
        notes.append(
            f"micro-batch graphs: {tracer.traced} traced, {tracer.derived} derived from them without tracing "
            "(passes.stages.rebatch)"
        )
    if tiers:  # the user's tiers on every realized layout: the choice sees what they cost
        realized = [_with_tiers(r, cluster, pinned) for r in realized]
    realized = _exact_where_it_matters(realized, cluster)
    chosen = _choose(realized)
    if chosen is None and train and pinned.offload != "none" and not tiers:
        chosen = _made_to_fit(realized, cluster, pinned, notes)
    if chosen is None:
        if not options.require_fit and realized:
            chosen = min(realized, key=lambda r: r.step_s)
            need = chosen.peak
            notes.append(
                f"does not fit: the plan needs {_size(need)} per device, {cluster.name} has "
                f"{_size(cluster.device.memory_bytes)}"
            )
        else:
            raise DoesNotFitError(_does_not_fit(result, realized, failed, cluster, pinned))
    if chosen.candidate.cp > 1:
        notes.append(_why_context(chosen.candidate, pinned, result))
    total = time.perf_counter() - t0
    traced = f", {tracer.seconds:.2f} s of it tracing at micro-batch sizes" if tracer and tracer.traced else ""
    notes.append(
        f"planning time: {total:.2f} s: {result.planning_s:.2f} s estimating layouts, "
        f"{total - result.planning_s:.2f} s realizing {len(realized)}{traced}"
    )
    out = _finish(chosen, realized, result, failed, notes, total)
    return out


class _Progress:
    """Progress lines on stderr (``PlanOptions.progress``) once planning has lasted ``PROGRESS_AFTER_S``:
    quick plans say nothing."""

    def __init__(self, enabled: bool, t0: float) -> None:
        self.enabled, self.t0 = enabled, t0

    def __call__(self, text: str) -> None:
        elapsed = time.perf_counter() - self.t0
        if self.enabled and elapsed >= PROGRESS_AFTER_S:
            print(f"shardwise: planning {elapsed:.0f} s: {text}", file=sys.stderr, flush=True)


def _kind(cand: Candidate) -> tuple:
    """The kind of layout whose memory estimate errs alike: flat or pipelined, recomputation, ZeRO sharding,
    expert and context parallelism."""
    return (cand.flat, cand.recompute, cand.zero >= 1, cand.ep > 1, cand.cp > 1)


def _next(order: list[Candidate], ratios: Mapping[tuple, float], capacity: int) -> Candidate:
    """Take the next layout to realize from ``order``: the first whose estimate, scaled by the most the memory
    maps of realized layouts of its kind exceeded theirs, still fits the device; the first of all when none
    does. A layout estimated too low is thus not followed by its like, which its map would refuse too."""
    for k, cand in enumerate(order):
        if cand.peak_bytes * ratios.get(_kind(cand), 1.0) <= capacity:
            return order.pop(k)
    return order.pop(0)


def _why_context(cand: Candidate, pinned: Constraints, result: SearchResult) -> str:
    """Why the chosen layout splits the sequence over ``cp``, and the way its estimate took for attention."""
    if pinned.cp is not None:
        why = f"cp={cand.cp} pinned"
    else:
        why = (
            f"cp={cand.cp}: the batch ({result.global_batch}) does not split over the {cand.dp * cand.cp} replicas "
            f"beside tp={cand.tp}, so the sequence takes cp={cand.cp} of them (a batch split costs no attention "
            "communication, so the search offers cp only where the batch cannot split), and this layout is the "
            "fastest that fits"
        )
    ways = ", ".join(f"{w} {t * 1e3:.3f} ms" for w, t in sorted(cand.cp_ways, key=lambda x: x[1]))
    way = f"attention by {cand.cp_attention}" + (" (pinned)" if pinned.cp_attention else " (the cheapest)")
    unit = "per step" if cand.flat else "per micro-batch"  # a pipeline's estimate is per micro-batch
    return f"context parallelism: {why}; {way}; estimated cp communication {unit} by way: {ways or 'none'}"


def _variant(a: Candidate, b: Candidate) -> bool:
    """Whether ``a`` differs from ``b`` only by choices (sequence parallelism, ZeRO) that its estimate says
    change nothing: same degrees, batch split, schedule and recomputation, estimates within 0.1%."""
    same = (a.pp, a.dp, a.tp, a.cp, a.microbatch, a.schedule, a.virtual, a.recompute, a.ep) == (
        b.pp, b.dp, b.tp, b.cp, b.microbatch, b.schedule, b.virtual, b.recompute, b.ep
    )  # fmt: skip
    return same and abs(a.step_s - b.step_s) <= 1e-3 * b.step_s and abs(a.peak_bytes - b.peak_bytes) <= 0.01 * b.peak_bytes


class _Cut:
    """Whether the batch can be cut into micro-batches and replicas (checked once per size)."""

    def __init__(self, graph: Graph, micro_graph: Callable[[int], Graph] | None) -> None:
        self.graph, self.micro_graph = graph, micro_graph
        self._problems: dict[int, str] = {}
        self.note = ""
        self.traced = traced_batch(graph)

    def problem(self, cand: Candidate) -> str:
        rows = cand.microbatch
        if rows == self.traced:
            return ""
        if rows not in self._problems:
            try:
                self._problems[rows] = batch_cut_problem(self.graph, self.micro_graph, rows)
            except ShardwiseError as exc:
                self._problems[rows] = str(exc).splitlines()[0]
            if self._problems[rows] and not self.note:
                self.note = f"pipelines run the whole batch at once: {self._problems[rows]}"
        return self._problems[rows]


def _choose(realized: list[_Realized]) -> _Realized | None:
    """The fastest realized plan that fits; within MEMORY_TOLERANCE of it, the least memory per device."""
    fitting = [r for r in realized if r.fits]
    if not fitting:
        return None
    fastest = min(r.step_s for r in fitting)
    close = [r for r in fitting if r.step_s <= fastest * (1 + MEMORY_TOLERANCE)]
    return min(close, key=lambda r: (r.peak, r.step_s))


def _exact_where_it_matters(realized: list[_Realized], cluster: ClusterSpec) -> list[_Realized]:
    """Pipeline plans are realized with memory maps that search offsets only when the greedy arena does not fit
    (``realize_pipeline(exact_memory=False)``): whether each fits is known. The plans the choice compares by
    memory (those that fit within ``MEMORY_TOLERANCE`` of the fastest) are mapped exactly, so the choice and the
    chosen plan's figures are those of exact maps; so is every realized plan when none fits (the error names
    their memory)."""
    fitting = [r for r in realized if r.fits]
    if fitting:
        fastest = min(r.step_s for r in fitting)
        close = [r for r in fitting if r.step_s <= fastest * (1 + MEMORY_TOLERANCE)]
        refine = close if len(close) > 1 else [min(fitting, key=lambda r: r.step_s)]
    else:
        refine = realized
    out = []
    for r in realized:
        if not r.exact and any(r is x for x in refine):
            plan = with_exact_memory(r.plan, cluster)
            r = _Realized(r.candidate, plan, _peak_of(plan) <= cluster.device.memory_bytes)
        out.append(r)
    return out


def _with_tiers(r: _Realized, cluster: ClusterSpec, pinned: Constraints) -> _Realized:
    from shardwise.planner.offload import with_offload

    recompute = "auto" if pinned.recompute in (None, "auto") else "none"
    plan = with_offload(r.plan, pinned.offload, cluster, recompute)
    return _Realized(r.candidate, plan, _peak_of(plan) <= cluster.device.memory_bytes)


def _made_to_fit(
    realized: list[_Realized], cluster: ClusterSpec, pinned: Constraints, notes: list[str]
) -> _Realized | None:
    """The fastest realized flat plan made to fit by host offload (jointly with recomputation)."""
    from shardwise.planner.offload import with_offload

    setting = pinned.offload or "auto"
    for r in sorted((r for r in realized if r.candidate.flat), key=lambda r: r.step_s):
        try:
            fitted = with_offload(r.plan, setting, cluster, "none" if pinned.recompute == "none" else "auto")
        except (DoesNotFitError, ShardwiseError):
            continue
        if _peak_of(fitted) <= cluster.device.memory_bytes:
            notes.append("made to fit by host offload: no layout fits the device as it is")
            return _Realized(r.candidate, fitted, True)
    return None


def _does_not_fit(
    result: SearchResult, realized: list[_Realized], failed: Mapping[tuple, str], cluster: ClusterSpec,
    pinned: Constraints,
) -> str:  # fmt: skip
    """What the best layout needs, what it is made of, and which knob would help (never a figure below the
    device's capacity as the reason)."""
    capacity = cluster.device.memory_bytes
    over = [r for r in realized if r.peak > capacity]
    if over:
        best = min(over, key=lambda r: r.peak)
        need, cand = best.peak, best.candidate
        # the rank with the peak (a pipeline's first stage may hold a small part of it): its parts add up to it
        m = max(best.plan.memory, key=lambda m: m.arena_bytes) if best.plan.memory else None
        parts = (
            [("weights", m.params_bytes), ("gradients", m.grads_bytes), ("optimizer state", m.optimizer_bytes),
             ("activations and buffers", m.activation_bytes)]
            if m is not None else list(cand.memory_parts)
        )  # fmt: skip
    else:
        usable = result.capacity_bytes or capacity
        estimated = [c for c in result.ranked if c.peak_bytes > usable] or list(result.ranked)
        cand = min(estimated, key=lambda c: c.peak_bytes)
        need, parts = cand.peak_bytes, list(cand.memory_parts)
    made_of = ", ".join(f"{name} {_size(b)}" for name, b in parts if b)
    knobs = []
    if pinned.recompute in ("none",):
        knobs.append("allow recomputation (recompute='auto')")
    if pinned.zero is not None and pinned.zero < 3:
        knobs.append("a higher ZeRO stage (zero=3 shards the parameters over data parallelism)")
    if any(v is not None for v in (pinned.pp, pinned.tp, pinned.dp)):
        knobs.append("unpin the parallel degrees (more pipeline or tensor parallelism divides the parameters)")
    if pinned.offload == "none":
        knobs.append("allow host offload (offload='auto')")
    knobs.append("more devices, devices with more memory, or a lower precision")
    failures = "; ".join(dict.fromkeys(failed.values()))
    if need > capacity:
        reason = f"every layout needs at least {_size(need)} per device, and a device has {_size(capacity)}"
    else:  # estimated above what a plan may use of the device (the rest: allocator slack, workspaces)
        reason = (
            f"every layout is estimated to need at least {_size(need)} per device, more than the "
            f"{_size(result.capacity_bytes)} a plan may use of a device's {_size(capacity)}"
        )
    return (
        f"the model does not fit {cluster.name}: {reason}; the leanest ({cand.describe()}) holds {made_of}. "
        f"Try: {'; '.join(knobs)}"
        + (f". (Also tried: {failures})" if failures else "")
    )


def _size(nbytes: float) -> str:
    """Bytes in GiB, or MiB below a tenth of a GiB (so small figures stay readable)."""
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 / 10 else f"{nbytes / 2**20:.2f} MiB"


def _times(seconds: float, best: float) -> str:
    """``seconds`` as a multiple of ``best`` (a plan of views alone is priced at 0 s)."""
    return f"{seconds / best:.2f}x" if best > 0 else ("as fast as" if seconds <= 0 else f"{seconds:.3g} s against 0 s,")


def _alternative(cand: Candidate, step: float, peak: int, fits: bool, chosen: bool, note: str) -> Alternative:
    return Alternative(degrees=cand.degrees, step_time_s=step, memory_bytes=peak, fits=fits, chosen=chosen, note=note)


def _finish(
    chosen: _Realized, realized: list[_Realized], result: SearchResult, failed: Mapping[tuple, str],
    notes: list[str], planning_s: float,
) -> ExecutionPlan:  # fmt: skip
    best_s = chosen.step_s
    rows: list[Alternative] = []
    seen: set[tuple] = set()
    for r in sorted(realized, key=lambda r: (not r.fits, r.step_s)):
        seen.add(r.candidate.key())
        if r is chosen and not r.fits:  # require_fit=False and nothing fits: the fastest, said so in the notes
            rows.append(_alternative(r.candidate, r.step_s, r.peak, False, True,
                                     f"chosen: fastest realized plan; none fits ({r.candidate.describe()})"))  # fmt: skip
        elif r is chosen:
            why = "chosen: fastest plan that fits" + (
                " (least memory of those within 1% of it)" if r.candidate.key() != min(
                    (x for x in realized if x.fits), key=lambda x: x.step_s).candidate.key() else ""
            )  # fmt: skip
            rows.append(_alternative(r.candidate, r.step_s, r.peak, True, True, f"{why} ({r.candidate.describe()})"))
        else:
            what = (f"{_times(r.step_s, best_s)} the chosen plan's step time" if r.fits
                    else "does not fit in device memory")  # fmt: skip
            rows.append(_alternative(r.candidate, r.step_s, r.peak, r.fits, False,
                                     f"{what}, realized ({r.candidate.describe()})"))  # fmt: skip
    # the best estimate of each other mesh (degrees, ep and cp) first, so that the alternatives say what each
    # parallel layout would cost (then the next best layouts, which mostly differ from the chosen one by less)
    meshes = {r.candidate.degrees for r in realized}
    distinct = []
    for c in result.ranked:
        if c.degrees not in meshes:
            meshes.add(c.degrees)
            distinct.append(c)
    for c in (*distinct[: MAX_ALTERNATIVES // 2], *result.ranked):
        if len(rows) >= MAX_ALTERNATIVES:
            break
        if c.key() in seen:
            continue
        seen.add(c.key())
        reason = failed.get(c.key())
        if reason:
            note = f"could not be built: {reason} ({c.describe()})"
        elif c.fits:
            note = f"{_times(c.step_s, best_s)} the chosen plan's step time, estimated ({c.describe()})"
        else:
            note = f"does not fit in device memory, estimated ({c.describe()})"
        rows.append(_alternative(c, c.step_s, c.peak_bytes, c.fits and not reason, False, note))
    plan = chosen.plan
    search_note = (
        f"search: {result.evaluated} layouts estimated, {len(realized)} realized and priced, "
        f"{result.placements} unit placements, {planning_s:.2f} s"
    )
    return plan.replace(
        alternatives=tuple(rows), notes=(*plan.notes, *notes, search_note),
        passes=tuple(dict.fromkeys((*plan.passes, "planner.search"))),
    )

