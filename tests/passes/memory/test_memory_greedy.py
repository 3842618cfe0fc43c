"""Vectorized best-fit against a plain reference: the same offsets, buffer by buffer."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardwise.passes.memory import Buffer, verify_assignment
from shardwise.passes.memory.greedy import best_fit, best_fit_offsets, greedy_order


def _reference(buffers: list[Buffer], order: str, alignment: int) -> list[int]:
    """Best-fit as written in the module docstring: per buffer, the smallest free gap (lowest on ties) between
    the placed buffers live with it, else on top of them."""
    out: dict[int, int] = {}
    for i in greedy_order(buffers, order):  # type: ignore[arg-type]
        b = buffers[i]
        chunks = sorted((out[j], out[j] + buffers[j].size) for j in out if buffers[j].overlaps(b))
        best, best_gap, cursor = None, None, 0
        for lo, hi in chunks:
            start = -(-cursor // alignment) * alignment
            if start + b.size <= lo and (best_gap is None or lo - cursor < best_gap):
                best, best_gap = start, lo - cursor
            cursor = max(cursor, hi)
        out[i] = best if best is not None else -(-cursor // alignment) * alignment
    return [out[i] for i in range(len(buffers))]


@st.composite
def _instances(draw) -> tuple[list[Buffer], int]:
    n = draw(st.integers(1, 40))
    horizon = draw(st.integers(1, 20))
    bufs = []
    for i in range(n):
        start = draw(st.integers(0, horizon - 1))
        end = draw(st.integers(start + 1, horizon))
        size = draw(st.one_of(st.integers(1, 24), st.sampled_from([8, 16, 64])))
        bufs.append(Buffer(f"b{i}", start, end, size))
    return bufs, draw(st.sampled_from([1, 1, 4, 8]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_instances(), st.sampled_from(["size", "lifetime"]))
def test_vectorized_best_fit_equals_the_reference(instance, order):
    bufs, alignment = instance
    offsets = best_fit_offsets(bufs, order, alignment)
    assert offsets == _reference(bufs, order, alignment)
    assert all(o % alignment == 0 for o in offsets)
    verify_assignment(bufs, best_fit(bufs, order=order, alignment=alignment))


def test_gaps_are_reused_smallest_first():
    # long-lived buffers with short-lived ones between them: once those die, the 2-byte buffer goes into
    # the smaller hole (4 bytes, left by s2) rather than the larger one (8 bytes, left by s1)
    bufs = [
        Buffer("l1", 0, 10, 32), Buffer("s1", 0, 4, 8), Buffer("l2", 0, 10, 6), Buffer("s2", 0, 4, 4),
        Buffer("l3", 0, 10, 3), Buffer("d", 5, 8, 2),
    ]  # fmt: skip
    offsets = dict(zip((b.id for b in bufs), best_fit_offsets(bufs, "size")))
    assert offsets == {"l1": 0, "s1": 32, "l2": 40, "s2": 46, "l3": 50, "d": 46}
