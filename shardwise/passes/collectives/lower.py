"""Lower a schedule to per-rank programs of send / recv / recv-reduce steps (plain data for the runtime).

Format ``shardwise.collective.v1`` (a JSON-able dict; ``shardwise.runtime.lib.schedule_exec`` runs it)::

    {"format": "shardwise.collective.v1", "collective": str, "nranks": p, "chunks": c,
     "in_chunks": int, "out_chunks": int, "algorithm": str, "digest": str,
     "programs": [                     # one per local rank
        {"nslots": k,                  # the rank's work buffer holds k chunks
         "inputs": [[in_index, slot], ...],    # copy input chunks into slots first
         "outputs": [[slot, out_index], ...],  # copy slots to the output at the end
         "chunk_ids": [global chunk of slot 0, ...],
         "steps": [["send", peer, [slot, ...], seq],
                   ["recv", peer, [slot, ...], seq],          # overwrite the slots
                   ["recv_reduce", peer, [slot, ...], seq]]}  # add into the slots
     ]}

Semantics: each rank runs its steps in order. A send takes its value when it is posted; a recv's data is in
place before any later step touches those slots. ``seq`` numbers the messages of each ordered pair
(sender, receiver) from 0: the k-th send from a to b matches the k-th recv from a at b (FIFO per pair).

Ordering: each rank's steps follow the simulated start times (sends before recvs at equal times), subject
to slot rules — a send comes after the writes it depends on and before the writes it must not see, and
ordered writes stay in order. Raises ScheduleError if these rules contradict (an ambiguous schedule).
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Sequence

from shardwise.passes.collectives.schedule import Schedule, ScheduleError

__all__ = ["lower", "ancestors", "FORMAT"]

FORMAT = "shardwise.collective.v1"


def ancestors(schedule: Schedule) -> list[int]:
    """Bitset (int) of the transitive deps of each transfer; ScheduleError on a dependency cycle."""
    n = len(schedule.transfers)
    succs: list[list[int]] = [[] for _ in range(n)]
    indeg = [0] * n
    for i, t in enumerate(schedule.transfers):
        indeg[i] = len(t.deps)
        for d in t.deps:
            succs[d].append(i)
    anc = [0] * n
    stack = [i for i in range(n) if indeg[i] == 0]
    seen = 0
    while stack:
        i = stack.pop()
        seen += 1
        a = 0
        for d in schedule.transfers[i].deps:
            a |= anc[d] | (1 << d)
        anc[i] = a
        for k in succs[i]:
            indeg[k] -= 1
            if indeg[k] == 0:
                stack.append(k)
    if seen != n:
        raise ScheduleError(f"schedule {schedule.algorithm}: its deps form a cycle")
    return anc


def _order_rank(
    items: list[tuple[tuple[float, int, int], int, bool]], before: dict[int, set[int]]
) -> list[tuple[int, bool]]:
    """Topological order of one rank's steps (key, transfer, is_send) under ``before`` (step -> preds)."""
    preds: list[set[int]] = [set(before.get(n, ())) for n in range(len(items))]
    succ: list[list[int]] = [[] for _ in items]
    indeg = [len(p) for p in preds]
    for n, ps in enumerate(preds):
        for m in ps:
            succ[m].append(n)
    heap = [(items[n][0], n) for n in range(len(items)) if indeg[n] == 0]
    heapq.heapify(heap)
    out = []
    while heap:
        _, n = heapq.heappop(heap)
        out.append((items[n][1], items[n][2]))
        for m in succ[n]:
            indeg[m] -= 1
            if indeg[m] == 0:
                heapq.heappush(heap, (items[m][0], m))
    if len(out) != len(items):
        raise ScheduleError("a rank's slot rules contradict each other (ambiguous reads and writes)")
    return out


def lower(schedule: Schedule, start_times: Sequence[float] | None = None) -> dict:
    """Per-rank programs for ``schedule`` (see the module docstring); ``start_times`` from the simulator."""
    spec = schedule.spec
    p = spec.nranks
    tr = schedule.transfers
    times = list(start_times) if start_times is not None else [t.prio for t in tr]
    anc = ancestors(schedule)
    # per rank: steps (key, transfer index, is_send)
    steps: dict[int, list[tuple[tuple[float, int, int], int, bool]]] = defaultdict(list)
    for i, t in enumerate(tr):
        steps[t.src].append(((times[i], 0, i), i, True))
        steps[t.dst].append(((times[i], 1, i), i, False))
    programs = []
    seqs: dict[tuple[int, int], int] = defaultdict(int)
    ordered: dict[int, list[tuple[int, bool]]] = {}
    for r in range(p):
        items = sorted(steps.get(r, []))
        reads: dict[int, list[int]] = defaultdict(list)
        writes: dict[int, list[int]] = defaultdict(list)
        for n, (_, i, is_send) in enumerate(items):
            for g in tr[i].chunks:
                (reads if is_send else writes)[g].append(n)
        before: dict[int, set[int]] = defaultdict(set)
        for g, ws in writes.items():
            for a in ws:
                ia = items[a][1]
                for b in ws:
                    ib = items[b][1]
                    if a != b and (anc[ib] >> ia) & 1:
                        before[b].add(a)
                for s in reads.get(g, ()):
                    i_s = items[s][1]
                    if (anc[i_s] >> ia) & 1:
                        before[s].add(a)
                    else:
                        before[a].add(s)
        ordered[r] = _order_rank(items, before)
    # FIFO per pair: receivers take messages in the order the sender sends them
    send_seq: dict[int, int] = {}
    for r in range(p):
        for i, is_send in ordered[r]:
            if is_send:
                key = (r, tr[i].dst)
                send_seq[i] = seqs[key]
                seqs[key] += 1
    for r in range(p):
        last: dict[int, int] = {}
        for i, is_send in ordered[r]:
            if not is_send:
                src = tr[i].src
                if send_seq[i] < last.get(src, -1):
                    raise ScheduleError(
                        f"rank {r} receives from {src} out of the order {src} sends in (transfer {i})"
                    )
                last[src] = send_seq[i]
    for r in range(p):
        touched = {g for _, g in spec.input_map(r)} | {g for g, _ in spec.output_map(r)}
        for i, _ in ordered[r]:
            touched.update(tr[i].chunks)
        chunk_ids = sorted(touched)
        slot = {g: k for k, g in enumerate(chunk_ids)}
        prog_steps = []
        for i, is_send in ordered[r]:
            t = tr[i]
            slots = [slot[g] for g in t.chunks]
            if is_send:
                prog_steps.append(["send", t.dst, slots, send_seq[i]])
            else:
                prog_steps.append(["recv_reduce" if t.reduce else "recv", t.src, slots, send_seq[i]])
        programs.append(
            {
                "nslots": len(chunk_ids),
                "inputs": [[k, slot[g]] for k, g in spec.input_map(r)],
                "outputs": [[slot[g], k] for g, k in spec.output_map(r)],
                "chunk_ids": chunk_ids,
                "steps": prog_steps,
            }
        )
    return {
        "format": FORMAT,
        "collective": spec.kind,
        "nranks": p,
        "chunks": spec.chunks,
        "root": spec.root,
        "in_chunks": spec.in_chunks,
        "out_chunks": spec.out_chunks,
        "algorithm": schedule.algorithm,
        "digest": schedule.digest(),
        "programs": programs,
    }
