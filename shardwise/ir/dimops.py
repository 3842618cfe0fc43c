"""Dimension annotations in the dimops style (nnScaler), e.g. ``"m k+, n k+, n -> m n"``.

Each tensor operand lists one label per dimension. A label shared by several operands names the same
logical dimension. Suffixes:

- ``+``: splitting the dimension is allowed and leaves partial sums in the outputs (a contraction);
- ``^``: the dimension cannot be split (the op needs the whole of it);
- the label ``1`` marks a broadcast dimension of size 1: it cannot be split either.

A label that appears in an output may be split: every operand holding it is then sharded on it and the
outputs are sharded on it too. A ``+`` label appears in no output: splitting it shards the operands
holding it and makes the outputs partial sums. Operands that lack a split label are used whole.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Dim", "OpDims", "parse_dimops", "frozen_dims"]


@dataclass(frozen=True)
class Dim:
    label: str
    reduce: bool = False  # "+"
    frozen: bool = False  # "^"

    @property
    def splittable(self) -> bool:
        return not self.frozen and self.label != "1"

    def __str__(self) -> str:
        return self.label + ("+" if self.reduce else "") + ("^" if self.frozen else "")


Operand = tuple[Dim, ...]


@dataclass(frozen=True)
class OpDims:
    """Labels per tensor operand (inputs in argument order, then outputs)."""

    inputs: tuple[Operand, ...]
    outputs: tuple[Operand, ...]
    partial: str = "sum"  # how partial results of a "+" split combine: "sum", "avg" (mean) or "max"
    # labels whose split the op's sharded implementation combines itself (outputs lacking them are whole),
    # e.g. the class dimension of cross entropy (vocabulary-parallel loss: its collectives are internal)
    combined: frozenset[str] = frozenset()
    # labels summed over inside the op whose operands lacking them are read whole (not as partial sums, unlike
    # a bias of a contraction): splitting one leaves partial sums in the outputs and partial gradients in the
    # operands lacking it, e.g. the intermediate dimension of a mixture of experts' gated experts (the
    # hidden state enters a nonlinearity, Megatron's column- then row-parallel pair inside one op)
    inner: frozenset[str] = frozenset()
    # labels only context parallelism may split (over ``ir.placement.CONTEXT_AXIS``, by a way of
    # ``costs.attention`` that builds the causal mask from global positions), e.g. the query sequence of an
    # ``is_causal=True`` attention: a plain split would mask each piece by its local positions
    context: frozenset[str] = frozenset()

    def __str__(self) -> str:
        def side(ops: tuple[Operand, ...]) -> str:
            return ", ".join(" ".join(str(d) for d in op) if op else "-" for op in ops)

        return f"{side(self.inputs)} -> {side(self.outputs)}"

    def splittable_labels(self) -> tuple[str, ...]:
        """Labels that some strategy may split, in first-seen order."""
        seen: dict[str, bool] = {}
        for op in self.inputs + self.outputs:
            for d in op:
                if d.label == "1":
                    continue
                ok = seen.get(d.label, True)
                seen[d.label] = ok and d.splittable
        return tuple(label for label, ok in seen.items() if ok)

    def is_reduction(self, label: str) -> bool:
        return any(d.label == label and d.reduce for op in self.inputs for d in op) and not any(
            d.label == label for op in self.outputs for d in op
        )

    def position(self, operand: Operand, label: str) -> int | None:
        for i, d in enumerate(operand):
            if d.label == label:
                return i
        return None


def _parse_operand(text: str) -> Operand:
    text = text.strip()
    if text in ("", "-"):
        return ()
    dims = []
    for token in text.split():
        reduce = "+" in token
        frozen = "^" in token
        label = token.replace("+", "").replace("^", "")
        if not label:
            raise ValueError(f"empty label in dimops operand {text!r}")
        dims.append(Dim(label, reduce, frozen))
    return tuple(dims)


def parse_dimops(text: str, partial: str = "sum") -> OpDims:
    """Parse ``"a b+, b+ c -> a c"``. Raises ValueError with the offending text."""
    if "->" not in text:
        raise ValueError(f"dimops annotation {text!r} has no '->'")
    left, right = text.split("->")
    inputs = tuple(_parse_operand(t) for t in left.split(",")) if left.strip() else ()
    outputs = tuple(_parse_operand(t) for t in right.split(","))
    out_labels = {d.label for op in outputs for d in op}
    for op in inputs:
        for d in op:
            if d.reduce and d.label in out_labels:
                raise ValueError(f"in {text!r}: {d.label}+ is a contraction but appears in an output")
    return OpDims(inputs, outputs, partial)


def frozen_dims(input_ranks: tuple[int, ...], output_ranks: tuple[int, ...]) -> OpDims:
    """The annotation of an op that must run on whole tensors (nothing splittable)."""
    counter = iter(range(10_000))

    def operand(rank: int) -> Operand:
        return tuple(Dim(f"x{next(counter)}", frozen=True) for _ in range(rank))

    return OpDims(tuple(operand(r) for r in input_ranks), tuple(operand(r) for r in output_ranks))
