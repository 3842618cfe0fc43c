"""MODEL arguments: a zoo name (``gpt2:small,layers=6``) or ``path/to/file.py:factory``.

A factory takes no arguments (or a ``batch`` keyword) and returns ``(model, example_inputs)`` or
``(model, example_inputs, loss_fn)``. Every model is built right after ``torch.manual_seed(seed)``, so the
same spec gives the same weights each time: that is how ``shardwise run plan.json`` rebuilds the model a
plan was made for.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shardwise.errors import ShardwiseError, UserInputError

__all__ = ["ModelSpec", "LoadedModel", "parse_model_spec", "load_model", "default_loss", "flat_tensors"]


@dataclass(frozen=True)
class ModelSpec:
    """A parsed MODEL argument. ``kind`` is ``"zoo"`` or ``"file"``; ``text`` is the argument as given."""

    text: str
    kind: str
    path: str = ""  # file models: the .py path as given (relative paths stay relative)
    factory: str = ""


@dataclass
class LoadedModel:
    spec: ModelSpec
    model: Any  # torch.nn.Module
    inputs: tuple[Any, ...]
    loss_fn: Callable[[Any], Any] | None  # the factory's own loss, if it returned one


def parse_model_spec(text: str) -> ModelSpec:
    """``gpt2``, ``gpt2:small,layers=6`` → zoo; ``models/net.py:make`` → file (a ``.py`` before the colon)."""
    text = text.strip()
    if not text:
        raise UserInputError(
            "MODEL is empty: give a built-in model (e.g. gpt2:small) or path/to/file.py:factory"
        )
    head, sep, tail = text.rpartition(":")
    if sep and head.endswith(".py"):
        if not tail.isidentifier():
            raise UserInputError(
                f"MODEL {text!r}: {tail!r} is not a Python function name (path/to/file.py:factory)"
            )
        return ModelSpec(text=text, kind="file", path=head, factory=tail)
    if text.endswith(".py"):
        raise UserInputError(
            f"MODEL {text!r}: name the factory function in the file too, as {text}:make_model; it must return "
            "(model, example_inputs)"
        )
    return ModelSpec(text=text, kind="zoo")


def _resolve_file(path: str, search: Sequence[Path]) -> Path:
    p = Path(path)
    if p.is_absolute():
        if p.is_file():
            return p
    else:
        for base in search:
            if (base / p).is_file():
                return (base / p).resolve()
    where = ", ".join(str(b) for b in search) or "the current directory"
    raise UserInputError(f"model file {path} not found (looked in {where})")


def _import_file(path: Path) -> Any:
    name = f"_shardwise_model_{abs(hash(str(path)))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UserInputError(f"cannot import {path}: it is not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))  # let the file import its neighbours
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise ShardwiseError(f"importing {path.name} failed: {_describe(exc)}") from None
    finally:
        if sys.path and sys.path[0] == str(path.parent):
            sys.path.pop(0)
    return module


def _describe(exc: BaseException) -> str:
    """``Type: message (file:line)`` of the innermost frame, for errors in the user's own code."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" ({Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"


def _normalize(result: Any, origin: str) -> tuple[Any, tuple[Any, ...], Callable[[Any], Any] | None]:
    import torch

    if not isinstance(result, tuple | list) or len(result) not in (2, 3):
        raise UserInputError(
            f"{origin} returned {type(result).__name__}; it must return (model, example_inputs) or "
            "(model, example_inputs, loss_fn)"
        )
    model, inputs = result[0], result[1]
    loss_fn = result[2] if len(result) == 3 else None
    if not isinstance(model, torch.nn.Module):
        raise UserInputError(
            f"{origin} returned a {type(model).__name__} as the model; expected a torch.nn.Module"
        )
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    if not isinstance(inputs, tuple | list):
        raise UserInputError(
            f"{origin} returned {type(inputs).__name__} as example inputs; give a tuple of positional inputs"
        )
    if loss_fn is not None and not callable(loss_fn):
        raise UserInputError(f"{origin}: the third value (loss_fn) must be callable")
    return model, tuple(inputs), loss_fn


def load_model(
    text: str, *, batch: int | None = None, seed: int = 0, search: Sequence[Path] = (), device: str = "cpu"
) -> LoadedModel:
    """Build the model named by ``text`` (seeded, eval mode); ``search`` lists folders for relative files."""
    import torch

    spec = parse_model_spec(text)
    if batch is not None and batch < 1:
        raise UserInputError(f"--batch {batch}: the batch size must be a positive integer")
    if spec.kind == "zoo":
        from shardwise.zoo import build_model

        overrides = {} if batch is None else {"batch": batch}
        model, inputs = build_model(spec.text, seed=seed, device=device, **overrides)
        return LoadedModel(spec, model, tuple(inputs), None)
    path = _resolve_file(spec.path, list(search) or [Path.cwd()])
    module = _import_file(path)
    factory = getattr(module, spec.factory, None)
    if not callable(factory):
        found = sorted(n for n, v in vars(module).items() if inspect.isfunction(v) and not n.startswith("_"))
        raise UserInputError(
            f"{path.name} has no function {spec.factory!r}"
            + (f"; it defines {', '.join(found)}" if found else "")
        )
    kwargs: dict[str, Any] = {}
    if batch is not None:
        params = inspect.signature(factory).parameters
        if "batch" not in params and not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            raise UserInputError(
                f"--batch: {spec.factory}() takes no 'batch' argument; add one or drop --batch"
            )
        kwargs["batch"] = batch
    torch.manual_seed(seed)
    try:
        with torch.device("meta") if device == "meta" else contextlib.nullcontext():
            result = factory(**kwargs)
    except UserInputError:
        raise
    except Exception as exc:
        raise ShardwiseError(f"{spec.path}:{spec.factory}() failed: {_describe(exc)}") from None
    model, inputs, loss_fn = _normalize(result, f"{spec.path}:{spec.factory}()")
    model.eval()
    return LoadedModel(spec, model, inputs, loss_fn)


def flat_tensors(value: Any) -> list[Any]:
    """The tensors inside a model output (tuples, dicts, HuggingFace ModelOutput), in pytree order."""
    import torch
    import torch.utils._pytree as pytree

    if hasattr(value, "to_tuple") and not isinstance(value, tuple):
        value = value.to_tuple()
    return [t for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor)]


def default_loss(output: Any) -> Any:
    """The loss used to plan and run ``--mode train`` when the model gives none: the mean square of its
    first floating-point output (a stand-in that exercises the whole backward pass)."""
    for t in flat_tensors(output):
        if t.is_floating_point():
            return t.float().pow(2).mean()
    raise UserInputError("--mode train: the model has no floating-point output to make a default loss from")
