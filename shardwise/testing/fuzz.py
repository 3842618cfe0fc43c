"""Random models over the op registry, for differential testing against eager PyTorch.

``generate(seed)`` returns a :class:`FuzzCase`: the Python source of a small ``nn.Module`` (``FuzzModel``),
its example inputs (``make_inputs()``), a loss for training (``loss_fn``) and the mesh to compile it for.
The source is the single source of truth: the fuzzer executes it (:func:`load_case`), and a failing case is
saved as that same source plus a ``__main__`` block (:func:`reproducer`), a standalone script.

The models mix elementwise ops, linear layers (shared and tied weights), matmuls, reductions over random
dims (batch dim included), softmax/cumsum, norms (layer, RMS, batch), reshapes/permutes, slices/chunks/cat,
embeddings, attention, convolutions and pooling, creation ops sized like the batch, comparisons/masks,
dtype detours, indexing and parameters/buffers broadcast into activations; values branch and merge.

Invariants: every model runs in eager PyTorch (shapes are tracked exactly while generating; the tests run
hundreds of cases eagerly); a seed gives the same case byte for byte; values stay bounded (exp of tanh,
division by ``|y| + 1``, square roots of ``|x| + 1``) so comparisons need no special cases; no op draws
random numbers or mutates its input in forward.
"""

from __future__ import annotations

import linecache
import math
import random
import textwrap
from dataclasses import dataclass, field
from typing import Any

__all__ = ["FuzzCase", "LoadedCase", "generate", "load_case", "reproducer", "mesh_choices", "DTYPES", "FEATURES"]

DTYPES = ("float32", "float64", "bfloat16")
FEATURES = ("inplace", "custom", "symbolic", "deep")
_SIZES = (2, 3, 4, 5, 6, 8)
_MAX_RANK = 5
_MAX_NUMEL = 4096


@dataclass(frozen=True)
class FuzzCase:
    """One generated case. ``source`` defines ``FuzzModel``, ``make_inputs()``, ``loss_fn(out)`` and
    ``SEED``/``DTYPE``; the case is compiled for ``cpu:<world_size>`` with ``constraints``."""

    seed: int
    source: str
    dtype: str
    world_size: int
    constraints: tuple[tuple[str, int], ...]
    ops: tuple[str, ...]  # labels of the generated steps, for statistics

    @property
    def cluster(self) -> str:
        return f"cpu:{self.world_size}"

    @property
    def filename(self) -> str:
        return f"fuzz_case_{self.seed}.py"


@dataclass
class LoadedCase:
    """The namespace of an executed case: ``model_factory()`` builds the model with deterministic weights."""

    case: FuzzCase
    namespace: dict[str, Any]

    def model(self) -> Any:
        return self.namespace["make_model"]()

    def inputs(self) -> tuple[Any, ...]:
        return tuple(self.namespace["make_inputs"]())

    @property
    def loss_fn(self) -> Any:
        return self.namespace["loss_fn"]

    def dynamic_shapes(self) -> Any:
        """torch.export's dynamic_shapes for the inputs (None: every size is static)."""
        make = self.namespace.get("dynamic_shapes")
        return make() if make is not None else None


@dataclass
class _Val:
    name: str
    shape: tuple[int, ...]
    kind: str = "f"  # f: the case's float dtype, i: int64 (ids below ``bound``), b: bool
    param: bool = False  # depends on a trainable parameter
    contiguous: bool = True
    bound: int = 0  # for ids: every value is < bound

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class _Module:
    name: str
    kind: str  # linear | embedding
    in_features: int
    out_features: int


