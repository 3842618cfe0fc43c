"""When a search is worth running: rules read from the lower bound's terms, never from size windows.

The lower bound (``bounds``) is priced with the price list's figures and says which resource bounds a
collective: its ``bandwidth`` term (bytes through the binding cut over its capacity), its ``latency`` term
(the longest least-alpha path: what one message across the cluster costs at least) and, per class of cut,
how long that class of resource must be busy (``terms``: ``nic`` for the NICs between nodes, ``rank`` for
one rank's links or switch port, ...). Each rule below compares these terms, so the same rule fires on any
cluster of the same shape and at whatever size the resources say, not around one published case:

* ``latency_bound`` — the bandwidth term is worth fewer than ``LATENCY_RATIO`` message latencies. A
  schedule that pipelines sends at least two messages one after the other on its critical resource, so it
  pays at least two latencies beyond the bandwidth term; with ``LATENCY_RATIO = 2 / (skip - 1)``, where
  ``skip`` is the multiple of the bound above which the synthesizer still looks for a better schedule
  (``TIMED_SKIP`` = 1.2), no pipelined schedule can get within ``skip`` of the bound below it, so few,
  bundled, unpipelined messages (the timed CP-SAT model) are the search worth its solver time there.
* ``steady_state_worth`` — the steady-state model (``modulo``) sends every flow in ``MODULO_PIECES``
  pieces, so at least that many messages one after the other on the critical resource; it can land within
  ``MODULO_SKIP`` of the bound (where it is still tried) only when the bandwidth term is worth at least
  ``MODULO_PIECES / (MODULO_SKIP - 1)`` latencies.
* ``nic_bound`` — the NIC term (bytes through a node's NICs over their bandwidth) is at least
  ``NIC_SHARE`` of the bandwidth term: the NICs are the bottleneck, or nearly. Schedules built around the
  NICs (rail pipelines: NICs busy from time zero, small last NIC messages) are offered only then, and only
  when not ``latency_bound`` (they send several NIC messages per peer). ``NIC_SHARE = 1 / 1.15``: where
  another resource must be busy more than 15% longer than the NICs, that resource decides the time and a
  schedule shaped for the NICs cannot be within 15% of the bound for that reason alone.

The NIC-sharing allgather (``nicshare``) has its own rule, a floor on its time computed from the same NIC
term (``nicshare.nic_floor``): it is built only when the floor is below the best schedule found so far.
"""

from __future__ import annotations

from shardwise.passes.collectives.bounds import LowerBound

__all__ = [
    "TIMED_SKIP", "LATENCY_RATIO", "MODULO_SKIP", "MODULO_PIECES", "NIC_SHARE", "latency_bound",
    "steady_state_worth", "nic_bound", "messages_worth",
]  # fmt: skip

#: the synthesizer looks for a better schedule (the timed model) only above this multiple of the bound
TIMED_SKIP = 1.2
#: below this many message latencies of bandwidth term, a collective is latency-bound (module docstring)
LATENCY_RATIO = 2.0 / (TIMED_SKIP - 1.0)
#: the steady-state model runs only when the best pipeline is above this multiple of the bound
MODULO_SKIP = 1.03
#: pieces per flow of the steady-state model's schedules
MODULO_PIECES = 16
#: the NICs bound a collective when their term is at least this share of the bandwidth term
NIC_SHARE = 1.0 / 1.15


def messages_worth(bound: LowerBound) -> float:
    """How many message latencies the bandwidth term is worth (inf without a latency term)."""
    if bound.latency <= 0:
        return float("inf")
    return bound.bandwidth / bound.latency


def latency_bound(bound: LowerBound) -> bool:
    """The bandwidth term is worth fewer than ``LATENCY_RATIO`` latencies (see the module docstring)."""
    return messages_worth(bound) < LATENCY_RATIO


def steady_state_worth(bound: LowerBound) -> bool:
    """The bandwidth term is worth at least ``MODULO_PIECES / (MODULO_SKIP - 1)`` latencies."""
    return messages_worth(bound) >= MODULO_PIECES / (MODULO_SKIP - 1.0)


def nic_bound(bound: LowerBound) -> bool:
    """The NIC term is at least ``NIC_SHARE`` of the bandwidth term (False on one node)."""
    nic_s, _ = bound.term("nic")
    return bound.bandwidth > 0 and nic_s >= NIC_SHARE * bound.bandwidth
