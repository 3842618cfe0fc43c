"""The step of test_context_attention.py that runs in its two gloo workers (imported by name there: this
directory is on the test's sys.path, which the workers take over)."""

from __future__ import annotations


def attention_case(module) -> dict:  # noqa: ANN001
    """Every way x layout x mask: the largest difference of this rank's output and of its q, k, v gradients
    from ``F.scaled_dot_product_attention`` of the whole sequence (float64), for a causal mask tensor and for
    ``is_causal``, with 4 heads on a sequence of 16 cut into contiguous chunks or chunk pairs."""
    import torch
    import torch.nn.functional as F

    from shardwise.runtime.lib import Mesh, context_attention
    from shardwise.runtime.lib.mesh import pieces

    rank = module.rank
    torch.manual_seed(0)
    b, h, s, d = 2, 4, 16, 8
    q, k, v = (torch.randn(b, h, s, d, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.ones(s, s, dtype=torch.bool).tril().expand(b, 1, s, s)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    g = torch.randn_like(ref)
    ref.backward(g)
    out: dict = {}
    for paired in ((), ("cp",)):
        mesh = Mesh(rank, (2,), ("cp",), (0, 1), paired=paired)

        def cut(t: torch.Tensor, mesh: Mesh = mesh) -> torch.Tensor:
            return pieces(t, 2, mesh, "cp")[rank]

        for way in ("ring", "ulysses"):
            for kind in ("mask", "causal"):
                ql, kl, vl = (cut(t.detach()).clone().requires_grad_() for t in (q, k, v))
                got = context_attention(ql, kl, vl, cut(mask) if kind == "mask" else None, mesh, "cp", way,
                                        is_causal=kind == "causal")  # fmt: skip
                got.backward(cut(g))
                grads = max((a.grad - cut(w.grad)).abs().max().item() for a, w in zip((ql, kl, vl), (q, k, v)))
                out[(bool(paired), way, kind)] = ((got - cut(ref)).abs().max().item(), grads)
    return out
