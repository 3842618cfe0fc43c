"""The serving planner's search: the layout with the highest goodput per device under latency targets.

Goodput of a layout: the highest Poisson arrival rate at which at least ``attainment`` of the requests meet
both their TTFT and TPOT targets in the simulation (``simulator.simulate``), found by bisection (the same
sampled lengths and arrival pattern at every rate, scaled by the rate, so the rates compare on one sample).

* **Colocated**: every (tp, pp) that fits the devices and holds the longest request; one instance simulated;
  replicas fill the cluster (each sees its share of a Poisson stream: the per-device goodput is the
  instance's).
* **Disaggregated** (DistServe's search): each phase alone first, every (tp, pp) of prefill instances for the
  TTFT target and of decode instances for the TPOT target; of the (prefill, decode) pairs whose instances
  fit together in the cluster, the ``TOP`` x ``TOP`` best by the goodput per device their balanced instance
  counts would give (``pairs``) are simulated whole (KV transfer included) for both targets.

Layouts are ranked by goodput per device (ties: fewer devices); the best is the plan, the next ones its
alternatives.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from shardwise.cluster.spec import ClusterSpec
from shardwise.costs.serving import ServingPrices
from shardwise.errors import UserInputError
from shardwise.planner.serving.simulator import Colocated, Disaggregated, Layout, Phase, simulate
from shardwise.planner.serving.workload import Workload

__all__ = ["SLO", "Scored", "ServeSearch", "Goodput", "max_rate", "layouts", "pairs", "search"]

#: the disaggregated search simulates the TOP x TOP most promising (prefill, decode) pairs
TOP = 2
#: bisection stops when the passing and failing rates are this close (relative)
RATE_TOLERANCE = 0.03
TP_CHOICES = (1, 2, 4, 8, 16)
PP_CHOICES = (1, 2, 4, 8)
#: a simulation's arrivals span WINDOW request lifetimes (TTFT target + mean output x TPOT target), so that
#: an overloaded layout's queue grows for several lifetimes; the first and last quarter of the arrivals
#: (warm-up and drain) are not measured
WINDOW = 4
#: the most requests one simulation serves; a rate needing more is not verified (the goodput found below it
#: is then a lower bound, ``Scored.capped``)
MAX_REQUESTS = 12000


@dataclass(frozen=True)
class SLO:
    ttft: float
    tpot: float
    attainment: float


@dataclass(frozen=True)
class Scored:
    """A layout, its goodput (requests/s over its devices) and the attainment measured at that rate."""

    layout: Layout
    goodput_rps: float
    attainment: float
    capped: bool = False  # a higher rate was too long to simulate: the goodput is a lower bound

    @property
    def per_device(self) -> float:
        return self.goodput_rps / self.layout.devices if self.layout.devices else 0.0


@dataclass(frozen=True)
class ServeSearch:
    best: Scored
    ranked: tuple[Scored, ...]
    phases: dict  # phase name -> tuple of (tp, pp, goodput_rps of one instance)
    requests: int


def max_rate(
    attained: Callable[[float], float | None], target: float, start: float = 1.0, iterations: int = 24
) -> tuple[float, float, bool]:
    """(the highest rate whose attainment >= ``target``, its attainment, whether a higher rate could not be
    verified): doubling or halving from ``start`` to bracket it, then bisection to ``RATE_TOLERANCE``;
    (0, attainment at the lowest rate, False) if none passes. ``attained`` returns None for a rate it cannot
    verify, which counts as failing."""
    lo, hi = 0.0, 0.0
    lo_att = 0.0
    capped = False
    rate = start

    def check(r: float) -> float:
        nonlocal capped
        a = attained(r)
        if a is None:
            capped = True
            return -1.0
        return a

    for _ in range(iterations):
        a = check(rate)
        if a >= target:
            lo, lo_att = rate, a
            if hi:
                break
            rate *= 2
        else:
            hi = rate
            if lo:
                break
            rate /= 2
            if rate < start * 2.0**-12:
                return 0.0, a, capped
    if not hi:
        return lo, lo_att, capped
    while hi / lo > 1 + RATE_TOLERANCE:
        mid = math.sqrt(lo * hi)
        a = check(mid)
        if a >= target:
            lo, lo_att = mid, a
        else:
            hi = mid
    return lo, lo_att, capped


def layouts(prices: ServingPrices, cluster: ClusterSpec, longest: int) -> list[tuple[int, int]]:
    """(tp, pp) instances that fit one node's devices for tp, divide the heads and layers, and hold the
    longest request in their KV cache."""
    m = prices.model
    out = []
    for tp in TP_CHOICES:
        if tp > cluster.devices_per_node or m.heads % tp or (m.kv_heads % tp and tp % m.kv_heads):
            continue
        for pp in PP_CHOICES:
            if tp * pp > cluster.world_size or m.layers % pp:
                continue
            if prices.kv_capacity_tokens(tp, pp) >= longest:
                out.append((tp, pp))
    return out


def _rate(rate: float, capped: bool) -> str:
    return (">= " if capped else "") + f"{rate:.3g}"


def _counts(rp: float, gp: int, rd: float, gd: int, devices: int) -> tuple[int, int] | None:
    """Prefill and decode instance counts within ``devices`` maximizing min(np rp, nd rd) per device."""
    best, key = None, None
    for n_p in range(1, devices // gp + 1):
        for n_d in range(1, (devices - n_p * gp) // gd + 1):
            used = n_p * gp + n_d * gd
            k = (min(n_p * rp, n_d * rd) / used, -used)
            if key is None or k > key:
                best, key = (n_p, n_d), k
    return best


class Goodput:
    """The goodput of layouts of one model for one workload and one set of targets (see the module docstring):
    each rate simulated on ``requests`` or more requests spanning ``WINDOW`` lifetimes."""

    def __init__(
        self, prices: ServingPrices, workload: Workload, slo: SLO, requests: int = 300, seed: int = 0
    ):
        self.prices, self.workload, self.slo, self.requests, self.seed = prices, workload, slo, requests, seed
        self.mean_output = workload.means(MAX_REQUESTS, seed)[1]

    def __call__(
        self, layout: Layout, ttft: float | None = None, tpot: float | None = None, only: str | None = None
    ) -> tuple[float, float, bool]:
        """(rate, attainment at it, capped) of ``layout`` for the targets (the SLO's by default)."""
        ttft = self.slo.ttft if ttft is None else ttft
        tpot = self.slo.tpot if tpot is None else tpot
        life = (ttft if ttft < math.inf else 0.0) + (self.mean_output * tpot if tpot < math.inf else 0.0)

        def attained(rate: float) -> float | None:
            n = int(max(self.requests, rate * WINDOW * life))
            if n > MAX_REQUESTS:
                return None
            sample = self.workload.requests(n, rate, self.seed)
            span = sample[-1].arrival
            result = simulate(self.prices, layout, sample, only)
            return result.attainment(ttft, tpot, span / WINDOW, span * (WINDOW - 1) / WINDOW)

        return max_rate(attained, self.slo.attainment)

    def prefill(self, tp: int, pp: int) -> tuple[float, bool]:
        """Goodput of one prefill instance alone (TTFT target only)."""
        rate, _, capped = self(Disaggregated(Phase(tp, pp), Phase(1, 1)), tpot=math.inf, only="prefill")
        return rate, capped

    def decode(self, tp: int, pp: int) -> tuple[float, bool]:
        """Goodput of one decode instance alone (TPOT target only)."""
        rate, _, capped = self(Disaggregated(Phase(1, 1), Phase(tp, pp)), ttft=math.inf, only="decode")
        return rate, capped

    def pair(
        self, cluster: ClusterSpec, pre: tuple[int, int, float], dec: tuple[int, int, float]
    ) -> tuple[Scored, Disaggregated] | None:
        """Prefill and decode instances (tp, pp, one instance's goodput) given the counts that balance them
        best per device within ``cluster``, simulated whole and replicated over the cluster: (the whole
        layout scored, the unit simulated)."""
        (tp_p, pp_p, rp), (tp_d, pp_d, rd) = pre, dec
        counts = _counts(rp, tp_p * pp_p, rd, tp_d * pp_d, cluster.world_size)
        if counts is None:
            return None
        unit = Disaggregated(Phase(tp_p, pp_p, counts[0]), Phase(tp_d, pp_d, counts[1]))
        rate, att, capped = self(unit)
        replicas = max(1, cluster.world_size // unit.devices)
        whole = Disaggregated(
            Phase(tp_p, pp_p, counts[0] * replicas), Phase(tp_d, pp_d, counts[1] * replicas)
        )
        return Scored(whole, rate * replicas, att, capped), unit


def pairs(
    pre: list[tuple[int, int, float]], dec: list[tuple[int, int, float]], devices: int, top: int = TOP * TOP
) -> list[tuple[tuple[int, int, float], tuple[int, int, float]]]:
    """The ``top`` (prefill, decode) candidates, each (tp, pp, one instance's goodput), whose instances fit
    together in ``devices`` (DistServe's search enumerates only such placements), ranked by the goodput per
    device their best instance counts would give if the two phases did not interfere (``_counts``)."""
    scored = []
    for p in pre:
        for d in dec:
            if p[2] <= 0 or d[2] <= 0:
                continue
            gp, gd = p[0] * p[1], d[0] * d[1]
            counts = _counts(p[2], gp, d[2], gd, devices)
            if counts is None:
                continue
            used = counts[0] * gp + counts[1] * gd
            scored.append((-min(counts[0] * p[2], counts[1] * d[2]) / used, used, p, d))
    scored.sort(key=lambda row: row[:2])
    return [(p, d) for _, _, p, d in scored[:top]]


def search(
    prices: ServingPrices, cluster: ClusterSpec, workload: Workload, slo: SLO, *, requests: int = 300,
    seed: int = 0, disaggregated: bool = True, colocated: bool = True,
    progress: Callable[[str], None] | None = None,
) -> ServeSearch:  # fmt: skip
    """Search the layouts (see the module docstring)."""
    say = progress or (lambda _text: None)
    longest = max(p + o for p, o in workload.lengths(MAX_REQUESTS, seed))
    options = layouts(prices, cluster, longest)
    if not options:
        raise UserInputError(
            f"no tp x pp layout of {prices.model.name} on {cluster.name} holds a request of {longest} tokens "
            "in its KV cache: use a cluster with more (or larger) devices, or a workload of shorter requests"
        )
    goodput = Goodput(prices, workload, slo, requests, seed)
    scored: list[Scored] = []
    if colocated:
        for tp, pp in options:
            rate, att, capped = goodput(Colocated(Phase(tp, pp)))
            say(f"colocated tp{tp} pp{pp}: {_rate(rate, capped)} req/s per instance (predicted)")
            replicas = max(1, cluster.world_size // (tp * pp))
            scored.append(Scored(Colocated(Phase(tp, pp, replicas)), rate * replicas, att, capped))
    phases: dict[str, tuple[tuple[int, int, float], ...]] = {}
    if disaggregated and cluster.world_size >= 2:
        pre, dec = [], []
        for tp, pp in options:
            rate, capped = goodput.prefill(tp, pp)
            say(f"prefill tp{tp} pp{pp}: {_rate(rate, capped)} req/s per instance (predicted)")
            pre.append((tp, pp, rate))
            rate, capped = goodput.decode(tp, pp)
            say(f"decode tp{tp} pp{pp}: {_rate(rate, capped)} req/s per instance (predicted)")
            dec.append((tp, pp, rate))
        phases = {"prefill": tuple(pre), "decode": tuple(dec)}

        for p, d in pairs(pre, dec, cluster.world_size):
            paired = goodput.pair(cluster, p, d)
            if paired is None:
                continue
            whole, unit = paired
            per = whole.per_device
            say(f"{unit.describe()}: {_rate(per, whole.capped)} req/s per device (predicted)")
            scored.append(whole)
    if not scored:
        raise UserInputError("no layout was searched: allow colocated or disaggregated layouts")
    ranked = tuple(sorted(scored, key=lambda s: (-s.per_device, s.layout.devices)))
    return ServeSearch(ranked[0], ranked, phases, requests)
