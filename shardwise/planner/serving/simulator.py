"""A discrete-event simulation of continuous batching, colocated or disaggregated, priced by
``costs.serving.ServingPrices``.

**KV cache** (both vLLM and DistServe allocate blocks as sequences grow; neither reserves a request's output
in advance): a running sequence holds its prompt and the tokens generated so far. Before a decode step that
would not fit, the most recently admitted sequences are preempted until it fits.

**Colocated**: each instance (a tp x pp group of devices) keeps a queue of waiting requests and a running
batch, scheduled as its engine does (``EngineMemory.chunked_prefill``).

*Chunked prefill* (vLLM's V1 scheduler, what ``vllm serve`` runs today): every iteration is one forward pass
of the running sequences' next tokens and chunks of the prompts being prefilled, within a budget of
``max_batched_tokens`` tokens (``ServingPrices.mixed_step_s``); a prompt's first token is out at the end of
the iteration that computes its last chunk. A prefill never stops the running sequences: it shares their
iterations (and lengthens them).

*Prefill first* (vLLM before V1 without chunked prefill, DistServe's baseline): an iteration is a prefill when waiting
requests can be admitted (first come, first served, while the cache holds their prompts with the engine's
``watermark`` of blocks kept free, the prompts total at most ``max_batched_tokens`` and the instance runs at
most ``max_seqs`` sequences): it produces their first tokens. Otherwise it is a decode step of every running
sequence: one token each. A prefill iteration blocks the instance for the batch's whole pass (its stages are
not overlapped with decoding). A preempted sequence goes back to the front of the queue and is recomputed
later by a prefill of its prompt and the tokens it had (vLLM's recompute preemption), which gives its next
token.

**Disaggregated** (DistServe): prefill instances batch waiting prompts (``EngineMemory.prefill_limits``) and
pipeline them (a new batch enters after one stage, ``PhaseTime.stage_s``); a prompt's first token is out when
its batch leaves the last stage. Its KV cache then moves to the decode instance with the most free cache
(``ServingPrices.kv_transfer_s`` on the link between the first devices of the two instances), where it joins
the running batch (at most ``EngineMemory.decode_seqs`` sequences) when the cache holds its current length.
A preempted decoding sequence is swapped out (DistServe's decode scheduler) and swapped back in before new
requests join; the swap's PCIe traffic is not priced.

Every iteration also pays the engine's host overhead on its first stage
(``ServingPrices.iteration_overhead_s``).

Requests go to the instance with the least work queued. A request whose prompt and output exceed an
instance's whole cache is never admitted and misses its targets. TTFT = first token - arrival; TPOT =
(last token - first token) / (output - 1) (0 for one-token outputs): the time a request waits for its
decode instance counts in its TPOT, as in DistServe.

Invariants (checked by tests): every request is finished or rejected exactly once; no instance's running
sequences ever hold more tokens than its cache; times are non-negative.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass, field

from shardwise.costs.serving import ServingPrices
from shardwise.planner.serving.workload import Request

__all__ = ["Phase", "Colocated", "Disaggregated", "SimResult", "simulate"]


@dataclass(frozen=True)
class Phase:
    """Instances of one kind: ``instances`` groups of ``tp`` x ``pp`` devices."""

    tp: int
    pp: int
    instances: int = 1

    @property
    def devices(self) -> int:
        return self.tp * self.pp * self.instances

    def describe(self) -> str:
        return f"tp{self.tp} pp{self.pp} x{self.instances}"


@dataclass(frozen=True)
class Colocated:
    phase: Phase

    @property
    def devices(self) -> int:
        return self.phase.devices

    def describe(self) -> str:
        return f"colocated {self.phase.describe()}"


@dataclass(frozen=True)
class Disaggregated:
    prefill: Phase
    decode: Phase

    @property
    def devices(self) -> int:
        return self.prefill.devices + self.decode.devices

    def describe(self) -> str:
        return f"prefill {self.prefill.describe()} + decode {self.decode.describe()}"


Layout = Colocated | Disaggregated


@dataclass(frozen=True)
class SimResult:
    """Per-request arrival, TTFT and TPOT (``None``: never served) and how many were rejected or finished."""

    arrival: tuple[float, ...]
    ttft: tuple[float | None, ...]
    tpot: tuple[float | None, ...]
    finished: int
    rejected: int
    end_s: float
    preempted: int = 0  # preemptions (a request may be preempted more than once)
    peak_fill: float = 0.0  # the largest share of an instance's cache its running sequences ever held

    def attainment(self, ttft: float, tpot: float, since: float = 0.0, until: float = math.inf) -> float:
        """Share of the requests arriving in [``since``, ``until``] whose TTFT and TPOT are both within their
        targets (1.0 when none arrives then)."""
        ok = total = 0
        for t, a, b in zip(self.arrival, self.ttft, self.tpot):
            if since <= t <= until:
                total += 1
                ok += a is not None and b is not None and a <= ttft and b <= tpot
        return ok / total if total else 1.0


@dataclass(eq=False)
class _Live:
    """A request in an instance: its first token's time (-1: none yet), the tokens it has generated, and,
    while running, the decode step at which it joined and the step after which it has its last token."""

    req: Request
    first: float = -1.0
    generated: int = 0
    joined: int = 0
    done_step: int = 0

    @property
    def cached(self) -> int:
        """Tokens of its KV cache while waiting (the prompt and what it generated before)."""
        return self.req.prompt + self.generated


@dataclass
class _Instance:
    tp: int
    pp: int
    first_rank: int
    capacity: int
    waiting: deque = field(default_factory=deque)  # of _Live
    swapped: deque = field(default_factory=deque)  # of _Live (decode instances)
    running: dict = field(default_factory=dict)  # step index -> list of _Live finishing after it
    order: list = field(default_factory=list)  # running _Live in admission order
    batch: int = 0
    context: float = 0.0  # tokens cached by the running sequences
    step: int = 0
    busy: bool = False
    queued_tokens: int = 0
    peak: float = 0.0  # most tokens the running sequences ever held
    prefilling: list = field(default_factory=list)  # [_Live, tokens computed] of partly prefilled prompts
    held: float = 0.0  # tokens of ``context`` held by the prompts being prefilled


class _Sim:
    def __init__(self, prices: ServingPrices, requests: list[Request]) -> None:
        self.prices = prices
        self.engine = prices.engine
        self.events: list[tuple[float, int, str, object]] = []
        self.seq = 0
        self.ttft: list[float | None] = [None] * len(requests)
        self.tpot: list[float | None] = [None] * len(requests)
        self.finished = 0
        self.rejected = 0
        self.preempted = 0
        self.now = 0.0
        self.requests = requests
        self.all: list[_Instance] = []

    def push(self, t: float, kind: str, payload: object) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, payload))

    def finish(self, live: _Live, t: float) -> None:
        r = live.req
        self.ttft[r.id] = live.first - r.arrival
        self.tpot[r.id] = (t - live.first) / (r.output - 1) if r.output > 1 else 0.0
        self.finished += 1

    def reject(self, req: Request) -> None:
        self.rejected += 1

    def instances(self, phase, first_rank: int) -> list[_Instance]:
        cap = self.prices.kv_capacity_tokens(phase.tp, phase.pp)
        size = phase.tp * phase.pp
        made = [_Instance(phase.tp, phase.pp, first_rank + i * size, cap) for i in range(phase.instances)]
        self.all.extend(made)
        return made

    # -- running batches: joining, decode steps, preemption ----------------------------------------------

    def join_decode(self, inst: _Instance, live: _Live) -> None:
        """``live`` (with at least its first token, and more to generate) joins ``inst``'s running batch."""
        assert live.generated < live.req.output, "a request with all its tokens does not decode"
        live.joined = inst.step
        live.done_step = inst.step + live.req.output - live.generated
        inst.running.setdefault(live.done_step, []).append(live)
        inst.order.append(live)
        inst.batch += 1
        inst.context += live.cached
        inst.peak = max(inst.peak, inst.context)

    def leave(self, inst: _Instance, live: _Live) -> None:
        """``live`` leaves the running batch (preempted): its tokens so far are recorded and its cache freed."""
        live.generated += inst.step - live.joined
        inst.running[live.done_step].remove(live)
        inst.order.remove(live)
        inst.batch -= 1
        inst.context -= live.cached

    def make_room(self, inst: _Instance) -> list[_Live]:
        """Preempt the most recently admitted sequences until the next decode step's tokens fit the cache
        (one sequence always runs: a request longer than the cache was rejected before)."""
        out = []
        while inst.batch > 1 and inst.context + inst.batch > inst.capacity:
            live = inst.order[-1]
            self.leave(inst, live)
            out.append(live)
        self.preempted += len(out)
        return out

    def start_decode(self, inst: _Instance) -> None:
        inst.busy = True
        groups = min(inst.pp, inst.batch)
        t = self.prices.decode_step_s(inst.tp, inst.pp, inst.batch, inst.context)
        t += self.prices.iteration_overhead_s(inst.context / groups)
        self.push(self.now + t, "decoded", inst)

    def end_decode_step(self, inst: _Instance, t: float) -> None:
        inst.step += 1
        inst.context += inst.batch
        inst.peak = max(inst.peak, inst.context)
        for live in inst.running.pop(inst.step, ()):
            inst.batch -= 1
            inst.order.remove(live)
            inst.context -= live.req.prompt + live.req.output
            self.finish(live, t)

    def result(self) -> SimResult:
        return SimResult(
            tuple(r.arrival for r in self.requests),
            tuple(self.ttft),
            tuple(self.tpot),
            self.finished,
            self.rejected,
            self.now,
            self.preempted,
            max((i.peak / i.capacity for i in self.all if i.capacity), default=0.0),
        )


