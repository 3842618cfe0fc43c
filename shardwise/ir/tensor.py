"""Tensor and scalar value specs: the shape and dtype facts every pass reads."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["TensorSpec", "ScalarSpec", "ValueSpec", "DTYPE_BYTES", "dtype_bytes", "short_dtype"]

DTYPE_BYTES: dict[str, int] = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
    "complex64": 8,
    "complex128": 16,
    "complex32": 4,
    "uint16": 2,
    "uint32": 4,
    "uint64": 8,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
}

_SHORT = {
    "float64": "f64",
    "float32": "f32",
    "float16": "f16",
    "bfloat16": "bf16",
    "int64": "i64",
    "int32": "i32",
    "int16": "i16",
    "int8": "i8",
    "uint8": "u8",
    "bool": "b8",
    "complex64": "c64",
    "complex128": "c128",
    "complex32": "c32",
    "uint16": "u16",
    "uint32": "u32",
    "uint64": "u64",
}


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of a dtype name such as "float32"."""
    try:
        return DTYPE_BYTES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; known: {sorted(DTYPE_BYTES)}") from None


def short_dtype(dtype: str) -> str:
    return _SHORT.get(dtype, dtype)


@dataclass(frozen=True)
class TensorSpec:
    """A tensor's shape (concrete sizes of the example inputs) and dtype name."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * dtype_bytes(self.dtype)

    def __str__(self) -> str:
        return f"{short_dtype(self.dtype)}[{','.join(str(s) for s in self.shape)}]"


@dataclass(frozen=True)
class ScalarSpec:
    """A Python scalar produced by the graph (e.g. a symbolic size read with ``x.size(0)``)."""

    kind: str  # "int" | "float" | "bool"

    @property
    def nbytes(self) -> int:
        return 0

    def __str__(self) -> str:
        return self.kind


ValueSpec = TensorSpec | ScalarSpec
