"""NumPy's ``.npy`` array file (``numpy.save``), the members of an ``.npz`` archive (``numpy.savez``).

The layout (numpy's ``numpy/lib/_format_impl.py`` states it): the magic ``\\x93NUMPY``, a version
byte pair (1.0; 2.0 and 3.0 only for headers past 65535 bytes or not latin-1), the header's length
(2 bytes in 1.0, 4 after), then the header: the text of a Python dict literal ``{'descr': '<f4',
'fortran_order': False, 'shape': (2, 3), }`` padded with spaces and a newline so that the array
data starts at a multiple of 64 bytes; then the array's bytes, C order unless ``fortran_order``.

Written here exactly as ``numpy.save`` writes it (:func:`header_bytes`: byte for byte the same
header, its growth padding included). Read strictly: the header is at most ``MAX_HEADER_CHARS``
(numpy.load's own limit without ``allow_pickle``), parsed by a small parser of the literals it may
hold (strings, ints, bools, tuples and lists), never evaluated; exactly the three keys; a
``descr`` this table names (:func:`dtype_for_descr`), every other one refused by name: object
arrays (a pickle, never unpickled), strings, dates, structured records, ``float128``.

Arrays whose bytes are not what a tensor holds (little-endian, C order) are turned into it while
they are read, in bounded memory: :class:`ByteSwapped` (big-endian ``descr``) and
:class:`FortranOrder` (``fortran_order: True``). Neither reads anything until its bytes are used.
"""

from __future__ import annotations

import re
import struct
import zlib
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ..core.dtypes import DTYPES, numel
from ..core.errors import CorruptFileError, UnsupportedValueError, shown
from ..core.integrity import crc_message
from ..core.sources import CHUNK_SIZE, ByteSource, FileRange, fill_from_chunks
from ..core.tree import MAX_DIM, MAX_NDIM
from .zip import first_member_name

NPY_MAGIC = b"\x93NUMPY"
PREFIX_BYTES = {(1, 0): 10, (2, 0): 12, (3, 0): 12}  # magic, version and header length, per version
MAX_HEADER_CHARS = 10_000  # numpy.load's max_header_size: longer headers need allow_pickle there
ARRAY_ALIGN = 64  # numpy pads the header so that the array data starts at a multiple of this
GROWTH_AXIS_MAX_DIGITS = 21  # numpy leaves room in the header to grow the shape's first dim
NPZ_METADATA_MEMBER = "__sdconvert__.npy"  # statedict-convert's metadata in an .npz: JSON text as a uint8 array
FORTRAN_BAND = 64 << 20  # bytes of C-order output one pass over a Fortran-order array makes

# torch dtype name -> the descr written. Dtypes numpy cannot name are written as raw bytes of their
# size (a void descr): numpy.load gives their exact bytes, which ``.view(ml_dtypes.bfloat16)``
# makes the right type; bfloat16 is spelled '<V2', as numpy.save spells an ml_dtypes.bfloat16
# array (the only 2-byte type it names so), float8 and complex32 as numpy's plain '|V1'/'|V4'.
DESCRS: dict[str, str] = {
    "float64": "<f8", "float32": "<f4", "float16": "<f2", "bfloat16": "<V2",
    "float8_e4m3fn": "|V1", "float8_e5m2": "|V1", "float8_e4m3fnuz": "|V1", "float8_e5m2fnuz": "|V1",
    "float8_e8m0fnu": "|V1",
    "int8": "|i1", "int16": "<i2", "int32": "<i4", "int64": "<i8",
    "uint8": "|u1", "uint16": "<u2", "uint32": "<u4", "uint64": "<u8",
    "bool": "|b1", "complex64": "<c8", "complex128": "<c16", "complex32": "|V4",
}  # fmt: skip
# What numpy itself names (type code and size), by torch dtype name.
_NUMPY_NAMED = {descr[1:]: name for name, descr in DESCRS.items() if descr[1] != "V"}
VOID_INFERRED = {"<V2": "bfloat16"}  # numpy.save of an ml_dtypes.bfloat16 array: no other type is '<V2'


@dataclass(frozen=True)
class NpyHeader:
    version: tuple[int, int]
    data_offset: int  # bytes before the array data: magic, version, length and header
    descr: str
    fortran_order: bool
    shape: tuple[int, ...]


class NpyError(Exception):
    """A problem with an .npy header; the caller names where it is (a file, an archive member)."""

    def __init__(self, message: str, unsupported: bool = False) -> None:
        super().__init__(message)
        self.unsupported = unsupported


