"""Model resolution for the CLI and the API's callers: the spec behind ``--model`` and the shape
behind ``--input-shape``. An edge module (it imports user code and the recipe), kept out of the
formats, which only receive a model object and an example input.
"""

from __future__ import annotations

import importlib
from typing import Any

from .core.errors import ConverterError


def resolve_model(spec: str) -> Any:
    """``recipe`` for the recipe Net, or ``package.module:Class`` built without arguments."""
    if spec == "recipe":
        from .recipe import Net

        return Net()
    module_name, _, class_name = spec.partition(":")
    if not module_name or not class_name:
        raise ConverterError(f"--model takes 'recipe' or 'package.module:Class', got {spec!r}")
    try:
        target = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise ConverterError(f"cannot import the model class {spec!r}: {exc}") from None
    try:
        return target()
    except Exception as exc:  # a user's constructor may raise anything
        raise ConverterError(f"cannot build {spec!r} without arguments: {type(exc).__name__}: {exc}") from None


def default_input_shape(model: Any) -> tuple[int, ...] | None:
    """The example input shape a model class declares (``example_input_shape``), if any."""
    shape = getattr(model, "example_input_shape", None)
    return tuple(shape) if shape is not None else None


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,32,32"`` as a shape of positive sizes."""
    try:
        dims = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ConverterError(f"--input-shape takes comma-separated sizes like 1,3,32,32, got {text!r}") from None
    if not dims or any(d <= 0 for d in dims):
        raise ConverterError(f"--input-shape needs positive sizes, got {text!r}")
    return dims
