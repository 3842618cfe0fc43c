"""What the planner and the CLI call: the best algorithm for a collective, and the synthesis table.

``best_collective`` returns a small frozen ``CollectiveChoice``: the algorithm (``library:<name>`` for an
algorithm a collective library runs natively, ``synth:<digest>`` for a synthesized schedule, or a named
baseline such as ``hierarchical``), its predicted time (simulated: every message priced by the price list,
``costs.comm``), the library's best time under the same simulator, the library's price in closed form
(``CommPrices.algorithms``: ring, tree, PAT) and ``program()`` to get the lowered schedule (plain data for
``shardwise.runtime.lib.schedule_exec``). ``synth_table`` returns the rows ``shardwise synth`` prints.

Results are cached by (topology fingerprint, ranks, collective, size, sketch, search settings) in memory
and, unless ``cache="memory"`` or ``"off"``, as JSON files under ``$SHARDWISE_CACHE_DIR/collectives`` (default
``~/.cache/shardwise/collectives``). A corrupt or unreadable cache file is ignored and rewritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shardwise.costs.comm import CommPrices
from shardwise.errors import UserInputError
from shardwise.passes.collectives.baselines import LIBRARY_ALGORITHMS
from shardwise.passes.collectives.chunks import check_collective
from shardwise.passes.collectives.lower import lower
from shardwise.passes.collectives.sketch import Sketch
from shardwise.passes.collectives.synthesize import synthesize
from shardwise.passes.collectives.topology import topology_view

__all__ = [
    "CollectiveChoice",
    "best_collective",
    "synth_table",
    "table_row",
    "format_synth_table",
    "cache_dir",
    "CACHE_VERSION",
]

CACHE_VERSION = 3
_MEMORY: dict[str, dict[str, Any]] = {}


@dataclass(frozen=True)
class CollectiveChoice:
    """The algorithm chosen for one collective (times in seconds; see the module docstring)."""

    collective: str
    nbytes: int
    ranks: tuple[int, ...]
    algorithm: str
    predicted_s: float
    library_s: float
    lower_bound_s: float
    source: str
    key: str
    library_closed_form_s: float = 0.0

    @property
    def uses_library(self) -> bool:
        return self.algorithm.startswith("library:")

    def program(self) -> dict[str, Any]:
        """The lowered schedule (``shardwise.collective.v1``), from the cache."""
        rec = _MEMORY.get(self.key) or _read_disk(self.key)
        if rec is None:
            raise UserInputError(
                f"the schedule of {self.algorithm} is no longer cached: call best_collective() again"
            )
        return rec["program"]


def cache_dir() -> Path:
    """Where results are cached on disk: ``$SHARDWISE_CACHE_DIR/collectives`` or ``~/.cache/shardwise/...``."""
    base = os.environ.get("SHARDWISE_CACHE_DIR")
    root = Path(base) if base else Path.home() / ".cache" / "shardwise"
    return root / "collectives"


def _read_disk(key: str) -> dict[str, Any] | None:
    path = cache_dir() / f"{key}.json"
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and rec.get("version") == CACHE_VERSION else None


def _write_disk(key: str, rec: dict[str, Any]) -> None:
    try:
        d = cache_dir()
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".{key}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(rec, separators=(",", ":")))
        tmp.replace(d / f"{key}.json")
    except OSError:
        pass  # a read-only home must not break planning


def _key(
    cluster: Any, ranks: tuple[int, ...], kind: str, nbytes: int, sketch: Sketch | None, *rest: Any
) -> str:
    text = json.dumps(
        [
            CACHE_VERSION,
            cluster.fingerprint(),
            list(ranks),
            kind,
            nbytes,
            sketch.key() if sketch else "auto",
            *rest,
        ]
    )
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _solve(
    cluster: Any,
    collective: str,
    nbytes: int,
    ranks: Sequence[int] | None,
    sketch: Sketch | None,
    allow_synthesis: bool,
    time_limit_s: float,
    seed: int,
    root: int,
    cache: str,
) -> dict[str, Any]:
    from shardwise.cluster import get_cluster

    if cache not in ("auto", "memory", "off"):
        raise UserInputError(f"cache={cache!r} is not allowed: use 'auto', 'memory' or 'off'")
    kind = check_collective(collective)
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes <= 0:
        raise UserInputError(f"size {nbytes!r} is not allowed: give a positive number of bytes")
    cluster = get_cluster(cluster)
    group = tuple(range(cluster.world_size)) if ranks is None else tuple(int(r) for r in ranks)
    key = _key(cluster, group, kind, nbytes, sketch, allow_synthesis, time_limit_s, seed, root)
    if cache != "off":
        rec = _MEMORY.get(key)
        if rec is None and cache == "auto":
            rec = _read_disk(key)
            if rec is not None:
                _MEMORY[key] = rec
        if rec is not None:
            return {**rec, "cached": True}
    topo = topology_view(cluster, group)
    t0, c0 = time.perf_counter(), time.process_time()
    if allow_synthesis:
        res = synthesize(topo, kind, nbytes, sketch=sketch, time_limit_s=time_limit_s, seed=seed, root=root)
    else:
        res = synthesize(
            topo, kind, nbytes, sketch=sketch, time_limit_s=0.0, seed=seed, root=root, search=False
        )
    library = {k: v for k, v in res.baselines.items() if k in LIBRARY_ALGORITHMS}
    library_s = min(library.values()) if library else res.time_s
    closed_form = CommPrices(cluster).algorithms(kind, nbytes, group) if kind != "broadcast" else {}
    if res.source.startswith("baseline:"):
        name = res.source.split(":", 1)[1]
        algorithm = f"library:{name}" if name in LIBRARY_ALGORITHMS else name
    elif res.source == "trivial":
        algorithm = "trivial"
    else:
        algorithm = f"synth:{res.schedule.digest()}"
    rec = {
        "version": CACHE_VERSION,
        "key": key,
        "cluster": cluster.name,
        "collective": kind,
        "size_bytes": nbytes,
        "ranks": list(group),
        "algorithm": algorithm,
        "source": res.source,
        "predicted_s": res.time_s,
        "search_s": res.search_s,
        "library_s": library_s,
        "library_closed_form_s": closed_form,
        "baselines_s": res.baselines,
        "lower_bound_s": res.bound.time,
        "bound_cut": res.bound.cut,
        "synthesis_s": time.perf_counter() - t0,
        "synthesis_cpu_s": time.process_time() - c0,
        "candidates_s": res.candidates,
        "program": res.program if res.program is not None else lower(res.schedule, res.start_times),
    }
    if cache != "off":
        _MEMORY[key] = rec
        if cache == "auto":
            _write_disk(key, rec)
    return {**rec, "cached": False}


def best_collective(
    cluster: Any,
    collective: str,
    nbytes: int,
    ranks: Sequence[int] | None = None,
    *,
    allow_synthesis: bool = True,
    time_limit_s: float = 30.0,
    sketch: Sketch | None = None,
    seed: int = 0,
    root: int = 0,
    cache: str = "auto",
) -> CollectiveChoice:
    """The fastest verified algorithm for ``collective`` of ``nbytes`` over ``ranks`` (all by default).

    ``allow_synthesis=False`` only compares the baselines (no solver runs); ``time_limit_s`` bounds the
    solvers (deterministic time, about seconds on an idle core).
    """
    rec = _solve(cluster, collective, nbytes, ranks, sketch, allow_synthesis, time_limit_s, seed, root, cache)
    return CollectiveChoice(
        collective=rec["collective"],
        nbytes=rec["size_bytes"],
        ranks=tuple(rec["ranks"]),
        algorithm=rec["algorithm"],
        predicted_s=rec["predicted_s"],
        library_s=rec["library_s"],
        lower_bound_s=rec["lower_bound_s"],
        source=rec["source"],
        key=rec["key"],
        library_closed_form_s=min(rec["library_closed_form_s"].values(), default=0.0),
    )


def synth_table(
    cluster: Any,
    collective: str,
    sizes_bytes: Sequence[int],
    *,
    sketch: Sketch | None = None,
    ranks: Sequence[int] | None = None,
    time_limit_s: float = 30.0,
    seed: int = 0,
    cache: str = "auto",
) -> list[dict[str, Any]]:
    """One row per size: what ``shardwise synth`` prints (times in microseconds).

    Keys: collective, size_bytes, synthesized_us (the returned schedule's simulated time), algbw_GBps,
    baselines {name: us} (simulated schedules), library_closed_form_us {name: us} (the price list's closed
    forms of the library's algorithms), lower_bound_us, synthesis_s (wall), synthesis_cpu_s (this process, all
    solver threads: the honest measure on a shared machine), plus algorithm, source (which search, or
    ``baseline:<name>`` when none beat it), search_us (best of the searches alone), best_baseline,
    speedup (best baseline / synthesized), bound_ratio (synthesized / lower bound), cached.
    """
    rows = []
    for size in sizes_bytes:
        rec = _solve(cluster, collective, int(size), ranks, sketch, True, time_limit_s, seed, 0, cache)
        rows.append(table_row(rec))
    return rows


def table_row(rec: dict[str, Any]) -> dict[str, Any]:
    """The ``synth_table`` row of one result record (as cached)."""
    base = {k: v * 1e6 for k, v in sorted(rec["baselines_s"].items())}
    best_name = min(base, key=base.get) if base else "-"
    closed = {k: v * 1e6 for k, v in sorted(rec.get("library_closed_form_s", {}).items())}
    t = rec["predicted_s"]
    return {
        "cluster": rec["cluster"],
        "collective": rec["collective"],
        "size_bytes": rec["size_bytes"],
        "synthesized_us": t * 1e6,
        "algbw_GBps": rec["size_bytes"] / t / 1e9 if t > 0 else float("inf"),
        "baselines": base,
        "library_closed_form_us": closed,
        "lower_bound_us": rec["lower_bound_s"] * 1e6,
        "synthesis_s": rec["synthesis_s"],
        "synthesis_cpu_s": rec["synthesis_cpu_s"],
        "algorithm": rec["algorithm"],
        "source": rec["source"],
        "search_us": rec["search_s"] * 1e6 if rec["search_s"] < float("inf") else None,  # None: no search ran
        "best_baseline": best_name,
        "speedup": (base[best_name] / (t * 1e6)) if base and t > 0 else 1.0,
        "bound_ratio": t / rec["lower_bound_s"] if rec["lower_bound_s"] > 0 else 1.0,
        "cached": rec.get("cached", True),
    }


def _size(n: int) -> str:
    for unit, f in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n >= f and n % f == 0:
            return f"{n // f}{unit}"
    return f"{n}B"


def format_synth_table(rows: Sequence[dict[str, Any]]) -> str:
    """A plain-text table of ``synth_table`` rows."""
    head = f"{'collective':<15}{'size':>7}{'synth us':>12}{'GB/s':>8}{'best baseline':>26}{'x':>6}{'bound us':>12}{'/bound':>7}{'synth s':>8}  source"
    lines = [head, "-" * len(head)]
    for r in rows:
        bb = r["best_baseline"]
        btxt = f"{bb} {r['baselines'].get(bb, float('nan')):.1f}" if bb != "-" else "-"
        lines.append(
            f"{r['collective']:<15}{_size(r['size_bytes']):>7}{r['synthesized_us']:>12.1f}{r['algbw_GBps']:>8.1f}"
            f"{btxt:>26}{r['speedup']:>6.2f}{r['lower_bound_us']:>12.1f}{r['bound_ratio']:>7.3f}"
            f"{r['synthesis_s']:>8.1f}  {r['source']}"
        )
    return "\n".join(lines)
