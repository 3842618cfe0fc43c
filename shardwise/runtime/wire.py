"""How messages travel between the caller and its local workers: pickled by value, every tensor included.

``pickle`` carries a tensor through torch's own reduction, which knows only the dtypes that had a typed storage
class (float32, int64, bool, ...): a complex32, uint16/32/64 or float8 tensor pickles, then fails to load
(``'UntypedStorage' has no attribute 'dtype'``). :func:`dumps` sends such a tensor as a bit-exact view of a
signed integer dtype of the same element size (``t.view(torch.int64)`` for uint64, ``torch.int32`` for
complex32, ...) with the name of its dtype, and the receiving side views it back: same bits, same shape, same
strides. Every other object pickles as ``pickle`` does.

Importing this module does not import torch (the workers import it before torch is set up).
"""

from __future__ import annotations

import io
import pickle
import sys
from typing import Any

__all__ = ["dumps", "loads"]

_PROTOCOL = pickle.HIGHEST_PROTOCOL
# dtypes torch's tensor pickling carries itself (quantized tensors have a reduction of their own)
_PICKLED_BY_TORCH = frozenset(
    ("float64", "float32", "float16", "bfloat16", "complex128", "complex64",
     "int64", "int32", "int16", "int8", "uint8", "bool")
)  # fmt: skip
_CARRIER = {1: "uint8", 2: "int16", 4: "int32", 8: "int64"}  # element size -> a dtype torch pickles


def _carried(obj: Any) -> tuple[Any, str] | None:
    """``(carrier, dtype name)`` when ``obj`` is a dense tensor of a dtype torch cannot pickle, else None."""
    torch = sys.modules.get("torch")
    if torch is None or type(obj) is not torch.Tensor or obj.layout != torch.strided or obj.is_quantized:
        return None
    name = str(obj.dtype).removeprefix("torch.")
    carrier = _CARRIER.get(obj.element_size())
    if name in _PICKLED_BY_TORCH or carrier is None:
        return None
    return obj.resolve_conj().resolve_neg().view(getattr(torch, carrier)), name


def _rebuild(carrier: Any, dtype: str, requires_grad: bool) -> Any:
    """The tensor :func:`dumps` sent as ``carrier``: its bits viewed as ``dtype``."""
    import torch

    tensor = carrier.view(getattr(torch, dtype))
    return tensor.requires_grad_() if requires_grad else tensor


class _Pickler(pickle.Pickler):
    def reducer_override(self, obj: Any) -> Any:
        carried = _carried(obj)
        if carried is None:
            return NotImplemented
        return _rebuild, (carried[0], carried[1], obj.requires_grad)


def dumps(obj: Any) -> bytes:
    """``obj`` pickled (highest protocol), tensors of every dtype included (see the module docstring)."""
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=_PROTOCOL).dump(obj)
    return buffer.getvalue()


def loads(data: bytes) -> Any:
    """The object :func:`dumps` pickled."""
    return pickle.loads(data)
