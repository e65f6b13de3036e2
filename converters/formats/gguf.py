"""``gguf``: llama.cpp's GGUF v3 (ggml), read and written by this module itself.

Spec of what we add: ``schemas/gguf.md``; the format itself: ggml's ``docs/gguf.md``. In short:

- a 24-byte header (``GGUF``, version 3, tensor count, key/value count), typed key/values, one
  info per tensor (name, dims in GGUF order — torch's reversed —, GGML type, data offset), zero
  padding to ``general.alignment`` (written explicitly, 32 by default), then the tensor data, each
  tensor at an aligned offset in tree order (the order ggml requires), padded to the alignment;
- tensors of the GGML types that hold torch dtypes unchanged: F32, F16, BF16, F64, I8, I16, I32,
  I64; any other dtype is refused by the converter naming the tensor (``dtype_codes``);
- tensor names are the storage keys (a bare ``state_dict`` keeps its own keys); a key ggml cannot
  take as a name (over 63 bytes, a NUL, not UTF-8) gets a short name, its first bytes + ``~`` + 8
  hex digits, with the real key in ``sdconvert.names``;
- our key/values, all GGUF strings: ``sdconvert.tree`` (the manifest tree node), ``sdconvert.blake3``
  (every tensor's digest), ``sdconvert.tree_blake3`` (the digest of everything else),
  ``sdconvert.casts`` (only when a tensor was made by a dtype cast), ``sdconvert.names`` and
  ``sdconvert.file_metadata`` (the carried metadata GGUF cannot type, as JSON), plus
  ``sdconvert.version`` (uint32); the digests are fixed-length placeholders rewritten in place once
  the tensors went by (the header is reserved whole, nothing after it moves);
- the file's own metadata (``Checkpoint.carried_metadata``) as native key/values where GGUF has a
  type for the value (str, bool, int64/uint64, float64, arrays of one of those);
  ``general.architecture`` is the carried one, else ``sdconvert`` (the file holds weights, not a
  model of an architecture llama.cpp knows).

Reading takes files of any GGUF v2/v3 writer (``gguf.GGUFWriter``): every count, length and offset
is checked against the file's size before anything is made, the budget is charged for every key,
value and tensor info first, and duplicate keys or names, unknown value or tensor types, arrays
nested deeper than 8 levels, misaligned, overlapping, out-of-file data, gaps and trailing bytes are
refused; quantized tensors (Q4_0, Q8_0, K-quants...) are refused by name, never mis-read. The
non-``sdconvert`` key/values become ``file_metadata`` (``general.alignment`` aside: a layout fact).
"""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

from blake3 import blake3

from ..core import manifests
from ..core.atomic import atomic_output
from ..core.budget import Budget
from ..core.contract import FormatBase, WriteContext, option
from ..core.dtypes import itemsize, numel
from ..core.errors import ConverterError, CorruptFileError, UnsupportedValueError, shown
from ..core.sources import FileRange
from ..core.storage import is_remote, location, open_read, size_of
from ..core.stored import (
    STR_OBJECT_BYTES,
    check_tree_digest,
    loads_json_strict,
    paused_gc,
    read_casts,
    read_digests,
    tree_from_stored,
)
from ..core.tree import MAX_DIM, MAX_NDIM, Checkpoint, TensorRef
from ..core.writing import DIGEST_PLACEHOLDER, Reserved, TensorWriter

MAGIC = b"GGUF"
VERSION = 3
READ_VERSIONS = (2, 3)  # v2 has v3's layout (v3 added big-endian files, which are refused)
HEADER_BYTES = 24  # magic, version, tensor count, key/value count
DEFAULT_ALIGNMENT = 32  # the spec's default when general.alignment is absent
MAX_ALIGNMENT = 1 << 16
ARCHITECTURE = "sdconvert"  # general.architecture of a file that is no llama.cpp architecture's model
MAX_NAME_BYTES = 63  # ggml: GGML_MAX_NAME (64) includes the C string's NUL
SHORT_HEAD_BYTES = MAX_NAME_BYTES - 9  # a short name: the key's first bytes, "~", 8 hex digits
MAX_KEY_BYTES = 65535  # the spec's limit for a key
MAX_ARRAY_NESTING = 8  # arrays of arrays (ggml itself reads none)
MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, the smallest value
MIN_INFO_BYTES = 8 + 4 + 4 + 8  # name length, dims count, type, offset