class _ColocatedSim(_Sim):
    def run(self, layout: Colocated) -> SimResult:
        self.pool = self.instances(layout.phase, 0)
        for r in self.requests:
            self.push(r.arrival, "arrive", r)
        while self.events:
            self.now, _, kind, payload = heapq.heappop(self.events)
            if kind == "arrive":
                inst = min(self.pool, key=lambda i: (len(i.waiting) + i.batch, i.first_rank))
                inst.waiting.append(_Live(payload))
                inst.queued_tokens += payload.prompt
                self.kick(inst)
            elif kind == "prefilled":
                inst, batch = payload
                for live in batch:
                    inst.context -= live.cached  # held by the prefill; the running batch takes it over
                    self.first_token(inst, live)
                inst.busy = False
                self.kick(inst)
            elif kind == "stepped":
                self.end_mixed_step(*payload)
            else:  # "decoded"
                self.end_decode_step(payload, self.now)
                payload.busy = False
                self.kick(payload)
        return self.result()

    def first_token(self, inst: _Instance, live: _Live) -> None:
        """``live``'s prefill (of its prompt and any tokens it had) is done: it has its next token."""
        if live.first < 0:
            live.first = self.now
        live.generated += 1
        if live.generated >= live.req.output:
            self.finish(live, self.now)
        else:
            self.join_decode(inst, live)

    def reject_unservable(self, inst: _Instance) -> bool:
        """Rejects the first waiting request of ``inst`` if its prompt and output can never fit in the instance's
        KV cache; True if it did."""
        live = inst.waiting[0]
        if live.req.prompt + live.req.output <= inst.capacity:
            return False
        inst.waiting.popleft()
        inst.queued_tokens -= live.req.prompt
        self.reject(live.req)
        return True

    def admit(self, inst: _Instance) -> list[_Live]:
        """Waiting requests a prefill iteration takes (see the module docstring)."""
        e = self.engine
        free = inst.capacity * (1 - e.watermark) - inst.context
        batch: list[_Live] = []
        tokens = 0
        while inst.waiting:
            if self.reject_unservable(inst):
                continue
            live = inst.waiting[0]
            need = live.cached
            if len(batch) + inst.batch >= e.max_seqs or (batch and tokens + need > e.max_batched_tokens):
                break
            if tokens + need > free and (batch or inst.batch):
                break
            inst.waiting.popleft()
            inst.queued_tokens -= live.req.prompt
            batch.append(live)
            tokens += need
        return batch

    def kick(self, inst: _Instance) -> None:
        if inst.busy:
            return
        if self.engine.chunked_prefill:
            self.start_mixed_step(inst)
            return
        batch = self.admit(inst)
        if batch:
            inst.busy = True
            cached = [live.cached for live in batch]
            inst.context += sum(cached)
            inst.peak = max(inst.peak, inst.context)
            t = self.prices.prefill(inst.tp, inst.pp, cached).latency_s
            t += self.prices.iteration_overhead_s(sum(cached))
            self.push(self.now + t, "prefilled", (inst, batch))
        elif inst.batch:
            for live in reversed(self.make_room(inst)):
                inst.waiting.appendleft(live)  # recomputed by a later prefill
                inst.queued_tokens += live.req.prompt
            self.start_decode(inst)

    # -- chunked prefill (EngineMemory.chunked_prefill): decodes and prefill chunks in one iteration ----------

    def start_mixed_step(self, inst: _Instance) -> None:
        """One iteration of vLLM's V1 scheduler: every running sequence's next token first (the most recently
        admitted preempted, and recomputed later, when the cache cannot hold them), then the rest of the
        prompts being prefilled, then waiting prompts (first come, first served; none after a preemption),
        each chunk as many of its tokens as the ``max_batched_tokens`` budget has left; a prompt is admitted
        while the instance runs fewer than ``max_seqs`` sequences and the cache holds it whole with the
        ``watermark`` kept free (its blocks are taken at admission)."""
        e = self.engine
        preempted = self.make_room(inst) if inst.batch else []
        for live in reversed(preempted):
            inst.waiting.appendleft(live)  # recomputed by a later prefill
            inst.queued_tokens += live.req.prompt
        budget = e.max_batched_tokens - inst.batch
        chunks: list[tuple[list, int]] = []
        for item in inst.prefilling:
            if budget <= 0:
                break
            n = min(item[0].cached - item[1], budget)
            chunks.append((item, n))
            budget -= n
        while inst.waiting and budget > 0 and not preempted:
            if self.reject_unservable(inst):
                continue
            live = inst.waiting[0]
            need = live.cached
            room = inst.capacity * (1 - e.watermark) - inst.context
            if inst.batch + len(inst.prefilling) >= e.max_seqs or (
                need > room and (inst.batch or inst.prefilling)
            ):
                break
            inst.waiting.popleft()
            inst.queued_tokens -= live.req.prompt
            item = [live, 0]
            inst.prefilling.append(item)
            inst.context += need
            inst.held += need
            inst.peak = max(inst.peak, inst.context)
            n = min(need, budget)
            chunks.append((item, n))
            budget -= n
        if not (inst.batch or chunks):
            return
        inst.busy = True
        decoding = inst.context - inst.held
        t = self.prices.mixed_step_s(
            inst.tp, inst.pp, inst.batch, decoding, [(n, item[1]) for item, n in chunks]
        )
        t += self.prices.iteration_overhead_s(
            decoding / max(1, min(inst.pp, inst.batch)) + sum(n for _, n in chunks)
        )
        self.push(self.now + t, "stepped", (inst, inst.batch > 0, chunks))

    def end_mixed_step(self, inst: _Instance, decoded: bool, chunks: list[tuple[list, int]]) -> None:
        if decoded:
            self.end_decode_step(inst, self.now)
        for item, n in chunks:
            item[1] += n
            live = item[0]
            if item[1] >= live.cached:
                inst.prefilling.remove(item)
                inst.context -= live.cached  # held by the prefill; the running batch takes it over
                inst.held -= live.cached
                self.first_token(inst, live)
        inst.busy = False
        self.kick(inst)


