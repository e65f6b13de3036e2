"""A small MessagePack codec: headers written by hand for streaming, and a validating parser.

Writing packs headers and scalars here and lets tensor bytes flow straight from their source to
the file, so memory does not grow with the checkpoint. Reading walks the file through ``mmap`` (a
remote file through ``core.storage.RangeBuffer``, which fetches the blocks walked):
every length and count is checked against the bytes actually present and charged to the read's
budget before anything is built, nesting is limited, duplicate map keys are refused, and ``bin``
payloads are returned as byte ranges of the file (never copied). Spec: https://github.com/msgpack/msgpack/blob/master/spec.md
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.budget import MAX_DEPTH, Budget
from ..core.errors import CorruptFileError, UnsupportedValueError

INT64_MIN, UINT64_MAX = -(2**63), 2**64 - 1


# ----------------------------------------------------------------------------------- writing


def pack_nil() -> bytes:
    return b"\xc0"


def pack_bool(value: bool) -> bytes:
    return b"\xc3" if value else b"\xc2"


def pack_int(value: int) -> bytes:
    """The shortest msgpack integer; ``value`` must lie in [-2**63, 2**64)."""
    if 0 <= value < 0x80:
        return bytes([value])
    if -32 <= value < 0:
        return struct.pack("b", value)
    if value >= 0:
        for code, fmt, limit in ((0xCC, ">B", 2**8), (0xCD, ">H", 2**16), (0xCE, ">I", 2**32), (0xCF, ">Q", 2**64)):
            if value < limit:
                return bytes([code]) + struct.pack(fmt, value)
    for code, fmt, limit in ((0xD0, ">b", 2**7), (0xD1, ">h", 2**15), (0xD2, ">i", 2**31), (0xD3, ">q", 2**63)):
        if value >= -limit:
            return bytes([code]) + struct.pack(fmt, value)
    raise OverflowError(f"{value} does not fit a msgpack integer")


def pack_float(value: float) -> bytes:
    return b"\xcb" + struct.pack(">d", value)  # float64 keeps every bit, NaN payloads included


def pack_str(value: str) -> bytes:
    encoded = value.encode("utf-8")  # lone surrogates raise UnicodeEncodeError: callers report the path
    if len(encoded) < 32:  # fixstr: the common case (keys, dtype names, digests are 64: str 8)
        return _FIX_STR[len(encoded)] + encoded
    return _sized(len(encoded), ((0xD9, ">B", 2**8), (0xDA, ">H", 2**16), (0xDB, ">I", 2**32))) + encoded


def bin_header(length: int) -> bytes:
    return _sized(length, ((0xC4, ">B", 2**8), (0xC5, ">H", 2**16), (0xC6, ">I", 2**32)))


def array_header(count: int) -> bytes:
    return _sized(count, ((0xDC, ">H", 2**16), (0xDD, ">I", 2**32)), fix=(0x90, 16))


def map_header(count: int) -> bytes:
    return _sized(count, ((0xDE, ">H", 2**16), (0xDF, ">I", 2**32)), fix=(0x80, 16))


_FIX_STR = [bytes([0xA0 | n]) for n in range(32)]
_FIXEXT_CODES = {1: 0xD4, 2: 0xD5, 4: 0xD6, 8: 0xD7, 16: 0xD8}


def ext_header(code: int, length: int) -> bytes:
    fixed = _FIXEXT_CODES.get(length)
    if fixed is not None:
        return bytes([fixed, code])
    return _sized(length, ((0xC7, ">B", 2**8), (0xC8, ">H", 2**16), (0xC9, ">I", 2**32))) + bytes([code])


def _sized(length: int, forms: tuple[tuple[int, str, int], ...], fix: tuple[int, int] | None = None) -> bytes:
    if fix is not None and length < fix[1]:
        return bytes([fix[0] | length])
    for code, fmt, limit in forms:
        if length < limit:
            return bytes([code]) + struct.pack(fmt, length)
    raise OverflowError(f"length {length} exceeds what msgpack can declare")


def pack_plain(value: Any, *, bigint_ext: int | None = None) -> bytes:
    """Pack a tree of dict (str/int keys), list, tuple, None, bool, int, float, str, bytes (no tensors).

    Ints outside msgpack's 64-bit range become ext ``bigint_ext`` holding their decimal digits.
    """
    kind = type(value)
    if value is None:
        return pack_nil()
    if kind is bool:
        return pack_bool(value)
    if kind is int:
        if bigint_ext is not None and not INT64_MIN <= value <= UINT64_MAX:
            digits = str(value).encode("ascii")
            return ext_header(bigint_ext, len(digits)) + digits
        return pack_int(value)
    if kind is float:
        return pack_float(value)
    if kind is str:
        return pack_str(value)
    if kind is bytes:
        return bin_header(len(value)) + bytes(value)
    if kind is list or kind is tuple:
        return array_header(len(value)) + b"".join(pack_plain(item, bigint_ext=bigint_ext) for item in value)
    if isinstance(value, dict):
        return map_header(len(value)) + b"".join(
            pack_plain(k, bigint_ext=bigint_ext) + pack_plain(v, bigint_ext=bigint_ext) for k, v in value.items()
        )
    raise TypeError(f"cannot pack {kind.__name__}")


# ----------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Bin:
    """A ``bin`` value: ``length`` bytes at ``offset`` of the parsed buffer (not copied)."""

    offset: int
    length: int


@dataclass(frozen=True)
class Ext:
    """An ``ext`` value: type ``code`` and its payload's place in the parsed buffer."""

    code: int
    offset: int
    length: int


