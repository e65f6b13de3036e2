"""statedict-convert: convert PyTorch checkpoints between pt, safetensors and more, bit for bit.

Example::

    import converters
    converters.convert("checkpoint.pt", "checkpoint.safetensors")
    converters.verify("checkpoint.pt", "checkpoint.safetensors")
    # []

The names below are imported when first used, so ``import converters`` costs almost nothing and a
job imports only the formats it touches.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "convert": "converters.api",
    "plan": "converters.api",
    "load": "converters.api",
    "manifest": "converters.api",
    "read": "converters.api",
    "save": "converters.api",
    "verify": "converters.api",
    "verify_report": "converters.api",
    "write": "converters.api",
    "location": "converters.core.storage",
    "RemoteError": "converters.core.storage",
    "ConverterError": "converters.core.errors",
    "CorruptFileError": "converters.core.errors",
    "DestinationError": "converters.core.errors",
    "MissingDependencyError": "converters.core.errors",
    "UnknownFormatError": "converters.core.errors",
    "UnsafeFileError": "converters.core.errors",
    "UnsupportedValueError": "converters.core.errors",
    "Format": "converters.core.contract",
    "FormatBase": "converters.core.contract",
    "NoOptions": "converters.core.contract",
    "WriteContext": "converters.core.contract",
    "option": "converters.core.contract",
    "TensorWriter": "converters.core.writing",
    "Budget": "converters.core.budget",
    "Checkpoint": "converters.core.tree",
    "TensorRef": "converters.core.tree",
}

__all__ = [
    "Budget",
    "Checkpoint",
    "ConverterError",
    "CorruptFileError",
    "DestinationError",
    "Format",
    "FormatBase",
    "MissingDependencyError",
    "NoOptions",
    "RemoteError",
    "TensorRef",
    "TensorWriter",
    "UnknownFormatError",
    "UnsafeFileError",
    "UnsupportedValueError",
    "WriteContext",
    "convert",
    "load",
    "location",
    "manifest",
    "option",
    "plan",
    "read",
    "registry",
    "save",
    "verify",
    "verify_report",
    "write",
]


def __getattr__(name: str) -> Any:
    if name == "registry":
        import_module("converters.formats")  # registers the built-ins
        return import_module("converters.core.registry").registry
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    if not name.startswith("_"):
        try:  # a submodule: converters.core, converters.transforms, ...
            return import_module(f"converters.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"converters.{name}":
                raise
    raise AttributeError(f"module 'converters' has no attribute {name!r}")


if TYPE_CHECKING:  # what the names are, for type checkers and editors
    from .api import convert, load, manifest, plan, read, save, verify, write
    from .core.budget import Budget
    from .core.contract import Format, FormatBase, NoOptions, WriteContext, option
    from .core.errors import (
        ConverterError,
        CorruptFileError,
        DestinationError,
        MissingDependencyError,
        UnknownFormatError,
        UnsafeFileError,
        UnsupportedValueError,
    )
    from .core.registry import registry
    from .core.storage import RemoteError, location
    from .core.tree import Checkpoint, TensorRef
    from .core.writing import TensorWriter
