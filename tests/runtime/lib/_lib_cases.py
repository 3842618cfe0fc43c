"""Steps of test_gradients.py that run in its two gloo workers (imported by name there: this directory is
on the test's sys.path, which the workers take over). Each returns what the test compares."""

from __future__ import annotations

SHAPES = ((3, 5), (7,), (64,), (2, 2), (5,))


def _params():
    import torch

    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in SHAPES]


def reduce_case(module, scatter: str, shard: bool, bucket_bytes: int, microbatches: int) -> dict:
    """Gradients that differ by rank (``(rank + 1) (i + 1)`` per element of parameter i, per micro-batch),
    reduced over "dp" by a GradientReducer armed before the last micro-batch only; the last parameter's
    gradient is not reduced (no axes)."""
    from shardwise.runtime.lib import GradientReducer, Mesh, make_buckets

    rank = module.rank
    mesh = Mesh(rank, (2,), ("dp",), (0, 1))
    params = _params()
    axes = [("dp",)] * (len(params) - 1) + [()]
    buckets = make_buckets(list(zip(params, axes)), mesh, bucket_bytes, "dp" if shard else None)
    reducer = GradientReducer(buckets, mesh, scatter=scatter)
    for m in range(microbatches):
        if m == microbatches - 1:
            reducer.arm()
        sum(((p * (rank + 1) * (i + 1)).sum() for i, p in enumerate(params))).backward()
    started = sorted(reducer._started)  # buckets the backward started (all of them when armed in time)
    reducer.finish()
    grad_shard = reducer.scatter_deferred()
    return {
        "grads": [p.grad for p in params],
        "shard": grad_shard,
        "buckets": [
            ([next(i for i, q in enumerate(params) if q is p) for p in b.params], b.offset, b.slice, b.padded)
            for b in buckets
        ],
        "started": started,
    }


def train_case(module, zero: int, optimizer: str, steps: int) -> dict:
    """A two-layer net trained by the Trainer on this rank's half of a batch, the loss being this rank's
    share of the whole batch's mean (sum over its rows / all rows); returns the losses and the weights."""
    import torch

    from shardwise.runtime.lib import Mesh, Trainer

    rank = module.rank
    mesh = Mesh(rank, (2,), ("dp",), (0, 1))
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    x = torch.randn(8, 6)
    mine = x.chunk(2)[rank]
    factory = {"sgd": lambda p: torch.optim.SGD(p, lr=0.1), "adamw": lambda p: torch.optim.AdamW(p, lr=0.01)}
    trainer = Trainer([(p, ("dp",)) for p in net.parameters()], mesh, factory[optimizer], zero_stage=zero)
    losses = []
    for _ in range(steps):
        loss = net(mine).pow(2).sum() / (x.shape[0] * 3)
        trainer.backward(loss)
        trainer.step()
        losses.append(loss.item())
    sharded = trainer.sharded.master.numel() if trainer.sharded is not None else 0
    return {"losses": losses, "state": {k: v.detach() for k, v in net.state_dict().items()}, "shard": sharded}
