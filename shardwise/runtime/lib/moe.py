"""Mixture-of-experts layers: the routed experts of one layer, whole or split over a mesh axis (expert
parallelism).

``moe_experts(hidden, index, weights, gate_up, down, activation)`` computes what transformers' experts modules
compute (dropless: every token reaches its ``k`` experts): token ``t`` goes through expert ``index[t, j]``,
``down[e] @ (act(gate) * up)`` with ``gate, up = (gate_up[e] @ x).chunk(2)``, scaled by ``weights[t, j]``, and
the ``k`` results are summed. Rows are grouped by expert and each expert multiplies its rows at once.

With ``mesh`` and ``axis`` (expert parallelism), ``gate_up`` and ``down`` hold this rank's experts only: the
experts are split evenly over the axis in order (rank ``r`` holds experts ``r * E/n ... (r + 1) * E/n - 1``),
and every rank holds its own tokens. The rows are dispatched to their experts' ranks and their results combined
back by all-to-all with variable counts: each rank first tells every other how many rows it sends to each of
its experts (an all-to-all of counts), then the rows move (``all_to_all_rows``, whose backward is the same
exchange in the other direction, so ``loss.backward()`` sends each row's gradient back to where it came from).
Each expert's weight gradient is complete on its rank (it saw every row routed to it).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .comm import run
from .mesh import Mesh

__all__ = ["ACTIVATIONS", "all_to_all_rows", "moe_experts"]

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def _exchange(x: torch.Tensor, send: list[int], receive: list[int], mesh: Mesh, axis: str) -> torch.Tensor:
    """Rows ``x`` cut by ``send`` (rows to each rank of the axis, in rank order); the rows received, in rank
    order, ``receive[i]`` from rank ``i``."""
    x = x.contiguous()
    out = x.new_empty((sum(receive), *x.shape[1:]))
    group = mesh.group(axis)
    run(lambda: dist.all_to_all_single(out, x, receive, send, group=group, async_op=True), [out, x], group)
    return out


class _AllToAllRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, send, receive, mesh, axis):
        ctx.args = (send, receive, mesh, axis)
        return _exchange(x, send, receive, mesh, axis)

    @staticmethod
    def backward(ctx, grad):
        send, receive, mesh, axis = ctx.args
        return _exchange(grad, receive, send, mesh, axis), None, None, None, None


def all_to_all_rows(x: torch.Tensor, send: list[int], receive: list[int], mesh: Mesh, axis: str) -> torch.Tensor:
    """All-to-all of rows with variable counts over ``axis``: ``send[i]`` rows of ``x`` (in order) go to rank
    ``i``, ``receive[i]`` rows come from rank ``i``. The backward sends the gradients back the same way."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _AllToAllRows.apply(x, send, receive, mesh, axis)
    return _exchange(x, send, receive, mesh, axis)


def _grouped(rows: torch.Tensor, counts: list[int], gate_up: torch.Tensor, down: torch.Tensor, act,
             up: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    """Rows grouped by expert (``counts[e]`` rows for expert ``e`` in turn) through their experts (``up``: the up
    projections apart, ``gate_up`` then the gate projections alone)."""
    outs = []
    for e, piece in enumerate(rows.split(counts)):
        if counts[e] == 0:
            continue
        if up is None:
            gate, lifted = F.linear(piece, gate_up[e]).chunk(2, dim=-1)
        else:
            gate, lifted = F.linear(piece, gate_up[e]), F.linear(piece, up[e])
        outs.append(F.linear(act(gate) * lifted, down[e]))
    return torch.cat(outs) if outs else rows.new_zeros((0, down.shape[1]))


def _local_order(counts: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Received rows come by source rank, then by expert (``counts[s, e]``): the permutation that groups them by
    expert (stable: source order within an expert), and the rows per expert."""
    sources, experts = counts.shape
    expert_of_row = torch.arange(experts).repeat(sources).repeat_interleave(counts.reshape(-1))
    return torch.argsort(expert_of_row, stable=True), counts.sum(0).tolist()


def moe_experts(
    hidden: torch.Tensor,
    index: torch.Tensor,
    weights: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    activation: str,
    mesh: Mesh | None = None,
    axis: str | None = None,
    *,
    up: torch.Tensor | None = None,
) -> torch.Tensor:
    """The routed experts of one layer (see the module docstring): ``hidden`` (tokens, hidden), ``index`` and
    ``weights`` (tokens, k) the experts each token goes to and their weights, ``gate_up`` (experts, 2 *
    intermediate, hidden), ``down`` (experts, hidden, intermediate): all experts, or with ``mesh`` and ``axis``
    this rank's experts of an expert-parallel split over ``axis``. ``up`` (experts, intermediate, hidden): the
    up projections apart, ``gate_up`` then holding the gate projections alone; with tensor parallelism inside
    the experts both hold this rank's part of the intermediate dimension (and ``down`` its columns), and the
    result is this rank's partial sum."""
    act = ACTIVATIONS[activation]
    tokens, k = index.shape
    ways = mesh.size(axis) if mesh is not None and axis is not None else 1
    local = gate_up.shape[0]
    flat = index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    rows = hidden[order // k]  # (tokens * k, hidden), grouped by expert
    counts = torch.bincount(flat, minlength=local * ways)
    if ways == 1:
        out = _grouped(rows, counts.tolist(), gate_up, down, act, up)
    else:
        assert mesh is not None and axis is not None
        per_rank = counts.view(ways, local)  # rows for each rank's experts, in rank order
        received = torch.empty_like(per_rank)
        group = mesh.group(axis)
        run(lambda: dist.all_to_all_single(received, per_rank, group=group, async_op=True), [received, per_rank], group)
        send, receive = per_rank.sum(1).tolist(), received.sum(1).tolist()
        arrived = all_to_all_rows(rows, send, receive, mesh, axis)
        regroup, per_expert = _local_order(received)
        done = _grouped(arrived[regroup], per_expert, gate_up, down, act, up)
        back = torch.empty_like(regroup)
        back[regroup] = torch.arange(regroup.numel())
        out = all_to_all_rows(done[back], receive, send, mesh, axis)
    weighted = out * weights.reshape(-1)[order].unsqueeze(-1)
    unsorted = torch.empty_like(order)
    unsorted[order] = torch.arange(order.numel())
    return weighted[unsorted].view(tokens, k, -1).sum(dim=1).to(hidden.dtype)
