"""The model at another batch size without tracing it again: ``rebatch(full, sample, rows)``.

A pipeline runs its chunks at the micro-batch size, so the planner needs the model's graph at each
micro-batch size it realizes. Tracing a large model takes seconds to minutes per size; this pass derives the
graph at ``rows`` rows from two traces the planner already has: ``full``, traced at ``B`` rows, and
``sample``, the same model traced at ``s`` rows (``s != B``, ``s >= 2``: torch.export specializes sizes of 1).

Every integer that differs between the two traces (a tensor's dimension, an integer argument such as a view's
sizes, an op's FLOPs) must be proportional to the rows (``x_sample * B == x_full * s``); it is then
``x_full * rows / B`` at ``rows`` rows, and must come out whole. Bytes moved may also hold a part that does
not grow with the rows (parameters): they are interpolated linearly between the two traces. Everything else
(ops, names, parameters, non-integer arguments, dtypes) must be equal in both traces.

Guarantees: the result has ``full``'s structure (same nodes, names, parameters and order), its batch-dependent
integers at ``rows``; ``None`` when any check fails (the caller traces at ``rows`` instead). A size that
depends on the batch without differing between the two traces (``min(batch, 2)`` traced at 1536 and 2) is not
caught; the planner's batch-cut check (``passes.stages.rows``) already requires the model's sizes to follow
its batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from shardwise.ir.graph import Arg, Const, Graph, GraphInput, Node, Value
from shardwise.ir.tensor import ScalarSpec, TensorSpec
from shardwise.passes.stages.profile import traced_batch

__all__ = ["rebatch", "RebatchingTracer"]


class _Mismatch(Exception):
    """The two traces differ in a way rows cannot explain."""


class _Scale:
    def __init__(self, full_rows: int, sample_rows: int, rows: int) -> None:
        self.b, self.s, self.r = full_rows, sample_rows, rows

    def int_(self, full: int, sample: int) -> int:
        if full == sample:
            return full
        if sample * self.b != full * self.s or (full * self.r) % self.b:
            raise _Mismatch
        return full * self.r // self.b

    def affine(self, full: int, sample: int) -> int:
        """Linear in the rows through both traces (a part that does not grow, plus one that does)."""
        if full == sample:
            return full
        num = (full - sample) * (self.r - self.s)
        if num % (self.b - self.s):
            raise _Mismatch
        out = sample + num // (self.b - self.s)
        if out < 0:
            raise _Mismatch
        return out

    def arg(self, full: Arg, sample: Arg) -> Arg:
        if type(full) is not type(sample):
            raise _Mismatch
        if isinstance(full, bool) or full is None or isinstance(full, str | Value | Const | float):
            if full != sample:
                raise _Mismatch
            return full
        if isinstance(full, int):
            assert isinstance(sample, int)
            return self.int_(full, sample)
        if isinstance(full, tuple):
            assert isinstance(sample, tuple)
            if len(full) != len(sample):
                raise _Mismatch
            return tuple(self.arg(a, b) for a, b in zip(full, sample, strict=True))
        raise _Mismatch

    def spec(self, full: TensorSpec | ScalarSpec, sample: TensorSpec | ScalarSpec) -> TensorSpec | ScalarSpec:
        if isinstance(full, ScalarSpec) or isinstance(sample, ScalarSpec):
            if full != sample:
                raise _Mismatch
            return full
        if full.dtype != sample.dtype or full.rank != sample.rank:
            raise _Mismatch
        shape = tuple(self.int_(a, b) for a, b in zip(full.shape, sample.shape, strict=True))
        return full if shape == full.shape else TensorSpec(shape, full.dtype)

    def node(self, full: Node, sample: Node) -> Node:
        if (full.name, full.op, full.tuple_output, full.whole) != (sample.name, sample.op, sample.tuple_output,
                                                                    sample.whole):  # fmt: skip
            raise _Mismatch
        if len(full.outputs) != len(sample.outputs) or len(full.kwargs) != len(sample.kwargs):
            raise _Mismatch
        kwargs = []
        for (k, a), (k2, b) in zip(full.kwargs, sample.kwargs, strict=True):
            if k != k2:
                raise _Mismatch
            kwargs.append((k, self.arg(a, b)))
        return full.replace(
            args=self.arg(full.args, sample.args), kwargs=tuple(kwargs),
            outputs=tuple(self.spec(a, b) for a, b in zip(full.outputs, sample.outputs, strict=True)),
            flops=self.int_(full.flops, sample.flops), bytes_moved=self.affine(full.bytes_moved, sample.bytes_moved),
        )  # fmt: skip


def rebatch(full: Graph, sample: Graph, rows: int) -> Graph | None:
    """``full`` as traced at ``rows`` rows, derived from ``full`` and ``sample`` (see the module docstring)."""
    b, s = traced_batch(full), traced_batch(sample)
    if rows < 1 or s < 2 or s == b:
        return None
    if rows == b:
        return full
    scale = _Scale(b, s, rows)
    try:
        if (
            len(full.nodes) != len(sample.nodes) or len(full.inputs) != len(sample.inputs)
            or full.params != sample.params or full.outputs != sample.outputs
            or full.buffer_updates != sample.buffer_updates or full.functions != sample.functions
        ):  # fmt: skip
            raise _Mismatch
        inputs = []
        for a, c in zip(full.inputs, sample.inputs, strict=True):
            if a.name != c.name or a.dynamic != c.dynamic:
                raise _Mismatch
            inputs.append(GraphInput(a.name, scale.spec(a.spec, c.spec), a.dynamic))
        nodes = tuple(scale.node(x, y) for x, y in zip(full.nodes, sample.nodes, strict=True))
    except _Mismatch:
        return None
    out = full.replace(inputs=tuple(inputs), nodes=nodes)
    return out if traced_batch(out) == rows else None


class RebatchingTracer:
    """``trace(rows)`` with each size traced at most once and, once the model has been traced at a size of 2
    rows or more (other than ``full``'s), every other size derived by :func:`rebatch` where it can be
    (``traced`` counts the real traces, ``derived`` the others)."""

    def __init__(self, full: Graph, trace: Callable[[int], Graph]) -> None:
        self.full, self.trace = full, trace
        self.sample: Graph | None = None
        self.graphs: dict[int, Graph] = {}
        self.traced = self.derived = 0
        self.seconds = 0.0  # spent tracing

    def __call__(self, rows: int) -> Graph:
        got = self.graphs.get(rows)
        if got is None and self.sample is not None:
            got = rebatch(self.full, self.sample, rows)
            self.derived += got is not None
        if got is None:
            t0 = time.perf_counter()
            got = self.trace(rows)
            self.seconds += time.perf_counter() - t0
            self.traced += 1
            if self.sample is None and rows >= 2 and rows != traced_batch(self.full):
                self.sample = got
        self.graphs[rows] = got
        return got
