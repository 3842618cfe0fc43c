"""Shared value checks for cluster-spec fields, so the dataclasses and the YAML schema word errors alike.

Every failure raises ``ClusterSpecError("<field>: <value> is not allowed: <what is allowed>")``; callers that
know more context (``links[3]``) prefix the field with :func:`prefixed`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from shardwise.cluster.units import is_number
from shardwise.errors import ClusterSpecError

__all__ = [
    "DTYPES",
    "DTYPE_ALIASES",
    "LINK_KINDS",
    "SWITCH_KINDS",
    "show",
    "fail",
    "check_positive",
    "check_nonnegative",
    "check_positive_int",
    "check_name",
    "check_kind",
    "normalize_dtype",
    "prefixed",
]

#: dtype names a DeviceSpec may give peak FLOP/s for ("tfloat32" = fp32 matmuls on TF32 tensor cores).
DTYPES = (
    "float64",
    "float32",
    "tfloat32",
    "bfloat16",
    "float16",
    "float8_e4m3fn",
    "float8_e5m2",
    "int8",
)
DTYPE_ALIASES = {
    "fp64": "float64",
    "double": "float64",
    "fp32": "float32",
    "float": "float32",
    "tf32": "tfloat32",
    "bf16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
    "fp8": "float8_e4m3fn",
    "float8": "float8_e4m3fn",
}
LINK_KINDS = ("nvlink", "nvswitch", "pcie", "ib", "ethernet", "loopback")
SWITCH_KINDS = ("nvswitch", "ib", "ethernet", "pcie", "loopback")


def show(value: object) -> str:
    """A value as it should appear in an error message (strings quoted, numbers bare)."""
    if isinstance(value, str):
        return repr(value)
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def fail(field: str, value: object, allowed: str) -> ClusterSpecError:
    """The standard error: ``<field>: <value> is not allowed: <allowed>`` (returned, for ``raise``)."""
    return ClusterSpecError(f"{field}: {show(value)} is not allowed: {allowed}")


@contextmanager
def prefixed(prefix: str) -> Iterator[None]:
    """Re-raise any ClusterSpecError inside the block with ``prefix.`` in front of its field."""
    try:
        yield
    except ClusterSpecError as err:
        raise ClusterSpecError(f"{prefix}.{err}") from None


def check_positive(field: str, value: object, unit: str, shown: object | None = None) -> float:
    if not is_number(value) or value <= 0:  # type: ignore[operator]
        raise fail(field, value if shown is None else shown, f"must be a positive number ({unit})")
    return float(value)  # type: ignore[arg-type]


def check_nonnegative(field: str, value: object, unit: str, shown: object | None = None) -> float:
    if not is_number(value) or value < 0:  # type: ignore[operator]
        raise fail(field, value if shown is None else shown, f"must be a number >= 0 ({unit})")
    return float(value)  # type: ignore[arg-type]


def check_positive_int(field: str, value: object, what: str = "a positive integer") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise fail(field, value, f"must be {what}")
    return value


def check_name(field: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip() or value != value.strip():
        raise fail(field, value, "must be a non-empty string without surrounding spaces")
    return value


def check_kind(field: str, value: object, kinds: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in kinds:
        raise fail(field, value, "must be one of " + ", ".join(kinds))
    return value


def normalize_dtype(name: object) -> str | None:
    """Canonical dtype name ("torch.bfloat16", "bf16" -> "bfloat16"); None if not a known dtype."""
    if not isinstance(name, str):
        name = str(name)
    key = name.strip()
    key = key.removeprefix("torch.")
    key = DTYPE_ALIASES.get(key.lower(), key)
    return key if key in DTYPES else None
