"""Strict parsing of human-friendly quantities in cluster files ("25GB/s", "80GiB", "2.6us", "312TFLOPS").

Every parser accepts a plain number (int or float, not bool) in base units, or a string of a number followed by
exactly one unit of the right kind. Anything else raises ``ValueError`` whose text says what is allowed; the
schema turns that into a ``ClusterSpecError`` naming the field. Decimal prefixes are powers of 1000 and binary
prefixes (KiB, MiB, ...) powers of 1024; a lowercase ``b`` in a rate means bits ("200Gb/s" = 25e9 bytes/s).
"""

from __future__ import annotations

import math
import re

__all__ = ["parse_bytes", "parse_bandwidth", "parse_seconds", "parse_flops", "is_number"]

_NUMBER = r"([0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?|\.[0-9]+(?:[eE][+-]?[0-9]+)?)"
_QUANTITY = re.compile(r"^\s*" + _NUMBER + r"\s*([A-Za-zµ/]+)\s*$")

_DECIMAL = {"": 1.0, "K": 1e3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15}
_BINARY = {"Ki": 2.0**10, "Mi": 2.0**20, "Gi": 2.0**30, "Ti": 2.0**40, "Pi": 2.0**50}

_BYTE_UNITS: dict[str, float] = {p + "B": f for p, f in _DECIMAL.items() if p != "k"}
_BYTE_UNITS.update({p + "B": f for p, f in _BINARY.items()})
_BIT_UNITS: dict[str, float] = {p + "b": f / 8.0 for p, f in _DECIMAL.items() if p not in ("", "k")}
_TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_FLOPS_UNITS = {
    prefix + suffix: factor
    for prefix, factor in _DECIMAL.items()
    if prefix != "k"
    for suffix in ("FLOPS", "FLOP/s")
}


def is_number(value: object) -> bool:
    """True for int/float values that are finite numbers (bool is not a number here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _parse(value: object, units: dict[str, float], what: str, examples: str) -> float:
    if isinstance(value, bool):
        raise ValueError(f"must be {what}, a plain number or a string like {examples}")
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        match = _QUANTITY.match(value)
        if match is None or match.group(2) not in units:
            raise ValueError(f"must be {what}, a plain number or a string like {examples}")
        number = float(match.group(1)) * units[match.group(2)]
    else:
        raise ValueError(f"must be {what}, a plain number or a string like {examples}")
    if not math.isfinite(number):
        raise ValueError(f"must be {what}, a finite number")
    return number


def parse_bytes(value: object) -> float:
    """A size in bytes: ``80GiB``, ``32GB``, ``1024`` (plain number = bytes)."""
    return _parse(value, _BYTE_UNITS, "a size in bytes", "'80GiB' or '32GB'")


def parse_bandwidth(value: object) -> float:
    """A rate in bytes/s: ``25GB/s``, ``200Gb/s`` (bits), ``300GiB/s``; plain number = bytes/s."""
    units = {u + "/s": f for u, f in _BYTE_UNITS.items()}
    units.update({u + "/s": f for u, f in _BIT_UNITS.items()})
    units.update({u[:-1] + "bps": f for u, f in _BIT_UNITS.items()})
    return _parse(value, units, "a bandwidth in bytes/s", "'25GB/s', '200Gb/s' or '131GiB/s'")


def parse_seconds(value: object) -> float:
    """A duration in seconds: ``2.6us``, ``0.3µs``, ``1ms``; plain number = seconds."""
    return _parse(value, _TIME_UNITS, "a time in seconds", "'2.6us' or '1ms'")


def parse_flops(value: object) -> float:
    """A compute rate in FLOP/s: ``312TFLOPS``, ``19.5TFLOP/s``; plain number = FLOP/s."""
    return _parse(value, _FLOPS_UNITS, "a rate in FLOP/s", "'312TFLOPS' or '50GFLOP/s'")
