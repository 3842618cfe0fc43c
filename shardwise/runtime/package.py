"""Importing generated packages by path, and making results safe to send to another process.

A generated package is a directory holding ``__init__.py`` that exposes ``build(rank, world_size)`` (and
``device=``: on nccl the runtime builds it on the rank's CUDA device and moves the arguments of its calls
there).
Packages are imported under a module name chosen by the caller, so many packages (or many versions of one
directory) can be loaded one after another into the same long-lived process; ``unload_package`` drops a
package and all its submodules from ``sys.modules`` so the next one starts clean.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from shardwise.errors import UserInputError

__all__ = ["build_module", "import_package", "rank_device", "to_cpu_detached", "to_device", "unload_package"]


def import_package(package_dir: str | Path, module_name: str) -> ModuleType:
    """Import the package at ``package_dir`` (a directory with ``__init__.py``, or one ``.py`` file).

    The package is registered as ``module_name`` (any previous module of that name and its submodules are
    unloaded first), so relative imports inside it work and absolute imports of ``module_name.x`` resolve
    to this directory.
    """
    path = Path(package_dir).resolve()
    if path.is_dir():
        init = path / "__init__.py"
        locations: list[str] | None = [str(path)]
    else:
        init, locations = path, None
    if not init.is_file():
        raise UserInputError(
            f"{path} is not a generated package: expected a directory with __init__.py (or a .py file)"
        )
    unload_package(module_name)
    importlib.invalidate_caches()
    spec = importlib.util.spec_from_file_location(module_name, init, submodule_search_locations=locations)
    if spec is None or spec.loader is None:
        raise UserInputError(f"cannot import {init}: Python found no loader for it")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        unload_package(module_name)
        raise
    return module


def unload_package(module_name: str) -> None:
    """Remove ``module_name`` and every ``module_name.*`` submodule from ``sys.modules``."""
    prefix = module_name + "."
    for name in [n for n in sys.modules if n == module_name or n.startswith(prefix)]:
        del sys.modules[name]


def rank_device(backend: str) -> Any:
    """The device a rank's program runs on: its current CUDA device on nccl, None (the package's default,
    the CPU) otherwise."""
    if backend != "nccl":
        return None
    import torch

    return torch.device("cuda", torch.cuda.current_device())


def build_module(package: ModuleType, rank: int, world_size: int, device: Any = None) -> Any:
    """Call the package's ``build(rank, world_size)`` (with ``device`` when one is given); a missing
    ``build`` is a clear error."""
    build = getattr(package, "build", None)
    if not callable(build):
        raise UserInputError(
            f"package {package.__name__} ({getattr(package, '__file__', '?')}) has no build(rank, world_size); "
            "regenerate it or point at the generated package directory"
        )
    return build(rank, world_size) if device is None else build(rank, world_size, device)


def to_device(value: Any, device: Any) -> Any:
    """``value`` with every tensor inside (lists, tuples, dicts) moved to ``device`` (None: unchanged)."""
    if device is None:
        return value
    import torch

    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(to_device(v, device) for v in value)
    return value


def to_cpu_detached(value: Any) -> Any:
    """``value`` with every tensor inside (lists, tuples, named tuples, dicts) detached and moved to CPU."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        items = {k: to_cpu_detached(v) for k, v in value.items()}
        if type(value) is dict:
            return items
        try:
            return type(value)(items)
        except TypeError:  # e.g. defaultdict: a plain dict carries the same data
            return items
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(to_cpu_detached(v) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(to_cpu_detached(v) for v in value)
    return value