ALIGNMENT_KEY = "general.alignment"
ARCHITECTURE_KEY = "general.architecture"
OWN_PREFIX = "sdconvert."
VERSION_KEY = "sdconvert.version"
TREE_KEY = "sdconvert.tree"
NAMES_KEY = "sdconvert.names"  # {GGUF tensor name: storage key} for the keys that needed a short name
METADATA_KEY = "sdconvert.file_metadata"  # carried metadata GGUF has no type for, as JSON
CASTS_KEY = "sdconvert.casts"
DIGESTS_KEY = "sdconvert.blake3"
TREE_DIGEST_KEY = "sdconvert.tree_blake3"

# torch dtype name -> GGML tensor type (ggml.h's ggml_type).
DTYPE_CODES: dict[str, int] = {
    "float32": 0, "float16": 1, "bfloat16": 30, "float64": 28,
    "int8": 24, "int16": 25, "int32": 26, "int64": 27,
}  # fmt: skip
BY_CODE = {code: name for name, code in DTYPE_CODES.items()}
TYPE_NAMES = {0: "F32", 1: "F16", 30: "BF16", 28: "F64", 24: "I8", 25: "I16", 26: "I32", 27: "I64"}
# Block types: quantized, or repacked quantized layouts since removed from GGUF files.
QUANTIZED = {
    2: "Q4_0", 3: "Q4_1", 4: "Q4_2", 5: "Q4_3", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
    10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS",
    17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS",
    29: "IQ1_M", 31: "Q4_0_4_4", 32: "Q4_0_4_8", 33: "Q4_0_8_8", 34: "TQ1_0", 35: "TQ2_0",
    36: "IQ4_NL_4_4", 37: "IQ4_NL_4_8", 38: "IQ4_NL_8_8", 39: "MXFP4", 40: "NVFP4", 41: "Q1_0",
}  # fmt: skip

# Metadata value types (gguf_metadata_value_type).
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
VALUE_TYPE_NAMES = (
    "uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "bool", "string", "array", "uint64",
    "int64", "float64",
)  # fmt: skip
NUMBERS = {
    UINT8: "B", INT8: "b", UINT16: "H", INT16: "h", UINT32: "I", INT32: "i", FLOAT32: "f",
    UINT64: "Q", INT64: "q", FLOAT64: "d",
}  # fmt: skip
NUMBER_BYTES = {vtype: struct.calcsize("<" + code) for vtype, code in NUMBERS.items()}
MIN_VALUE_BYTES = {**NUMBER_BYTES, BOOL: 1, STRING: 8, ARRAY: 4 + 8}


@dataclass(frozen=True)
class GgufOptions:
    alignment: int = option(
        DEFAULT_ALIGNMENT,
        "align tensor data to N bytes (general.alignment: a power of two from 8 to 65536)",
        kind="int",
        metavar="N",
        flag="--gguf-alignment",
    )

    def __post_init__(self) -> None:
        value = self.alignment
        if type(value) is not int or not 8 <= value <= MAX_ALIGNMENT or value & (value - 1):
            raise ConverterError(f"the GGUF alignment must be a power of two from 8 to {MAX_ALIGNMENT}, got {value!r}")


