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
    onnx: int | None  # onnx.TensorProto.DataType value, None when ONNX has no such type


DTYPES: dict[str, DType] = {
    row.name: row
    for row in (
        DType("float64", 8, "F64", "DoubleStorage", 11),
        DType("float32", 4, "F32", "FloatStorage", 1),
        DType("float16", 2, "F16", "HalfStorage", 10),
        DType("bfloat16", 2, "BF16", "BFloat16Storage", 16),
        DType("float8_e4m3fn", 1, "F8_E4M3", None, 17),
        DType("float8_e5m2", 1, "F8_E5M2", None, 19),
        DType("float8_e4m3fnuz", 1, "F8_E4M3FNUZ", None, 18),
        DType("float8_e5m2fnuz", 1, "F8_E5M2FNUZ", None, 20),
        DType("float8_e8m0fnu", 1, "F8_E8M0", None, 24),
        DType("int8", 1, "I8", "CharStorage", 3),
        DType("int16", 2, "I16", "ShortStorage", 5),
        DType("int32", 4, "I32", "IntStorage", 6),
        DType("int64", 8, "I64", "LongStorage", 7),
        DType("uint8", 1, "U8", "ByteStorage", 2),
        DType("uint16", 2, "U16", None, 4),
        DType("uint32", 4, "U32", None, 12),
        DType("uint64", 8, "U64", None, 13),
        DType("bool", 1, "BOOL", "BoolStorage", 9),
        DType("complex64", 8, "C64", "ComplexFloatStorage", 14),
        DType("complex128", 16, None, "ComplexDoubleStorage", 15),
        DType("complex32", 4, None, None, None),
    )
}

BY_SAFETENSORS: dict[str, DType] = {d.safetensors: d for d in DTYPES.values() if d.safetensors}
BY_PT_STORAGE: dict[str, DType] = {d.pt_storage: d for d in DTYPES.values() if d.pt_storage}
BY_ONNX: dict[int, DType] = {d.onnx: d for d in DTYPES.values() if d.onnx is not None}


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