@dataclass
class _Gen:
    rng: random.Random
    dtype: str
    batch: int
    init: list[str] = field(default_factory=list)
    fwd: list[str] = field(default_factory=list)
    vals: list[_Val] = field(default_factory=list)
    inputs: list[tuple[str, str]] = field(default_factory=list)  # (name, make_inputs expression)
    modules: list[_Module] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    n: int = 0
    # features beyond the original generator (see FEATURES); none of them draws from ``rng`` unless enabled
    features: frozenset[str] = frozenset()
    # safe: the values carry the batch in dim 0 and no op acts along it or moves it (pipeline blocks: the
    # batch can be cut into micro-batches); sym: shapes are written as expressions of the values' own sizes
    # (the batch dimension is dynamic when the case is exported)
    safe: bool = False
    sym: bool = False
    header: list[str] = field(default_factory=list)  # custom op definitions (module level, once each)

    # -- helpers -------------------------------------------------------------------------------------------

    @property
    def shaped(self) -> bool:
        """Are sizes written as expressions of the values' own shapes (dynamic batch, or pipeline blocks traced
        again at the micro-batch size)?"""
        return self.sym or self.safe

    @property
    def torch_dtype(self) -> str:
        return f"torch.{self.dtype}"

    def fresh(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}{self.n}"

    def emit(self, expr: str, shape: tuple[int, ...], label: str, *, kind: str = "f", param: bool = False,
             contiguous: bool = True, bound: int = 0) -> _Val:  # fmt: skip
        val = _Val(self.fresh("h"), tuple(shape), kind, param, contiguous, bound)
        self.fwd.append(f"{val.name} = {expr}")
        self.vals.append(val)
        self.labels.append(label)
        return val

    def pick(self, kind: str = "f", min_rank: int = 0, pred: Any = None) -> _Val | None:
        if self.safe:
            min_rank = max(min_rank, 1)
        pool = [v for v in self.vals if v.kind == kind and v.rank >= min_rank and (pred is None or pred(v))]
        if not pool:
            return None
        weights = [1 + 2 * self.vals.index(v) for v in pool]  # recent values more often: deeper graphs
        return self.rng.choices(pool, weights)[0]

    def size(self) -> int:
        return self.rng.choice(_SIZES)

    def fits(self, shape: tuple[int, ...]) -> bool:
        return len(shape) <= _MAX_RANK and math.prod(shape) <= _MAX_NUMEL

    def param_like(self, shape: tuple[int, ...], *, buffer: bool | None = None) -> tuple[str, bool]:
        """A new parameter (or buffer) of ``shape`` with random values; returns its expression."""
        if buffer is None:
            buffer = self.rng.random() < 0.3
        if buffer:
            name = self.fresh("buf")
            persistent = self.rng.random() < 0.8
            self.init.append(
                f"self.register_buffer({name!r}, torch.randn({_tuple(shape)}), persistent={persistent})"
            )
            return f"self.{name}", False
        name = self.fresh("p")
        self.init.append(f"self.{name} = nn.Parameter(torch.randn({_tuple(shape)}) * 0.5)")
        return f"self.{name}", True

    def broadcast_partner(self, x: _Val, scalar: bool = True) -> tuple[str, bool, tuple[int, ...]]:
        """Something to combine with ``x`` elementwise: a value of a broadcastable shape, a parameter or
        buffer of a broadcastable shape, or (``scalar``) a Python number. Returns (expression, needs grad,
        shape)."""
        same = [
            v for v in self.vals if v.kind == "f" and v is not x and _broadcast(x.shape, v.shape) == x.shape
            and (not self.safe or v.rank == x.rank)
        ]
        r = self.rng.random()
        if same and r < 0.55:
            y = self.rng.choice(same)
            return y.name, y.param, y.shape
        if (r < 0.9 or not scalar) and x.rank > 0:
            keep = self.rng.randint(1, x.rank)
            shape = tuple(d if self.rng.random() < 0.6 else 1 for d in x.shape[x.rank - keep :])
            if self.safe and keep == x.rank:  # a parameter never has the batch's size
                shape = (1,) + shape[1:]
            expr, grad = self.param_like(shape)
            return expr, grad, shape
        if not scalar:
            expr, grad = self.param_like((), buffer=True)
            return expr, grad, ()
        return repr(self.rng.choice((0.5, -1.25, 2.0, 3.0))), False, ()

    # -- ops -------------------------------------------------------------------------------------------------

    def op_unary(self) -> bool:
        x = self.pick()
        if x is None:
            return False
        template, label = self.rng.choice(_UNARY)
        self.emit(template.format(x=x.name), x.shape, label, param=x.param)
        return True

    def op_binary(self) -> bool:
        x = self.pick()
        if x is None:
            return False
        template, label = self.rng.choice(_BINARY)
        y, grad, yshape = self.broadcast_partner(x, scalar=label in ("add", "sub", "mul"))
        shape = _broadcast(x.shape, yshape)
        if shape is None:
            return False
        self.emit(template.format(x=x.name, y=y), shape, label, param=x.param or grad)
        return True

    def op_linear(self) -> bool:
        x = self.pick(min_rank=2 if self.safe else 1)
        if x is None:
            return False
        k = x.shape[-1]
        # a linear layer with k inputs, or an embedding table of width k (a tied head: logits over its rows)
        shared = [
            m for m in self.modules if (m.out_features if m.kind == "embedding" else m.in_features) == k
        ]
        if shared and self.rng.random() < 0.35:
            m = self.rng.choice(shared)
            if m.kind == "embedding":
                self.emit(f"F.linear({x.name}, self.{m.name}.weight)", x.shape[:-1] + (m.in_features,),
                          "linear(tied embedding)", param=True)  # fmt: skip
            else:
                self.emit(
                    f"self.{m.name}({x.name})", x.shape[:-1] + (m.out_features,), "linear(shared)", param=True
                )
            return True
        out = self.size() if self.rng.random() < 0.7 else k
        if not self.fits(x.shape[:-1] + (out,)):
            return False
        name = self.fresh("lin")
        bias = self.rng.random() < 0.8
        self.init.append(f"self.{name} = nn.Linear({k}, {out}, bias={bias})")
        twins = [
            m for m in self.modules if m.kind == "linear" and (m.in_features, m.out_features) == (k, out)
        ]
        label = "linear"
        if twins and self.rng.random() < 0.3:
            self.init.append(f"self.{name}.weight = self.{self.rng.choice(twins).name}.weight")
            label = "linear(tied weight)"
        self.modules.append(_Module(name, "linear", k, out))
        self.emit(f"self.{name}({x.name})", x.shape[:-1] + (out,), label, param=True)
        return True

    def op_matmul(self) -> bool:
        x = self.pick(min_rank=3 if self.safe else 2)
        if x is None:
            return False
        m, k = x.shape[-2], x.shape[-1]
        r = self.rng.random()
        if r < 0.4:  # against a weight matrix
            n = self.size()
            expr, grad = self.param_like((k, n), buffer=False)
            self.emit(f"torch.matmul({x.name}, {expr})", x.shape[:-1] + (n,), "matmul(param)", param=True)
            return True
        partners = [v for v in self.vals if v.kind == "f" and v.rank == x.rank and v.shape[:-2] == x.shape[:-2]
                    and v.shape[-2] == k]  # fmt: skip
        if partners and r < 0.7:
            y = self.rng.choice(partners)
            shape = x.shape[:-1] + (y.shape[-1],)
            if self.fits(shape):
                self.emit(
                    f"torch.matmul({x.name}, {y.name}) / {k}", shape, "matmul", param=x.param or y.param
                )
                return True
        shape = x.shape[:-1] + (m,)
        if not self.fits(shape):
            return False
        op = "torch.bmm" if x.rank == 3 and self.rng.random() < 0.5 else "torch.matmul"
        self.emit(f"{op}({x.name}, {x.name}.transpose(-1, -2)) / {k}", shape, "matmul(gram)", param=x.param)
        return True

    def op_reduce(self) -> bool:
        x = self.pick(min_rank=1)
        if x is None:
            return False
        kind = self.rng.choice(("sum", "mean", "amax", "amin", "var", "std", "max.dim", "argmax", "logsumexp",
                                "prod", "norm"))  # fmt: skip
        keep = self.rng.random() < 0.4
        if self.safe and x.rank < 2:
            return False
        if kind in ("max.dim", "argmax", "prod"):
            d = self.rng.randrange(1, x.rank) if self.safe else self.rng.randrange(x.rank)
            shape = _reduced(x.shape, [d], keep)
            if kind == "max.dim":
                self.emit(f"{x.name}.max(dim={d}, keepdim={keep}).values", shape, "max.dim", param=x.param)
            elif kind == "prod":
                self.emit(f"(torch.tanh({x.name}) * 0.5 + 1.0).prod(dim={d}, keepdim={keep})", shape, "prod",
                          param=x.param)  # fmt: skip
            else:
                self.emit(f"{x.name}.argmax(dim={d}, keepdim={keep})", shape, "argmax", kind="i",
                          bound=x.shape[d])  # fmt: skip
            return True
        if not self.safe and self.rng.random() < 0.15 and kind in ("sum", "mean"):
            self.emit(f"{x.name}.{kind}()", (), f"{kind}(all)", param=x.param)
            return True
        first = 1 if self.safe else 0
        count = self.rng.randint(1, x.rank - first)
        dims = sorted(self.rng.sample(range(first, x.rank), count))
        if self.rng.random() < 0.3:
            dims = [d - x.rank for d in dims]  # negative dims
        shape = _reduced(x.shape, [d % x.rank for d in dims], keep)
        if kind in ("var", "std") and math.prod(x.shape[d] for d in dims) < 2:
            kind = "sum"
        call = {
            "sum": f"{x.name}.sum(dim={dims}, keepdim={keep})",
            "mean": f"{x.name}.mean(dim={dims}, keepdim={keep})",
            "amax": f"torch.amax({x.name}, dim={dims}, keepdim={keep})",
            "amin": f"torch.amin({x.name}, dim={dims}, keepdim={keep})",
            "var": f"{x.name}.var(dim={dims}, keepdim={keep})",
            "std": f"{x.name}.std(dim={dims}, keepdim={keep})",
            "logsumexp": f"torch.logsumexp({x.name}, dim={dims}, keepdim={keep})",
            "norm": f"torch.linalg.vector_norm({x.name}, dim={dims}, keepdim={keep})",
        }[kind]
        self.emit(call, shape, kind, param=x.param)
        return True

    def op_softmax(self) -> bool:
        x = self.pick(min_rank=1)
        if x is None:
            return False
        d = self.rng.randrange(-x.rank, x.rank)
        if self.safe and d % x.rank == 0:
            return False
        fn, label = self.rng.choice(
            (("F.softmax({x}, dim={d})", "softmax"), ("F.log_softmax({x}, dim={d})", "log_softmax"),
             ("torch.cumsum({x}, dim={d})", "cumsum"))
        )  # fmt: skip
        self.emit(fn.format(x=x.name, d=d), x.shape, label, param=x.param)
        return True

    def op_norm(self) -> bool:
        x = self.pick(min_rank=1)
        if x is None:
            return False
        if self.safe and x.rank < 2:
            return False
        name = self.fresh("norm")
        r = self.rng.random()
        if r < 0.2 and x.rank in (2, 3, 4) and x.shape[0] > 1 and not self.safe:
            cls = "BatchNorm2d" if x.rank == 4 else "BatchNorm1d"
            self.init.append(f"self.{name} = nn.{cls}({x.shape[1]})")
            self.init.append(f"self.{name}.running_mean.uniform_(-0.5, 0.5)")
            self.init.append(f"self.{name}.running_var.uniform_(0.5, 2.0)")
            self.emit(f"self.{name}({x.name})", x.shape, "batch_norm", param=True)
            return True
        if r < 0.45:
            self.init.append(f"self.{name} = nn.RMSNorm({x.shape[-1]})")
            self.emit(f"self.{name}({x.name})", x.shape, "rms_norm", param=True)
            return True
        normalized = x.shape[-2:] if x.rank >= (3 if self.safe else 2) and self.rng.random() < 0.25 else x.shape[-1:]
        affine = self.rng.random() < 0.8
        self.init.append(f"self.{name} = nn.LayerNorm({list(normalized)}, elementwise_affine={affine})")
        self.emit(f"self.{name}({x.name})", x.shape, "layer_norm", param=affine or x.param)
        return True

    def op_reshape(self) -> bool:
        x = self.pick(min_rank=1)
        if x is None:
            return False
        choice = self.rng.choice(("merge", "split", "transpose", "permute", "unsqueeze", "squeeze", "flatten",
                                  "view", "contiguous"))  # fmt: skip
        s = list(x.shape)
        first = 1 if self.safe else 0  # safe: the batch stays in dim 0
        if choice == "merge" and x.rank >= 2 + first:
            i = self.rng.randrange(first, x.rank - 1)
            shape = tuple(s[:i] + [s[i] * s[i + 1]] + s[i + 2 :])
            expr = f"{x.name}.flatten({i}, {i + 1})" if self.shaped else f"{x.name}.reshape({_tuple(shape)})"
            self.emit(expr, shape, "reshape(merge)", param=x.param)
        elif choice == "split" and any(d % 2 == 0 and d >= 4 for d in s[first:]):
            i = self.rng.choice([i for i, d in enumerate(s) if d % 2 == 0 and d >= 4 and i >= first])
            shape = tuple(s[:i] + [2, s[i] // 2] + s[i + 1 :])
            if not self.fits(shape):
                return False
            method = "view" if x.contiguous else "reshape"
            expr = f"{x.name}.unflatten({i}, (2, -1))" if self.shaped else f"{x.name}.{method}({_tuple(shape)})"
            self.emit(expr, shape, f"{method}(split)", param=x.param)
        elif choice == "transpose" and x.rank >= 2 + first:
            i, j = self.rng.sample(range(first, x.rank), 2)
            s[i], s[j] = s[j], s[i]
            self.emit(f"{x.name}.transpose({i}, {j})", tuple(s), "transpose", param=x.param, contiguous=False)
        elif choice == "permute" and x.rank >= 3 + first:
            perm = list(range(first, x.rank))
            self.rng.shuffle(perm)
            perm = list(range(first)) + perm
            shape = tuple(s[p] for p in perm)
            self.emit(f"{x.name}.permute({_tuple(perm)})", shape, "permute", param=x.param, contiguous=False)
        elif choice == "unsqueeze" and x.rank < _MAX_RANK:
            d = self.rng.randint(first, x.rank)
            self.emit(f"{x.name}.unsqueeze({d})", tuple(s[:d] + [1] + s[d:]), "unsqueeze", param=x.param,
                      contiguous=x.contiguous)  # fmt: skip
        elif choice == "squeeze" and 1 in s[first:]:
            d = self.rng.choice([i for i, n in enumerate(s) if n == 1 and i >= first])
            self.emit(f"{x.name}.squeeze({d})", tuple(s[:d] + s[d + 1 :]), "squeeze", param=x.param,
                      contiguous=x.contiguous)  # fmt: skip
        elif choice == "flatten" and x.rank >= 2 + first:
            start = self.rng.randrange(first, x.rank - 1)
            shape = tuple(s[:start] + [math.prod(s[start:])])
            self.emit(f"{x.name}.flatten({start})", shape, "flatten", param=x.param)
        elif choice == "view" and x.contiguous and x.rank >= 2:
            lead = f"{x.name}.shape[0]" if self.shaped else str(s[0])
            self.emit(f"{x.name}.view({lead}, -1)", (s[0], math.prod(s[1:])), "view", param=x.param)
        elif choice == "contiguous" and not x.contiguous:
            self.emit(f"{x.name}.contiguous()", x.shape, "contiguous", param=x.param)
        else:
            return False
        return True

    def op_slice(self) -> bool:
        first = 1 if self.safe else 0
        x = self.pick(min_rank=1, pred=lambda v: max(v.shape[first:], default=0) >= 2)
        if x is None:
            return False
        d = self.rng.choice([i for i, n in enumerate(x.shape) if n >= 2 and i >= first])
        s = x.shape[d]
        r = self.rng.random()
        lead = ":, " * d
        if r < 0.3:
            a = self.rng.randrange(s - 1)
            b = self.rng.randint(a + 1, s)
            shape = x.shape[:d] + (b - a,) + x.shape[d + 1 :]
            self.emit(f"{x.name}[{lead}{a}:{b}]", shape, "slice", param=x.param, contiguous=False)
        elif r < 0.4:
            shape = x.shape[:d] + ((s + 1) // 2,) + x.shape[d + 1 :]
            self.emit(f"{x.name}[{lead}::2]", shape, "slice(step)", param=x.param, contiguous=False)
        elif r < 0.55:
            i = self.rng.randrange(-s, s)
            self.emit(f"{x.name}.select({d}, {i})", x.shape[:d] + x.shape[d + 1 :], "select", param=x.param,
                      contiguous=False)  # fmt: skip
        elif r < 0.7:
            a = self.rng.randrange(s - 1)
            length = self.rng.randint(1, s - a)
            self.emit(f"{x.name}.narrow({d}, {a}, {length})", x.shape[:d] + (length,) + x.shape[d + 1 :],
                      "narrow", param=x.param, contiguous=False)  # fmt: skip
        elif r < 0.85:
            n = self.rng.randint(2, s)
            size = -(-s // n)
            pieces = -(-s // size)
            i = self.rng.randrange(pieces)
            length = min(size, s - i * size)
            self.emit(f"{x.name}.chunk({n}, dim={d})[{i}]", x.shape[:d] + (length,) + x.shape[d + 1 :], "chunk",
                      param=x.param, contiguous=False)  # fmt: skip
        else:  # both halves, recombined later by the other ops (a branch)
            if s % 2:
                return False
            a, b = self.fresh("h"), self.fresh("h")
            shape = x.shape[:d] + (s // 2,) + x.shape[d + 1 :]
            self.fwd.append(f"{a}, {b} = torch.split({x.name}, {s // 2}, dim={d})")
            self.vals += [_Val(a, shape, "f", x.param, False), _Val(b, shape, "f", x.param, False)]
            self.labels.append("split")
            self.emit(f"{a} * torch.sigmoid({b})", shape, "split(gate)", param=x.param)
        return True

    def op_cat(self) -> bool:
        x = self.pick(min_rank=2 if self.safe else 1)
        if x is None:
            return False
        d = self.rng.randrange(1, x.rank) if self.safe else self.rng.randrange(x.rank)
        partners = [v for v in self.vals if v.kind == "f" and v.rank == x.rank and v is not x
                    and all(a == b for i, (a, b) in enumerate(zip(v.shape, x.shape)) if i != d)]  # fmt: skip
        if self.rng.random() < 0.3 and x.rank < _MAX_RANK:
            same = [v for v in partners if v.shape == x.shape]
            y = self.rng.choice(same) if same else None
            other = y.name if y else f"torch.tanh({x.name})"
            sd = self.rng.randint(1 if self.safe else 0, x.rank)
            shape = x.shape[:sd] + (2,) + x.shape[sd:]
            if self.fits(shape):
                self.emit(f"torch.stack([{x.name}, {other}], dim={sd})", shape, "stack",
                          param=x.param or bool(y and y.param))  # fmt: skip
                return True
        y = self.rng.choice(partners) if partners else None
        other = y.name if y else f"{x.name} * 0.5"
        extra = y.shape[d] if y else x.shape[d]
        shape = x.shape[:d] + (x.shape[d] + extra,) + x.shape[d + 1 :]
        if not self.fits(shape):
            return False
        self.emit(
            f"torch.cat([{x.name}, {other}], dim={d})", shape, "cat", param=x.param or bool(y and y.param)
        )
        return True

    def op_embedding(self) -> bool:
        ids = self.pick("i", pred=lambda v: v.bound > 0)
        if ids is None:
            return False
        shared = [m for m in self.modules if m.kind == "embedding" and m.in_features == ids.bound]
        if shared and self.rng.random() < 0.5:
            m = self.rng.choice(shared)
            label = "embedding(shared)"
        else:
            m = _Module(self.fresh("emb"), "embedding", ids.bound, self.size())
            self.init.append(f"self.{m.name} = nn.Embedding({m.in_features}, {m.out_features})")
            self.modules.append(m)
            label = "embedding"
        shape = ids.shape + (m.out_features,)
        if not self.fits(shape):
            return False
        self.emit(f"self.{m.name}({ids.name})", shape, label, param=True)
        return True

    def op_attention(self) -> bool:
        x = self.pick(pred=lambda v: v.rank == 3 and v.shape[-1] % 2 == 0)
        if x is None:
            return False
        b, s, e = x.shape
        heads = self.rng.choice((1, 2)) if e % 2 == 0 else 1
        hd = e // heads
        causal = self.rng.random() < 0.5
        name = self.fresh("attn")
        batch = self.rng.choice((str(b), "-1"))
        seq = str(s)
        if self.shaped:
            batch, seq = f"{x.name}.shape[0]", f"{x.name}.shape[1]"
        q, k, v = self.fresh("q"), self.fresh("k"), self.fresh("v")
        if self.rng.random() < 0.5:
            self.init.append(f"self.{name} = nn.Linear({e}, {3 * e})")
            self.fwd.append(f"{q}, {k}, {v} = self.{name}({x.name}).chunk(3, dim=-1)")
        else:
            self.init.append(f"self.{name}_q = nn.Linear({e}, {e})")
            self.init.append(f"self.{name}_k = nn.Linear({e}, {e}, bias=False)")
            self.init.append(f"self.{name}_v = nn.Linear({e}, {e})")
            self.fwd.append(
                f"{q}, {k}, {v} = self.{name}_q({x.name}), self.{name}_k({x.name}), self.{name}_v({x.name})"
            )
        for t in (q, k, v):
            self.fwd.append(f"{t} = {t}.reshape({batch}, {seq}, {heads}, {hd}).transpose(1, 2)")
        a = self.fresh("a")
        self.fwd.append(f"{a} = F.scaled_dot_product_attention({q}, {k}, {v}, is_causal={causal})")
        self.emit(f"{a}.transpose(1, 2).reshape({batch}, {seq}, {e})", x.shape, "attention", param=True)
        return True

    def op_conv(self) -> bool:
        x = self.pick(pred=lambda v: v.rank in (3, 4) and min(v.shape[2:]) >= 2)
        if x is None:
            return False
        if self.rng.random() < 0.35 and x.rank == 4:
            r = self.rng.random()
            h, w = x.shape[2:]
            if r < 0.4 and h % 2 == 0 and w % 2 == 0:
                fn = self.rng.choice(("F.max_pool2d", "F.avg_pool2d"))
                self.emit(
                    f"{fn}({x.name}, 2)", x.shape[:2] + (h // 2, w // 2), fn.split(".")[1], param=x.param
                )
            else:
                self.emit(f"F.adaptive_avg_pool2d({x.name}, 1)", x.shape[:2] + (1, 1), "adaptive_avg_pool2d",
                          param=x.param)  # fmt: skip
            return True
        c = x.shape[1]
        out = self.size()
        k = self.rng.choice((1, 3)) if min(x.shape[2:]) >= 3 else 1
        pad = self.rng.choice((0, k // 2))
        spatial = tuple(n - k + 1 + 2 * pad for n in x.shape[2:])
        shape = (x.shape[0], out) + spatial
        if not self.fits(shape) or min(spatial) < 1:
            return False
        name = self.fresh("conv")
        cls = "Conv2d" if x.rank == 4 else "Conv1d"
        self.init.append(f"self.{name} = nn.{cls}({c}, {out}, {k}, padding={pad})")
        self.emit(f"self.{name}({x.name})", shape, cls.lower(), param=True)
        return True

    def op_creation(self) -> bool:
        x = self.pick(min_rank=1)
        if x is None:
            return False
        dt = self.torch_dtype
        r = self.rng.random()
        shape = f"{x.name}.shape" if self.shaped else _tuple(x.shape)
        if r < 0.25:
            if self.safe and x.rank < 2:
                return False
            n = f"{x.name}.shape[-1]" if self.sym else str(x.shape[-1])
            self.emit(f"{x.name} + torch.arange({n}, dtype={dt}) * 0.1", x.shape, "arange", param=x.param)
        elif r < 0.45:
            self.emit(f"{x.name} * torch.full({shape}, 0.5, dtype={dt})", x.shape, "full", param=x.param)
        elif r < 0.6:
            self.emit(f"torch.zeros({shape}, dtype={dt}) - {x.name}", x.shape, "zeros", param=x.param)
        elif r < 0.75:
            self.emit(f"{x.name}.new_ones({shape}) + torch.ones_like({x.name}) * {x.name}", x.shape,
                      "new_ones", param=x.param)  # fmt: skip
        elif x.rank >= (3 if self.safe else 2):
            self.emit(f"torch.tril({x.name})", x.shape, "tril", param=x.param)
        else:
            return False
        return True

    def op_mask(self) -> bool:
        x = self.pick()
        if x is None:
            return False
        c = self.rng.choice((-0.5, 0.0, 0.3))
        r = self.rng.random()
        if r < 0.3:
            y, grad, yshape = self.broadcast_partner(x)
            shape = _broadcast(x.shape, yshape)
            if shape is None:
                return False
            self.emit(f"torch.where({x.name} > {c}, {x.name}, {y})", shape, "where", param=x.param or grad)
        elif r < 0.5:
            self.emit(f"{x.name}.masked_fill({x.name} < {c}, {self.rng.choice((0.0, -1.0))})", x.shape,
                      "masked_fill", param=x.param)  # fmt: skip
        elif r < 0.7:
            self.emit(
                f"{x.name} * ({x.name} > {c}).to({self.torch_dtype})", x.shape, "mask(mul)", param=x.param
            )
        elif r < 0.85 and x.rank >= (3 if self.safe else 2) and x.shape[-1] == x.shape[-2]:
            n = f"{x.name}.shape[-1]" if self.sym else str(x.shape[-1])
            self.emit(f"{x.name}.masked_fill(torch.ones({n}, {n}, dtype=torch.bool).triu(1), 0.0)", x.shape,
                      "causal_mask", param=x.param)  # fmt: skip
        else:
            self.emit(f"({x.name} > {c}).logical_and({x.name} < 2.0)", x.shape, "compare", kind="b")
        return True

    def op_cast(self) -> bool:
        x = self.pick()
        if x is None or self.dtype == "float64":  # a detour through a narrower type amplifies roundoff
            return False
        wide = "torch.float32" if self.dtype == "bfloat16" else "torch.float64"
        self.emit(f"torch.tanh({x.name}.to({wide}) * 1.5).to({self.torch_dtype})", x.shape, "cast",
                  param=x.param)  # fmt: skip
        return True

    def op_index(self) -> bool:
        first = 1 if self.safe else 0
        x = self.pick(min_rank=1, pred=lambda v: max(v.shape[first:], default=0) >= 2)
        if x is None:
            return False
        d = self.rng.choice([i for i, n in enumerate(x.shape) if n >= 2 and i >= first])
        s = x.shape[d]
        r = self.rng.random()
        if r < 0.15:
            self.emit(f"{x.name}.flip({d})", x.shape, "flip", param=x.param)
        elif r < 0.3:
            self.emit(f"{x.name}.roll({self.rng.randint(1, s - 1)}, {d})", x.shape, "roll", param=x.param)
        elif r < 0.45:
            k = self.rng.randint(1, s)
            shape = x.shape[:d] + (k,) + x.shape[d + 1 :]
            self.emit(f"torch.topk({x.name}, {k}, dim={d}).values", shape, "topk", param=x.param)
        elif r < 0.55:
            self.emit(f"{x.name}.sort(dim={d}).values", x.shape, "sort", param=x.param)
        elif r < 0.7:
            count = self.rng.randint(1, 2 * s)
            idx = [self.rng.randrange(s) for _ in range(count)]
            name = self.fresh("idx")
            self.init.append(f"self.register_buffer({name!r}, torch.tensor({idx}), persistent=False)")
            shape = x.shape[:d] + (count,) + x.shape[d + 1 :]
            if not self.fits(shape):
                return False
            self.emit(f"{x.name}.index_select({d}, self.{name})", shape, "index_select", param=x.param)
        elif r < 0.8:
            left, right = self.rng.randint(0, 2), self.rng.randint(0, 2)
            if self.safe and x.rank < 2:
                return False
            shape = x.shape[:-1] + (x.shape[-1] + left + right,)
            self.emit(f"F.pad({x.name}, ({left}, {right}))", shape, "pad", param=x.param)
        elif r < 0.9 and x.numel * 2 <= _MAX_NUMEL:
            reps = [1] * x.rank
            reps[d] = 2
            shape = tuple(n * m for n, m in zip(x.shape, reps))
            self.emit(f"{x.name}.repeat({_tuple(reps)})", shape, "repeat", param=x.param)
        else:
            shape = x.shape[:d] + (s - 1,) + x.shape[d + 1 :]
            self.emit(f"torch.diff({x.name}, dim={d})", shape, "diff", param=x.param)
        return True

    # -- ops of the extended generator (FEATURES) ---------------------------------------------------------

    def op_inplace(self) -> bool:
        """An in-place op on a fresh copy of a value (never on an input, a parameter or a value autograd saved):
        ``h = x.clone()`` then ``h.add_(y)``, ``h.relu_()``, ``h[:, a:b] = 0.0``, ``h.masked_fill_(...)``, ..."""
        x = self.pick()
        if x is None:
            return False
        name = self.fresh("h")
        kind = self.rng.choice(("add_", "mul_", "sub_", "relu_", "tanh_", "clamp_", "masked_fill_", "setitem",
                                "setitem_mul", "copy_", "div_"))  # fmt: skip
        first = 1 if self.safe else 0
        dims = [i for i, n in enumerate(x.shape) if n >= 2 and i >= first]
        if kind in ("setitem", "setitem_mul") and not dims:
            kind = "relu_"
        lines = [f"{name} = {x.name}.clone()"]
        param = x.param
        if kind in ("add_", "sub_", "copy_"):
            y, grad, yshape = self.broadcast_partner(x, scalar=kind != "copy_")
            if _broadcast(x.shape, yshape) != x.shape:
                return False
            lines.append(f"{name}.{kind}({y})")
            param = param or grad
        elif kind in ("mul_", "div_"):
            lines.append(f"{name}.{kind}({self.rng.choice((0.5, -1.5, 2.0))})")
        elif kind in ("relu_", "tanh_"):
            lines.append(f"{name}.{kind}()")
        elif kind == "clamp_":
            lines.append(f"{name}.clamp_(-1.0, 1.0)")
        elif kind == "masked_fill_":
            lines.append(f"{name}.masked_fill_({name} > {self.rng.choice((-0.5, 0.0, 0.3))}, 0.25)")
        else:
            d = self.rng.choice(dims)
            a = self.rng.randrange(x.shape[d] - 1)
            b = self.rng.randint(a + 1, x.shape[d])
            index = ":, " * d + f"{a}:{b}"
            lines.append(f"{name}[{index}] = 0.0" if kind == "setitem" else f"{name}[{index}] *= 2.0")
        self.fwd.extend(lines)
        self.vals.append(_Val(name, x.shape, "f", param))
        self.labels.append(f"inplace({kind})")
        return True

    def op_custom(self) -> bool:
        """A custom op (torch.library, namespace ``fuzz``) whose implementation is ATen code registered as
        CompositeImplicitAutograd: it decomposes at trace time and autograd differentiates it in eager."""
        x = self.pick(min_rank=2 if self.safe else 1)
        if x is None:
            return False
        kind = self.rng.choice(("gated", "scaled_gelu", "rms"))
        op = kind
        if kind == "gated":
            y, grad, yshape = self.broadcast_partner(x, scalar=False)
            if _broadcast(x.shape, yshape) != x.shape:
                return False
            self.header.append(
                f'_define("{op}(Tensor x, Tensor y) -> Tensor", lambda x, y: torch.tanh(x) * torch.sigmoid(y) + x)'
            )
            self.emit(f"torch.ops.fuzz.{op}({x.name}, {y})", x.shape, "custom(gated)", param=x.param or grad)
        elif kind == "scaled_gelu":
            self.header.append(
                f'_define("{op}(Tensor x, float s) -> Tensor", lambda x, s: torch.nn.functional.gelu(x) * s)'
            )
            self.emit(f"torch.ops.fuzz.{op}({x.name}, 0.75)", x.shape, "custom(scaled_gelu)", param=x.param)
        else:
            self.header.append(
                f'_define("{op}(Tensor x) -> Tensor", '
                "lambda x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))"
            )
            self.emit(f"torch.ops.fuzz.{op}({x.name})", x.shape, "custom(rms)", param=x.param)
        return True

    def op_symbolic(self) -> bool:
        """Arithmetic on sizes (symbolic when the batch is dynamic): views computed from ``x.shape``, tensors
        made at a computed size, values scaled by a ratio of sizes."""
        x = self.pick(min_rank=2)
        if x is None:
            return False
        kind = self.rng.choice(("view", "merge", "pad_zeros", "scale", "half", "batch_ratio"))
        n = x.name
        if kind == "view":  # a round trip through a view whose sizes are products of sizes
            rest = ", ".join(f"{n}.shape[{i}]" for i in range(2, x.rank))
            merged = f"{n}.shape[0], {n}.shape[1] * {n}.shape[-1] // {n}.shape[-1]" + (f", {rest}" if rest else "")
            self.emit(f"{n}.reshape({merged}).reshape({n}.shape)", x.shape, "sym(view)", param=x.param)
        elif kind == "merge" and not self.safe:  # the batch merged with the next dimension, then split again
            self.emit(f"{n}.reshape({n}.shape[0] * {n}.shape[1], -1).reshape({n}.shape[0], {n}.shape[1], -1)"
                      f".reshape({n}.shape)", x.shape, "sym(merge)", param=x.param)  # fmt: skip
        elif kind == "pad_zeros":  # zeros at a computed size, concatenated along the last dim
            shape = x.shape[:-1] + (x.shape[-1] + 2,)
            if not self.fits(shape):
                return False
            self.emit(f"torch.cat([{n}, {n}.new_zeros(*{n}.shape[:-1], {n}.shape[-1] // {n}.shape[-1] + 1)], dim=-1)",
                      shape, "sym(new_zeros)", param=x.param)  # fmt: skip
        elif kind == "scale":  # a ratio of sizes as a factor (sizes other than the batch: the same in any part)
            self.emit(f"{n} * ({n}.shape[-1] / ({n}.shape[-1] + {n}.shape[1]))", x.shape, "sym(scale)",
                      param=x.param)  # fmt: skip
        elif kind == "batch_ratio" and not self.safe:  # the size of dim 0 (the batch, if it is there) in a value
            self.emit(f"{n} * ({n}.shape[0] / ({n}.shape[0] + 1.0))", x.shape, "sym(batch_ratio)", param=x.param)
        elif kind == "half" and x.shape[-1] >= 2:  # a slice up to a computed bound
            k = x.shape[-1] // 2
            self.emit(f"{n}[..., : {n}.shape[-1] // 2]", x.shape[:-1] + (k,), "sym(slice)", param=x.param,
                      contiguous=False)  # fmt: skip
        else:
            return False
        return True

    def final_linear(self, x: _Val) -> None:
        """A last linear layer on ``x``, so that a training loss depends on a parameter."""
        k, out = (x.shape[-1] if x.rank else 1), self.size()
        name = self.fresh("lin")
        self.init.append(f"self.{name} = nn.Linear({k}, {out})")
        src = x.name if x.rank else f"{x.name}.reshape(1)"
        self.emit(f"self.{name}({src})", (x.shape[:-1] if x.rank else ()) + (out,), "linear", param=True)

    def op_expand(self) -> bool:
        x = self.pick(pred=lambda v: 1 in v.shape)
        if x is None:
            return False
        shape = tuple(self.size() if n == 1 else n for n in x.shape)
        if not self.fits(shape):
            return False
        sizes = _tuple(shape)
        if self.shaped:  # the dims kept as they are: -1 (they may be the dynamic batch)
            sizes = _tuple(m if n == 1 else -1 for n, m in zip(x.shape, shape))
        self.emit(f"{x.name}.expand({sizes})", shape, "expand", param=x.param, contiguous=False)
        return True


def _tuple(shape: Any) -> str:
    items = list(shape)
    return "(" + ", ".join(map(str, items)) + ("," if len(items) == 1 else "") + ")"


def _broadcast(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...] | None:
    out = []
    for i in range(1, max(len(a), len(b)) + 1):
        x = a[-i] if i <= len(a) else 1
        y = b[-i] if i <= len(b) else 1
        if x != y and 1 not in (x, y):
            return None
        out.append(max(x, y))
    return tuple(reversed(out))


def _reduced(shape: tuple[int, ...], dims: list[int], keep: bool) -> tuple[int, ...]:
    return tuple(1 if i in dims else n for i, n in enumerate(shape) if keep or i not in dims)


_UNARY = [
    ("torch.relu({x})", "relu"), ("F.gelu({x})", "gelu"), ("torch.tanh({x})", "tanh"),
    ("torch.sigmoid({x})", "sigmoid"), ("F.silu({x})", "silu"), ("torch.abs({x})", "abs"), ("-{x}", "neg"),
    ("torch.sin({x})", "sin"), ("torch.cos({x})", "cos"), ("torch.exp(torch.tanh({x}))", "exp"),
    ("{x} * {x}", "square"), ("{x}.clamp(-1.0, 1.0)", "clamp"), ("F.leaky_relu({x}, 0.1)", "leaky_relu"),
    ("F.softplus({x})", "softplus"), ("torch.erf({x})", "erf"), ("F.hardtanh({x})", "hardtanh"),
    ("torch.sqrt({x}.abs() + 1.0)", "sqrt"), ("torch.log1p({x}.abs())", "log1p"),
    ("torch.rsqrt({x} * {x} + 1.0)", "rsqrt"), ("F.elu({x})", "elu"), ("{x} * 0.5 + 1.0", "scalar"),
    ("{x} ** 2", "pow"), ("2.0 - {x}", "rsub"), ("torch.reciprocal({x}.abs() + 1.0)", "reciprocal"),
    ("F.hardswish({x})", "hardswish"), ("F.mish({x})", "mish"), ("{x} / 3.0", "div(scalar)"),
]  # fmt: skip
_BINARY = [
    ("{x} + {y}", "add"), ("{x} - {y}", "sub"), ("{x} * {y}", "mul"), ("torch.maximum({x}, {y})", "maximum"),
    ("torch.minimum({x}, {y})", "minimum"), ("{x} / ({y}.abs() + 1.0)" , "div"),
    ("torch.atan2({x}, {y} + 2.0)", "atan2"), ("torch.lerp({x}, {y}, 0.25)", "lerp"),
]  # fmt: skip
_BINARY = [(t, label) for t, label in _BINARY if "{y}" in t]

_EXTENDED_OPS = {"inplace": ("op_inplace", 5), "custom": ("op_custom", 3), "symbolic": ("op_symbolic", 4)}
# ops a pipeline block does without: token ids exist only at the model's inputs
_NOT_IN_BLOCKS = ("op_embedding",)
_OPS = (
    ("op_unary", 10), ("op_binary", 10), ("op_linear", 9), ("op_matmul", 4), ("op_reduce", 7),
    ("op_softmax", 4), ("op_norm", 4), ("op_reshape", 7), ("op_slice", 5), ("op_cat", 4),
    ("op_embedding", 3), ("op_attention", 2), ("op_conv", 3), ("op_creation", 3), ("op_mask", 4),
    ("op_cast", 2), ("op_index", 4), ("op_expand", 2),
)  # fmt: skip


def mesh_choices(world_size: int, degrees: tuple[str, ...]) -> list[tuple[tuple[str, int], ...]]:
    """Every way to use all ``world_size`` processes with the supported ``degrees`` (``("dp",)`` or
    ``("dp", "tp")``, ...): constraints that pin each degree."""
    out: list[tuple[tuple[str, int], ...]] = []

    def rec(i: int, left: int, acc: tuple[tuple[str, int], ...]) -> None:
        if i == len(degrees) - 1:
            out.append(acc + ((degrees[i], left),))
            return
        for d in range(1, left + 1):
            if left % d == 0:
                rec(i + 1, left // d, acc + ((degrees[i], d),))

    rec(0, world_size, ())
    return out


def generate(
    seed: int,
    *,
    degrees: tuple[str, ...] = ("dp",),
    world_sizes: tuple[int, ...] = (2, 4),
    dtypes: tuple[str, ...] = DTYPES,
    steps: tuple[int, int] = (2, 10),
    features: tuple[str, ...] = (),
) -> FuzzCase:
    """The case for ``seed``: a random model, its inputs, and a mesh over ``cpu:2`` or ``cpu:4`` using the
    planner's supported ``degrees``.

    ``features`` (see :data:`FEATURES`; none: the original generator, whose seeds the tests pin) adds in-place
    ops, custom ops, size arithmetic with a dynamic batch, a batch that the mesh divides, and models of
    repeated blocks, at least as many as the pipeline stages (``deep``: the blocks keep the batch in dim 0 and
    never mix its rows, so the batch can be cut into micro-batches)."""
    rng = random.Random(seed)
    weights = {"float32": 0.8, "float64": 0.15, "bfloat16": 0.05}
    dtype = rng.choices(list(dtypes), [weights.get(d, 0.1) for d in dtypes])[0]
    world = rng.choice(world_sizes)
    constraints = rng.choice(mesh_choices(world, degrees))
    batch = rng.choice((4, 8, 8, 4, 6)) if world != 4 else rng.choice((4, 8, 8, 4, 12, 6))
    unknown = set(features) - set(FEATURES)
    if unknown:
        raise ValueError(f"unknown fuzz features {sorted(unknown)}; known: {FEATURES}")
    feats = frozenset(features)
    sym = deep = False
    if feats:
        pinned = dict(constraints)
        pp, dp = pinned.get("pp", 1), pinned.get("dp", 1)
        # a batch the mesh divides (pipelines: at least two micro-batches per replica)
        unit = dp * (2 if pp > 1 else 1)
        batch = rng.choice([b for b in (4, 6, 8, 12, 16) if b % unit == 0 and b // unit >= 1][:3])
        sym = "symbolic" in feats and rng.random() < 0.4
        deep = "deep" in feats and (pp > 1 or rng.random() < 0.2)
    gen = _Gen(rng, dtype, batch, features=feats, sym=sym)
    table = list(_OPS) + [_EXTENDED_OPS[f] for f in FEATURES if f in feats and f in _EXTENDED_OPS]
    if deep:  # (a pipeline's batch is static: micro-batches are cut from it; its shapes are still written
        #          as size expressions, which the micro-batches' traces evaluate at their own sizes)
        return _deep_case(gen, seed, dtype, world, constraints, table, steps)
    _inputs(gen)
    names, weights_ = zip(*table)
    for _ in range(rng.randint(*steps)):
        for _attempt in range(8):
            if getattr(gen, rng.choices(names, weights_)[0])():
                break
    return _finish(gen, seed, dtype, world, constraints)


def _deep_case(
    gen: _Gen, seed: int, dtype: str, world: int, constraints: tuple[tuple[str, int], ...],
    table: list[tuple[str, int]], steps: tuple[int, int],
) -> FuzzCase:  # fmt: skip
    """A stack of identical random blocks (``blocks.N``: the pipeline's layers, at least ``pp`` of them)
    between the input and a linear head. Each block maps ``h`` to ``h + tanh(proj(ops(h)))``."""
    rng = gen.rng
    pp = dict(constraints).get("pp", 1)
    layers = pp * rng.choice((1, 2)) if pp > 1 else rng.choice((2, 3))
    rank = rng.choice((2, 3, 3, 4))
    shape = (gen.batch,) + tuple(gen.size() for _ in range(rank - 1))
    gen.inputs.append(("x", f"torch.randn({_tuple(shape)}, generator=g).to(DTYPE)"))
    block = _Gen(rng, dtype, gen.batch, features=gen.features, safe=True, sym=gen.sym)
    block.vals.append(_Val("h", shape))
    names, weights = zip(*[(n, w) for n, w in table if n not in _NOT_IN_BLOCKS])
    for _ in range(max(1, rng.randint(*steps) // 2)):
        for _attempt in range(8):
            if getattr(block, rng.choices(names, weights)[0])():
                break
    last = next((v for v in reversed(block.vals) if v.kind == "f" and v.rank >= 1 and v.name != "h"), None)
    if last is None:
        last = block.emit("torch.tanh(h) * 2.0", shape, "tanh")
    block.init.append(f"self.proj = nn.Linear({math.prod(last.shape[1:])}, {math.prod(shape[1:])})")
    block.fwd.append(f"out = self.proj({last.name}.reshape({last.name}.shape[0], -1)).reshape(h.shape)")
    out = gen.size()
    head = f"self.head = nn.Linear({shape[-1]}, {out})"
    source = _DEEP_SOURCE.format(
        seed=seed, dtype=dtype, world=world, constraints=dict(constraints), layers=layers,
        ops=", ".join(block.labels), header=_header(block.header),
        init="\n".join("        " + line for line in block.init) or "        pass",
        body="\n".join("        " + line for line in block.fwd), head=head,
        inputs=f"        torch.randn({_tuple(shape)}, generator=g).to(DTYPE),",
        dynamic=_dynamic_source(gen.sym and pp == 1, [("x", True)]),
    )  # fmt: skip
    labels = tuple(f"block:{label}" for label in block.labels) + (f"blocks({layers})",)
    return FuzzCase(seed, source, dtype, world, constraints, labels)


def _header(lines: list[str]) -> str:
    """Module-level definitions of the custom ops a case uses (each once)."""
    if not lines:
        return ""
    return _CUSTOM_OPS_HEADER + "\n".join(dict.fromkeys(lines)) + "\n\n"


def _dynamic_source(sym: bool, inputs: list[tuple[str, bool]]) -> str:
    """A ``dynamic_shapes()`` function for torch.export: the batch dimension of every batch input is dynamic
    (only in a case whose shapes are written as size expressions)."""
    if not sym:
        return ""
    items = ", ".join(f"{name!r}: {{0: Dim.AUTO}}" if batch else f"{name!r}: None" for name, batch in inputs)
    return (
        "\n\ndef dynamic_shapes():\n"
        '    """torch.export dynamic_shapes: the batch dimension is dynamic."""\n'
        "    from torch.export import Dim\n\n"
        f"    return {{{items}}}\n"
    )


def _inputs(gen: _Gen) -> None:
    rng = gen.rng
    rank = rng.choice((2, 2, 3, 3, 4))
    shape = (gen.batch,) + tuple(gen.size() for _ in range(rank - 1))
    gen.inputs.append(("x", f"torch.randn({_tuple(shape)}, generator=g).to(DTYPE)"))
    gen.vals.append(_Val("x", shape))
    r = rng.random()
    if r < 0.3:  # a second activation with the same batch
        shape2 = (gen.batch,) + tuple(gen.size() for _ in range(rng.randint(0, 2)))
        gen.inputs.append(("y", f"torch.randn({_tuple(shape2)}, generator=g).to(DTYPE)"))
        gen.vals.append(_Val("y", shape2))
    elif r < 0.4:  # an input without a batch dim (broadcast into the activations)
        shape2 = (shape[-1],)
        gen.inputs.append(("y", f"torch.randn({_tuple(shape2)}, generator=g).to(DTYPE)"))
        gen.vals.append(_Val("y", shape2))
    if rng.random() < 0.3:  # token ids
        vocab = rng.choice((5, 11, 16))
        ids_shape = (gen.batch, gen.size())
        gen.inputs.append(("ids", f"torch.randint(0, {vocab}, {_tuple(ids_shape)}, generator=g)"))
        gen.vals.append(_Val("ids", ids_shape, "i", bound=vocab))


def _finish(
    gen: _Gen, seed: int, dtype: str, world: int, constraints: tuple[tuple[str, int], ...]
) -> FuzzCase:
    rng = gen.rng
    floats = [v for v in gen.vals if v.kind == "f" and v.name not in {n for n, _ in gen.inputs}]
    if not floats or not floats[-1].param:
        gen.final_linear(gen.vals[-1] if gen.vals[-1].kind == "f" else gen.vals[0])
        floats = [v for v in gen.vals if v.kind == "f"]
    last = floats[-1]
    others = [v for v in gen.vals if v is not last and v.name not in {n for n, _ in gen.inputs}]
    extra = rng.sample(others, min(len(others), rng.choice((0, 0, 1, 2))))
    outs = [last] + extra
    style = rng.choice(("single", "tuple", "dict")) if len(outs) > 1 else "single"
    if style == "single":
        outs = [last]
        ret = last.name
    elif style == "tuple":
        ret = "(" + ", ".join(v.name for v in outs) + ")"
    else:
        ret = "{" + ", ".join(f"{f'out{i}'!r}: {v.name}" for i, v in enumerate(outs)) + "}"
    args = ", ".join(n for n, _ in gen.inputs)
    init = "\n".join("        " + line for line in gen.init) or "        pass"
    body = "\n".join("        " + line for line in gen.fwd)
    inputs = "\n".join(f"        {expr}," for _, expr in gen.inputs)
    batch_inputs = [(n, any(v.name == n and v.shape[:1] == (gen.batch,) for v in gen.vals)) for n, _ in gen.inputs]
    source = _SOURCE.format(
        seed=seed, dtype=dtype, world=world, constraints=dict(constraints), ops=", ".join(gen.labels),
        init=init, args=args, body=body, ret=ret, inputs=inputs, header=_header(gen.header),
    ) + _dynamic_source(gen.sym and dict(constraints).get("pp", 1) == 1, batch_inputs)  # fmt: skip
    return FuzzCase(seed, source, dtype, world, constraints, tuple(gen.labels))


_SOURCE = '''\
"""Fuzz case {seed} (shardwise.testing.fuzz): {dtype}, compiled for cpu:{world} with {constraints}.

Steps: {ops}.
"""

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import nn

SEED = {seed}
DTYPE = torch.{dtype}
CLUSTER = "cpu:{world}"
CONSTRAINTS = {constraints}

{header}
class FuzzModel(nn.Module):
    def __init__(self):
        super().__init__()
{init}

    def forward(self, {args}):
{body}
        return {ret}


def make_model():
    torch.manual_seed(SEED)
    return FuzzModel().to(DTYPE)


def make_inputs():
    g = torch.Generator().manual_seed(SEED)
    return (
{inputs}
    )


def loss_fn(out):
    leaves = [t for t in pytree.tree_leaves(out) if torch.is_tensor(t) and t.is_floating_point()]
    wide = torch.float64 if DTYPE == torch.float64 else torch.float32  # never narrower than the model
    return sum((t.to(wide) ** 2).mean() for t in leaves)
'''


_CUSTOM_OPS_HEADER = '''
def _define(schema, fn):
    """A custom op fuzz::<name> implemented by ATen code (CompositeImplicitAutograd: autograd differentiates
    the implementation; tracing decomposes it). Defined once per process."""
    name = schema.split("(")[0]
    if not hasattr(torch.ops.fuzz, name):
        torch.library.define(f"fuzz::{name}", schema[len(name):])
        torch.library.impl(f"fuzz::{name}", "CompositeImplicitAutograd", fn)


'''

_DEEP_SOURCE = '''\
"""Fuzz case {seed} (shardwise.testing.fuzz): {dtype}, compiled for cpu:{world} with {constraints}.

{layers} blocks of: {ops}.
"""

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import nn

SEED = {seed}
DTYPE = torch.{dtype}
CLUSTER = "cpu:{world}"
CONSTRAINTS = {constraints}

{header}
class FuzzBlock(nn.Module):
    def __init__(self):
        super().__init__()
{init}

    def forward(self, h):
{body}
        return h + torch.tanh(out)


class FuzzModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(FuzzBlock() for _ in range({layers}))
        {head}

    def forward(self, x):
        h = x
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def make_model():
    torch.manual_seed(SEED)
    return FuzzModel().to(DTYPE)


def make_inputs():
    g = torch.Generator().manual_seed(SEED)
    return (
{inputs}
    )


def loss_fn(out):
    leaves = [t for t in pytree.tree_leaves(out) if torch.is_tensor(t) and t.is_floating_point()]
    wide = torch.float64 if DTYPE == torch.float64 else torch.float32  # never narrower than the model
    return sum((t.to(wide) ** 2).mean() for t in leaves)
{dynamic}'''


def load_case(case: FuzzCase) -> LoadedCase:
    """Execute the case's source (registered with linecache, so tracebacks and traced source lines show it)."""
    filename = case.filename
    lines = case.source.splitlines(keepends=True)
    linecache.cache[filename] = (len(case.source), None, lines, filename)
    namespace: dict[str, Any] = {"__name__": f"fuzz_case_{case.seed}", "__file__": filename}
    exec(compile(case.source, filename, "exec"), namespace)  # noqa: S102 - our own generated source
    return LoadedCase(case, namespace)


_REPRO_MAIN = """

# -- reproducer: compile for the cluster above, compare with eager PyTorch ------------------------------
if __name__ == "__main__":
    import functools

    import shardwise
    from shardwise.runtime import WorkerPool

    def leaves(x):
        return [t for t in pytree.tree_leaves(x) if torch.is_tensor(t)]

    def compare(what, got, want):
        got, want = leaves(got), leaves(want)
        assert len(got) == len(want), f"{{what}}: {{len(got)}} tensors, eager gives {{len(want)}}"
        for i, (g, w) in enumerate(zip(got, want)):
            assert g.shape == w.shape and g.dtype == w.dtype, f"{{what}}[{{i}}]: {{g.shape}} {{g.dtype}} vs {{w.shape}} {{w.dtype}}"
            if w.is_floating_point():
                scale = 1.0 + w.double().abs().max().item() if w.numel() else 1.0
                diff = (g.double() - w.double()).abs().max().item() if w.numel() else 0.0
                print(f"{{what}}[{{i}}]: max abs diff {{diff:.3e}} (scale {{scale:.3e}})")
            else:
                print(f"{{what}}[{{i}}]: {{int((g != w).sum())}} elements differ")

    inputs = make_inputs()
    model = make_model().eval()
    with torch.no_grad():
        want = model(*inputs)
    with WorkerPool(int(CLUSTER.split(":")[1])) as pool:
        dynamic = globals().get("dynamic_shapes", lambda: None)()
        with shardwise.compile(make_model().eval(), CLUSTER, example_inputs=inputs, constraints=CONSTRAINTS,
                               dynamic_shapes=dynamic, workers=pool) as cm:
            print(cm.plan.summary())
            compare("inference", cm.run(*inputs), want)

        sgd = functools.partial(torch.optim.SGD, lr={lr})
        reference = make_model().train()
        loss = loss_fn(reference(*inputs))
        loss.backward()
        sgd(reference.parameters()).step()
        with shardwise.compile(make_model(), CLUSTER, example_inputs=inputs, mode="train", loss_fn=loss_fn,
                               optimizer=sgd, constraints=CONSTRAINTS, dynamic_shapes=dynamic, workers=pool) as cm:
            got_loss = cm.train_step(*inputs)
            print(f"loss {{got_loss:.8f}}, eager {{loss.item():.8f}}")
            state = cm.state_dict()
            for key, value in reference.state_dict().items():
                compare(f"state after one SGD step: {{key}}", state[key], value)
"""

LR = 0.05


def reproducer(case: FuzzCase, note: str = "") -> str:
    """A standalone script: the case's source and a ``__main__`` block that compiles it and compares it with
    eager PyTorch (inference, then one SGD training step). ``note`` (what went wrong) heads the file."""
    head = "".join(f"# {line}\n" for line in textwrap.dedent(note).strip().splitlines()[:40]) if note else ""
    return head + case.source + _REPRO_MAIN.format(lr=LR)
