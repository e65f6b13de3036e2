"""statedict-convert: convert PyTorch checkpoints between pt, safetensors and more, bit for bit.

Example::

    import converters
    converters.convert("checkpoint.pt", "checkpoint.safetensors")
    converters.verify("checkpoint.pt", "checkpoint.safetensors")
    # []
"""

from __future__ import annotations

from .api import convert, load, manifest, read, save, verify, write
from .errors import (
    ConverterError,
    CorruptFileError,
    DestinationError,
    MissingDependencyError,
    UnknownFormatError,
    UnsafeFileError,
    UnsupportedValueError,
)
from .plugins import Format, registry
from .tree import Checkpoint, TensorRef

__version__ = "0.1.0"

__all__ = [
    "Checkpoint",
    "ConverterError",
    "CorruptFileError",
    "DestinationError",
    "Format",
    "MissingDependencyError",
    "TensorRef",
    "UnknownFormatError",
    "UnsafeFileError",
    "UnsupportedValueError",
    "convert",
    "load",
    "manifest",
    "read",
    "registry",
    "save",
    "verify",
    "write",
]
