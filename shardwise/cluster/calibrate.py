"""Measure this machine and describe it as a ``cpu:N`` ClusterSpec: the figures the price list needs.

``calibrate(n)`` starts ``n`` local processes (gloo over 127.0.0.1), each with the intra-op threads the runtime
gives its workers (``cores // n``, or ``$SHARDWISE_THREADS_PER_WORKER``). All processes measure at the same
time, as they run a plan; :func:`measure` is what each one does, :func:`spec_from_measurements` turns the
measurements into the cluster (pure: tested with given figures).

**How every figure is measured.** A figure is timed as many short samples, each a batch of calls lasting
about ``SAMPLE_S`` (1 ms), and the figure is the **minimum** over the samples of the mean time per call: on
a shared machine other processes only ever add time to a sample, and a sample as short as a scheduler time
slice often runs undisturbed, so the minimum is the undisturbed cost. Compute figures of a process that
computes on one thread (the runtime's budget on a machine with as many cores as processes) are read on the
thread's CPU clock, which preemption by other processes does not advance; with more threads, on the wall
clock.

**Compute is timed as a program pays it** (since calibration version 4). A generated program is
straight-line Python that calls each op once a step: every op follows ops of other kinds (the host ran their
dispatch and kernels just before: other code, other data, other allocations), each matmul reads its own
weights (read once a step), and an op's activation input is what the op before it has just written. An op
timed in a back-to-back loop of itself meets none of that: its code and its operands stay hot, and it costs
less than in the program. So every compute figure read per call (matmuls, attention, math ops, streaming) is
the mean per call of a run of ``COMPUTE_RUN`` calls, each after ``COMPUTE_GAP`` round(s) of the dispatch
probe's tiny ops (the same ops alone, timed in the same kind of run, subtracted; :func:`in_program`), a matmul
or attention call with a weight operand of its own and the activation operand shared; the least over the
samples of that mean. The dispatch, view, backward-node and optimizer probes are runs of many different ops
already. Streaming (``a + b``) writes into a buffer allocated once: a fresh result of 32 MiB or more is a
new mapping on every call (glibc's largest dynamic mmap threshold), whose page faults are not streaming.

Communication needs both processes on a core at once, on the wall clock: a point-to-point sample
is one round trip, a collective's sample is a run of ``COLLECTIVE_RUN`` calls made as a program makes them
(each after a short compute, ``COLLECTIVE_GAP``, on both processes, so that the library's threads have gone
idle), its time per call less that compute's (a step adds up many collectives, so it pays their mean cost;
the least single call, the luckiest meeting of the two processes' threads, is lower than the mean of any run).
Since calibration version 7 a collective's figure is not the least run: a collective waits for the other
process's threads to wake (gloo's device thread, then the caller), which on this kind of machine (a virtual
machine whose idle cores sleep) is slow much of the time even when nothing else runs: in the generated tp 2
decode programs on a quiet machine (04:47 UTC, load 0.35-1.2) the median step was 3.4-3.9x the least one
(GPT-2 tiny 9.68 against 2.52 ms, Llama small 35.5 against 11.6), and this probe's runs of 8 all-reduces (load
1.5) took 682 us per call in the least run, 1830 at the median, 3444 at the most; the least run is the
luckiest, not what a program's step pays. Version 7 took the median run; it moved with the load of the few
seconds it was measured in (a median of 0.9 ms and one of 2 ms a call, an hour apart at loads 3.4 and 2.0).
Since version 8 it is the **least of the medians** of ``COLLECTIVE_GROUPS`` consecutive groups of runs
(:func:`min_of_medians`; the compute alone the same way): the typical run of the least disturbed stretch, the
statistic ``bench/serving_cpu.py`` measures the programs' steps by (the least of its rounds' median steps). Compute figures keep the least sample (on the CPU clock
other processes only add to it) and the slowest process's value; communication figures are rank 0's (the
pair 0-1).

What is measured (each a figure of the price list, ``costs/``):

* ``dispatch_s``: the forward cost of one op that computes, as the generated program runs it (straight-line
  Python calling ATen ops, on tensors so small that the kernel's own work is negligible), with autograd off
  (inference), measured on the ops the price list prices at their launch and bytes alone (``_plain_ops``:
  arithmetic, comparisons, copies, concatenation, reductions, lookups: most of a program's ops), since
  version 4: an op with fixed work of its own is priced by its own figure, measured beyond this one (a
  matmul: ``gemm_overhead_s``; attention; a math function: per element), so counting its fixed work here
  too would charge it to every op (the earlier probe's 14 kinds, matmul, softmax and layer_norm among them,
  cost 4.3-4.7 us an op where an RMSNorm's, a rotary embedding's and a residual's ops cost 2.5 us, on this
  machine under load); ``view_s``: the same for views (no kernel, no allocation); ``record_s``: what
  autograd recording adds to an op that computes (training; ``_kernel_ops``);
* ``kernels`` (since version 6; measured this way since version 8): the fixed cost of one kernel of each
  memory-bound op kind the generated decoder programs call (``KERNEL_OPS``: residual adds, scalings, norms,
  rotary halves, the KV cache's indexed write, ...) beyond a plain op's (``PLAIN_KINDS``: the kinds
  ``dispatch_s`` is measured on). A program runs a straight sequence of ops of many kinds, once each, and its
  step repeats that sequence: so the probe is a sequence of every kind (each on activations of its own, in
  the generated program's style; an op a program writes in two forms, a tensor operand and a Python number,
  appears in both: ``add``, ``mul``, ``pow``), timed as a whole like the dispatch probe, and a kind's figure
  is what one more call of it costs, inserted half-way round the sequence among the other kinds: the time
  of the longer sequence less the sequence's. At (rows, ``KERNEL_HIDDEN``) float32 activations of
  ``KERNEL_ROWS`` rows (a decode step's 4 rows up to a prefill's 256; each point the median of
  ``KERNEL_ROUNDS`` rounds over every size and kind), a line ``t = c + s x elements`` through the four by
  :func:`fit_line_robust` (Siegel's repeated median: one sample a load disturbed does not move it); ``c`` less
  the plain kinds' median ``c`` (never below 0) is the kind's ``kernel_overhead_s``. Version 6 timed each
  kind alone after the dispatch probe's ops (``in_program``): in the generated GPT-2 tiny decode program on one
  thread one more ``layer_norm``, ``index_copy_``, ``mul``, ``clone`` cost 3.9, 3.8, 4.0, 1.6 us, where that
  probe gave 7.2-7.7, 6.7 and 6.0 (dispatch included) and priced the step 41% above its measured 392 us (the
  price without kind costs: +3%). With several intra-op threads, ``parallel``: one more ``add`` of
  ``PARALLEL_ROWS`` rows (above ``PARALLEL_GRAIN`` elements: split over the threads) in the same sequence, its
  line's intercept beyond the serial add's: the threads' fork and join (``parallel_overhead_s``). Since
  version 10 the kinds' sequences run on one thread whatever the process's budget (on two threads ATen splits
  its vectorized math ops from 2,048 elements and a norm from one row, so a line through sizes straddling that
  measured the fork and join, under load a preempted thread's time slice: 7-8 ms for tanh, sin, cos,
  layer_norm at load 2.9). Since version 11 also the matmul kinds the programs write (``GEMM_KINDS``: GPT-2's
  ``addmm``; Llama's ``linear`` on a 3-D activation, which PyTorch runs as a transpose, reshapes and an ``mm``,
  each dispatched) and a plain ``mm``, each as one more call in a sequence of the plain kinds on decode rows
  (a sequence holding matmuls of every size was unstable: whole sizes read 0 or 50 us), the kind's intercept
  beyond the ``mm``'s (which ``gemm_overhead_s`` prices). The per-element math figures below are net of the
  kind's fixed cost;
* ``backward_node_s``: one node of the autograd engine's backward (a chain of tiny ops: forward and
  backward minus forward, per node);
* ``gemm``: float32 matmuls of square sizes 64..512 (``GEMM_SIZES``): the achieved rate and fixed cost by a
  fit of ``t = c + flops / rate`` (least squares on relative error);
* ``attention``: ``scaled_dot_product_attention`` forward and backward on one shape (``ATTENTION_SHAPE``),
  as a fraction of the matmul rate on the registry's FLOP count (4 b h s^2 d + 5 b h s^2); since version 4
  the forward's rate and fixed cost (``attention_overhead_s``, beyond ``dispatch_s``) are a line through
  causal calls of sequences ``ATTENTION_SEQS`` (a decode step's call is tiny: its fixed cost is its price);
* ``stream``: ``a + b`` (into a preallocated result) on float32 vectors of growing working sets
  (``CACHE_PROBES``, then ``MEMORY_PROBE_BYTES``, beyond the caches), less ``dispatch_s`` (the price of a
  memory-bound op is its launch plus its bytes at the bandwidth): bytes read and written per second at each. The largest
  working set that still streams at least half-way between the smallest's bandwidth and the memory's is the
  cache's size (``cache_bytes``), the smallest's bandwidth the cache's;
* ``elementwise``: for each op of ``ELEMENTWISE_OPS`` (math functions whose cost per element exceeds
  streaming: exponentials, trigonometry, normalizations, softmax), seconds per element of its forward and
  of its backward on a cache-resident tensor (``ELEMENTWISE_SHAPE``), minus ``dispatch_s`` (and, since
  version 6, the forward minus its kind's ``kernel_overhead_s`` too: a fixed cost is not a cost per element);
* ``p2p``: gloo send/recv ping-pong between ranks 0 and 1: alpha = half a 4-byte round trip, beta from a
  ``P2P_LARGE`` message;
* ``allreduce`` / ``allgather`` / ``reduce_scatter``: the runtime library's own functions
  (``shardwise.runtime.lib.comm``, what every generated program calls) at ``COLLECTIVE_SIZES``, in runs
  (see above); a line
  through each gives its fixed cost beyond the ring formula's latency terms, and its bandwidth as a
  fraction of the point-to-point one (the cluster keeps the mean of the three);
* ``object_gather``: ``dist.gather_object`` of a tensor (``OBJECT_SIZES``) from the last rank to rank 0, as a
  pipeline's inference hands rank 0 its outputs (pickled): a fixed cost and seconds per byte;
* ``overlap``: an all-reduce started asynchronously while the process computes matmuls, against each
  alone: the fraction of the shorter one hidden (1: collectives progress while the host computes);
* ``optimizer``: ``torch.optim.AdamW`` and ``SGD`` (momentum) steps as PyTorch runs them on CPU tensors
  (one tensor at a time) over many tiny tensors and over one large one: the cost per parameter tensor and
  the bytes streamed per second.

``quick`` keeps the measurements to a few seconds (plus process start-up); ``quick=False`` takes more
samples.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from shardwise.cluster.efficiency import Efficiency
from shardwise.cluster.presets import CPU_GLOO_BANDWIDTH, CPU_GLOO_LATENCY, cpu_cluster
from shardwise.cluster.spec import ClusterSpec
from shardwise.errors import DeviceUnavailableError

__all__ = [
    "calibrate", "measure", "spec_from_measurements", "fit_line", "fit_line_robust", "Measurement", "SAMPLE_S", "GEMM_SIZES",
    "ELEMENTWISE_OPS", "KERNEL_OPS", "GEMM_KINDS", "KERNEL_ROWS", "PARALLEL_ROWS", "kernel_overheads", "parallel_overhead", "COLLECTIVE_SIZES", "COLLECTIVE_RUN",
    "COMPUTE_RUN", "run_per_call", "in_program", "min_of_medians", "COLLECTIVE_GROUPS",
]  # fmt: skip

Measurement = dict[str, Any]

SAMPLE_S = 1e-3  # one sample's length: about a scheduler time slice
GEMM_SIZES = (64, 128, 256, 384, 512)
ATTENTION_SHAPE = (4, 4, 64, 32)  # batch, heads, sequence, head dim
#: sequence lengths of the forward attention calls a line is fitted through (the fixed cost and the rate)
ATTENTION_SEQS = (8, 32, 64, 128)
#: working sets (bytes read and written) of the a + b probes: 128 KiB .. 8 MiB vectors, then 32 MiB ones
CACHE_PROBES = (3 * 2**17, 3 * 2**19, 3 * 2**21, 3 * 2**23)
MEMORY_PROBE_BYTES = 3 * 2**25
ELEMENTWISE_SHAPE = (128, 256)
#: math ops whose cost per element exceeds streaming on CPUs (ATen base names, as in the op registry)
ELEMENTWISE_OPS = (
    "exp", "log", "sqrt", "rsqrt", "sin", "cos", "tanh", "sigmoid", "erf", "gelu", "gelu_tanh", "silu", "pow",
    "softmax", "log_softmax", "layer_norm", "cumsum",
)  # fmt: skip
#: memory-bound op kinds whose fixed cost per kernel is measured (price-list names, ``costs.compute.op_work``'s
#: ``op``): those the zoo's GPT-2 and Llama programs call in every layer or step; other kinds pay dispatch_s alone
KERNEL_OPS = (
    "add", "mul", "neg", "clone", "cat", "pow", "rsqrt", "mean", "tanh", "silu", "sin", "cos", "layer_norm",
    "index_copy", "embedding", "masked_fill",
)  # fmt: skip
#: matmul kinds the programs call whose fixed cost beyond a plain ``mm``'s (which ``gemm_overhead_s`` prices) is
#: measured: ``addmm`` (GPT-2's Conv1D: a bias), ``linear`` (Llama's Linear on a (batch, sequence, hidden)
#: activation: PyTorch runs a transpose, reshapes and an mm, each dispatched)
GEMM_KINDS = ("addmm", "linear")
#: the kinds priced at their launch and bytes alone (``dispatch_s``: ``_plain_ops``' kinds): the others' fixed costs
#: are what they cost beyond these, in the same probe
PLAIN_KINDS = ("add", "mul", "neg", "clone", "cat", "embedding", "masked_fill")
#: rows of the (rows, KERNEL_HIDDEN) activations the kernel probes run on: a decode step's batch to a prefill's
KERNEL_ROWS = (4, 16, 64, 256)
KERNEL_HIDDEN = 64
#: rows of the add calls (x KERNEL_HIDDEN elements: above ``PARALLEL_GRAIN``) a process with several intra-op
#: threads splits over them: its fork and join's fixed cost (``parallel_overhead_s``)
PARALLEL_ROWS = (1024, 2048, 4096)
#: rounds of the kernel probes; each point is the median of its rounds' figures
KERNEL_ROUNDS = 3
OPTIMIZER_POINTS = ((1, 16), (32, 16), (1, 2**18))  # (tensors, elements each)
P2P_LARGE = 2**22
COLLECTIVE_SIZES = (2**6, 2**12, 2**16, 2**20)
#: calls of one collective sample, and the ops each call follows: the dispatch probe's tiny ops in the
#: generated program's style (``_kernel_ops``), this many times (about 30 ops, a decode layer's share between
#: two of its collectives): a program reaches each collective after its ops, the library's threads idle meanwhile
COLLECTIVE_RUN = 8
COLLECTIVE_GAP = 2
#: consecutive groups of a collective's samples: its figure is the least of the groups' median runs
COLLECTIVE_GROUPS = 3
#: calls of one compute sample (matmuls, attention, math ops, streaming), each after one round of the dispatch
#: probe's tiny ops (``_kernel_ops``: 14 ops of other kinds, as an op of a program follows the ops written
#: between it and the previous op of its kind); a matmul or attention call of a run reads its own weight
#: operand (each of a program's matmuls reads its own weights, once a step), and the activation operand is
#: shared (a program's op reads what the op before it has just written)
COMPUTE_RUN = 8
COMPUTE_GAP = 1
OBJECT_SIZES = (2**12, 2**20)
#: the collectives plans use, and the ring formula's latency steps for p ranks (costs/comm.py; gloo has no
#: reduce-scatter: the runtime library all-reduces and keeps its slice)
COLLECTIVES = {"allreduce": lambda p: 2 * (p - 1), "allgather": lambda p: p - 1, "reduce_scatter": lambda p: 2 * (p - 1)}


# -- timing -----------------------------------------------------------------------------------------------


def _compute_clock() -> Callable[[], float]:
    """The clock compute figures are read on: this thread's CPU time when the process computes on one
    thread (other processes' preemption adds wall time, never CPU time), else the wall clock."""
    import torch

    return time.thread_time if torch.get_num_threads() == 1 else time.perf_counter


def _per_call(
    fn: Callable[[], object], samples: int, sample_s: float = SAMPLE_S, max_calls: int = 2000
) -> list[float]:
    """Seconds per call of ``fn`` in each of ``samples`` samples of about ``sample_s`` (module docstring)."""
    clock = _compute_clock()
    fn()  # warm-up: allocations, caches, the thread pool
    start = time.perf_counter()
    fn()
    one = max(time.perf_counter() - start, 1e-7)
    calls = max(1, min(max_calls, int(sample_s / one)))
    out = []
    for _ in range(samples):
        start = clock()
        for _ in range(calls):
            fn()
        out.append((clock() - start) / calls)
    return out


def _best(fn: Callable[[], object], samples: int, sample_s: float = SAMPLE_S) -> float:
    return min(_per_call(fn, samples, sample_s))


def fit_line(xs: Sequence[float], ys: Sequence[float], relative: bool = True) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line ``y = c + s x`` (weighted by 1/y^2 when ``relative``:
    each point's relative error counts alike); the intercept is clipped at 0."""
    if len(xs) != len(ys) or len(xs) < 2:
        raise ValueError("fit_line needs two or more points")
    w = [1.0 / (y * y) if relative and y > 0 else 1.0 for y in ys]
    sw = sum(w)
    mx = sum(wi * x for wi, x in zip(w, xs)) / sw
    my = sum(wi * y for wi, y in zip(w, ys)) / sw
    sxx = sum(wi * (x - mx) ** 2 for wi, x in zip(w, xs))
    sxy = sum(wi * (x - mx) * (y - my) for wi, x, y in zip(w, xs, ys))
    slope = sxy / sxx if sxx > 0 else 0.0
    intercept = my - slope * mx
    if intercept < 0:  # no negative fixed cost: the line through the origin instead
        intercept = 0.0
        slope = sum(wi * x * y for wi, x, y in zip(w, xs, ys)) / sum(wi * x * x for wi, x in zip(w, xs))
    return intercept, slope


def fit_line_robust(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """(intercept, slope) of the line ``y = c + s x`` by Siegel's repeated median: each point's median slope to
    the others, ``s`` the median of those, ``c`` the median of ``y - s x``; one point of four off the line (a
    disturbed sample) moves neither. The intercept is clipped at 0."""
    if len(xs) != len(ys) or len(xs) < 2:
        raise ValueError("fit_line_robust needs two or more points")
    each = []
    for i, (xi, yi) in enumerate(zip(xs, ys, strict=True)):
        slopes = [(yj - yi) / (xj - xi) for j, (xj, yj) in enumerate(zip(xs, ys, strict=True)) if j != i and xj != xi]
        if slopes:
            each.append(statistics.median(slopes))
    slope = statistics.median(each) if each else 0.0
    intercept = statistics.median(y - slope * x for x, y in zip(xs, ys, strict=True))
    return max(intercept, 0.0), slope


# -- what one process measures ----------------------------------------------------------------------------


def _kernel_ops(x, w, idx, emb, mask):  # noqa: ANN001, ANN202 - ops that compute, in a generated program's style
    import torch
    import torch.nn.functional as F

    aten = torch.ops.aten
    a = x + w
    b = a * 0.5
    c = torch.tanh(b)
    f = aten.mul.Tensor(c, c)
    h = aten.exp.default(f)
    i = F.layer_norm(x, [4], None, None, 1e-5)
    j = torch.softmax(i, -1)
    k = aten.matmul.default(j, w)
    m = k.sum(-1)
    n = torch.where(mask, x, w)
    o = F.embedding(idx, emb)
    p = aten.cat.default([x, w])
    q = aten.rsqrt.default(x)
    s = F.gelu(x)
    return h, m, n, o, p, q, s


def _view_ops(x):  # noqa: ANN001, ANN202 - views, in a generated program's style
    import torch

    aten = torch.ops.aten
    d = x.transpose(0, 1)
    e = d.reshape(-1)
    g = e.unsqueeze(0)
    r = x.expand(2, 4, 4)
    t = aten.slice.Tensor(x, 1, 0, 2)
    v = aten.view.default(x, [2, 8])
    return g, r, t, v


def _plain_ops(x, w, idx, emb, mask):  # noqa: ANN001, ANN202 - ops priced at their launch and bytes alone
    import torch
    import torch.nn.functional as F

    aten = torch.ops.aten
    a = x + w
    b = a * 0.5
    c = aten.neg.default(b)
    d = a - c
    e = x.to(dtype=torch.float32, copy=True)
    f = aten.cat.default([x, w])
    g = x.sum(-1)
    h = x.mean(-1, keepdim=True)
    i = torch.where(mask, x, w)
    j = x <= w
    k = j & mask
    m = F.embedding(idx, emb)
    n = x.clone()
    o = aten.masked_fill.Scalar(x, mask, 0.0)
    return d, e, f, g, h, i, k, m, n, o


_KERNEL_OPS = 14  # statements in _kernel_ops
_PLAIN_OPS = 14  # statements in _plain_ops
_VIEW_OPS = 6  # statements in _view_ops


def _measure_dispatch(samples: int) -> Measurement:
    import torch

    x, w, emb = torch.rand(4, 4) + 0.5, torch.randn(4, 4), torch.randn(4, 4)
    idx, mask = torch.tensor([0, 1]), torch.rand(4, 4) > 0.5
    with torch.no_grad():
        plain = _best(lambda: _plain_ops(x, w, idx, emb, mask), samples) / _PLAIN_OPS
        kernels = _best(lambda: _kernel_ops(x, w, idx, emb, mask), samples) / _KERNEL_OPS
        views = _best(lambda: _view_ops(x), samples) / _VIEW_OPS
    xg, wg, eg = (t.clone().requires_grad_() for t in (x, w, emb))
    recorded = _best(lambda: _kernel_ops(xg, wg, idx, eg, mask), samples) / _KERNEL_OPS
    return {"dispatch_s": plain, "view_s": views, "record_s": max(recorded - kernels, 0.0)}


def _kernel_calls(op: str, rows: int) -> list[Callable[[], object]]:
    """Calls of op kind ``op`` on a (``rows``, ``KERNEL_HIDDEN``) activation, in a generated program's style (the
    forms a program writes it in, taken in turn by :func:`in_program`)."""
    import torch
    import torch.nn.functional as F

    hidden = KERNEL_HIDDEN
    x, y = torch.rand(rows, hidden) + 0.5, torch.rand(rows, hidden)
    w, b = torch.rand(hidden), torch.rand(hidden)
    left, right = x[:, : hidden // 2], x[:, hidden // 2 :]
    cache = torch.zeros(4, 4, max(KERNEL_ROWS) // 4, hidden // 4)  # a KV cache: batch 4, 4 heads, slots, head dim
    slots = torch.arange(rows // 4)
    written = torch.rand(4, 4, rows // 4, hidden // 4)
    table, ids = torch.randn(128, hidden), torch.randint(0, 128, (rows,))
    mask = torch.rand(rows, hidden) > 0.5
    calls: dict[str, list[Callable[[], object]]] = {
        "add": [lambda: x + y, lambda: x + 1e-05],
        "mul": [lambda: x * y, lambda: x * 0.5],
        "neg": [lambda: torch.neg(x)],
        "clone": [lambda: x.clone()],
        "cat": [lambda: torch.cat([right, left], -1)],
        "pow": [lambda: x.pow(2), lambda: x**3.0],
        "rsqrt": [lambda: torch.rsqrt(x)],
        "mean": [lambda: x.mean(-1, keepdim=True)],
        "tanh": [lambda: torch.tanh(x)],
        "silu": [lambda: F.silu(x)],
        "sin": [lambda: torch.sin(x)],
        "cos": [lambda: torch.cos(x)],
        "layer_norm": [lambda: F.layer_norm(x, [hidden], w, b, 1e-05)],
        "index_copy": [lambda: cache.index_copy_(2, slots, written)],
        "embedding": [lambda: F.embedding(ids, table)],
        "masked_fill": [lambda: x.masked_fill(mask, 0.0)],
    }
    return calls[op]


def _run_all(calls: Sequence[Callable[[], object]]) -> Callable[[], None]:
    def run() -> None:
        for call in calls:
            call()

    return run


def _matmul_call(kind: str, rows: int) -> Callable[[], object]:
    """A matmul of kind ``kind`` (``mm`` or one of ``GEMM_KINDS``) of a (``rows``, ``KERNEL_HIDDEN``) activation
    by a square weight of its own, as the programs write it."""
    import torch
    import torch.nn.functional as F

    x, weight, bias = torch.rand(rows, KERNEL_HIDDEN), torch.randn(KERNEL_HIDDEN, KERNEL_HIDDEN), torch.rand(KERNEL_HIDDEN)
    x3 = x.view(4, rows // 4, KERNEL_HIDDEN)
    calls = {"mm": lambda: torch.mm(x, weight), "addmm": lambda: torch.addmm(bias, x, weight),
             "linear": lambda: F.linear(x3, weight.t())}  # fmt: skip
    return calls[kind]


def _measure_kernels(samples: int) -> Measurement:
    """(elements, seconds per call) of each ``KERNEL_OPS`` kind at ``KERNEL_ROWS`` rows, each the cost of one more
    call of the kind in a sequence of every kind (module docstring), on one thread (a kernel's own fixed cost; on
    several threads some kinds split from 2,048 elements or one row on, which is the fork and join's cost, not
    the kind's); with more than one intra-op thread, also ``parallel``: one more ``add`` of ``PARALLEL_ROWS``
    rows, split over the process's threads, in the same kind of sequence."""
    import torch

    threads = torch.get_num_threads()
    times: dict[tuple[str, int], list[float]] = {}

    def one_more(rows: int, kinds: Sequence[str]) -> None:
        calls = {op: _kernel_calls(op, rows) for op in kinds}
        sequence = [c for op in KERNEL_OPS for c in _kernel_calls(op, min(rows, KERNEL_ROWS[-1]))]
        base = _best(_run_all(sequence), samples)
        for k, op in enumerate(kinds):
            at = (k * len(sequence) // len(kinds) + len(sequence) // 2) % len(sequence)  # among other kinds
            more = _best(_run_all(sequence[:at] + calls[op] + sequence[at:]), samples)
            times.setdefault((op, rows), []).append(max(more - base, 0.0) / len(calls[op]))

    def one_more_matmul(rows: int) -> None:  # in a sequence of the plain kinds on decode rows: no matmul in it
        sequence = [c for op in PLAIN_KINDS for c in _kernel_calls(op, KERNEL_ROWS[0])]
        base = _best(_run_all(sequence), samples)
        for kind in ("mm", *GEMM_KINDS):
            more = _best(_run_all([*sequence[: len(sequence) // 2], _matmul_call(kind, rows),
                                   *sequence[len(sequence) // 2 :]]), samples)  # fmt: skip
            times.setdefault((kind, rows), []).append(max(more - base, 0.0))

    with torch.no_grad():
        for _ in range(KERNEL_ROUNDS):  # rounds over every size and kind: a burst of load meets one round of a point
            torch.set_num_threads(1)
            try:
                for rows in KERNEL_ROWS:
                    one_more(rows, KERNEL_OPS)
                    one_more_matmul(rows)
            finally:
                torch.set_num_threads(threads)
            if threads > 1:
                for rows in PARALLEL_ROWS:
                    one_more(rows, ("add",))
    out: Measurement = {
        "kernels": {op: [(float(rows * KERNEL_HIDDEN), statistics.median(times[op, rows])) for rows in KERNEL_ROWS]
                    for op in (*KERNEL_OPS, "mm", *GEMM_KINDS)},
    }  # fmt: skip
    if threads > 1:
        out["parallel"] = [(float(rows * KERNEL_HIDDEN), statistics.median(times["add", rows])) for rows in PARALLEL_ROWS]
    return out


def parallel_overhead(results: Sequence[Measurement]) -> float:
    """The fixed cost an op split over a process's intra-op threads pays beyond one run on its own thread: the
    intercept of the slowest process's line through its ``parallel`` add calls beyond that of its serial add calls
    (``kernels``); 0 for one-thread processes (no ``parallel``)."""
    if not all("parallel" in r and "kernels" in r for r in results):
        return 0.0
    split = max(fit_line_robust(*zip(*r["parallel"], strict=True))[0] for r in results)
    serial = max(fit_line_robust(*zip(*r["kernels"]["add"], strict=True))[0] for r in results)
    return max(split - serial, 0.0)


def kernel_overheads(results: Sequence[Measurement]) -> dict[str, float]:
    """Each measured op kind's fixed cost per kernel beyond a plain op's (``PLAIN_KINDS``, priced at ``dispatch_s``):
    the intercept of the slowest process's line through its sizes less the median intercept of the plain kinds
    (both from the same sequence probe), never below 0: ``efficiency.kernel_overhead_s``; a matmul kind
    (``GEMM_KINDS``) beyond a plain ``mm``'s intercept. {} for measurements without kernels (calibration version 5
    and earlier)."""
    if not all("kernels" in r for r in results):
        return {}
    intercept = {op: max(fit_line_robust(*zip(*r["kernels"][op], strict=True))[0] for r in results)
                 for op in results[0]["kernels"]}  # fmt: skip
    plain = statistics.median(intercept[op] for op in PLAIN_KINDS if op in intercept)
    fixed = {op: max(c - plain, 0.0) for op, c in intercept.items() if op not in ("mm", *GEMM_KINDS)}
    if "mm" in intercept:  # a matmul kind beyond a plain mm's (its own fixed cost: gemm_overhead_s)
        fixed.update({op: max(intercept[op] - intercept["mm"], 0.0) for op in GEMM_KINDS if op in intercept})
    return fixed


def _measure_backward(samples: int) -> Measurement:
    import torch

    length = 16  # 4 ops each: 64 nodes, plus the sum and the leaf's accumulation

    def chain(p):  # noqa: ANN001, ANN202
        y = p
        for _ in range(length):
            y = torch.tanh(y * 1.0001 + p).reshape(-1).reshape(4, 4)
        return y.sum()

    leaf = torch.randn(4, 4, requires_grad=True)
    forward = _best(lambda: chain(leaf), samples, 4 * SAMPLE_S)

    def both() -> None:
        chain(leaf).backward()
        leaf.grad = None

    total = _best(both, samples, 4 * SAMPLE_S)
    nodes = 5 * length + 2  # mul, add, tanh, 2 views per link; sum; AccumulateGrad
    return {"backward_node_s": max(total - forward, 0.0) / nodes}


def _measure_gemm(samples: int) -> Measurement:
    import torch

    points = []
    with torch.no_grad():
        for n in GEMM_SIZES:
            a, weights = torch.randn(n, n), [torch.randn(n, n) for _ in range(COMPUTE_RUN)]
            calls = [lambda a=a, b=b: torch.mm(a, b) for b in weights]
            points.append((2.0 * n**3, in_program(calls, samples)))
    return {"gemm": points}


def _measure_attention(samples: int) -> Measurement:
    import torch
    import torch.nn.functional as F

    b, h, s, d = ATTENTION_SHAPE
    q = torch.randn(b, h, s, d, requires_grad=True)
    kvs = [(torch.randn(b, h, s, d, requires_grad=True), torch.randn(b, h, s, d, requires_grad=True))
           for _ in range(COMPUTE_RUN)]  # fmt: skip
    flops = 4.0 * b * h * s * s * d + 5.0 * b * h * s * s
    with torch.no_grad():
        forward = in_program(
            [lambda k=k, v=v: F.scaled_dot_product_attention(q, k, v, is_causal=True) for k, v in kvs],
            samples,
        )
        points = []  # forward calls of other lengths: a line through them gives the fixed cost and the rate
        for n in ATTENTION_SEQS:
            qn = torch.randn(b, h, n, d)
            kvn = [(torch.randn(b, h, n, d), torch.randn(b, h, n, d)) for _ in range(COMPUTE_RUN)]
            calls = [lambda k=k, v=v, qn=qn: F.scaled_dot_product_attention(qn, k, v, is_causal=True) for k, v in kvn]
            points.append((4.0 * b * h * n * n * d + 5.0 * b * h * n * n, in_program(calls, samples)))
    grad = torch.ones(b, h, s, d)

    def both(k, v) -> None:  # noqa: ANN001
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        torch.autograd.grad(out, (q, k, v), grad)

    total = in_program([lambda k=k, v=v: both(k, v) for k, v in kvs], samples)
    return {"attention": {"flops": flops, "forward_s": forward, "backward_s": max(total - forward, 0.0),
                          "forward_points": points}}  # fmt: skip


def _measure_stream(samples: int, dispatch_s: float) -> Measurement:
    import torch

    out = []
    for nbytes in (*CACHE_PROBES, MEMORY_PROBE_BYTES):
        numel = nbytes // 12
        a, b, result = torch.rand(numel), torch.rand(numel), torch.empty(numel)
        count = samples if nbytes < MEMORY_PROBE_BYTES else max(3, samples // 3)
        # into a buffer allocated once: a new 32 MiB result would be a fresh mapping from the C library
        # (glibc maps 32 MiB and more on every allocation) and its page faults would be timed as streaming
        seconds = in_program([lambda a=a, b=b, r=result: torch.add(a, b, out=r)], count)
        out.append((12.0 * numel, max(seconds - dispatch_s, 1e-9)))
    return {"stream": out}


def _elementwise_fn(name: str):  # noqa: ANN202
    import torch
    import torch.nn.functional as F

    table = {
        "exp": torch.exp, "log": torch.log, "sqrt": torch.sqrt, "rsqrt": torch.rsqrt, "sin": torch.sin,
        "cos": torch.cos, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "erf": torch.erf, "gelu": F.gelu,
        "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "silu": F.silu, "pow": lambda x: x.pow(3),
        "softmax": lambda x: torch.softmax(x, -1), "log_softmax": lambda x: torch.log_softmax(x, -1),
        "layer_norm": lambda x: F.layer_norm(x, x.shape[-1:]), "cumsum": lambda x: torch.cumsum(x, -1),
    }  # fmt: skip
    return table[name]


def _measure_elementwise(samples: int, dispatch_s: float, backward_node_s: float) -> Measurement:
    import torch

    x = (torch.rand(*ELEMENTWISE_SHAPE) + 0.5).requires_grad_()
    numel = x.numel()
    grad = torch.ones_like(x)
    out = {}
    for name in ELEMENTWISE_OPS:
        fn = _elementwise_fn(name)
        with torch.no_grad():
            forward = in_program([lambda fn=fn: fn(x)], samples)

        def both(fn=fn) -> None:  # noqa: ANN001
            torch.autograd.grad(fn(x), x, grad)

        total = in_program([both], samples)
        out[name] = (
            max(forward - dispatch_s, 0.0) / numel,
            max(total - forward - backward_node_s, 0.0) / numel,
        )
    return {"elementwise": out}


def _measure_optimizer(samples: int) -> Measurement:
    import torch

    def step_s(factory, count: int, numel: int) -> float:  # noqa: ANN001
        params = [torch.nn.Parameter(torch.rand(numel)) for _ in range(count)]
        for p in params:
            p.grad = torch.rand(numel)
        opt = factory(params)
        return _best(opt.step, samples, 4 * SAMPLE_S)

    out = {}
    for name, factory in (
        ("adamw", lambda ps: torch.optim.AdamW(ps, lr=1e-3)),
        ("sgd", lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9)),
    ):
        # (tensors, elements, seconds) at three points: one tiny tensor, many tiny ones, one large one
        out[name] = [(t, t * e, step_s(factory, t, e)) for t, e in OPTIMIZER_POINTS]
    return {"optimizer": out}


def _pingpong(rank: int, nbytes: int, samples: int) -> float:
    """Least one-way time of a ``nbytes`` message between ranks 0 and 1 (half a round trip)."""
    import torch
    import torch.distributed as dist

    buf = torch.zeros(max(1, nbytes // 4))

    def round_trip() -> None:
        if rank == 0:
            dist.send(buf, 1)
            dist.recv(buf, 1)
        else:
            dist.recv(buf, 0)
            dist.send(buf, 0)

    round_trip()  # the first message sets up the pair
    times = []
    for _ in range(samples):
        start = time.perf_counter()
        round_trip()
        times.append(time.perf_counter() - start)
    return min(times) / 2


def run_per_call(
    call: Callable[[], object], gap: Callable[[], object], calls: int, samples: int,
    sync: Callable[[], object] = lambda: None, clock: Callable[[], float] = time.perf_counter,
    statistic: Callable[[list[float]], float] = min,
) -> float:  # fmt: skip
    """Least (``statistic``: another one, e.g. the median) over ``samples`` runs of the seconds per ``call`` in a
    run of ``calls`` calls, each after ``gap()`` (after ``sync()``, the same runs of ``gap()`` alone, taken by the
    same statistic, are subtracted): the mean cost of a call as a program pays it, in the least disturbed run
    (module docstring), read on ``clock``. Never below 0."""
    call()
    gap()
    both, alone = [], []
    for _ in range(samples):
        sync()
        start = clock()
        for _ in range(calls):
            gap()
            call()
        both.append((clock() - start) / calls)
        sync()
        start = clock()
        for _ in range(calls):
            gap()
        alone.append((clock() - start) / calls)
    return max(statistic(both) - statistic(alone), 0.0)


def _program_gap(rounds: int) -> Callable[[], object]:
    """What a sample runs before each call: ``rounds`` rounds of the dispatch probe's tiny ops (a generated
    program's other ops; ``COMPUTE_GAP`` before a compute call, ``COLLECTIVE_GAP`` before a collective)."""
    import torch

    x, w, emb = torch.rand(4, 4) + 0.5, torch.randn(4, 4), torch.randn(4, 4)
    idx, mask = torch.tensor([0, 1]), torch.rand(4, 4) > 0.5

    def gap() -> None:
        with torch.no_grad():
            for _ in range(rounds):
                _kernel_ops(x, w, idx, emb, mask)

    return gap


def in_program(calls: Sequence[Callable[[], object]], samples: int) -> float:
    """Seconds per call of a compute op as a generated program pays it (module docstring): runs of
    ``COMPUTE_RUN`` calls taking ``calls`` in turn (one per weight operand), each after the program's other
    ops (:func:`_program_gap`, subtracted), on the compute clock; the least disturbed run."""
    turn = [0]

    def call() -> None:
        calls[turn[0] % len(calls)]()
        turn[0] += 1

    return run_per_call(call, _program_gap(COMPUTE_GAP), COMPUTE_RUN, samples, clock=_compute_clock())


def _collective(kind: str, nbytes: int, mesh: Any, samples: int) -> float:
    """Seconds per call of one collective as the runtime library runs it (``shardwise.runtime.lib.comm``, the
    code every generated program calls; ``nbytes``: the full buffer), in runs after compute
    (:func:`run_per_call`): all-reduce into a new tensor, all-gather along the middle dimension of a (batch,
    sequence, hidden) activation, reduce-scatter along it."""
    import torch
    import torch.distributed as dist

    from shardwise.runtime.lib import comm

    world = mesh.size("x")
    hidden = 16
    rows = max(1, nbytes // 4 // hidden)
    if kind == "allreduce":
        full = torch.zeros(1, rows, hidden)

        def run() -> None:
            comm.reduce(full, mesh, "x", "sum")

    elif kind == "allgather":
        piece = torch.zeros(1, max(1, rows // world), hidden)

        def run() -> None:
            comm.gather(piece, 1, mesh, "x")

    else:
        full = torch.zeros(1, max(world, rows - rows % world), hidden)

        def run() -> None:
            comm.reduce_scatter(full, 1, mesh, "x", "sum")

    return run_per_call(run, _program_gap(COLLECTIVE_GAP), COLLECTIVE_RUN, samples, dist.barrier, statistic=min_of_medians)


def min_of_medians(values: Sequence[float], groups: int | None = None) -> float:
    """The least of the medians of ``groups`` (``COLLECTIVE_GROUPS``) consecutive groups of ``values`` (samples in
    the order taken): the typical sample of the least disturbed stretch. One group: the median."""
    groups = max(1, min(groups or COLLECTIVE_GROUPS, len(values)))
    size = len(values) // groups
    cuts = [values[k * size : (k + 1) * size if k < groups - 1 else len(values)] for k in range(groups)]
    return min(statistics.median(cut) for cut in cuts)


def _object_gather(rank: int, world: int, nbytes: int, samples: int) -> float:
    """Least time of ``dist.gather_object`` to rank 0 of a float32 tensor of ``nbytes`` from the last rank
    (the others send None), as a pipeline's ``infer`` gathers its last stage's outputs."""
    import torch
    import torch.distributed as dist

    obj = torch.zeros(max(1, nbytes // 4)) if rank == world - 1 else None

    def run() -> None:
        dist.gather_object(obj, [None] * world if rank == 0 else None, dst=0)

    run()
    times = []
    for _ in range(samples):
        dist.barrier()
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def _measure_comm(rank: int, world: int, samples: int) -> Measurement:
    import torch
    import torch.distributed as dist

    out: Measurement = {}
    if rank < 2:
        small = _pingpong(rank, 4, 10 * samples)
        large = _pingpong(rank, P2P_LARGE, samples)
        out["p2p"] = {"small": (4.0, small), "large": (float(P2P_LARGE), large)}
    dist.barrier()
    from shardwise.runtime.lib.mesh import Mesh

    mesh = Mesh(rank, (world,), ("x",), tuple(range(world)))
    for kind in COLLECTIVES:
        out[kind] = [(float(n), _collective(kind, n, mesh, samples)) for n in COLLECTIVE_SIZES]
    # an object gather to rank 0 (pickled tensors: how a pipeline's inference hands rank 0 its outputs)
    out["object_gather"] = [(float(n), _object_gather(rank, world, n, samples)) for n in OBJECT_SIZES]
    # overlap: an all-reduce started, then matmuls, then the wait; against each alone
    a, b = torch.randn(192, 192), torch.randn(192, 192)
    buf = torch.zeros(2**18)

    def compute() -> None:
        for _ in range(4):
            torch.mm(a, b)

    def comm() -> None:
        dist.all_reduce(buf, async_op=True).wait()

    def both() -> None:
        work = dist.all_reduce(buf, async_op=True)
        compute()
        work.wait()

    figures = {}
    for name, fn in (("compute", compute), ("comm", comm), ("both", both)):
        fn()
        times = []
        for _ in range(samples):
            dist.barrier()
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        figures[name] = min(times)
    out["overlap"] = figures
    return out


def measure(rank: int, world: int, quick: bool = True) -> Measurement:
    """Everything one of ``world`` processes measures (torch.distributed is initialised; all ranks call it)."""
    import torch.distributed as dist

    samples = 15 if quick else 40
    result: Measurement = {"phase_s": {}}
    phases: list[tuple[str, Callable[[], Measurement]]] = [
        ("dispatch", lambda: _measure_dispatch(samples)),
        ("backward", lambda: _measure_backward(samples)),
        ("gemm", lambda: _measure_gemm(samples)),
        ("attention", lambda: _measure_attention(samples)),
        ("kernels", lambda: _measure_kernels(samples)),
        ("stream", lambda: _measure_stream(samples, result["dispatch_s"])),
        (
            "elementwise",
            lambda: _measure_elementwise(samples, result["dispatch_s"], result["backward_node_s"]),
        ),
        ("optimizer", lambda: _measure_optimizer(samples)),
    ]
    if world >= 2:
        phases.append(("comm", lambda: _measure_comm(rank, world, samples)))
    for name, run in phases:
        dist.barrier()
        start = time.perf_counter()
        result.update(run())
        result["phase_s"][name] = time.perf_counter() - start
    dist.barrier()
    return result


# -- the cluster from the measurements ---------------------------------------------------------------------


def _solve3(rows: Sequence[tuple[float, float, float, float]]) -> tuple[float, float, float]:
    """(x, y, z) with ``a x + b y + c z = d`` for the three rows ``(a, b, c, d)`` (Cramer's rule)."""

    def det(m: Sequence[Sequence[float]]) -> float:
        return (m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1]) - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
                + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0]))  # fmt: skip

    a = [r[:3] for r in rows]
    d = det(a)
    if d == 0:
        raise ValueError("the three measurements do not determine the three figures")
    out = []
    for k in range(3):
        m = [list(r) for r in a]
        for i in range(3):
            m[i][k] = rows[i][3]
        out.append(det(m) / d)
    return out[0], out[1], out[2]


def _slowest(results: Sequence[Measurement], pick: Callable[[Measurement], float]) -> float:
    return max(pick(r) for r in results)


def spec_from_measurements(
    results: Sequence[Measurement], n: int, *, machine: str = "this machine", when: str | None = None,
    name: str | None = None,
) -> ClusterSpec:  # fmt: skip
    """The ``cpu:n`` cluster of per-process measurements ``results`` (rank order; see the module docstring for
    what each holds and how it becomes a figure)."""
    if not results:
        raise ValueError("spec_from_measurements needs the measurements of at least one process")
    when = when or datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    origin = f"measured on {machine} at {when} by shardwise calibrate"
    # compute: the slowest process's figures
    gemm_points = [list(zip(*r["gemm"], strict=True)) for r in results]
    fits = [fit_line(flops, secs) for flops, secs in gemm_points]
    rate = min(1.0 / slope for _, slope in fits)
    gemm_fixed = max(c for c, _ in fits)
    dispatch = _slowest(results, lambda r: r["dispatch_s"])
    view = _slowest(results, lambda r: r.get("view_s", r["dispatch_s"]))
    record = _slowest(results, lambda r: r["record_s"])
    backward = _slowest(results, lambda r: r["backward_node_s"])
    streams = [[(nbytes, nbytes / secs) for nbytes, secs in r["stream"]] for r in results]
    memory_bw = min(r[-1][1] for r in streams)
    cache_bw = min(r[0][1] for r in streams)
    cache_bytes = 0.0
    if cache_bw > memory_bw:
        half = (cache_bw + memory_bw) / 2
        for k, (nbytes, _) in enumerate(streams[0][:-1]):
            if all(r[k][1] >= half for r in streams):
                cache_bytes = float(nbytes)
    if cache_bytes == 0.0:
        cache_bw = 0.0
    att = results[0]["attention"]
    att_fwd = max(r["attention"]["forward_s"] for r in results)
    att_bwd = max(r["attention"]["backward_s"] for r in results)
    attention_forward = min(1.0, att["flops"] / max(att_fwd - dispatch, 1e-9) / rate)
    attention_backward = min(1.0, 2.5 * att["flops"] / max(att_bwd - backward, 1e-9) / rate)
    attention_fixed = 0.0
    if all("forward_points" in r["attention"] for r in results):  # calibration version 4: a line through calls
        att_fits = [fit_line(*zip(*r["attention"]["forward_points"], strict=True)) for r in results]
        attention_forward = min(1.0, min(1.0 / slope for _, slope in att_fits) / rate)
        attention_fixed = max(max(c for c, _ in att_fits) - dispatch, 0.0)
    kernels = kernel_overheads(results)
    parallel = parallel_overhead(results)
    numel = ELEMENTWISE_SHAPE[0] * ELEMENTWISE_SHAPE[1]
    elementwise = tuple(  # the forward per element net of the kind's fixed cost per kernel (priced apart)
        (op, max(max(r["elementwise"][op][0] for r in results) - kernels.get(op, 0.0) / numel, 0.0),
         max(r["elementwise"][op][1] for r in results))
        for op in results[0]["elementwise"]
    )  # fmt: skip
    optimizer = []
    for opt in results[0]["optimizer"]:
        figures = [_solve3([(1.0, float(t), float(e), float(secs)) for t, e, secs in r["optimizer"][opt]])
                   for r in results]  # fmt: skip
        optimizer.append((opt, *(max(max(f[k] for f in figures), 0.0) for k in range(3))))
    # communication: rank 0's view of the pair 0-1
    first = results[0]
    latency, bandwidth = CPU_GLOO_LATENCY, CPU_GLOO_BANDWIDTH
    collective_overhead, intra = 0.0, 1.0
    overlap = 1.0
    object_fixed = object_per_byte = 0.0
    comm_sources: list[tuple[str, str]] = []
    if "p2p" in first:
        (n_small, t_small), (n_large, t_large) = first["p2p"]["small"], first["p2p"]["large"]
        bandwidth = (n_large - n_small) / (t_large - t_small) if t_large > t_small else n_large / t_large
        latency = max(t_small - n_small / bandwidth, 1e-9)  # the line's intercept
        # ring formulas for p processes (costs/comm.py): allreduce 2(p-1)(alpha + beta m/p),
        # allgather (p-1)(alpha + beta m/p); what the line through the measurements adds is the overhead,
        # the ratio of slopes the achieved bandwidth fraction
        overheads, fractions = [], []
        for kind, steps_of in COLLECTIVES.items():
            if kind not in first:
                continue
            steps = steps_of(n)
            sizes, secs = zip(*first[kind], strict=True)
            c, slope = fit_line(sizes, secs)
            overheads.append(max(c - steps * latency, 0.0))
            ideal = steps / n / bandwidth
            fractions.append(min(1.0, ideal / slope) if slope > 0 else 1.0)
        collective_overhead = statistics.fmean(overheads)
        intra = min(1.0, max(statistics.fmean(fractions), 1e-3))
        o = first["overlap"]
        hidden = o["compute"] + o["comm"] - o["both"]
        overlap = min(1.0, max(0.0, hidden / min(o["compute"], o["comm"])))
        sizes, secs = zip(*first["object_gather"], strict=True)
        object_fixed, object_per_byte = fit_line(sizes, secs)
        comm_sources = [
            ("object_overhead_s", f"{origin}: dist.gather_object of a tensor to rank 0, fixed cost (4 KiB, 1 MiB)"),
            ("object_byte_s", f"{origin}: the same, seconds per byte"),
            ("collective_overhead_s", f"{origin}: the runtime library's all-reduce, all-gather and reduce-scatter "
                                      "on gloo, fixed cost beyond the ring's latency terms (mean of the three)"),
            ("intra_node", f"{origin}: those collectives' bandwidth over point-to-point's (mean of the three)"),
            ("comm_overlap", f"{origin}: fraction of an asynchronous all-reduce hidden behind matmuls"),
        ]  # fmt: skip
    efficiency = Efficiency(
        gemm=1.0,
        attention_forward=max(attention_forward, 1e-3),
        attention_backward=max(attention_backward, 1e-3),
        memory=1.0,
        intra_node=intra,
        op_overhead_s=dispatch,
        view_overhead_s=view,
        record_overhead_s=record,
        backward_op_overhead_s=backward,
        gemm_overhead_s=max(gemm_fixed - dispatch, 0.0),
        attention_overhead_s=attention_fixed,
        collective_overhead_s=collective_overhead,
        object_overhead_s=object_fixed,
        object_byte_s=object_per_byte,
        cache_bytes=cache_bytes,
        cache_bandwidth=cache_bw,
        comm_overlap=overlap,
        elementwise_s=elementwise,
        kernel_overhead_s=tuple(kernels.items()),
        parallel_overhead_s=parallel,
        optimizer_s=tuple(optimizer),
        overhead_hidden=False,
        fused_kernels=False,
        sources=(
            ("gemm", f"{origin}: the device's float32 figure is the matmul rate itself"),
            ("attention_forward", f"{origin}: scaled_dot_product_attention forward over the matmul rate (the slope "
                                  "of a line through causal calls of sequences 8-128)"),
            ("attention_overhead_s", f"{origin}: the same line's fixed cost beyond op_overhead_s"),
            ("attention_backward", f"{origin}: its backward (2.5x the forward FLOPs) over the matmul rate"),
            ("memory", f"{origin}: the device's bandwidth is a + b beyond the caches itself"),
            ("op_overhead_s", f"{origin}: forward ops without autograd, as the generated program runs them"),
            ("view_overhead_s", f"{origin}: views, as the generated program runs them"),
            ("record_overhead_s", f"{origin}: the same ops with autograd recording, the difference"),
            ("backward_op_overhead_s", f"{origin}: autograd engine, one backward node"),
            ("gemm_overhead_s", f"{origin}: matmul fixed cost beyond op_overhead_s (fit over sizes 64-512)"),
            ("cache_bytes", f"{origin}: the largest working set of a + b streaming at least half-way between "
                            "the cache's bandwidth and the memory's"),
            ("cache_bandwidth", f"{origin}: a + b on 128 KiB vectors"),
            ("elementwise_s", f"{origin}: math ops on a {ELEMENTWISE_SHAPE[0]}x{ELEMENTWISE_SHAPE[1]} tensor, "
                              "forward (net of its kernel_overhead_s) and backward per element"),
            *([("kernel_overhead_s", f"{origin}: memory-bound op kinds the generated programs call, on (rows, "
                                     f"{KERNEL_HIDDEN}) activations of {', '.join(map(str, KERNEL_ROWS))} rows as a "
                                     "program pays them: one more call in a sequence of every kind, the intercept of a "
                                     "robust line through them (repeated median) beyond the plain kinds' (priced at "
                                     "op_overhead_s)")]
              if kernels else []),
            *([("parallel_overhead_s", f"{origin}: one more add of {PARALLEL_ROWS[0]}-{PARALLEL_ROWS[-1]} rows of "
                                       f"{KERNEL_HIDDEN} (split over the process's threads) among the other kinds, the "
                                       "intercept beyond the serial add's")]
              if any("parallel" in r for r in results) else []),
            ("optimizer_s", f"{origin}: torch.optim steps on CPU tensors (1 and 32 tensors of 16 elements, 1 of "
                            "2**18): per step, per tensor and per element"),
            ("overhead_hidden", "a CPU process dispatches and computes its own ops in turn"),
            ("fused_kernels", "codegen runs fused groups as their eager PyTorch ops on CPU"),
            *comm_sources,
        ),
    )  # fmt: skip
    return cpu_cluster(
        n,
        flops=rate,
        memory_bandwidth=memory_bw,
        latency=latency,
        bandwidth=bandwidth,
        name=name or f"cpu:{n}-calibrated",
        efficiency=efficiency,
    )


# -- processes ------------------------------------------------------------------------------------------

_ROOT = str(Path(__file__).resolve().parents[2])  # the directory holding the shardwise package
TIMEOUT_S = 900.0
_ENTRY = "import sys; from shardwise.cluster.calibrate import _worker_main; _worker_main(sys.argv[1:])"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker_main(argv: Sequence[str]) -> None:
    """One measuring process (``_ENTRY``, arguments RANK WORLD PORT QUICK THREADS OUT)."""
    rank, world, port, quick, threads = (int(x) for x in argv[:5])
    out = Path(argv[5])
    import torch
    import torch.distributed as dist

    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # the loopback interface, as init uses 127.0.0.1
    torch.set_num_threads(threads)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=120),
    )
    try:
        result = measure(rank, world, bool(quick))
    finally:
        dist.destroy_process_group()
    out.write_text(json.dumps(result))


def _machine() -> str:
    from shardwise.cluster.machine import machine_identity

    ident = machine_identity(1)
    return f"{ident['cpu']} ({ident['cores']} cores, torch {ident['torch']})"


def _run_processes(n: int, quick: bool, threads: int) -> list[Measurement]:
    """Start the ``n`` measuring processes as fresh interpreters (never the caller's main module again: a
    script without a main guard may plan for ``cpu:N``) and read their measurements."""
    port = _free_port()
    path = os.pathsep.join([_ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with tempfile.TemporaryDirectory(prefix="shardwise-calibrate-") as tmp:
        outs = [Path(tmp) / f"rank{r}.json" for r in range(n)]
        logs = [open(Path(tmp) / f"rank{r}.log", "w+b") for r in range(n)]  # noqa: SIM115 - closed below
        procs = []
        try:
            for r in range(n):
                command = [sys.executable, "-c", _ENTRY, str(r), str(n), str(port), str(int(quick)), str(threads),
                           str(outs[r])]  # fmt: skip
                procs.append(subprocess.Popen(command, env=env, stdout=logs[r], stderr=subprocess.STDOUT))
            deadline = time.monotonic() + TIMEOUT_S
            failed = None
            while any(p.poll() is None for p in procs):
                failed = next((r for r, p in enumerate(procs) if p.poll() not in (None, 0)), None)
                if failed is not None:
                    break
                if time.monotonic() > deadline:
                    raise DeviceUnavailableError(
                        f"calibrate: {n} local processes did not finish measuring in {TIMEOUT_S:.0f} s (the machine "
                        "is very busy?): run `shardwise calibrate` again later, or plan with fixed nominal figures "
                        "(SHARDWISE_CPU_CLUSTER=nominal)"
                    )
                time.sleep(0.05)
            if failed is None and any(p.poll() != 0 for p in procs):
                failed = next((r for r, p in enumerate(procs) if p.poll() != 0), 0)
            if failed is not None or not all(o.is_file() for o in outs):
                rank = failed if failed is not None else 0
                logs[rank].seek(0)
                tail = logs[rank].read().decode(errors="replace").strip().splitlines()[-5:]
                raise DeviceUnavailableError(
                    f"calibrate: could not run {n} local gloo processes (rank {rank}: "
                    f"{' / '.join(tail) or 'no output'}); check that 127.0.0.1 is usable and that the machine has "
                    "enough memory, or plan with fixed nominal figures (SHARDWISE_CPU_CLUSTER=nominal)"
                )
            return [json.loads(o.read_text()) for o in outs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            for log in logs:
                log.close()


def calibrate(num_processes: int = 2, *, quick: bool = True, name: str | None = None) -> ClusterSpec:
    """Measure this machine with ``num_processes`` local processes; the ``cpu:N`` spec of those figures
    (named ``name``, by default ``cpu:N-calibrated``)."""
    if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
        raise DeviceUnavailableError(
            f"calibrate: num_processes={num_processes!r} is not allowed: give a positive number of processes"
        )
    from shardwise.cluster.machine import threads_per_process

    results = _run_processes(num_processes, quick, threads_per_process(num_processes))
    return spec_from_measurements(results, num_processes, machine=_machine(), name=name)