class _DisaggregatedSim(_Sim):
    def __init__(self, prices: ServingPrices, requests: list[Request], only: str | None) -> None:
        super().__init__(prices, requests)
        self.only = only

    def run(self, layout: Disaggregated) -> SimResult:
        self.prefillers = self.instances(layout.prefill, 0)
        self.decoders = self.instances(layout.decode, layout.prefill.devices)
        self.ways = min(layout.prefill.tp * layout.prefill.pp, layout.decode.tp * layout.decode.pp)
        for r in self.requests:
            self.push(r.arrival, "arrive", r)
        while self.events:
            self.now, _, kind, payload = heapq.heappop(self.events)
            if kind == "arrive" and self.only == "decode":
                live = _Live(payload, first=self.now, generated=1)
                if payload.output <= 1:
                    self.finish(live, self.now)  # its one token came from the prefill
                else:
                    self.to_decoder(live, 0)
            elif kind == "arrive":
                inst = min(self.prefillers, key=lambda i: (i.queued_tokens, i.first_rank))
                inst.waiting.append(payload)
                inst.queued_tokens += payload.prompt
                self.kick_prefill(inst)
            elif kind == "stage_free":
                payload.busy = False
                self.kick_prefill(payload)
            elif kind == "prefilled":
                inst, batch = payload
                for r in batch:
                    live = _Live(r, first=self.now, generated=1)
                    if r.output <= 1 or self.only == "prefill":
                        self.finish(live, self.now)
                    else:
                        self.to_decoder(live, inst.first_rank)
            elif kind == "transferred":
                dec, live = payload
                dec.waiting.append(live)
                self.kick_decode(dec)
            else:  # "decoded"
                self.end_decode_step(payload, self.now)
                payload.busy = False
                self.kick_decode(payload)
        return self.result()

    def to_decoder(self, live: _Live, src: int) -> None:
        """Send ``live``'s KV cache from the prefill instance at rank ``src`` to the emptiest decoder."""
        r = live.req
        dec = min(self.decoders, key=lambda d: (d.context + d.queued_tokens - d.capacity, d.first_rank))
        if r.prompt + r.output > dec.capacity:
            self.reject(r)
            return
        moved = (
            0.0
            if self.only == "decode"
            else self.prices.kv_transfer_s(r.prompt, src, dec.first_rank, self.ways)
        )
        dec.queued_tokens += live.cached
        self.push(self.now + moved, "transferred", (dec, live))

    def admit_prefill(self, inst: _Instance) -> list[Request]:
        """Waiting prompts a prefill batch takes (``EngineMemory.prefill_limits``; the cache holds them)."""
        max_tokens, max_seqs = self.engine.prefill_limits
        batch: list[Request] = []
        tokens = 0
        while inst.waiting:
            r = inst.waiting[0]
            if r.prompt > inst.capacity:
                inst.waiting.popleft()
                inst.queued_tokens -= r.prompt
                self.reject(r)
                continue
            if len(batch) >= max_seqs or (batch and tokens + r.prompt > min(max_tokens, inst.capacity)):
                break
            inst.waiting.popleft()
            inst.queued_tokens -= r.prompt
            batch.append(r)
            tokens += r.prompt
        return batch

    def kick_prefill(self, inst: _Instance) -> None:
        if inst.busy:
            return
        batch = self.admit_prefill(inst)
        if batch:
            inst.busy = True
            lens = [r.prompt for r in batch]
            price = self.prices.prefill(inst.tp, inst.pp, lens)
            overhead = self.prices.iteration_overhead_s(sum(lens))
            self.push(self.now + price.stage_s + overhead, "stage_free", inst)
            self.push(self.now + price.latency_s + overhead, "prefilled", (inst, batch))

    def kick_decode(self, dec: _Instance) -> None:
        if dec.busy:
            return
        for queue, queued in ((dec.swapped, False), (dec.waiting, True)):
            while queue and (dec.swapped is queue or not dec.swapped):
                live = queue[0]
                # the cache must hold it and the next step's tokens (else it would be swapped out at once)
                if (
                    dec.context + live.cached + dec.batch + 1 > dec.capacity
                    or dec.batch >= self.engine.decode_seqs
                ):
                    break
                queue.popleft()
                if queued:
                    dec.queued_tokens -= live.cached
                self.join_decode(dec, live)
        if dec.batch:
            for live in reversed(self.make_room(dec)):
                dec.swapped.appendleft(live)
            self.start_decode(dec)


def simulate(
    prices: ServingPrices, layout: Layout, requests: list[Request], only: str | None = None
) -> SimResult:
    """Serve ``requests`` on ``layout`` (see the module docstring). ``only`` (disaggregated layouts): "prefill"
    ends each request at its first token (TPOT 0); "decode" starts each at its arrival with its prompt's
    cache in place (TTFT 0): the two phases' own goodput, as DistServe searches them."""
    if isinstance(layout, Colocated):
        return _ColocatedSim(prices, requests).run(layout)
    return _DisaggregatedSim(prices, requests, only).run(layout)