class GgufFormat(FormatBase):
    name = "gguf"
    suffixes: tuple[str, ...] = (".gguf",)
    description = "GGUF (llama.cpp, ggml): gguf-py's GGUFReader, ggml's gguf_init_from_file"
    dtype_codes: ClassVar[Mapping[str, Any]] = DTYPE_CODES
    Options = GgufOptions

    def sniff(self, head: bytes) -> bool:
        return head.startswith(MAGIC)

    # ------------------------------------------------------------------------------ writing

    def write(self, checkpoint: Checkpoint, path: Path, context: WriteContext, options: GgufOptions) -> None:
        tensor_writer = TensorWriter(context, checkpoint.origin)
        alignment = options.alignment
        keys = manifests.storage_keys(checkpoint.tree)
        order = checkpoint.unique_tensors()  # tree order: ggml wants the data in the infos' order
        names = tensor_names([keys[tensor_path] for tensor_path, _ in order])
        native, rest = split_metadata(checkpoint.carried_metadata())
        architecture = native.pop(ARCHITECTURE_KEY, None) or _kv(ARCHITECTURE_KEY, STRING, _string(ARCHITECTURE))
        fixed = [architecture, _kv(ALIGNMENT_KEY, UINT32, struct.pack("<I", alignment)), *native.values()]
        fixed.append(_kv(VERSION_KEY, UINT32, struct.pack("<I", manifests.MANIFEST_VERSION)))
        tree = json.dumps(manifests.encode_tree(checkpoint.tree, keys), separators=(",", ":"))
        fixed.append(_kv(TREE_KEY, STRING, _string(tree)))
        renamed = {name: key for key, name in names.items() if name != key}
        if renamed:
            fixed.append(_kv(NAMES_KEY, STRING, _string(json.dumps(renamed, separators=(",", ":")))))
        if rest:
            fixed.append(_kv(METADATA_KEY, STRING, _string(json.dumps(rest, separators=(",", ":")))))
        digests = {keys[tensor_path]: DIGEST_PLACEHOLDER for tensor_path, _ in order}
        casts = manifests.cast_records(order, keys, final=False)
        state = {"tree_digest": DIGEST_PLACEHOLDER}
        infos = bytearray()
        offset = 0
        for tensor_path, ref in order:
            infos += _string(names[keys[tensor_path]])
            infos += struct.pack(f"<I{len(ref.shape)}Q", len(ref.shape), *reversed(ref.shape))
            infos += struct.pack("<IQ", DTYPE_CODES[ref.dtype], offset)
            offset += _align(ref.nbytes, alignment)
        kv_count = len(fixed) + (1 if casts else 0) + 2
        prefix = MAGIC + struct.pack("<IQQ", VERSION, len(order), kv_count) + b"".join(fixed)

        def encode_header() -> bytes:
            changing = b""
            if casts:
                changing += _kv(CASTS_KEY, STRING, _string(json.dumps(casts, separators=(",", ":"))))
            changing += _kv(DIGESTS_KEY, STRING, _string(json.dumps(digests, separators=(",", ":"))))
            changing += _kv(TREE_DIGEST_KEY, STRING, _string(state["tree_digest"]))
            header = prefix + changing + infos
            return header + bytes(_align(len(header), alignment) - len(header))

        with atomic_output(path, fsync=context.fsync, overwrite=context.overwrite) as out:
            first = [encode_header()]  # encoded once for its length and its placeholders
            reserved = Reserved(out, lambda: first.pop() if first else encode_header())
            for tensor_path, ref in order:
                digests[keys[tensor_path]] = tensor_writer.copy(out, ref, tensor_path).digest
                _pad(out, ref.nbytes, alignment)
            state["tree_digest"] = tensor_writer.tree_digest(checkpoint)
            casts.update(manifests.cast_records(order, keys, final=True))
            reserved.rewrite()

    # ------------------------------------------------------------------------------ reading

    def read(self, path: Path, budget: Budget) -> Checkpoint:
        path = location(path)  # not Path(): a remote path stays remote
        raw = open_read(path)
        # The header is parsed by small reads, through a buffer. A remote file's own cache reads
        # ahead (64 KiB, then doubling while the reads go on): a small buffer over it asks for small
        # pieces, which its cache serves, rather than a 64 KiB read that it would fetch exactly.
        with io.BufferedReader(raw, 1 << 12 if is_remote(path) else 1 << 16) as handle:
            cursor = _Cursor(handle, size_of(raw), path, budget)
            header = cursor.read_header()
            infos = [cursor.tensor_info(index) for index in range(header.tensor_count)]
            info_end = cursor.position
        size = cursor.size
        alignment = header.alignment
        data_start = _align(info_end, alignment)
        with paused_gc():
            refs = _tensor_refs(path, infos, data_start, alignment, info_end, size)
        del infos
        fields, types = header.fields, header.types
        ours = DIGESTS_KEY in fields
        own = {
            key: value
            for key, value in fields.items()
            if not key.startswith(OWN_PREFIX)
            and key != ALIGNMENT_KEY
            and not (key == ARCHITECTURE_KEY and value == ARCHITECTURE and types[key] == STRING)
        }
        if METADATA_KEY in fields:
            what = f"metadata {METADATA_KEY!r}"
            extra = loads_json_strict(
                _own_string(fields, types, METADATA_KEY, path), path, what, budget, allow_nan=True
            )
            if type(extra) is not dict:
                raise CorruptFileError(f"{what} must be a JSON object", file=path)
            clash = next((key for key in extra if key in own), None)
            if clash is not None:
                raise CorruptFileError(f"{what} holds {shown(clash, 80)!r}, also a key/value of the file", file=path)
            own.update(extra)
        if NAMES_KEY in fields:
            refs = _renamed(refs, _own_string(fields, types, NAMES_KEY, path), path, budget)
        tree_digest = None
        if DIGESTS_KEY in fields:
            what = f"metadata {DIGESTS_KEY!r}"
            digests = read_digests(_own_string(fields, types, DIGESTS_KEY, path), path, what, budget)
            for key, ref in refs.items():
                digest = digests.get(key)
                if digest is not None:
                    refs[key] = ref.with_stored_digest(digest)
        if TREE_DIGEST_KEY in fields:
            what = f"metadata {TREE_DIGEST_KEY!r}"
            tree_digest = check_tree_digest(_own_string(fields, types, TREE_DIGEST_KEY, path), path, what)
        if CASTS_KEY in fields:
            what = f"metadata {CASTS_KEY!r}"
            read_casts(
                loads_json_strict(_own_string(fields, types, CASTS_KEY, path), path, what, budget), refs, path, what
            )
        # Without our tree (a file from another writer) the tensors form a flat dict in the infos' order.
        if TREE_KEY in fields:
            tree = tree_from_stored(
                _own_string(fields, types, TREE_KEY, path),
                refs,
                path,
                f"metadata {TREE_KEY!r}",
                holder="the file",
                unused_name="tensor",
                budget=budget,
            )
        else:
            tree = refs
        return Checkpoint(tree, path, tree_digest=tree_digest, file_metadata=own or None, expects_tree_digest=ours)


