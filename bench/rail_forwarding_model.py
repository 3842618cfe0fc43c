"""How fast can one GPU of dgx-h100x4 receive and forward its share of a 64 MB allgather? (issue 5's one miss)

A relaxed model, solved with CP-SAT, of the part of a rail allgather that the 1.15 x goal hinges on. One GPU
(2 MiB of its own, 32 KiB pieces):

* its NIC receives the 6 MiB of remote data that node needs through it, in at most ``M`` messages, one after
  the other from time zero (alpha + beta per byte of the cluster's NIC edge: 2.6 us + 20.97 us/MiB);
* its switch egress port sends to each of its 7 node peers its own 2 MiB and those 6 MiB, in at most ``K``
  messages (its switch edge: 0.7 us + 2.33 us/MiB), peers in rotation (message i goes to peer i mod 7); a message
  carries only NIC data that had arrived when it starts.

Relaxed: the peers' ingress ports, the senders' NICs and the ordering of the messages from 3 remote nodes are
ignored (each only makes a real schedule slower). Restricted: peers are served in rotation, and the caps M and
K. So the optimum of one case is a lower bound on every schedule of that family: every remote piece enters the
node once, through one GPU's NIC (at most M messages), and that GPU forwards it to each peer directly (at most
K messages, peers in rotation). It is not a bound on other schedules (a piece sent through several NICs of a
node, relays through a third GPU, other peer orders, more messages).

    .venv/bin/python bench/rail_forwarding_model.py [--cases 3x21,4x28,...] [--time-limit 400]

prints per case (M x K) the best time found, CP-SAT's proven lower bound and the status, and saves
``bench/results/rail_forwarding_model.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from ortools.sat.python import cp_model

from shardwise.cluster import get_cluster
from shardwise.passes.collectives.bounds import lower_bound
from shardwise.passes.collectives.topology import topology_view

CLUSTER, NBYTES = "dgx-h100x4", 64 * 2**20
PIECE_BYTES = 32 * 2**10
PEERS = 7
OWN_PIECES = 64  # 2 MiB in 32 KiB pieces
NIC_PIECES = 192  # 6 MiB
HORIZON_NS = 400_000


@dataclass(frozen=True)
class Costs:
    """The cluster's edge costs in whole ns, rounded down so the model stays optimistic (alpha, and beta times one
    piece), and the collective's lower bound."""

    nic_alpha_ns: int
    nic_piece_ns: int
    switch_alpha_ns: int
    switch_piece_ns: int
    lower_bound_us: float


def cluster_costs() -> Costs:
    """Costs of GPU 0's NIC edge (to GPU 8, on the next node) and switch edge (to GPU 1) on CLUSTER."""
    topo = topology_view(get_cluster(CLUSTER))
    nic, switch = topo.route(0, 8), topo.route(0, 1)
    assert nic.kind == "nic" and switch.kind == "switch", (nic.kind, switch.kind)
    return Costs(
        nic_alpha_ns=math.floor(nic.alpha * 1e9 + 1e-6),
        nic_piece_ns=math.floor(nic.beta * PIECE_BYTES * 1e9 + 1e-6),
        switch_alpha_ns=math.floor(switch.alpha * 1e9 + 1e-6),
        switch_piece_ns=math.floor(switch.beta * PIECE_BYTES * 1e9 + 1e-6),
        lower_bound_us=lower_bound("allgather", topo, NBYTES).time * 1e6,
    )