def raise_at(error: NpyError, where: str, file: Any) -> None:
    """``error`` as the ConverterError it is, ``where`` (``"member 'w.npy': "``) before its text."""
    kind = UnsupportedValueError if error.unsupported else CorruptFileError
    raise kind(f"{where}{error}", file=file) from None


# ------------------------------------------------------------------------------------- writing


def header_bytes(descr: str, shape: tuple[int, ...]) -> bytes:
    """The bytes before the array data of ``numpy.save`` of a C-order array (same header, same padding).

    >>> header_bytes("<f4", (2, 3))[:69]
    b"\\x93NUMPY\\x01\\x00v\\x00{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }"
    >>> len(header_bytes("<f4", ())) % 64
    0
    """
    text = "{" + f"'descr': {descr!r}, 'fortran_order': False, 'shape': {tuple(shape)!r}, " + "}"
    if shape:  # room for the first dim to grow in place, as numpy leaves it
        text += " " * (GROWTH_AXIS_MAX_DIGITS - len(repr(shape[0])))
    encoded = text.encode("latin1")
    for version, length_format in (((1, 0), "<H"), ((2, 0), "<I")):
        prefix = PREFIX_BYTES[version]
        padding = ARRAY_ALIGN - (prefix + len(encoded) + 1) % ARRAY_ALIGN
        length = len(encoded) + padding + 1
        if length < 1 << (8 * struct.calcsize(length_format)):
            return NPY_MAGIC + bytes(version) + struct.pack(length_format, length) + encoded + b" " * padding + b"\n"
    raise AssertionError("an .npy header past 4 GiB")  # a shape has at most MAX_NDIM dims


# ------------------------------------------------------------------------------------- reading


def parse_header(read: Callable[[int], bytes], size: int) -> NpyHeader:
    """The header of an .npy of ``size`` bytes whose first ``n`` bytes ``read(n)`` gives (fewer at
    its end). Raises ``NpyError`` for anything but a header this module reads."""
    prefix = read(12)
    if not prefix.startswith(NPY_MAGIC):
        raise NpyError("not an .npy array: it does not start with the magic \\x93NUMPY")
    if len(prefix) < 10:
        raise NpyError(f"the .npy ends after {size} bytes, inside its header")
    version = (prefix[6], prefix[7])
    if version not in PREFIX_BYTES:
        raise NpyError(f".npy format version {version[0]}.{version[1]} is not one numpy writes (1.0, 2.0, 3.0)", True)
    start = PREFIX_BYTES[version]
    if len(prefix) < start:
        raise NpyError(f"the .npy ends after {size} bytes, inside its header")
    (length,) = struct.unpack_from("<H" if version == (1, 0) else "<I", prefix, 8)
    if length > MAX_HEADER_CHARS:
        raise NpyError(
            f"the .npy header is {length} bytes, more than the {MAX_HEADER_CHARS} numpy.load reads without allow_pickle"
        )
    if start + length > size:
        raise NpyError(f"the .npy header needs {start + length} bytes; there are {size}")
    raw = read(start + length)[start:]
    if len(raw) != length:
        raise NpyError(f"the .npy ends after {size} bytes, inside its header")
    try:
        text = raw.decode("utf-8" if version == (3, 0) else "latin1")
    except UnicodeDecodeError:
        raise NpyError("the .npy header (format 3.0) is not UTF-8") from None
    canonical = _CANONICAL.fullmatch(text)  # numpy.save's own spelling, parsed at once
    if canonical is not None:
        dims = canonical.group(3).replace(" ", "").split(",")
        fields = {
            "descr": canonical.group(1),
            "fortran_order": canonical.group(2) == "True",
            "shape": tuple(int(dim) for dim in dims if dim),
        }
    else:
        fields = _Literal(text).parse_dict()
    if set(fields) != {"descr", "fortran_order", "shape"}:
        raise NpyError(
            f"the .npy header must have exactly the keys descr, fortran_order and shape, found {_listed(fields)}"
        )
    descr, fortran, shape = fields["descr"], fields["fortran_order"], fields["shape"]
    if type(descr) is not str:
        raise NpyError(
            f"descr {_short(descr)} is a structured (record) dtype; only plain numeric arrays are read", True
        )
    if type(fortran) is not bool:
        raise NpyError(f"fortran_order must be True or False, found {_short(fortran)}")
    if type(shape) is not tuple or not all(type(dim) is int for dim in shape):
        raise NpyError(f"shape must be a tuple of ints, found {_short(shape)}")
    if len(shape) > MAX_NDIM:
        raise NpyError(f"shape has {len(shape)} dims, at most {MAX_NDIM} are supported", True)
    if any(dim < 0 or dim > MAX_DIM for dim in shape):
        raise NpyError(f"shape {_short(shape)} must hold ints in [0, 2**63)")
    return NpyHeader(version, start + length, descr, fortran, shape)