# ---------------------------------------------------------------------------------- writing


def tensor_names(keys: list[str]) -> dict[str, str]:
    """The GGUF tensor name of each storage key: the key itself when ggml can take it as a name
    (at most 63 bytes of UTF-8 without NUL), else a short name that no other tensor has: the key's
    first bytes, ``~`` and 8 hex digits of a BLAKE3 of the key (and a counter, on a clash)."""
    names = {key: key for key in keys if _fits(key)}
    taken = set(names)
    for key in keys:
        if key in names:
            continue
        head = key.encode("utf-8", "backslashreplace").replace(b"\x00", b"\\x00")[:SHORT_HEAD_BYTES]
        text = head.decode("utf-8", "ignore")  # a character cut in two is dropped
        attempt = 0
        while True:
            tag = blake3(f"{attempt}:{key}".encode("utf-8", "surrogatepass")).hexdigest()[:8]
            name = f"{text}~{tag}"
            if name not in taken:
                break
            attempt += 1
        taken.add(name)
        names[key] = name
    return names


def _fits(key: str) -> bool:
    if "\x00" in key or len(key) > MAX_NAME_BYTES:
        return False
    try:
        return len(key.encode("utf-8")) <= MAX_NAME_BYTES
    except UnicodeEncodeError:  # a lone surrogate
        return False


def split_metadata(metadata: Mapping[str, Any]) -> tuple[dict[str, bytes], dict[str, Any]]:
    """The carried metadata as GGUF key/values (encoded, by key) where GGUF has a type for the key
    and value, and the rest for ``sdconvert.file_metadata`` (JSON)."""
    native: dict[str, bytes] = {}
    rest: dict[str, Any] = {}
    for key, value in metadata.items():
        encoded = _native(key, value)
        if encoded is not None:
            native[key] = encoded
            continue
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            raise UnsupportedValueError(
                f"file metadata {shown(key, 80)!r}: a {type(value).__name__} value cannot be stored in GGUF"
            ) from None
        rest[key] = value
    return native, rest


def _native(key: str, value: Any) -> bytes | None:
    if not key or key.startswith(OWN_PREFIX) or key == ALIGNMENT_KEY:
        return None
    if key == ARCHITECTURE_KEY and (type(value) is not str or value == ARCHITECTURE):
        return None  # the architecture is a string, and "sdconvert" is what an absent one reads as
    try:
        encoded_key = key.encode("utf-8")
    except UnicodeEncodeError:
        return None
    if len(encoded_key) > MAX_KEY_BYTES:
        return None
    typed = _typed(value)
    if typed is None:
        return None
    return struct.pack("<Q", len(encoded_key)) + encoded_key + struct.pack("<I", typed[0]) + typed[1]


