"""Export lowered schedules to the MSCCL XML algorithm format, and check such XML symbolically.

The XML has the attributes current MSCCL executors read: on ``<algo>``: ``name``, ``proto``
(Simple/LL/LL128), ``nchannels``, ``nchunksperloop``, ``ngpus``, ``coll`` (allgather, reducescatter,
allreduce, alltoall, broadcast), ``inplace``, ``outofplace``, ``minBytes``, ``maxBytes``; on ``<gpu>``:
``id``, ``i_chunks``, ``o_chunks``, ``s_chunks``; on ``<tb>``: ``id``, ``send``, ``recv``, ``chan``; on
``<step>``: ``s``, ``type`` (s, r, rrc, cpy, nop), ``srcbuf``/``srcoff``, ``dstbuf``/``dstoff``, ``cnt``,
``depid``/``deps`` (one dependency per step; extra ones go on ``nop`` steps just before) and ``hasdep``.

Mapping (out of place, one channel): each rank's slots live in the output buffer when they hold an
output chunk, in the input buffer when they are only read, else in scratch; input chunks that end up
elsewhere are copied first (``cpy``). Every rank gets one threadblock per peer it sends to and one per
peer it receives from, so sends and receives of a pair keep the program's order (MSCCL matches them in
FIFO order per connection). Steps carry dependencies on the other threadblocks' steps that touch the
same chunks before them in the program (read after write, write after read, write after write). A
message whose chunks are not contiguous on both sides becomes several steps.

``check_msccl_xml`` executes an XML algorithm on symbolic data (threadblocks run concurrently, subject
to their dependencies and FIFO connections) and raises ScheduleError unless every GPU ends with what the
collective requires; it knows nothing of how the XML was made.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections import defaultdict, deque

from shardwise.passes.collectives.lower import FORMAT
from shardwise.passes.collectives.schedule import ScheduleError

__all__ = ["to_msccl_xml", "check_msccl_xml", "MSCCL_COLL", "MSCCL_MAX_STEPS", "MSCCL_MAX_COUNT"]

MSCCL_COLL = {
    "allgather": "allgather",
    "reduce_scatter": "reducescatter",
    "allreduce": "allreduce",
    "alltoall": "alltoall",
    "broadcast": "broadcast",
}
#: executor limits (steps per threadblock, chunks per step)
MSCCL_MAX_STEPS = 256
MSCCL_MAX_COUNT = 72


def _locations(program: dict, r: int) -> tuple[list[tuple[str, int]], list[tuple[int, int]], int]:
    """Per slot its (buffer, offset); the input copies (in index, slot) needed first; scratch size."""
    pr = program["programs"][r]
    k = pr["nslots"]
    outs = {slot: idx for slot, idx in pr["outputs"]}
    ins = {slot: idx for idx, slot in pr["inputs"]}
    written = {s for op, _, slots, _ in pr["steps"] if op != "send" for s in slots}
    loc: list[tuple[str, int]] = []
    copies: list[tuple[int, int]] = []
    scratch = 0
    for slot in range(k):
        if slot in outs:
            loc.append(("o", outs[slot]))
            if slot in ins:
                copies.append((ins[slot], slot))
        elif slot in written or slot not in ins:
            loc.append(("s", scratch))
            scratch += 1
            if slot in ins:
                copies.append((ins[slot], slot))
        else:
            loc.append(("i", ins[slot]))
    return loc, copies, scratch


def _runs(slots: list[int], src: list[tuple[str, int]], dst: list[tuple[str, int]] | None) -> list[list[int]]:
    """Split a message's slots (positions) into runs contiguous in the sender's (and receiver's) buffers."""
    runs: list[list[int]] = []
    for i in range(len(slots)):
        if runs:
            j = runs[-1][-1]
            a, b = src[i], src[j]
            ok = a[0] == b[0] and a[1] == b[1] + 1
            if dst is not None:
                c, d = dst[i], dst[j]
                ok = ok and c[0] == d[0] and c[1] == d[1] + 1
            if ok and len(runs[-1]) < MSCCL_MAX_COUNT - 1:
                runs[-1].append(i)
                continue
        runs.append([i])
    return runs


class _Gpu:
    """Threadblocks of one GPU being built: steps per threadblock and the chunk access history."""

    def __init__(self) -> None:
        self.tbs: dict[tuple[str, int], list[dict]] = {}
        self.order: list[tuple[str, int]] = []
        self.last_write: dict[int, tuple[tuple[str, int], int]] = {}
        self.reads_since: dict[int, list[tuple[tuple[str, int], int]]] = defaultdict(list)

    def _deps(self, key: tuple[str, int], slots: list[int], writes: bool) -> list:
        out = []
        for s in slots:
            w = self.last_write.get(s)
            if w is not None and w[0] != key:
                out.append(w)
            if writes:
                out.extend(x for x in self.reads_since[s] if x[0] != key)
        return sorted(set(out), key=lambda x: (self.order.index(x[0]), x[1]))

    def add(self, key: tuple[str, int], step: dict, slots: list[int], writes: bool) -> None:
        """Append ``step`` to threadblock ``key``, depending on earlier conflicting steps of other ones."""
        if key not in self.tbs:
            self.tbs[key] = []
            self.order.append(key)
        steps = self.tbs[key]
        deps = self._deps(key, slots, writes)
        for d in deps[:-1]:
            steps.append(
                {"type": "nop", "srcbuf": "i", "srcoff": -1, "dstbuf": "o", "dstoff": -1, "cnt": 0, "dep": d}
            )
        step["dep"] = deps[-1] if deps else None
        steps.append(step)
        me = (key, len(steps) - 1)
        for s in slots:
            if writes:
                self.last_write[s] = me
                self.reads_since[s] = []
            else:
                self.reads_since[s].append(me)


def to_msccl_xml(
    program: dict,
    *,
    name: str | None = None,
    proto: str = "Simple",
    min_bytes: int = 0,
    max_bytes: int = 0,
    check_limits: bool = True,
) -> str:
    """The MSCCL XML of a lowered ``program`` (see the module docstring).

    ``check_limits`` raises ScheduleError when a threadblock exceeds the executor's step limit (use a
    schedule with fewer pieces for MSCCL).
    """
    if program.get("format") != FORMAT:
        raise ScheduleError(f"not a {FORMAT} program")
    if proto not in ("Simple", "LL", "LL128"):
        raise ScheduleError(f"proto {proto!r}: use Simple, LL or LL128")
    p = program["nranks"]
    progs = program["programs"]
    locs = [_locations(program, r) for r in range(p)]
    # message m of pair (a, b) = the m-th send a->b; recover each message's slots on both sides
    sends: dict[tuple[int, int], list[list[int]]] = defaultdict(list)
    recvs: dict[tuple[int, int], list[list[int]]] = defaultdict(list)
    for r, pr in enumerate(progs):
        for op, peer, slots, _ in pr["steps"]:
            (sends[(r, peer)] if op == "send" else recvs[(peer, r)]).append(list(slots))
    algo = ET.Element(
        "algo",
        {
            "name": name or f"shardwise-{program['algorithm']}-{program['digest']}",
            "proto": proto,
            "nchannels": "1",
            "nchunksperloop": str(max(program["in_chunks"], program["out_chunks"])),
            "ngpus": str(p),
            "coll": MSCCL_COLL[program["collective"]],
            "inplace": "0",
            "outofplace": "1",
            "minBytes": str(min_bytes),
            "maxBytes": str(max_bytes),
        },
    )
    for r, pr in enumerate(progs):
        loc, copies, scratch = locs[r]
        g = _Gpu()
        for in_idx, slot in copies:
            b, off = loc[slot]
            g.add(
                ("cpy", 0),
                {"type": "cpy", "srcbuf": "i", "srcoff": in_idx, "dstbuf": b, "dstoff": off, "cnt": 1},
                [slot],
                True,
            )
        seen: dict[tuple[str, int], int] = defaultdict(int)
        for op, peer, slots, _ in pr["steps"]:
            if op == "send":
                m = seen[("s", peer)]
                seen[("s", peer)] += 1
                other = recvs[(r, peer)][m]
                dst = [locs[peer][0][s] for s in other]
                src = [loc[s] for s in slots]
                for run in _runs(slots, src, dst):
                    first = src[run[0]]
                    step = {"type": "s", "srcbuf": first[0], "srcoff": first[1], "dstbuf": dst[run[0]][0],
                            "dstoff": dst[run[0]][1], "cnt": len(run)}  # fmt: skip
                    g.add(("send", peer), step, [slots[i] for i in run], False)
            else:
                m = seen[("r", peer)]
                seen[("r", peer)] += 1
                other = sends[(peer, r)][m]
                src = [locs[peer][0][s] for s in other]
                dst = [loc[s] for s in slots]
                for run in _runs(other, src, dst):
                    first = dst[run[0]]
                    kind = "rrc" if op == "recv_reduce" else "r"
                    step = {"type": kind, "srcbuf": first[0] if kind == "rrc" else src[run[0]][0],
                            "srcoff": first[1] if kind == "rrc" else src[run[0]][1], "dstbuf": first[0],
                            "dstoff": first[1], "cnt": len(run)}  # fmt: skip
                    g.add(("recv", peer), step, [slots[i] for i in run], True)
        gpu = ET.SubElement(
            algo,
            "gpu",
            {"id": str(r), "i_chunks": str(program["in_chunks"]), "o_chunks": str(program["out_chunks"]),
             "s_chunks": str(scratch)},
        )  # fmt: skip
        tb_id = {key: i for i, key in enumerate(g.order)}
        depended = {
            (tb_id[st["dep"][0]], st["dep"][1]) for steps in g.tbs.values() for st in steps if st.get("dep")
        }
        for key in g.order:
            steps = g.tbs[key]
            if check_limits and len(steps) > MSCCL_MAX_STEPS:
                raise ScheduleError(
                    f"GPU {r} threadblock {key} needs {len(steps)} steps; MSCCL allows {MSCCL_MAX_STEPS}: "
                    "export a schedule with fewer pieces"
                )
            send = key[1] if key[0] == "send" else -1
            recv = key[1] if key[0] == "recv" else -1
            tbe = ET.SubElement(
                gpu, "tb", {"id": str(tb_id[key]), "send": str(send), "recv": str(recv), "chan": "0"}
            )
            for i, st in enumerate(steps):
                dep = st.get("dep")
                ET.SubElement(
                    tbe,
                    "step",
                    {
                        "s": str(i),
                        "type": st["type"],
                        "srcbuf": st["srcbuf"],
                        "srcoff": str(st["srcoff"]),
                        "dstbuf": st["dstbuf"],
                        "dstoff": str(st["dstoff"]),
                        "cnt": str(st["cnt"]),
                        "depid": str(tb_id[dep[0]]) if dep else "-1",
                        "deps": str(dep[1]) if dep else "-1",
                        "hasdep": "1" if (tb_id[key], i) in depended else "0",
                    },
                )
    ET.indent(algo)
    return ET.tostring(algo, encoding="unicode")


def _required(coll: str, p: int, c: int, r: int, root: int) -> dict[int, tuple[frozenset[int], int]]:
    everyone = frozenset(range(p))
    if coll == "allgather":
        return {g: (frozenset((g // c,)), g % c) for g in range(p * c)}
    if coll == "allreduce":
        return {g: (everyone, g) for g in range(p * c)}
    if coll == "reducescatter":
        return {k: (everyone, r * c + k) for k in range(c)}
    if coll == "alltoall":
        return {s * c + k: (frozenset((s,)), r * c + k) for s in range(p) for k in range(c)}
    return {k: (frozenset((root,)), k) for k in range(c)}


def check_msccl_xml(xml: str, *, root: int = 0) -> int:
    """Run an MSCCL XML algorithm symbolically; the number of steps executed, or ScheduleError."""
    algo = ET.fromstring(xml)
    need = (
        "name",
        "proto",
        "nchannels",
        "nchunksperloop",
        "ngpus",
        "coll",
        "inplace",
        "outofplace",
        "minBytes",
        "maxBytes",
    )
    missing = [a for a in need if a not in algo.attrib]
    if missing:
        raise ScheduleError(f"<algo> lacks {missing}")
    coll, p = algo.get("coll"), int(algo.get("ngpus"))
    bufs: dict[int, dict[str, list]] = {}
    tbs: list[tuple[int, int, ET.Element, list[ET.Element]]] = []
    c = 0
    for gpu in algo.findall("gpu"):
        r = int(gpu.get("id"))
        ni, no, ns = int(gpu.get("i_chunks")), int(gpu.get("o_chunks")), int(gpu.get("s_chunks"))
        if coll in ("allgather", "broadcast"):
            c = ni
        elif coll == "reducescatter":
            c = no
        else:
            c = ni // p
        init = [((frozenset((r,)), k) if (coll != "broadcast" or r == root) else None) for k in range(ni)]
        bufs[r] = {"i": init, "o": [None] * no, "s": [None] * ns}
        for t in gpu.findall("tb"):
            tbs.append((r, int(t.get("id")), t, t.findall("step")))
    pcs = {(r, b): 0 for r, b, _, _ in tbs}
    chans: dict[tuple[int, int, int], deque] = defaultdict(deque)
    executed = 0

    def done(r: int, b: int, s: int) -> bool:
        return pcs.get((r, b), 0) > s

    progress = True
    while progress:
        progress = False
        for r, b, t, steps in tbs:
            while pcs[(r, b)] < len(steps):
                st = steps[pcs[(r, b)]]
                dep = int(st.get("depid"))
                if dep >= 0 and not done(r, dep, int(st.get("deps"))):
                    break
                typ, cnt = st.get("type"), int(st.get("cnt"))
                sb, so = st.get("srcbuf"), int(st.get("srcoff"))
                db, do = st.get("dstbuf"), int(st.get("dstoff"))
                chan = int(t.get("chan"))
                if typ == "s":
                    vals = bufs[r][sb][so : so + cnt]
                    if len(vals) != cnt or any(v is None for v in vals):
                        raise ScheduleError(f"GPU {r} tb {b} step {st.get('s')}: sends data it does not hold")
                    chans[(r, int(t.get("send")), chan)].append(list(vals))
                elif typ in ("r", "rrc"):
                    q = chans[(int(t.get("recv")), r, chan)]
                    if not q:
                        break
                    vals = q.popleft()
                    if len(vals) != cnt:
                        raise ScheduleError(
                            f"GPU {r} tb {b}: receives {cnt} chunks, the message has {len(vals)}"
                        )
                    for i, v in enumerate(vals):
                        if typ == "r":
                            bufs[r][db][do + i] = v
                            continue
                        old = bufs[r][sb][so + i]
                        if old is None or old[1] != v[1] or old[0] & v[0]:
                            raise ScheduleError(f"GPU {r} tb {b}: bad reduction of {old} with {v}")
                        bufs[r][db][do + i] = (old[0] | v[0], v[1])
                elif typ == "cpy":
                    for i in range(cnt):
                        bufs[r][db][do + i] = bufs[r][sb][so + i]
                elif typ != "nop":
                    raise ScheduleError(f"step type {typ!r} is not checked here")
                pcs[(r, b)] += 1
                executed += 1
                progress = True
    stuck = [(r, b) for r, b, _, steps in tbs if pcs[(r, b)] < len(steps)]
    if stuck:
        raise ScheduleError(f"MSCCL algorithm deadlocks: threadblocks {stuck[:6]} wait forever")
    for r in range(p):
        for k, want in _required(coll, p, c, r, root).items():
            if bufs[r]["o"][k] != want:
                raise ScheduleError(f"GPU {r} output {k} = {bufs[r]['o'][k]}, needs {want}")
    return executed
