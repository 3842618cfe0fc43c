"""Small modules whose traced graphs fuse into every kind of kernel (shared by the kernel and fusion tests).

Sizes are deliberately not multiples of the kernel blocks: elementwise domains of 2·3·211 = 1266 elements
(two programs of 1024, the second masked) and rows of 37 (a 64-wide block, 27 lanes masked).
Inputs stay in the domain of every op (logs and roots see positive values) so no NaN hides a difference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ROWS, COLS = (2, 3), 37
SHAPE = (2, 3, 211)


class Activations(nn.Module):
    """Elementwise: unary activations on a transposed (strided) input plus a broadcast bias."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.randn(SHAPE[-1]))

    def forward(self, x):
        x = x.transpose(1, 2).transpose(1, 2)  # a strided view reaches the kernel as is
        a = x * 2.0 + self.bias
        b = F.gelu(a) - F.gelu(a, approximate="tanh") * 0.5
        c = torch.tanh(b) + torch.sigmoid(b) + F.silu(b) + torch.relu(b) + F.leaky_relu(b, 0.1)
        d = F.hardtanh(c) + F.elu(c) + F.softplus(c) + F.hardsigmoid(c) + F.hardswish(c) + F.mish(c)
        return torch.sub(d, a, alpha=0.5)


class Arithmetic(nn.Module):
    """Elementwise: logs and roots of positive values, powers, clamps, comparisons through masks, casts."""

    def forward(self, x, y, mask):
        p = x.abs() + 1.0
        a = (
            torch.log(p)
            + torch.sqrt(p)
            + torch.rsqrt(p)
            + torch.log1p(p)
            + torch.reciprocal(p)
            + torch.exp(-p)
        )
        b = torch.sin(a) * torch.cos(y) + torch.erf(a) - torch.neg(y) + torch.square(y)
        c = torch.pow(p, 3) + torch.pow(p, 0.5) + torch.pow(p, 1.7) - torch.pow(p, -2)
        d = torch.clamp(b, -1.0, 1.0) + torch.clamp_min(c, 2.0) + torch.clamp_max(c, 3.0)
        e = torch.maximum(d, y) - torch.minimum(d, y) + torch.where(mask, d, y) + d.masked_fill(mask, 0.25)
        f = 1.0 - e / p + torch.add(e, y, alpha=2.0)
        return f.half().float() * 3.0  # a cast to float16 and back rounds inside the kernel


class MaskedSoftmax(nn.Module):
    """Softmax: scale, mask with -inf (attention style), softmax; and log_softmax; over 37-wide rows."""

    def forward(self, scores, mask):
        s = (scores * 0.125).masked_fill(mask, float("-inf"))
        return torch.softmax(s, dim=-1), torch.log_softmax(scores + 1.0, dim=-1)


class WrittenSoftmax(nn.Module):
    """Softmax written out: amax, subtract, exp, sum, divide (reductions in the kernel)."""

    def forward(self, x):
        e = torch.exp(x - x.amax(dim=-1, keepdim=True))
        return e / e.sum(dim=-1, keepdim=True)


class ResidualLayerNorm(nn.Module):
    """LayerNorm: residual add + layer_norm with weight and bias (both results leave the kernel), and one
    without affine parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(COLS)
        self.bare = nn.LayerNorm(COLS, elementwise_affine=False)
        with torch.no_grad():
            self.norm.weight.normal_()
            self.norm.bias.normal_()

    def forward(self, x, residual):
        h = x + residual
        return h, self.norm(h), self.bare(h * 2.0)


class RMSNorms(nn.Module):
    """RMSNorm: the fused op (F.rms_norm), and Llama's written-out form with its float32 round trip."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(COLS))
        self.weight2 = nn.Parameter(torch.randn(COLS))

    def forward(self, x):
        a = F.rms_norm(x + 1.0, (COLS,), self.weight, 1e-6)
        h = x.to(torch.float32)
        variance = h.pow(2).mean(-1, keepdim=True)
        h = h * torch.rsqrt(variance + 1e-6)
        return a, self.weight2 * h.to(x.dtype)


class RowReductions(nn.Module):
    """Reduction: sums and means of a row feed an epilogue; a per-row result leaves the kernel ([..., 1])."""

    def forward(self, x):
        centred = x - x.mean(-1, keepdim=True)
        total = (centred * centred).sum(-1, keepdim=True)
        return centred / (total + 1.0), total * 0.5


def _rows(dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(*ROWS, COLS, dtype=dtype)


def cases(dtype: torch.dtype) -> dict[str, tuple[nn.Module, tuple[torch.Tensor, ...], str]]:
    """name -> (module in ``dtype``, example inputs, the kind of kernel it must fuse into)."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    x = torch.randn(SHAPE, generator=g).to(dtype)
    y = torch.randn(SHAPE, generator=g).to(dtype)
    mask = torch.rand(SHAPE, generator=g) > 0.5
    row_mask = torch.rand(*ROWS, COLS, generator=g) > 0.7
    row_mask[..., 0] = False  # every row keeps a column: no all -inf row
    out = {
        "activations": (Activations(), (x,), "elementwise"),
        "arithmetic": (Arithmetic(), (x, y, mask), "elementwise"),
        "masked_softmax": (MaskedSoftmax(), (_rows(dtype), row_mask), "softmax"),
        "written_softmax": (WrittenSoftmax(), (_rows(dtype),), "softmax"),
        "layernorm": (ResidualLayerNorm(), (_rows(dtype), _rows(dtype)), "layernorm"),
        "rmsnorm": (RMSNorms(), (_rows(dtype),), "rmsnorm"),
        "reduction": (RowReductions(), (_rows(dtype),), "reduction"),
        "overloads": (Overloads(), (x, mask), "elementwise"),
        "zero_dim": (
            ZeroDim(),
            (torch.randn((), generator=g).to(dtype), torch.randn(5, generator=g).to(dtype)),
            "elementwise",
        ),
        "underscore_softmax": (UnderscoreSoftmax(), (_rows(dtype),), "softmax"),
    }
    return {k: (m.to(dtype).eval(), args, kind) for k, (m, args, kind) in out.items()}


class Overloads(nn.Module):
    """Elementwise: ATen overloads that models reach through other paths (scalar overloads, clone, casts,
    eval-mode dropout, underscored softmax), called directly so the trace keeps them."""

    def forward(self, x, mask):
        aten = torch.ops.aten
        a = aten.add.Scalar(x, 2.0)
        b = aten.mul.Scalar(aten.sub.Scalar(a, 0.5), 3.0)
        c = aten.div.Scalar(aten.rsub.Tensor(b, a), 4.0)
        d = aten.where.ScalarOther(mask, c, 0.5) + aten.where.ScalarSelf(mask, -0.5, c)
        e = aten.dropout.default(aten.clone.default(d), 0.1, False)
        e = aten.alpha_dropout.default(e, 0.1, False) + aten.feature_dropout.default(e, 0.1, False)
        return aten._to_copy.default(aten._to_copy.default(e, dtype=torch.float16), dtype=x.dtype)


class ZeroDim(nn.Module):
    """Elementwise over a 0-d domain (one element) and a 0-d tensor broadcast into a vector."""

    def forward(self, s, v):
        a = torch.tanh(s * 2.0 + 1.0)
        return a, torch.sigmoid(v * a - 0.5) * 3.0


class UnderscoreSoftmax(nn.Module):
    """Softmax: aten's underscored forms."""

    def forward(self, x):
        aten = torch.ops.aten
        return aten._softmax.default(x * 2.0, -1, False) + aten._log_softmax.default(x, -1, False)