def _typed(value: Any) -> tuple[int, bytes] | None:
    """(GGUF value type, encoded value) for a value GGUF reads back as the same Python value."""
    kind = type(value)
    if kind is bool:
        return BOOL, bytes([value])
    if kind is int:
        vtype = _int_type([value])
        return None if vtype is None else (vtype, struct.pack("<" + NUMBERS[vtype], value))
    if kind is float:
        return FLOAT64, struct.pack("<d", value)
    if kind is str:
        try:
            return STRING, _string(value)
        except UnicodeEncodeError:
            return None
    if kind is not list or not value or len({type(item) for item in value}) != 1:
        return None  # an empty list has no element type; a mixed one none GGUF has
    first = type(value[0])
    if first is int:
        vtype = _int_type(value)
        if vtype is None:
            return None
        elements = struct.pack(f"<{len(value)}{NUMBERS[vtype]}", *value)
    elif first is float:
        vtype, elements = FLOAT64, struct.pack(f"<{len(value)}d", *value)
    elif first is bool:
        vtype, elements = BOOL, bytes(value)
    elif first is str:
        try:
            vtype, elements = STRING, b"".join(_string(item) for item in value)
        except UnicodeEncodeError:
            return None
    else:
        return None
    return ARRAY, struct.pack("<IQ", vtype, len(value)) + elements


def _int_type(values: list[int]) -> int | None:
    low, high = min(values), max(values)
    if low >= -(2**63) and high < 2**63:
        return INT64
    if low >= 0 and high < 2**64:
        return UINT64
    return None