def dtype_for_descr(descr: str) -> tuple[str, bool]:
    """(torch dtype name, big-endian) for a plain numeric descr; ``NpyError`` naming any other.

    Void descrs are not here (their element type is not in the header): see ``VOID_INFERRED``.
    """
    match = re.fullmatch(r"([<>|=])([a-zA-Z])(\d{1,3})", descr)
    if match is None:
        if re.fullmatch(r"[<>|=]?[OSUaMmV].*", descr):
            raise NpyError(_refused_kind(descr), True)
        raise NpyError(f"descr {_short(descr)} is not a numpy dtype this reader knows", True)
    order, code = match.group(1), match.group(2) + str(int(match.group(3)))
    if code[0] in "OSUaMmV":
        raise NpyError(_refused_kind(descr), True)
    name = _NUMPY_NAMED.get(code)
    if name is None and code == "f1":
        raise NpyError(
            f"descr {_short(descr)} is what numpy.save writes for ml_dtypes.float8_e5m2 (numpy.load cannot read it "
            "either): its element type is not recorded",
            True,
        )
    if name is None:
        known = "is a size no tensor dtype has (float128?)" if code[0] in "biufc" else "is not a numpy type code"
        raise NpyError(f"descr {_short(descr)} {known}", True)
    single = DTYPES[name].itemsize == 1
    if order == "=" or (order == "|" and not single):
        raise NpyError(f"descr {_short(descr)} does not say its byte order ('<' or '>')")
    return name, order == ">" and not single


def _refused_kind(descr: str) -> str:
    kinds = {"O": "Python objects (the data is a pickle, never unpickled here)", "S": "byte strings",
             "a": "byte strings", "U": "unicode strings", "M": "datetimes", "m": "timedeltas",
             }  # fmt: skip
    letter = descr.lstrip("<>|=")[:1]
    if letter == "V":
        return (
            f"descr {_short(descr)} is raw bytes whose element type the file does not record (numpy.save writes "
            "ml_dtypes' float8 and int4 arrays so); of those only '<V2' (bfloat16) is read"
        )
    return f"descr {_short(descr)} holds {kinds.get(letter, 'non-numeric values')}, not a tensor's numbers"


def swap_unit(name: str) -> int:
    """Bytes a big-endian element of dtype ``name`` swaps as one (a complex number's halves apart)."""
    size = DTYPES[name].itemsize
    return size // 2 if name.startswith("complex") else size


def fortran_is_c_order(shape: tuple[int, ...]) -> bool:
    """Whether Fortran and C order lay ``shape`` out alike (at most one dim longer than 1)."""
    return sum(dim > 1 for dim in shape) <= 1


def may_be_npz(head: bytes) -> bool:
    """Whether a file's first bytes may be an .npy or an .npz: any zip but one whose first record
    is torch.save's ``<archive>/data.pkl`` (numpy.savez names its first member after the first
    array's key, which may be longer than the bytes looked at, or not end with .npy)."""
    if head.startswith(NPY_MAGIC):
        return True
    if not head.startswith(b"PK\x03\x04"):
        return False
    name = first_member_name(head)
    return name is None or not (name.endswith(b"/data.pkl") and name.count(b"/") == 1)


def starts_like_npz(head: bytes) -> bool:
    """Whether a file's first bytes are those of an .npz: a zip whose first record is an ``.npy``
    (``numpy.savez``; ours starts with its metadata member). Only a name the bytes hold whole
    counts: a torch.save archive starts with ``<archive>/data.pkl``."""
    name = first_member_name(head)
    return name is not None and name.endswith(b".npy")


_CANONICAL = re.compile(
    r"\{'descr': '([<>|=][a-zA-Z]\d{1,3})', 'fortran_order': (True|False), "
    r"'shape': \(((?:\d{1,20}, )*(?:\d{1,20},?)?)\), \} *\n?"
)
_TOKEN = re.compile(
    r"\s*(?:(?P<str>'[^'\\\n]*'|\"[^\"\\\n]*\")|(?P<int>-?\d+)L?(?![\w.])|(?P<name>True|False)(?!\w)|(?P<punct>[{}()\[\],:]))"
)


