"""Exact search for byte offsets that fit a capacity: a depth-first search over canonical solutions.

The search follows the ideas of MiniMalloc (Moffitt, ASPLOS'23); the code is ours.

* Canonical solutions. Every feasible instance has a solution in which no buffer can slide down (each
  sits at 0 or right on top of a buffer live with it). Placing buffers in order of offset, each such
  buffer goes exactly at its *floor*: the highest top of the placed buffers live with it. So a node only
  chooses which buffer comes next; offsets never decrease along a branch (ties broken by a static
  preorder), which enumerates each canonical solution once.
* Dominance. A buffer is not placed at a floor at or above the top another unplaced buffer would have at
  its own floor: that one could slide below, so the branch only leads to non-canonical solutions.
* Section inference. Time is cut into sections (between consecutive start/end steps). In every section
  the unplaced buffers must still stack under the capacity, each starting at or above its floor and at or
  above the current level: with those release heights the tightest stack height is
  ``max_k(release_k + sum of sizes released at or above release_k)``, checked after every placement for
  the sections whose floors moved (and, for the level, for all sections at once).
* Decomposition. When no unplaced buffer crosses a section boundary any more, the two sides are
  independent sub-problems, solved one after the other (a failure of either fails the branch).
* Memory of failures (and successes) of sub-problems, keyed by their exact state, and symmetry breaking
  between identical buffers.
* Restarts. Several static preorders take turns under a node limit that doubles each round.

Guarantees: a "found" result satisfies the capacity and never overlaps live buffers; "infeasible" is a
proof (the search over canonical solutions was exhaustive); "limit" means the budget ran out. For a given
input and node budget the result is deterministic; the wall-clock deadline is a safety net only.
"""

from __future__ import annotations

import hashlib
import math
import struct
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = ["HEURISTICS", "MAX_CELLS", "Problem", "SearchResult", "fit_within"]

# Static preorders (letters compared in turn, descending): T = largest total of live bytes over the
# buffer's sections, A = area (size x lifetime), W = lifetime, Z = size, C = number of sections.
HEURISTICS: tuple[str, ...] = ("TWA", "WAT", "TAW", "ZAT", "CAT")

# Above this many (section x live buffer) cells the exact search is not attempted (memory and time).
MAX_CELLS = 20_000_000

Status = Literal["found", "infeasible", "limit"]


@dataclass(frozen=True)
class SearchResult:
    """Outcome of ``fit_within``: offsets (indexed like the input) when found."""

    status: Status
    offsets: tuple[int, ...] | None
    nodes: int


class _Abort(Exception):
    """The node limit or the deadline was reached."""