def _string(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack("<Q", len(data)) + data


def _kv(key: str, vtype: int, payload: bytes) -> bytes:
    return _string(key) + struct.pack("<I", vtype) + payload


def _align(offset: int, alignment: int) -> int:
    return offset + -offset % alignment


_ZEROS = bytes(MAX_ALIGNMENT)


def _pad(out: BinaryIO, nbytes: int, alignment: int) -> None:
    padding = -nbytes % alignment
    if padding:
        out.write(_ZEROS[:padding])


# ---------------------------------------------------------------------------------- reading


@dataclass
class _Header:
    tensor_count: int
    fields: dict[str, Any]  # key -> value, in file order
    types: dict[str, int]  # key -> GGUF value type
    alignment: int


@dataclass(frozen=True)
class _Info:
    name: str
    dims: tuple[int, ...]  # GGUF order (torch's reversed)
    code: int
    offset: int  # from the start of the tensor data


class _Cursor:
    """Reads the header and the tensor infos, checking each length against the file's size and
    charging the budget before anything the file asks for is made."""

    def __init__(self, handle: BinaryIO, size: int, path: Path, budget: Budget) -> None:
        self.handle, self.size, self.path, self.budget = handle, size, path, budget
        self.position = 0

    def fail(self, message: str) -> CorruptFileError:
        return CorruptFileError(message, file=self.path)

    def take(self, count: int, what: str) -> bytes:
        if count > self.size - self.position:
            raise self.fail(
                f"the file ends inside {what} ({count} bytes at offset {self.position}, the file has {self.size})"
            )
        data = self.handle.read(count)
        if len(data) != count:
            raise self.fail(f"the file changed size while it was read (inside {what})")
        self.position += count
        return data

    def u32(self, what: str) -> int:
        value: int = struct.unpack("<I", self.take(4, what))[0]
        return value

    def u64(self, what: str) -> int:
        value: int = struct.unpack("<Q", self.take(8, what))[0]
        return value

    def string(self, what: str, limit: int | None = None) -> str:
        length = self.u64(f"the length of {what}")
        if length > self.size - self.position:
            raise self.fail(
                f"{what} is {length} bytes long, past the end of the {self.size}-byte file (at offset {self.position})"
            )
        if limit is not None and length > limit:
            raise self.fail(f"{what} is {length} bytes long; at most {limit} are allowed")
        self.budget.materialize(2 * length + STR_OBJECT_BYTES, what)  # the bytes read and the text decoded
        raw = self.take(length, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.fail(f"{what} is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None

    def read_header(self) -> _Header:
        size = self.size
        if size < HEADER_BYTES:
            raise self.fail(f"file is {size} bytes; a GGUF file starts with a {HEADER_BYTES}-byte header")
        head = self.take(HEADER_BYTES, "the header")
        if head[:4] != MAGIC:
            raise self.fail(f"does not start with the GGUF magic (found {head[:4]!r})")
        version, tensor_count, kv_count = struct.unpack("<IQQ", head[4:])
        if version and not version & 0xFFFF:
            raise self.fail("is a big-endian GGUF file; only little-endian files are read")
        if version not in READ_VERSIONS:
            raise self.fail(
                f"GGUF version {version} is not read (versions {' and '.join(map(str, READ_VERSIONS))} are)"
            )
        needed = HEADER_BYTES + kv_count * MIN_KV_BYTES + tensor_count * MIN_INFO_BYTES
        if needed > size:
            raise self.fail(
                f"the header announces {kv_count} key/values and {tensor_count} tensors, which need at least "
                f"{needed} bytes; the file has {size}"
            )
        self.budget.nodes(kv_count, "GGUF metadata key/values")
        self.budget.tensors(tensor_count)
        self.budget.small_values(tensor_count, "GGUF tensor names")
        fields: dict[str, Any] = {}
        types: dict[str, int] = {}
        for index in range(kv_count):
            key = self.string(f"the key of metadata entry {index}", MAX_KEY_BYTES)
            if not key:
                raise self.fail(f"the key of metadata entry {index} is empty")
            if key in fields:
                raise self.fail(f"metadata key {shown(key, 80)!r} appears twice")
            where = f"metadata {shown(key, 80)!r}"
            vtype = self.u32(f"the value type of {where}")
            fields[key] = self.value(vtype, where, 0)
            types[key] = vtype
        alignment = DEFAULT_ALIGNMENT
        if ALIGNMENT_KEY in fields:
            if types[ALIGNMENT_KEY] != UINT32:
                raise self.fail(f"{ALIGNMENT_KEY} must be a uint32, found a {_type_name(types[ALIGNMENT_KEY])}")
            alignment = fields[ALIGNMENT_KEY]
            if not alignment or alignment & (alignment - 1):
                raise self.fail(f"{ALIGNMENT_KEY} {alignment} is not a power of two")
        return _Header(tensor_count, fields, types, alignment)

    def value(self, vtype: int, where: str, depth: int) -> Any:
        code = NUMBERS.get(vtype)
        if code is not None:
            return struct.unpack("<" + code, self.take(NUMBER_BYTES[vtype], where))[0]
        if vtype == BOOL:
            return self.bools(1, where)[0]
        if vtype == STRING:
            return self.string(where)
        if vtype == ARRAY:
            return self.array(where, depth + 1)
        raise self.fail(f"{where} has unknown value type {vtype}")

    def array(self, where: str, depth: int) -> list[Any]:
        if depth > MAX_ARRAY_NESTING:
            raise self.fail(f"{where}: arrays nested deeper than {MAX_ARRAY_NESTING} levels")
        vtype = self.u32(f"the element type of {where}")
        count = self.u64(f"the length of {where}")
        smallest = MIN_VALUE_BYTES.get(vtype)
        if smallest is None:
            raise self.fail(f"{where} is an array of unknown value type {vtype}")
        remaining = self.size - self.position
        if count * smallest > remaining:
            raise self.fail(
                f"{where}: an array of {count} {_type_name(vtype)} values needs at least {count * smallest} bytes, "
                f"{remaining} remain in the file"
            )
        self.budget.nodes(1, f"the arrays of {where}")
        self.budget.small_values(count, f"the values of {where}")
        code = NUMBERS.get(vtype)
        if code is not None:
            self.budget.materialize(count * NUMBER_BYTES[vtype], f"the values of {where}")
            return list(struct.unpack(f"<{count}{code}", self.take(count * NUMBER_BYTES[vtype], where)))
        if vtype == BOOL:
            return self.bools(count, where)
        if vtype == STRING:
            return [self.string(f"a string of {where}") for _ in range(count)]
        return [self.array(where, depth + 1) for _ in range(count)]

    def bools(self, count: int, where: str) -> list[bool]:
        raw = self.take(count, where)
        if raw.translate(None, b"\x00\x01"):
            bad = next(byte for byte in raw if byte > 1)
            raise self.fail(f"{where}: a bool must be 0 or 1, found {bad}")
        return [byte == 1 for byte in raw]

    def tensor_info(self, index: int) -> _Info:
        name = self.string(f"the name of tensor {index}")
        where = f"tensor {shown(name, 80)!r}"
        ndim = self.u32(f"the dims count of {where}")
        if ndim > MAX_NDIM:
            raise self.fail(f"{where} has {ndim} dims; at most {MAX_NDIM} are supported")
        dims = struct.unpack(f"<{ndim}Q", self.take(8 * ndim, f"the dims of {where}"))
        code, offset = struct.unpack("<IQ", self.take(12, f"the type and offset of {where}"))
        return _Info(name, dims, code, offset)


def _tensor_refs(
    path: Path, infos: list[_Info], data_start: int, alignment: int, info_end: int, size: int
) -> dict[str, TensorRef]:
    """Each tensor by name, in the infos' order, once every range is checked: inside the file,
    aligned, no two overlapping, no gap but the padding, nothing after the last one's padding."""
    if infos and data_start > size:
        raise CorruptFileError(
            f"the tensor data would start at offset {data_start}, past the end of the {size}-byte file", file=path
        )
    refs: dict[str, TensorRef] = {}
    spans = []
    for info in infos:
        where = f"tensor {shown(info.name, 80)!r}"
        if info.name in refs:
            raise CorruptFileError(f"tensor name {shown(info.name, 80)!r} appears twice", file=path)
        dtype = BY_CODE.get(info.code)
        if dtype is None:
            if info.code in QUANTIZED:
                raise UnsupportedValueError(
                    f"{where} is quantized (GGML type {QUANTIZED[info.code]}); only unquantized tensors "
                    f"({', '.join(TYPE_NAMES.values())}) are read: dequantize it first",
                    file=path,
                )
            raise UnsupportedValueError(
                f"{where} has unknown GGML type {info.code} (newer than this reader, or a corrupt file)", file=path
            )
        if any(dim > MAX_DIM for dim in info.dims):
            raise CorruptFileError(f"{where}: a dimension is past 2**63 - 1: {list(info.dims)}", file=path)
        nbytes = numel(info.dims) * itemsize(dtype)
        if info.offset % alignment:
            raise CorruptFileError(
                f"{where}: data offset {info.offset} is not a multiple of the alignment {alignment}", file=path
            )
        if data_start + info.offset + nbytes > size:
            raise CorruptFileError(
                f"{where}: its {nbytes} bytes at data offset {info.offset} run past the end of the {size}-byte file",
                file=path,
            )
        spans.append((info.offset, info.offset + nbytes, info.name))
        refs[info.name] = TensorRef(
            dtype, tuple(reversed(info.dims)), FileRange(path, data_start + info.offset, nbytes)
        )
    position = end = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            kind = "overlaps the tensor before it" if begin < position else "leaves a gap before it"
            raise CorruptFileError(
                f"tensor {shown(name, 80)!r}: its data {kind} (starts at {begin}, expected {position})", file=path
            )
        position = _align(end, alignment)
    allowed = (data_start + end, data_start + position) if infos else (info_end, data_start)
    if size not in allowed:
        raise CorruptFileError(
            f"trailing bytes after the tensor data (it ends at offset {allowed[1]}, the file has {size} bytes)",
            file=path,
        )
    return refs


def _renamed(refs: dict[str, TensorRef], text: str, path: Path, budget: Budget) -> dict[str, TensorRef]:
    """The tensors by storage key: ``sdconvert.names`` maps the short names to their keys."""
    what = f"metadata {NAMES_KEY!r}"
    names = loads_json_strict(text, path, what, budget)
    if type(names) is not dict or not all(type(key) is str for key in names.values()):
        raise CorruptFileError(f"{what} must map tensor names to storage keys", file=path)
    renamed: dict[str, TensorRef] = {}
    for name, ref in refs.items():
        key = names.get(name, name)
        if key in renamed:
            raise CorruptFileError(f"{what} gives two tensors the key {shown(key, 80)!r}", file=path)
        renamed[key] = ref
    unknown = next((name for name in names if name not in refs), None)
    if unknown is not None:
        raise CorruptFileError(f"{what} names {shown(unknown, 80)!r}, which is not a tensor of the file", file=path)
    return renamed


def _own_string(fields: dict[str, Any], types: dict[str, int], key: str, path: Path) -> str:
    if types[key] != STRING:
        raise CorruptFileError(f"metadata {key!r} must be a string, found a {_type_name(types[key])}", file=path)
    value: str = fields[key]
    return value


def _type_name(vtype: int) -> str:
    return VALUE_TYPE_NAMES[vtype] if vtype < len(VALUE_TYPE_NAMES) else f"type {vtype}"


FORMAT = GgufFormat()