# What a parsed value costs, in the budget's node units, measured with tracemalloc over the msgpack
# reader as a whole (the parsed value, the tree built from it in place and, for our files, the
# metadata tree decoded beside it): per value 8-72 B in plain files, 208-633 B in ours (whose
# metadata tree says each value again), at most 0.72 of this charge at 100 B a unit. An array item
# or a map entry's value is charged ITEM_UNITS and a map entry's key KEY_UNITS when the container's
# header is read, before any of them is built; a str longer than SHORT_STR bytes is charged its
# decoded size besides.
ITEM_UNITS = 2
KEY_UNITS = 1
SHORT_STR = 32


class Parser:
    """Parses one msgpack value from ``buffer[start:end]``; offsets in results are absolute.

    Every value is charged to ``budget`` before it is created (by default a budget sized for the
    buffer) and nesting is limited to ``max_depth`` (the budget's ``MAX_DEPTH``). Map keys are
    shared: a key spelled the same way twice is one str object.
    """

    def __init__(self, buffer: Any, file: Path, *, budget: Budget | None = None, max_depth: int = MAX_DEPTH) -> None:
        self.buffer = buffer
        self.file = file
        self.max_depth = max_depth
        self.budget = Budget(file, len(buffer)) if budget is None else budget
        self._keys: dict[bytes, str] = {}
        # A buffer without the buffer protocol (``core.storage.RangeBuffer``: a remote file fetched
        # by blocks) unpacks itself; bytes and mmap go to struct directly.
        self._unpack_from = getattr(buffer, "unpack_from", None)

    def parse(self, start: int, end: int, what: str = "the file") -> Any:
        self._end = end
        self.budget.nodes(ITEM_UNITS, "msgpack values")
        value, position = self._value(start, 0, ())
        if position != end:
            raise CorruptFileError(
                f"{end - position} trailing bytes after the msgpack value of {what} (at byte {position})",
                file=self.file,
            )
        return value

    def _need(self, position: int, count: int, what: str) -> None:
        if count > self._end - position:
            raise CorruptFileError(
                f"{what} at byte {position} declares {count} bytes, only {self._end - position} remain", file=self.file
            )

    def _unpack(self, fmt: str, position: int) -> tuple[Any, int]:
        size = struct.calcsize(fmt)
        self._need(position, size, "a msgpack header")
        if self._unpack_from is not None:
            return self._unpack_from(fmt, position)[0], position + size
        return struct.unpack_from(fmt, self.buffer, position)[0], position + size

    def _value(self, position: int, depth: int, path: tuple[Any, ...]) -> tuple[Any, int]:
        if position >= self._end:
            self._need(position, 1, "a msgpack value")
        code = self.buffer[position]
        position += 1
        if code <= 0x7F:
            return code, position
        if code >= 0xE0:
            return code - 0x100, position
        if code <= 0x8F:
            return self._map(code & 0x0F, position, depth, path)
        if code <= 0x9F:
            return self._array(code & 0x0F, position, depth, path)
        if code <= 0xBF:
            return self._str(code & 0x1F, position)
        if code in _SIMPLE:
            return _SIMPLE[code], position
        sized = _SIZED.get(code)
        if sized is not None:
            kind, fmt = sized
            length, position = self._unpack(fmt, position)
            if kind == "str":
                return self._str(length, position)
            if kind == "bin":
                self._need(position, length, "a msgpack bin")
                return Bin(position, length), position + length
            if kind == "ext":
                ext_code, position = self._unpack(">b", position)
                self._need(position, length, "a msgpack ext")
                return Ext(ext_code, position, length), position + length
            if kind == "array":
                return self._array(length, position, depth, path)
            return self._map(length, position, depth, path)
        if code in _FIXEXT:
            ext_code, position = self._unpack(">b", position)
            length = _FIXEXT[code]
            self._need(position, length, "a msgpack fixext")
            return Ext(ext_code, position, length), position + length
        if code in _NUMBERS:
            value, position = self._unpack(_NUMBERS[code], position)
            return (float(value) if code == 0xCA else value), position
        raise CorruptFileError(
            f"byte 0x{code:02x} at {position - 1} is not a msgpack type", file=self.file, path=path or None
        )

    def _raw(self, length: int, position: int) -> bytes:
        self._need(position, length, "a msgpack str")
        return bytes(self.buffer[position : position + length])

    def _decode(self, raw: bytes, position: int) -> str:
        if len(raw) > SHORT_STR:  # short ones are within an item's units; 4 bytes a char at worst
            self.budget.materialize(len(raw) * (1 if raw.isascii() else 4), "msgpack strings")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CorruptFileError(
                f"msgpack str at byte {position} is not valid UTF-8 ({exc.reason})", file=self.file
            ) from None

    def _str(self, length: int, position: int) -> tuple[str, int]:
        return self._decode(self._raw(length, position), position), position + length

    def _deeper(self, depth: int, position: int) -> int:
        if depth >= self.max_depth:
            raise CorruptFileError(
                f"msgpack nesting deeper than {self.max_depth} levels at byte {position}", file=self.file
            )
        return depth + 1

    def _array(self, count: int, position: int, depth: int, path: tuple[Any, ...]) -> tuple[list[Any], int]:
        self._need(position, count, "a msgpack array of that many items")  # each item takes >= 1 byte
        depth = self._deeper(depth, position)
        self.budget.nodes(count * ITEM_UNITS, "msgpack values")  # before any item is built
        items = []
        for index in range(count):
            item, position = self._value(position, depth, (*path, index))
            items.append(item)
        return items, position

    def _map(self, count: int, position: int, depth: int, path: tuple[Any, ...]) -> tuple[Any, int]:
        self._need(position, 2 * count, "a msgpack map of that many entries")  # each entry takes >= 2 bytes
        depth = self._deeper(depth, position)
        self.budget.nodes(count * (ITEM_UNITS + KEY_UNITS), "msgpack values")  # before any entry is built
        result: dict[Any, Any] = {}
        buffer, keys = self.buffer, self._keys
        for _ in range(count):
            key_position = position
            code = buffer[position] if position < self._end else None
            if code is not None and 0xA0 <= code <= 0xBF:  # a fixstr key: shared with its earlier spellings
                length = code & 0x1F
                raw = self._raw(length, position + 1)
                key = keys.get(raw)
                if key is None:
                    key = keys[raw] = self._decode(raw, position + 1)
                position += 1 + length
            else:
                key, position = self._value(position, depth, path)
                if type(key) is not str and type(key) is not int:
                    raise UnsupportedValueError(
                        f"msgpack map key at byte {key_position} is {type(key).__name__}; "
                        "only str and int keys are supported",
                        file=self.file,
                        path=path or None,
                    )
            if key in result:
                raise CorruptFileError(
                    f"msgpack map has the key {key!r} twice (byte {key_position})", file=self.file, path=path or None
                )
            result[key], position = self._value(position, depth, (*path, key))
        return result, position


_SIMPLE = {0xC0: None, 0xC2: False, 0xC3: True}
_SIZED = {
    0xC4: ("bin", ">B"), 0xC5: ("bin", ">H"), 0xC6: ("bin", ">I"),
    0xC7: ("ext", ">B"), 0xC8: ("ext", ">H"), 0xC9: ("ext", ">I"),
    0xD9: ("str", ">B"), 0xDA: ("str", ">H"), 0xDB: ("str", ">I"),
    0xDC: ("array", ">H"), 0xDD: ("array", ">I"),
    0xDE: ("map", ">H"), 0xDF: ("map", ">I"),
}  # fmt: skip
_FIXEXT = {0xD4: 1, 0xD5: 2, 0xD6: 4, 0xD7: 8, 0xD8: 16}
_NUMBERS = {
    0xCA: ">f", 0xCB: ">d",
    0xCC: ">B", 0xCD: ">H", 0xCE: ">I", 0xCF: ">Q",
    0xD0: ">b", 0xD1: ">h", 0xD2: ">i", 0xD3: ">q",
}  # fmt: skip
