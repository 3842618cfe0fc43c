"""Symbolic verification of schedules and of the per-rank programs they lower to.

``verify_program`` executes the lowered programs on symbolic values (a chunk's value is the set of ranks
whose contribution it holds) as a Kahn process network: sends never block, a recv blocks until the
matching message (same sender, next sequence number) exists. Since such a network is deterministic, one
execution decides correctness for every interleaving. It checks:

* no step sends a slot that holds no data yet;
* every recv matches the sender's message: same peer, sequence number and number of chunks, and the same
  chunk identities (sends and receives match per pair, in order);
* a reduction adds disjoint contribution sets (every contribution at most once);
* no rank waits forever (no dependency cycle, no missing message) and no message is left unreceived;
* at the end every rank's output holds exactly what the collective requires (for reductions: every
  contribution exactly once).

``verify`` also checks the schedule itself (deps acyclic) and returns a small report.
"""

from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass

from shardwise.passes.collectives.chunks import CollectiveSpec
from shardwise.passes.collectives.lower import FORMAT, lower
from shardwise.passes.collectives.schedule import Schedule, ScheduleError

__all__ = ["VerifyReport", "verify", "verify_program"]


@dataclass(frozen=True)
class VerifyReport:
    ok: bool
    messages: int
    steps: int
    max_slots: int


def _spec_of(program: dict) -> CollectiveSpec:
    if program.get("format") != FORMAT:
        raise ScheduleError(f"not a {FORMAT} program: format={program.get('format')!r}")
    return CollectiveSpec(program["collective"], program["nranks"], program["chunks"], program.get("root", 0))


def verify_program(program: dict) -> VerifyReport:
    """Run the lowered ``program`` symbolically; ScheduleError describing the first violation found."""
    spec = _spec_of(program)
    p = spec.nranks
    progs = program["programs"]
    if len(progs) != p:
        raise ScheduleError(f"{len(progs)} programs for {p} ranks")
    state: list[list[frozenset[int] | None]] = []
    for r, pr in enumerate(progs):
        slots: list[frozenset[int] | None] = [None] * pr["nslots"]
        init = dict(spec.input_map(r))
        for k, s in pr["inputs"]:
            g = init.get(k)
            if g is None or pr["chunk_ids"][s] != g:
                raise ScheduleError(f"rank {r}: input {k} lands in slot {s} that is not chunk {g}")
            slots[s] = frozenset((r,))
        state.append(slots)
    pcs = [0] * p
    channels: dict[tuple[int, int], deque[tuple[int, list[int], list[frozenset[int]]]]] = defaultdict(deque)
    expect: dict[tuple[int, int], int] = defaultdict(int)
    messages = 0
    while True:
        progress = False
        for r in range(p):
            steps = progs[r]["steps"]
            ids = progs[r]["chunk_ids"]
            while pcs[r] < len(steps):
                op, peer, slots, seq = steps[pcs[r]]
                if op == "send":
                    vals = []
                    for s in slots:
                        v = state[r][s]
                        if v is None:
                            raise ScheduleError(
                                f"rank {r} step {pcs[r]}: sends chunk {ids[s]} to {peer} before it holds it"
                            )
                        vals.append(v)
                    channels[(r, peer)].append((seq, [ids[s] for s in slots], vals))
                    messages += 1
                elif op in ("recv", "recv_reduce"):
                    chan = channels[(peer, r)]
                    if not chan:
                        break
                    mseq, mids, vals = chan.popleft()
                    want = expect[(peer, r)]
                    expect[(peer, r)] += 1
                    if mseq != seq or seq != want:
                        raise ScheduleError(
                            f"rank {r} step {pcs[r]}: expects message {seq} from {peer}, the next is {mseq}"
                        )
                    if mids != [ids[s] for s in slots]:
                        raise ScheduleError(
                            f"rank {r} step {pcs[r]}: receives chunks {[ids[s] for s in slots]} but {peer} "
                            f"sent {mids}"
                        )
                    for s, v in zip(slots, vals):
                        if op == "recv":
                            state[r][s] = v
                            continue
                        old = state[r][s]
                        if old is None:
                            raise ScheduleError(f"rank {r}: reduces into chunk {ids[s]} that holds no data")
                        if old & v:
                            raise ScheduleError(
                                f"rank {r}: reducing chunk {ids[s]} counts contributions {sorted(old & v)} twice"
                            )
                        state[r][s] = old | v
                else:
                    raise ScheduleError(f"rank {r}: unknown step {op!r}")
                pcs[r] += 1
                progress = True
        if all(pcs[r] == len(progs[r]["steps"]) for r in range(p)):
            break
        if not progress:
            blocked = [
                (r, progs[r]["steps"][pcs[r]][:2]) for r in range(p) if pcs[r] < len(progs[r]["steps"])
            ]
            raise ScheduleError(f"deadlock: ranks wait forever at {blocked[:6]}")
    left = {k: len(v) for k, v in channels.items() if v}
    if left:
        raise ScheduleError(f"messages sent but never received: {left}")
    for r in range(p):
        need = spec.required(r)
        outs = {k: s for s, k in progs[r]["outputs"]}
        ids = progs[r]["chunk_ids"]
        for g, k in spec.output_map(r):
            s = outs.get(k)
            if s is None or ids[s] != g:
                raise ScheduleError(f"rank {r}: output {k} is not taken from chunk {g}")
            if state[r][s] != need[g]:
                got = None if state[r][s] is None else sorted(state[r][s])
                raise ScheduleError(f"rank {r} ends with chunk {g} = {got}, needs {sorted(need[g])}")
    steps_total = sum(len(pr["steps"]) for pr in progs)
    return VerifyReport(True, messages, steps_total, max(pr["nslots"] for pr in progs))


def verify(schedule: Schedule, start_times: list[float] | tuple[float, ...] | None = None) -> VerifyReport:
    """Lower ``schedule`` (ordered by ``start_times`` if given) and verify the programs; ScheduleError if wrong."""
    return verify_program(lower(schedule, start_times))