class _Literal:
    """A strict parser of the dict literal of an .npy header: strings (no escapes), ints (Python 2's
    ``3L`` too), ``True``/``False``, tuples and lists of them, at most 4 levels deep. Not ``eval``,
    not ``ast``: anything else is an error naming where it is."""

    def __init__(self, text: str) -> None:
        self.text, self.position = text, 0

    def parse_dict(self) -> dict[str, Any]:
        self._expect("{")
        out: dict[str, Any] = {}
        while not self._next_is("}"):
            kind, key = self._token()
            if kind != "str":
                raise self._error("a string key")
            if key in out:
                raise NpyError(f"the .npy header has the key {_short(key)} twice")
            self._expect(":")
            out[key] = self._value(1)
            if not self._next_is("}"):
                self._expect(",")
        self._expect("}")
        if self.text[self.position :].strip(" \t\r\n"):  # numpy pads with spaces and a newline
            raise self._error("the end of the header")
        return out

    def _value(self, depth: int) -> Any:
        if depth > 4:
            raise NpyError("the .npy header is nested too deeply")
        if _TOKEN.match(self.text, self.position) is None:
            raise self._error("a value (a string, int, True, False, tuple or list)")
        kind, value = self._token()
        if kind in ("str", "int", "name"):
            return value
        if value in ("(", "["):
            closing = ")" if value == "(" else "]"
            items = []
            while not self._next_is(closing):
                items.append(self._value(depth + 1))
                if not self._next_is(closing):
                    self._expect(",")
            self._expect(closing)
            return tuple(items) if value == "(" else items
        raise self._error("a value")

    def _token(self) -> tuple[str, Any]:
        match = _TOKEN.match(self.text, self.position)
        if match is None:
            raise self._error("a string, int, True, False or punctuation")
        self.position = match.end()
        kind = match.lastgroup
        assert kind is not None
        text = match.group(kind)
        if kind == "str":
            return kind, text[1:-1]
        if kind == "int":
            if len(text) > 40:
                raise NpyError(f"the .npy header holds an integer of {len(text)} digits")
            return kind, int(text)
        if kind == "name":
            return kind, text == "True"
        return kind, text

    def _next_is(self, punct: str) -> bool:
        match = _TOKEN.match(self.text, self.position)
        return match is not None and match.group("punct") == punct

    def _expect(self, punct: str) -> None:
        match = _TOKEN.match(self.text, self.position)
        if match is None or match.group("punct") != punct:
            raise self._error(repr(punct))
        self.position = match.end()

    def _error(self, expected: str) -> NpyError:
        rest = self.text[self.position :]
        at = self.position + len(rest) - len(rest.lstrip())
        found = repr(shown(rest.lstrip()[:40], 50)) if rest.strip() else "the end"
        return NpyError(f"the .npy header is not a dict literal: expected {expected} at char {at}, found {found}")


def _listed(fields: dict[str, Any]) -> str:
    return ", ".join(shown(key, 40) for key in sorted(fields)[:6]) or "none"


def _short(value: Any) -> str:
    return shown(repr(value), 60)


# ----------------------------------------------------------------------- arrays read as tensors


@dataclass(frozen=True)
class Streamed:
    """A source handed out in chunks only (``readinto`` goes through ``chunks``), so that a copy goes
    through Python (into a deflater, say) instead of the kernel; the classes below change the bytes
    on the way."""

    source: ByteSource

    @property
    def nbytes(self) -> int:
        return self.source.nbytes

    def readinto(self, buffer: memoryview) -> None:
        fill_from_chunks(self, buffer)

    def chunks(self, chunk_size: int = CHUNK_SIZE) -> Iterator[memoryview]:
        return self.source.chunks(chunk_size)


@dataclass(frozen=True)
class RecordChecked(Streamed):
    """A byte range that is one whole checksummed record (an .npy member's array data), streamed
    and checked against the record's CRC-32 at the end of every full read, for the sources below,
    which are not byte ranges and so are not checked by the writer."""

    source: FileRange

    def chunks(self, chunk_size: int = CHUNK_SIZE) -> Iterator[memoryview]:
        record = self.source.record
        crc = 0
        for chunk in self.source.chunks(chunk_size):
            if record is not None:
                crc = zlib.crc32(chunk, crc)
            yield chunk
        if record is not None and crc != record.crc32:
            raise CorruptFileError(crc_message(record, crc), file=record.path)