def solve(costs: Costs, nic_messages: int, switch_messages: int, time_limit_s: float, seed: int = 0) -> dict:
    """Build and solve the model (see the module docstring) for ``nic_messages`` x ``switch_messages``."""
    m = cp_model.CpModel()
    # NIC messages: sizes, used flags (a prefix), arrival times
    size = [m.NewIntVar(0, NIC_PIECES, f"b{k}") for k in range(nic_messages)]
    used = [m.NewBoolVar(f"u{k}") for k in range(nic_messages)]
    arrival, clock = [], 0
    for k in range(nic_messages):
        m.Add(size[k] <= NIC_PIECES * used[k])
        if k:
            m.AddImplication(used[k], used[k - 1])
        a = m.NewIntVar(0, HORIZON_NS, f"a{k}")
        m.Add(a == clock + costs.nic_alpha_ns * used[k] + costs.nic_piece_ns * size[k])
        arrival.append(a)
        clock = a
    m.Add(sum(size) == NIC_PIECES)
    end = m.NewIntVar(0, HORIZON_NS, "end")
    start = [m.NewIntVar(0, HORIZON_NS, f"s{i}") for i in range(switch_messages)]
    sent = [m.NewBoolVar(f"w{i}") for i in range(switch_messages)]
    # per (message, peer): own and forwarded pieces; only message i's peer (i mod 7) gets any, the others'
    # stay zero (redundant, but CP-SAT proves the 4 x 28 case optimal with it and not without it)
    forwarded_so_far = [0] * PEERS
    own_total = [0] * PEERS
    for i in range(switch_messages):
        if i:
            m.AddImplication(sent[i], sent[i - 1])
        own = [m.NewIntVar(0, OWN_PIECES, f"x{i}_{j}") for j in range(PEERS)]
        fwd = [m.NewIntVar(0, NIC_PIECES, f"y{i}_{j}") for j in range(PEERS)]
        for peer in range(PEERS):
            on = sent[i] if peer == i % PEERS else 0
            m.Add(own[peer] <= OWN_PIECES * on)
            m.Add(fwd[peer] <= NIC_PIECES * on)
        duration = costs.switch_alpha_ns * sent[i] + costs.switch_piece_ns * sum(
            own[j] + fwd[j] for j in range(PEERS)
        )
        if i + 1 < switch_messages:
            m.Add(start[i + 1] >= start[i] + duration)
        m.Add(end >= start[i] + duration)
        # what had arrived when message i starts: the NIC messages (a prefix) that ended by then
        ended = [m.NewBoolVar(f"z{i}_{k}") for k in range(nic_messages)]
        arrived = []
        for k in range(nic_messages):
            m.Add(start[i] >= arrival[k]).OnlyEnforceIf(ended[k])
            if k:
                m.AddImplication(ended[k], ended[k - 1])
            v = m.NewIntVar(0, NIC_PIECES, f"v{i}_{k}")
            m.Add(v <= size[k])
            m.Add(v <= NIC_PIECES * ended[k])
            arrived.append(v)
        for peer in range(PEERS):
            total = m.NewIntVar(0, NIC_PIECES, f"c{i}_{peer}")
            m.Add(total == forwarded_so_far[peer] + fwd[peer])
            m.Add(total <= sum(arrived))
            forwarded_so_far[peer] = total
            own_total[peer] = own_total[peer] + own[peer]
    for peer in range(PEERS):
        m.Add(own_total[peer] == OWN_PIECES)
        m.Add(forwarded_so_far[peer] == NIC_PIECES)
    m.Minimize(end)
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = time_limit_s
    solver.parameters.num_workers = 2
    solver.parameters.random_seed = seed
    t0 = time.perf_counter()
    status = solver.Solve(m)
    found = status in (cp_model.OPTIMAL, cp_model.FEASIBLE)
    return {
        "nic_messages": nic_messages,
        "switch_messages": switch_messages,
        "status": solver.StatusName(status),
        "best_us": solver.Value(end) / 1000 if found else None,
        "proven_lower_us": solver.BestObjectiveBound() / 1000,
        "nic_sizes_kib": [solver.Value(s) * 32 for s in size] if found else None,
        "solve_s": time.perf_counter() - t0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--cases", default="3x21,4x28,5x28,6x28,4x35,6x35", help="NIC x switch message caps, comma-separated"
    )
    ap.add_argument("--time-limit", type=float, default=400.0, help="CP-SAT seconds per case")
    args = ap.parse_args()
    costs = cluster_costs()
    bound = costs.lower_bound_us
    goal = 1.15 * bound
    rows = []
    print(f"{costs}\ngoal: {goal:.1f} us (1.15 x the lower bound {bound:.3f} us)")
    print(
        f"{'M x K':>8} {'status':>9} {'best us':>9} {'proven >= us':>13} {'/bound':>7} {'solve s':>8}  NIC KiB"
    )
    for case in args.cases.split(","):
        nic, switch = (int(v) for v in case.lower().split("x"))
        row = solve(costs, nic, switch, args.time_limit)
        rows.append(row)
        best = row["best_us"]
        ratio = f"{best / bound:.3f}" if best else "-"
        print(
            f"{case:>8} {row['status']:>9} {best or float('nan'):>9.2f} {row['proven_lower_us']:>13.2f} "
            f"{ratio:>7} {row['solve_s']:>8.1f}  {row['nic_sizes_kib']}"
        )
    out = Path(__file__).parent / "results" / "rail_forwarding_model.json"
    out.write_text(
        json.dumps(
            {"goal_us": goal, "lower_bound_us": bound, "costs": costs.__dict__, "rows": rows}, indent=1
        )
    )
    print(f"saved {out}")


if __name__ == "__main__":
    main()
