"""A discrete-event simulation of continuous batching, colocated or disaggregated, priced by
``costs.serving.ServingPrices``.

**Colocated** (vLLM's scheduler): each instance (a tp x pp group of devices) keeps a queue of waiting requests
and a running batch. An iteration is a prefill when waiting requests can be admitted (first come, first
served, while the KV cache holds their prompt and output, the prompts total at most ``max_batched_tokens``
and the batch at most ``max_seqs`` sequences): it produces their first tokens. Otherwise it is a decode step
of every running sequence: one token each. A prefill iteration blocks the instance for the batch's whole
pass (its stages are not overlapped with decoding).

**Disaggregated** (DistServe): prefill instances batch waiting prompts (the same limits) and pipeline them
(a new batch enters after one stage, ``PhaseTime.stage_s``); a prompt's first token is out when its batch
leaves the last stage. Its KV cache then moves to the decode instance with the most free cache
(``ServingPrices.kv_transfer_s`` on the link between the first devices of the two instances), where it
joins the running batch when the cache holds it, and is decoded one token per step.

Requests go to the instance with the least work queued. A request whose prompt and output exceed an
instance's whole cache is never admitted and misses its targets. TTFT = first token - arrival; TPOT =
(last token - first token) / (output - 1) (0 for one-token outputs): the time a request waits for its
decode instance counts in its TPOT, as in DistServe.

Invariants (checked by tests): every request is finished or rejected exactly once; decode instances hold at
most their capacity; times are non-negative.
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

    def attainment(self, ttft: float, tpot: float, since: float = 0.0, until: float = math.inf) -> float:
        """Share of the requests arriving in [``since``, ``until``] whose TTFT and TPOT are both within their
        targets (1.0 when none arrives then)."""
        ok = total = 0
        for t, a, b in zip(self.arrival, self.ttft, self.tpot):
            if since <= t <= until:
                total += 1
                ok += a is not None and b is not None and a <= ttft and b <= tpot
        return ok / total if total else 1.0


@dataclass
class _Live:
    req: Request
    first: float = -1.0
    done_step: int = 0  # the decode step after which it has its last token


@dataclass
class _Instance:
    tp: int
    pp: int
    first_rank: int
    capacity: int
    waiting: deque = field(default_factory=deque)
    running: dict = field(default_factory=dict)  # step index -> list of _Live finishing after it
    batch: int = 0
    context: float = 0.0
    reserved: int = 0
    step: int = 0
    busy: bool = False
    queued_tokens: int = 0


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
        self.now = 0.0
        self.requests = requests

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
        return [_Instance(phase.tp, phase.pp, first_rank + i * size, cap) for i in range(phase.instances)]

    # -- admission and decode steps shared by colocated and decode instances -----------------------------

    def admit_prefill(self, inst: _Instance, reserve: bool) -> list[Request]:
        """Waiting requests a prefill iteration takes (see the module docstring)."""
        e = self.engine
        batch: list[Request] = []
        tokens = 0
        while inst.waiting:
            r = inst.waiting[0]
            need = r.prompt + r.output if reserve else r.prompt
            if need > inst.capacity:
                inst.waiting.popleft()
                inst.queued_tokens -= r.prompt
                self.reject(r)
                continue
            if len(batch) + inst.batch >= e.max_seqs or (batch and tokens + r.prompt > e.max_batched_tokens):
                break
            if reserve and inst.reserved + need > inst.capacity:
                break
            if not reserve and tokens + need > inst.capacity:
                break
            inst.waiting.popleft()
            inst.queued_tokens -= r.prompt
            batch.append(r)
            tokens += r.prompt
            if reserve:
                inst.reserved += need
        return batch

    def join_decode(self, inst: _Instance, live: _Live) -> None:
        """``live`` (its first token out) joins ``inst``'s running batch."""
        r = live.req
        live.done_step = inst.step + r.output - 1
        inst.running.setdefault(live.done_step, []).append(live)
        inst.batch += 1
        inst.context += r.prompt + 1

    def decode_step(self, inst: _Instance) -> float:
        return self.prices.decode_step_s(inst.tp, inst.pp, inst.batch, inst.context)

    def end_decode_step(self, inst: _Instance, t: float) -> None:
        inst.step += 1
        inst.context += inst.batch
        for live in inst.running.pop(inst.step, ()):
            inst.batch -= 1
            inst.context -= live.req.prompt + live.req.output
            inst.reserved -= live.req.prompt + live.req.output
            self.finish(live, t)

    def result(self) -> SimResult:
        return SimResult(
            tuple(r.arrival for r in self.requests),
            tuple(self.ttft),
            tuple(self.tpot),
            self.finished,
            self.rejected,
            self.now,
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
                inst.waiting.append(payload)
                inst.queued_tokens += payload.prompt
                self.kick(inst)
            elif kind == "prefilled":
                inst, batch = payload
                for r in batch:
                    live = _Live(r, first=self.now)
                    if r.output <= 1:
                        inst.reserved -= r.prompt + r.output
                        self.finish(live, self.now)
                    else:
                        self.join_decode(inst, live)
                inst.busy = False
                self.kick(inst)
            else:  # "decoded"
                self.end_decode_step(payload, self.now)
                payload.busy = False
                self.kick(payload)
        return self.result()

    def kick(self, inst: _Instance) -> None:
        if inst.busy:
            return
        batch = self.admit_prefill(inst, reserve=True)
        if batch:
            inst.busy = True
            t = self.prices.prefill(inst.tp, inst.pp, [r.prompt for r in batch]).latency_s
            self.push(self.now + t, "prefilled", (inst, batch))
        elif inst.batch:
            inst.busy = True
            self.push(self.now + self.decode_step(inst), "decoded", inst)


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
                self.to_decoder(_Live(payload, first=self.now), 0)
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
                    live = _Live(r, first=self.now)
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
        dec = min(self.decoders, key=lambda d: (d.reserved + d.queued_tokens - d.capacity, d.first_rank))
        if r.prompt + r.output > dec.capacity:
            self.reject(r)
            return
        moved = (
            0.0
            if self.only == "decode"
            else self.prices.kv_transfer_s(r.prompt, src, dec.first_rank, self.ways)
        )
        dec.queued_tokens += r.prompt + r.output
        self.push(self.now + moved, "transferred", (dec, live))

    def kick_prefill(self, inst: _Instance) -> None:
        if inst.busy:
            return
        batch = self.admit_prefill(inst, reserve=False)
        if batch:
            inst.busy = True
            price = self.prices.prefill(inst.tp, inst.pp, [r.prompt for r in batch])
            self.push(self.now + price.stage_s, "stage_free", inst)
            self.push(self.now + price.latency_s, "prefilled", (inst, batch))

    def kick_decode(self, dec: _Instance) -> None:
        if dec.busy:
            return
        while dec.waiting:
            live = dec.waiting[0]
            need = live.req.prompt + live.req.output
            if dec.reserved + need > dec.capacity or dec.batch >= self.engine.max_seqs:
                break
            dec.waiting.popleft()
            dec.queued_tokens -= need
            dec.reserved += need
            self.join_decode(dec, live)
        if dec.batch:
            dec.busy = True
            self.push(self.now + self.decode_step(dec), "decoded", dec)


def simulate(
    prices: ServingPrices, layout: Layout, requests: list[Request], only: str | None = None
) -> SimResult:
    """Serve ``requests`` on ``layout`` (see the module docstring). ``only`` (disaggregated layouts): "prefill"
    ends each request at its first token (TPOT 0); "decode" starts each at its arrival with its prompt's
    cache in place (TTFT 0): the two phases' own goodput, as DistServe searches them."""
    if isinstance(layout, Colocated):
        return _ColocatedSim(prices, requests).run(layout)
    return _DisaggregatedSim(prices, requests, only).run(layout)
