"""The core dtype table: every tensor element type by torch's name, with its size in bytes.

Tensor bytes are never interpreted, so only the element size matters for the bytes themselves.
Each format keeps its own codes for these names (its ``dtype_codes``) beside its code; a format
"can hold" a dtype when it has a code for it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UnsupportedValueError


@dataclass(frozen=True)
class DType:
    name: str  # torch's spelling: torch.<name>
    itemsize: int  # bytes per element


DTYPES: dict[str, DType] = {
    row.name: row
    for row in (
        DType("float64", 8),
        DType("float32", 4),
        DType("float16", 2),
        DType("bfloat16", 2),
        DType("float8_e4m3fn", 1),
        DType("float8_e5m2", 1),
        DType("float8_e4m3fnuz", 1),
        DType("float8_e5m2fnuz", 1),
        DType("float8_e8m0fnu", 1),
        DType("int8", 1),
        DType("int16", 2),
        DType("int32", 4),
        DType("int64", 8),
        DType("uint8", 1),
        DType("uint16", 2),
        DType("uint32", 4),
        DType("uint64", 8),
        DType("bool", 1),
        DType("complex64", 8),
        DType("complex128", 16),
        DType("complex32", 4),
    )
}


# The dtypes a dtype cast converts between (transforms/cast.py); a stored cast record names one.
CASTABLE = ("float64", "float32", "float16", "bfloat16")


def lookup(name: str) -> DType:
    """The row for a torch dtype name; ``UnsupportedValueError`` for names not in the table."""
    try:
        return DTYPES[name]
    except KeyError:
        known = ", ".join(DTYPES)
        raise UnsupportedValueError(f"unknown dtype {name!r}; known dtypes: {known}") from None


def itemsize(name: str) -> int:
    """Bytes per element of the dtype named ``name`` (a name already checked by ``TensorRef``)."""
    return DTYPES[name].itemsize


def numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count