class Problem:
    """A buffer set preprocessed for the search (independent of the capacity).

    Sizes are divided by the gcd of all sizes and the alignment: canonical offsets are sums of sizes
    rounded up to the alignment, so they stay multiples of that gcd.
    """

    def __init__(self, starts: Sequence[int], ends: Sequence[int], sizes: Sequence[int], alignment: int = 1):
        n = len(sizes)
        self.n = n
        g = alignment
        for s in sizes:
            g = math.gcd(g, int(s))
        self.scale = max(g, 1)
        self.alignment = alignment // self.scale
        times = sorted(set(starts) | set(ends))
        index = {t: k for k, t in enumerate(times)}
        self.S = max(len(times) - 1, 0)
        a = [index[t] for t in starts]
        b = [index[t] for t in ends]
        self.a = np.array(a + [0], dtype=np.int64)  # index n: a padding buffer of size 0
        self.b = np.array(b + [0], dtype=np.int64)
        self.a_list, self.b_list = a, b
        self.size = np.array([int(s) // self.scale for s in sizes] + [0], dtype=np.int64)
        self.size_list = self.size[:n].tolist()
        self.length = np.array([e - s for s, e in zip(starts, ends)] + [0], dtype=np.int64)
        occ = np.zeros(self.S + 1, dtype=np.int64)
        np.add.at(occ, self.a[:n], 1)
        np.add.at(occ, self.b[:n], -1)
        occ = np.cumsum(occ)[: self.S]
        self.K = int(occ.max()) + 1 if self.S else 1
        self.cells = self.S * self.K

    def too_large(self) -> bool:
        return self.cells > MAX_CELLS

    def build(self) -> None:
        """The tables the search needs (done once, only when the search runs)."""
        if hasattr(self, "P"):
            return
        n, S = self.n, self.S
        P = np.full((S, self.K), n, dtype=np.int64)
        fill = np.zeros(S, dtype=np.int64)
        for i in range(n):
            lo, hi = self.a_list[i], self.b_list[i]
            P[np.arange(lo, hi), fill[lo:hi]] = i
            fill[lo:hi] += 1
        self.P = P
        self.tot0 = np.zeros(S, dtype=np.int64)
        self.cuts0 = np.zeros(S, dtype=np.int64)  # cuts0[s]: buffers live in both section s and s + 1
        for i in range(n):
            self.tot0[self.a_list[i] : self.b_list[i]] += self.size_list[i]
            self.cuts0[self.a_list[i] : self.b_list[i] - 1] += 1
        # overlaps[i]: the buffers live with i, ascending (intervals [a, b) that intersect i's); O(n) each,
        # not O(lifetime x K): long-lived buffers (parameters) would make the table scan quadratic in steps
        starts, ends = np.asarray(self.a_list, dtype=np.int64), np.asarray(self.b_list, dtype=np.int64)
        live = ends > starts  # a buffer of no sections is in no table row: it overlaps nothing
        self.overlaps: list[np.ndarray] = []
        for i in range(n):
            if not live[i]:
                self.overlaps.append(np.zeros(0, dtype=np.int64))
                continue
            near = np.nonzero(live & (starts < self.b_list[i]) & (ends > self.a_list[i]))[0]
            self.overlaps.append(near[near != i])
        first: dict[tuple[int, int, int], int] = {}
        self.twin = [-1] * n  # an identical buffer with a smaller index: it must be placed first
        for i in range(n):
            k = (self.a_list[i], self.b_list[i], self.size_list[i])
            if k in first:
                self.twin[i] = first[k]
            first[k] = i


@dataclass
class _Memo:
    failed: set[bytes]
    solved: dict[bytes, np.ndarray]


@dataclass
class _Part:
    ords: np.ndarray  # member buffers in preorder
    sz: np.ndarray  # their sizes
    pos: np.ndarray  # 0..len-1 (preorder position)
    slo: int
    shi: int
    tag: bytes


def _digest(*chunks: bytes) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for c in chunks:
        h.update(c)
    return h.digest()


class _Run:
    """One depth-first search with one preorder, under a node limit."""

    def __init__(
        self, prob: Problem, cap: int, heuristic: str, node_limit: int, deadline: float, memo: _Memo
    ):
        self.p = prob
        self.cap = cap
        self.heuristic = heuristic
        self.node_limit = node_limit
        self.deadline = deadline
        self.memo = memo
        self.nodes = 0
        n = prob.n
        self.rel = np.zeros(n + 1, dtype=np.int64)  # floor of unplaced buffers, -1 once placed
        self.rel[n] = -1
        self.szu = prob.size.copy()  # sizes of unplaced buffers, 0 once placed
        self.tot = prob.tot0.copy()  # bytes of unplaced buffers per section
        self.cuts = prob.cuts0.copy()
        self.sol = np.full(n, -1, dtype=np.int64)
        self.n1 = n + 1
        self.big = cap * self.n1 >= 2**62

    def _preorder(self, members: np.ndarray) -> np.ndarray:
        p = self.p
        cols: list[np.ndarray] = [members]  # last tie-break: index, ascending
        for letter in reversed(self.heuristic):
            if letter == "T":
                v = np.array([int(self.tot[p.a_list[i] : p.b_list[i]].max()) for i in members.tolist()])
            elif letter == "A":
                v = p.size[members] * p.length[members]
            elif letter == "W":
                v = p.length[members]
            elif letter == "Z":
                v = p.size[members]
            elif letter == "C":
                v = p.b[members] - p.a[members]
            else:
                raise ValueError(f"unknown preorder letter {letter!r}")
            cols.append(-v)
        return members[np.lexsort(cols)]

    def subsolve(self, members: np.ndarray, slo: int, shi: int) -> bool:
        ords = self._preorder(members)
        tag = _digest(self.heuristic.encode(), ords.tobytes())
        key = _digest(tag, self.rel[ords].tobytes())
        cached = self.memo.solved.get(key)
        if cached is not None:
            self.sol[ords] = cached
            return True
        part = _Part(ords, self.p.size[ords], np.arange(len(ords)), slo, shi, tag)
        if self._search(part, 0, -1):
            self.memo.solved[key] = self.sol[ords].copy()
            return True
        return False

    def _fits(self, alo: int, ahi: int, level: int) -> bool:
        """Can the unplaced buffers of sections [alo, ahi) still stack under the capacity?"""
        sub = self.p.P[alo:ahi]
        if self.big:
            r = self.rel[sub]
            idx = np.argsort(r, axis=1, kind="stable")
            rs = np.take_along_axis(r, idx, 1)
            zs = self.szu[np.take_along_axis(sub, idx, 1)]
        else:
            keys = self.rel[sub] * self.n1 + sub
            keys.sort(axis=1)
            rs = keys // self.n1
            zs = self.szu[keys - rs * self.n1]
        suffix = np.cumsum(zs[:, ::-1], axis=1)[:, ::-1]
        np.maximum(rs, level, out=rs)
        rs += suffix
        return int(rs.max()) <= self.cap

    def _search(self, part: _Part, last_off: int, last_p: int) -> bool:
        self.nodes += 1
        if self.nodes > self.node_limit or (self.nodes & 63 == 0 and time.perf_counter() > self.deadline):
            raise _Abort
        p = self.p
        rel = self.rel
        ords = part.ords
        r = rel[ords]
        unplaced = r >= 0
        if not unplaced.any():
            return True
        key = _digest(part.tag, r.tobytes(), struct.pack("<qq", last_off, last_p))
        if key in self.memo.failed:
            return False
        min_top = int((r + part.sz)[unplaced].min())
        allowed = unplaced & (r < min_top) & ((r > last_off) | ((r == last_off) & (part.pos > last_p)))
        cands = np.flatnonzero(allowed)
        if len(cands) > 1:
            cands = cands[np.argsort(r[cands], kind="stable")]
        cap, tot, szu, align = self.cap, self.tot, self.szu, p.alignment
        slo, shi = part.slo, part.shi
        level_o = -1
        cover: tuple[int, int, int] | None = None
        for pos in cands.tolist():
            b = int(ords[pos])
            o = int(r[pos])
            t = p.twin[b]
            if t >= 0 and rel[t] >= 0:
                continue
            if o != level_o:  # sections that would overflow at this level unless b covers them
                level_o = o
                ptot = tot[slo:shi]
                over = np.flatnonzero(ptot > cap - o)
                cover = None
                if len(over):
                    cover = (slo + int(over[0]), slo + int(over[-1]), int(ptot[over].max()) - (cap - o))
            ab, bb, size = p.a_list[b], p.b_list[b], p.size_list[b]
            if cover is not None and not (ab <= cover[0] and bb > cover[1] and size >= cover[2]):
                continue
            top = o + size
            if align > 1:
                top = -(-top // align) * align
            near = p.overlaps[b]
            m = rel[near]
            moved = near[(m >= 0) & (m < top)]
            saved = rel[moved]
            rel[moved] = top
            rel[b] = -1
            szu[b] = 0
            tot[ab:bb] -= size
            try:
                ok = True
                if len(moved):
                    ok = self._fits(int(p.a[moved].min()), int(p.b[moved].max()), o)
                if ok and self._place(part, o, pos, b):
                    return True
            finally:
                tot[ab:bb] += size
                szu[b] = size
                rel[b] = o
                rel[moved] = saved
        self.memo.failed.add(key)
        return False

    def _place(self, part: _Part, o: int, pos: int, b: int) -> bool:
        """Record b at o, then go on: in this part, or in the independent parts it leaves."""
        self.sol[b] = o
        ab, bb = self.p.a_list[b], self.p.b_list[b]
        seg = self.cuts[ab : bb - 1]
        seg -= 1
        try:
            zeros = np.flatnonzero(seg == 0)
            if len(zeros) == 0:
                return self._search(part, o, pos)
            bounds = [part.slo] + (zeros + ab + 1).tolist() + [part.shi]
            live = part.ords[self.rel[part.ords] >= 0]
            for lo, hi in zip(bounds, bounds[1:]):
                members = live[(self.p.a[live] < hi) & (self.p.b[live] > lo)]
                if len(members) and not self.subsolve(members, lo, hi):
                    return False
            return True
        finally:
            seg += 1


def fit_within(
    problem: Problem,
    capacity: int,
    *,
    deadline: float = math.inf,
    node_limit: int | None = None,
    heuristics: Sequence[str] = HEURISTICS,
) -> SearchResult:
    """Search offsets (in bytes) for ``problem``'s buffers within ``capacity`` bytes."""
    n = problem.n
    if n == 0:
        return SearchResult("found", (), 0)
    cap = capacity // problem.scale
    if int(problem.size[:n].max()) > cap:
        return SearchResult("infeasible", None, 0)
    problem.build()
    if int(problem.tot0.max()) > cap:
        return SearchResult("infeasible", None, 0)
    budget = node_limit if node_limit is not None else sys.maxsize
    used = 0
    offsets = np.full(n, -1, dtype=np.int64)
    cuts = problem.cuts0
    bounds = [0] + (np.flatnonzero(cuts[: max(problem.S - 1, 0)] == 0) + 1).tolist() + [problem.S]
    old_limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old_limit, 4 * n + 1000))
    try:
        for lo, hi in zip(bounds, bounds[1:]):
            members = np.flatnonzero((problem.a[:n] < hi) & (problem.b[:n] > lo))
            if len(members) == 0:
                continue
            memos = {h: _Memo(set(), {}) for h in heuristics}
            limit = max(2 * len(members), 64)
            solved = False
            while not solved:
                for h in heuristics:
                    if time.perf_counter() > deadline:
                        return SearchResult("limit", None, used)
                    run = _Run(problem, cap, h, min(limit, budget - used), deadline, memos[h])
                    try:
                        ok = run.subsolve(members, lo, hi)
                    except _Abort:
                        used += run.nodes
                        if used >= budget or time.perf_counter() > deadline:
                            return SearchResult("limit", None, used)
                        continue
                    used += run.nodes
                    if not ok:
                        return SearchResult("infeasible", None, used)
                    offsets[members] = run.sol[members]
                    solved = True
                    break
                limit *= 2
    finally:
        sys.setrecursionlimit(old_limit)
    return SearchResult("found", tuple(int(o) * problem.scale for o in offsets), used)
