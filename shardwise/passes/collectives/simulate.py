"""Time a schedule under the alpha-beta model with contention: an absolute time from the price list.

A transfer of ``b`` bytes from ``u`` to ``v`` takes ``costs.comm.message_s(b, alpha, beta)`` at the figures of
``topo.route(u, v)`` (the price list's achieved alpha and beta for that route, ``costs.comm.route_alpha_beta``;
alone, it costs what ``CommPrices.p2p_s`` charges for that message) and holds every resource of that route
for the whole time. It starts as soon as (1) every transfer in its ``deps``
has ended and (2) on each of its resources, the transfer before it in that resource's ``(prio, index)``
order has ended. Start times are the earliest satisfying these rules (no transfer waits longer than it
must), so the result is a function of the schedule alone: deterministic and exact (no discretisation).

Raises ScheduleError when the orders and deps form a cycle (no execution exists).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from shardwise.passes.collectives.schedule import Schedule, ScheduleError
from shardwise.passes.collectives.topology import TopologyView

__all__ = ["SimResult", "simulate", "durations"]


@dataclass(frozen=True)
class SimResult:
    """``time`` (s) is the completion of the last transfer; ``start``/``end`` per transfer."""

    time: float
    start: tuple[float, ...]
    end: tuple[float, ...]
    busiest: tuple[str, float]

    @property
    def time_us(self) -> float:
        return self.time * 1e6


def durations(
    schedule: Schedule, topo: TopologyView, nbytes: float
) -> tuple[list[float], list[tuple[int, ...]]]:
    """(duration s, resources) of every transfer of ``schedule`` for a collective of ``nbytes``."""
    cb = schedule.spec.chunk_bytes(nbytes)
    durs, res = [], []
    for t in schedule.transfers:
        e = topo.route(t.src, t.dst)
        durs.append(e.time(cb * len(t.chunks)))
        res.append(e.resources)
    return durs, res


def simulate(schedule: Schedule, topo: TopologyView, nbytes: float) -> SimResult:
    """Simulate ``schedule`` on ``topo`` for a collective of ``nbytes`` bytes (see the module docstring)."""
    n = len(schedule.transfers)
    if n == 0:
        return SimResult(0.0, (), (), ("", 0.0))
    durs, res = durations(schedule, topo, nbytes)
    on_res: dict[int, list[int]] = defaultdict(list)
    for i, rs in enumerate(res):
        for r in rs:
            on_res[r].append(i)
    preds: list[list[int]] = [list(t.deps) for t in schedule.transfers]
    for lst in on_res.values():
        lst.sort(key=lambda i: (schedule.transfers[i].prio, i))
        for a, b in zip(lst, lst[1:]):
            preds[b].append(a)
    succs: list[list[int]] = [[] for _ in range(n)]
    indeg = [0] * n
    for i, ps in enumerate(preds):
        indeg[i] = len(ps)
        for j in ps:
            succs[j].append(i)
    start = [0.0] * n
    end = [0.0] * n
    stack = [i for i in range(n) if indeg[i] == 0]
    done = 0
    while stack:
        i = stack.pop()
        done += 1
        s = max((end[j] for j in preds[i]), default=0.0)
        start[i] = s
        end[i] = s + durs[i]
        for k in succs[i]:
            indeg[k] -= 1
            if indeg[k] == 0:
                stack.append(k)
    if done != n:
        stuck = [i for i in range(n) if indeg[i] > 0][:5]
        raise ScheduleError(
            f"schedule {schedule.algorithm}: deps and resource orders form a cycle (e.g. transfers {stuck})"
        )
    busy: dict[int, float] = defaultdict(float)
    for i, rs in enumerate(res):
        for r in rs:
            busy[r] += durs[i]
    top = max(busy, key=lambda r: (busy[r], -r))
    return SimResult(max(end), tuple(start), tuple(end), (topo.resources[top].name, busy[top]))
