"""Protocol-buffer wire format, just enough to stream ONNX files.

ONNX files are one protobuf message. Reading them with ``onnx.load`` copies every tensor into
memory; here fields are walked in place (over ``mmap``), every length is checked against the bytes
of the enclosing message before it is used, and a ``bytes`` field comes back as its byte range.
Writing splices fields by hand: a message's bytes are its fields in any order, so a tensor's
``raw_data`` can be streamed after its other fields without building the message in memory.
Wire format: https://protobuf.dev/programming-guides/encoding/
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import CorruptFileError

VARINT, I64, LEN, I32 = 0, 1, 2, 5


@dataclass(frozen=True)
class Field:
    number: int
    wire_type: int
    value: int  # the varint or fixed-width value; for LEN fields, the payload's length
    offset: int  # where the payload starts (LEN) or the value's bytes start

    @property
    def end(self) -> int:
        return self.offset + self.value if self.wire_type == LEN else self.offset


def read_varint(buffer: Any, position: int, end: int, file: Path) -> tuple[int, int]:
    result = shift = 0
    for index in range(10):
        if position + index >= end:
            raise CorruptFileError(f"protobuf varint at byte {position} runs past its message", file=file)
        byte = buffer[position + index]
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, position + index + 1
        shift += 7
    raise CorruptFileError(f"protobuf varint at byte {position} is longer than 10 bytes", file=file)


def fields(buffer: Any, start: int, end: int, file: Path) -> Iterator[Field]:
    """The fields of the message in ``buffer[start:end]``, each checked to lie inside it."""
    position = start
    while position < end:
        key, position = read_varint(buffer, position, end, file)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise CorruptFileError(f"protobuf field number 0 at byte {position}", file=file)
        if wire_type == VARINT:
            value, after = read_varint(buffer, position, end, file)
            yield Field(number, wire_type, value, position)
            position = after
        elif wire_type in (I64, I32):
            size = 8 if wire_type == I64 else 4
            if position + size > end:
                raise CorruptFileError(f"protobuf fixed field at byte {position} runs past its message", file=file)
            yield Field(number, wire_type, int.from_bytes(buffer[position : position + size], "little"), position)
            position += size
        elif wire_type == LEN:
            length, position = read_varint(buffer, position, end, file)
            if length > end - position:
                raise CorruptFileError(
                    f"protobuf field {number} at byte {position} declares {length} bytes, "
                    f"its message has {end - position} left",
                    file=file,
                )
            yield Field(number, wire_type, length, position)
            position += length
        else:
            raise CorruptFileError(
                f"protobuf wire type {wire_type} (field {number}) at byte {position} is not supported", file=file
            )


def packed_varints(buffer: Any, field: Field, file: Path) -> Iterator[int]:
    position, end = field.offset, field.end
    while position < end:
        value, position = read_varint(buffer, position, end, file)
        yield value


def text(buffer: Any, field: Field, file: Path, what: str) -> str:
    if field.wire_type != LEN:
        raise CorruptFileError(f"{what} must be a length-delimited string", file=file)
    try:
        return bytes(buffer[field.offset : field.end]).decode("utf-8")
    except UnicodeDecodeError:
        raise CorruptFileError(f"{what} at byte {field.offset} is not valid UTF-8", file=file) from None


# ----------------------------------------------------------------------------------- writing


def varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64  # int64 negatives take ten bytes, as protobuf writes them
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def len_header(number: int, length: int) -> bytes:
    """The key and length that precede a length-delimited field's payload."""
    return varint(number << 3 | LEN) + varint(length)


def varint_field(number: int, value: int) -> bytes:
    return varint(number << 3 | VARINT) + varint(value)


def bytes_field(number: int, payload: bytes) -> bytes:
    return len_header(number, len(payload)) + payload


def string_field(number: int, value: str) -> bytes:
    return bytes_field(number, value.encode("utf-8"))