@dataclass(frozen=True)
class ByteSwapped(Streamed):
    """Big-endian elements handed out little-endian: each ``unit`` bytes reversed (a complex
    number's halves each), a chunk at a time."""

    unit: int  # 2, 4 or 8

    def chunks(self, chunk_size: int = CHUNK_SIZE) -> Iterator[memoryview]:
        code = {2: "H", 4: "I", 8: "Q"}[self.unit]
        pending = b""
        for chunk in self.source.chunks(chunk_size):
            data = pending + bytes(chunk) if pending else chunk
            whole = len(data) // self.unit * self.unit
            pending = bytes(data[whole:])
            if whole:
                swapped = array(code)
                swapped.frombytes(data[:whole])
                swapped.byteswap()
                yield memoryview(swapped).cast("B")
        if pending:  # the inner source holds a whole number of elements: never left over
            raise AssertionError(f"{len(pending)} bytes left over swapping {self.unit}-byte elements")


@dataclass(frozen=True)
class FortranOrder(Streamed):
    """The C-order bytes of an array stored in Fortran (column-major) order, made in bands of its
    first axis: each band is one sequential pass over the stored bytes (a stream: a deflated
    member too), scattered into the band, which is then handed out. Memory: the band twice (at
    most ``band`` bytes, or one index of the first axis when that is larger) and a chunk; passes:
    the array's size over the band's."""

    shape: tuple[int, ...]
    itemsize: int
    band: int = FORTRAN_BAND

    def band_bytes(self) -> int:
        """The largest band this array makes (for the read's budget)."""
        row = numel(self.shape[1:]) * self.itemsize
        return min(self.nbytes, max(row, self.band // max(row, 1) * row))

    def chunks(self, chunk_size: int = CHUNK_SIZE) -> Iterator[memoryview]:
        import numpy as np

        first, rest = self.shape[0], self.shape[1:]
        per_band = max(1, self.band_bytes() // (numel(rest) * self.itemsize))
        element = np.dtype(f"V{self.itemsize}")
        for begin in range(0, first, per_band):
            end = min(first, begin + per_band)
            band = np.empty((end - begin, numel(rest)), dtype=element)  # [i0 - begin, q]: q as stored (i1 fastest)
            self._pass(band, begin, end, element)
            if len(rest) > 1:  # q's order reversed into C order: one transposed copy of the band
                shaped = band.reshape((end - begin, *reversed(rest)))
                band = np.ascontiguousarray(shaped.transpose((0, *range(len(rest), 0, -1))))
            flat = band.reshape(-1).view(np.uint8)
            for start in range(0, flat.nbytes, chunk_size):
                yield flat[start : start + chunk_size].data
            del band, flat

    def _pass(self, band: Any, begin: int, end: int, element: Any) -> None:
        """Fill ``band`` with the elements whose first index is in [begin, end): one read through."""
        import numpy as np

        size, first = self.itemsize, self.shape[0]
        position = 0  # index of the next stored element
        pending = bytearray()
        for chunk in self.source.chunks():
            view = memoryview(chunk)
            if pending:
                taken = view[: size - len(pending)]
                pending += taken
                view = view[len(taken) :]
                if len(pending) == size:
                    _scatter(band, np.frombuffer(bytes(pending), element), position, first, begin, end)
                    position += 1
                    pending = bytearray()
            whole = len(view) // size * size
            if whole:
                _scatter(band, np.frombuffer(view[:whole], element), position, first, begin, end)
                position += whole // size
            pending += view[whole:]


def _scatter(band: Any, elements: Any, start: int, first: int, begin: int, end: int) -> None:
    """Stored elements [start, start + len) — element e is (q, i0) = divmod(e, first) — into
    ``band[i0 - begin, q]`` for those with i0 in [begin, end)."""
    stop = start + len(elements)
    position = start
    while position < stop:
        q, i0 = divmod(position, first)
        if i0 == 0 and stop - position >= first:  # whole stored rows: one strided copy
            rows = (stop - position) // first
            block = elements[position - start : position - start + rows * first].reshape(rows, first)
            band[:, q : q + rows] = block[:, begin:end].T
            position += rows * first
            continue
        row_end = min(stop, (q + 1) * first)
        low, high = max(i0, begin), min(row_end - q * first, end)
        if low < high:
            band[low - begin : high - begin, q] = elements[q * first + low - start : q * first + high - start]
        position = row_end
