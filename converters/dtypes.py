"""The dtype table: one row per tensor element type, spelled the way torch spells it.

Formats look up their own spelling here instead of writing if-chains; a format "can hold" a dtype
when its column has a value. Tensor bytes are never interpreted, so only the element size matters
for the bytes themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UnsupportedValueError


@dataclass(frozen=True)
class DType:
    name: str  # torch's spelling: torch.<name>
    itemsize: int  # bytes per element
    safetensors: str | None  # safetensors header "dtype" code, None when safetensors has none
    pt_storage: str | None  # legacy typed-storage class torch pickles (torch.<X>), None: v3 path


DTYPES: dict[str, DType] = {
    row.name: row
    for row in (
        DType("float64", 8, "F64", "DoubleStorage"),
        DType("float32", 4, "F32", "FloatStorage"),
        DType("float16", 2, "F16", "HalfStorage"),
        DType("bfloat16", 2, "BF16", "BFloat16Storage"),
        DType("float8_e4m3fn", 1, "F8_E4M3", None),
        DType("float8_e5m2", 1, "F8_E5M2", None),
        DType("float8_e4m3fnuz", 1, "F8_E4M3FNUZ", None),
        DType("float8_e5m2fnuz", 1, "F8_E5M2FNUZ", None),
        DType("float8_e8m0fnu", 1, "F8_E8M0", None),
        DType("int8", 1, "I8", "CharStorage"),
        DType("int16", 2, "I16", "ShortStorage"),
        DType("int32", 4, "I32", "IntStorage"),
        DType("int64", 8, "I64", "LongStorage"),
        DType("uint8", 1, "U8", "ByteStorage"),
        DType("uint16", 2, "U16", None),
        DType("uint32", 4, "U32", None),
        DType("uint64", 8, "U64", None),
        DType("bool", 1, "BOOL", "BoolStorage"),
        DType("complex64", 8, "C64", "ComplexFloatStorage"),
        DType("complex128", 16, None, "ComplexDoubleStorage"),
        DType("complex32", 4, None, None),
    )
}

BY_SAFETENSORS: dict[str, DType] = {d.safetensors: d for d in DTYPES.values() if d.safetensors}
BY_PT_STORAGE: dict[str, DType] = {d.pt_storage: d for d in DTYPES.values() if d.pt_storage}


def lookup(name: str) -> DType:
    """The row for a torch dtype name; ``UnsupportedValueError`` for names not in the table."""
    try:
        return DTYPES[name]
    except KeyError:
        known = ", ".join(DTYPES)
        raise UnsupportedValueError(f"unknown dtype {name!r}; known dtypes: {known}") from None


def numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count
