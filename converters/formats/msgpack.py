"""``msgpack``: the flax encoding of tensor trees, plus what a PyTorch checkpoint needs to round-trip.

Spec: ``schemas/msgpack.md``. In short, the file is one msgpack map:

- tensors are ext type 1 holding the msgpack array ``[shape, dtype name, C-order bytes]`` — what
  ``flax.serialization`` writes — and tensors over 2**30 bytes use flax's chunked-array map, so
  ``flax.serialization.msgpack_restore`` gives back every tensor as a numpy array;
- containers and scalars are native msgpack; dict keys are strings (flax decodes with
  ``strict_map_key``), int keys written in decimal;
- the first key, ``"__sdconvert__"``, holds ext type 80: ``{"version": 1, "wrapped": bool,
  "tree": <manifest tree node>}``, which says what native msgpack cannot (tuple vs list,
  OrderedDict and ``_metadata``, int keys). Plain decoders see one opaque ext value there.

Ints beyond 64 bits are ext type 81 (decimal ASCII); a tied tensor is stored at its first path and is
ext type 82 (that path's storage key) at the others. Reading checks the native tree against the
metadata tree and refuses a file where they disagree.
"""

from __future__ import annotations

import json
import mmap
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

from ..codecs import msgpack as codec
from ..core import dtypes, manifests
from ..core.atomic import atomic_output
from ..core.budget import Budget
from ..core.contract import FormatBase, NoOptions, WriteContext
from ..core.errors import CorruptFileError, TreePath, UnsupportedValueError
from ..core.sources import ByteSource, ConcatSource, FileRange, slice_source
from ..core.stored import read_digests
from ..core.tree import MAPPING_TYPES, Checkpoint, TensorRef, walk
from ..core.writing import DIGEST_PLACEHOLDER, PiecewiseCopy, Reserved, TensorWriter

EXT_NDARRAY = 1  # flax: _MsgpackExtType.ndarray
EXT_NPSCALAR = 3  # flax: a numpy scalar, stored like a 0-d array
EXT_METADATA = 80
EXT_BIGINT = 81
EXT_TIED = 82  # a tied tensor's second and later places: the storage key of its first place
META_KEY = "__sdconvert__"
WRAPPED_ROOT_KEY = "__sdconvert_root__"
CHUNKED_KEY = "__msgpack_chunked_array__"
FLAX_MAX_LEAF_BYTES = 2**30  # flax.serialization.MAX_CHUNK_SIZE
MAX_BIGINT_DIGITS = 4000  # below CPython's int/str conversion limit
META_VERSION = 1


class MsgpackFormat(FormatBase):
    name = "msgpack"
    suffixes: tuple[str, ...] = (".msgpack",)
    description = "MessagePack, flax.serialization-compatible: any msgpack library, any language"
    # flax's ndarray ext spells the dtype by numpy's name, which is torch's for every dtype.
    dtype_codes: ClassVar[Mapping[str, Any]] = {name: name for name in dtypes.DTYPES}

    def __init__(self, max_leaf_bytes: int = FLAX_MAX_LEAF_BYTES, max_depth: int = 256) -> None:
        self.max_leaf_bytes = max_leaf_bytes
        self.max_depth = max_depth

    def sniff(self, head: bytes) -> bool:
        # Our files open with a map whose first key is "__sdconvert__" (fixstr of 13 bytes).
        marker = b"\xad" + META_KEY.encode()
        return bool(head) and (0x80 <= head[0] <= 0x8F or head[0] in (0xDE, 0xDF)) and marker in head[: 8 + len(marker)]

    # ------------------------------------------------------------------------------- writing

    def write(self, checkpoint: Checkpoint, path: Path, context: WriteContext, options: NoOptions) -> None:
        tree = checkpoint.tree
        keys = manifests.storage_keys(tree)
        wrapped = not isinstance(tree, dict)
        _require_utf8(tree, ())
        if not wrapped and META_KEY in tree:
            raise UnsupportedValueError(f"the key {META_KEY!r} is reserved by the msgpack format", path=(META_KEY,))
        node = manifests.encode_tree(tree, keys)
        # Digests are known once the bytes went by: the metadata is written with placeholders of
        # the same length and rewritten in place at the end.
        digests = {keys[tensor_path]: DIGEST_PLACEHOLDER for tensor_path, _ in checkpoint.unique_tensors()}

        def pack_meta() -> bytes:
            meta = {"version": META_VERSION, "wrapped": wrapped, "tree": node, "blake3": digests}
            return codec.pack_plain(meta, bigint_ext=EXT_BIGINT)

        with atomic_output(Path(path), fsync=context.fsync, overwrite=context.overwrite) as out:
            out.write(codec.map_header(1 + (1 if wrapped else len(tree))))
            out.write(codec.pack_str(META_KEY) + codec.ext_header(EXT_METADATA, len(pack_meta())))
            reserved = Reserved(out, pack_meta)
            emit = _Emitter(self.max_leaf_bytes, out, keys, TensorWriter(context, checkpoint.origin))
            if wrapped:
                out.write(codec.pack_str(WRAPPED_ROOT_KEY))
                emit.node(tree, ())
            else:
                emit.items(tree, ())
            digests.update(emit.digests)
            reserved.rewrite()

    # ------------------------------------------------------------------------------- reading

    def read(self, path: Path, budget: Budget) -> Checkpoint:
        path = Path(path)
        size = path.stat().st_size
        if size == 0:
            raise CorruptFileError("the file is empty; a msgpack file holds at least one value", file=path)
        with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
            reader = _TreeReader(buffer, path, self.max_depth)
            native = reader.parse_root(size)
            tree = reader.resolve(native)
        return Checkpoint(tree, path)


class _Emitter:
    """Writes the native tree of one file; remembers which tensors it wrote, to tie the others."""

    def __init__(
        self, max_leaf_bytes: int, out: BinaryIO, keys: dict[tuple[str | int, ...], str], tensors: TensorWriter
    ) -> None:
        self.max_leaf_bytes, self.out, self.keys, self.tensors = max_leaf_bytes, out, keys, tensors
        self.written: set[int] = set()
        self.digests: dict[str, str] = {}  # storage key -> BLAKE3 of the tensor's bytes

    def node(self, node: Any, path: tuple[str | int, ...]) -> None:
        out = self.out
        kind = type(node)
        if kind in MAPPING_TYPES:
            out.write(codec.map_header(len(node)))
            self.items(node, path)
        elif kind is list or kind is tuple:
            out.write(codec.array_header(len(node)))
            for index, value in enumerate(node):
                self.node(value, (*path, index))
        elif kind is TensorRef and id(node) in self.written:
            key = self.keys[path].encode("utf-8")
            out.write(codec.ext_header(EXT_TIED, len(key)) + key)
        elif kind is TensorRef:
            self.written.add(id(node))
            copy = self.tensors.piecewise(node, path)
            if node.nbytes > self.max_leaf_bytes:
                self.chunked(node, copy)
            else:
                self.ndarray(node.dtype, node.shape, node.source, copy)
            self.digests[self.keys[path]] = copy.finish().digest
        else:
            out.write(codec.pack_plain(node, bigint_ext=EXT_BIGINT))

    def items(self, node: dict[Any, Any], path: tuple[str | int, ...]) -> None:
        if CHUNKED_KEY in node:
            raise UnsupportedValueError(
                f"the key {CHUNKED_KEY!r} marks flax chunked arrays; it cannot be a dict key", path=path
            )
        for native_key, (key, value) in zip(_native_keys(list(node)), node.items(), strict=True):
            self.out.write(codec.pack_str(native_key))
            self.node(value, (*path, key))

    def chunked(self, ref: TensorRef, copy: PiecewiseCopy) -> None:
        """flax's layout for big leaves.

        ``{"__msgpack_chunked_array__": true, "shape": {"0": d0, ...}, "chunks": {"0": 1-D array, ...}}``
        """
        itemsize = dtypes.DTYPES[ref.dtype].itemsize
        per_chunk = max(1, self.max_leaf_bytes // itemsize) * itemsize
        count = -(-ref.nbytes // per_chunk)
        out = self.out
        out.write(codec.map_header(3) + codec.pack_str(CHUNKED_KEY) + codec.pack_bool(True))
        out.write(codec.pack_str("shape") + codec.pack_plain({str(i): d for i, d in enumerate(ref.shape)}))
        out.write(codec.pack_str("chunks") + codec.map_header(count))
        for index in range(count):
            length = min(per_chunk, ref.nbytes - index * per_chunk)
            out.write(codec.pack_str(str(index)))
            piece = slice_source(ref.source, index * per_chunk, length)
            self.ndarray(ref.dtype, (length // itemsize,), piece, copy)

    def ndarray(self, dtype: str, shape: tuple[int, ...], source: ByteSource, copy: PiecewiseCopy) -> None:
        """flax's ext 1: [shape, dtype, bin]; the bin's bytes copied straight from the source."""
        prefix = (
            codec.array_header(3)
            + codec.array_header(len(shape))
            + b"".join(codec.pack_int(d) for d in shape)
            + codec.pack_str(dtype)
            + codec.bin_header(source.nbytes)
        )
        self.out.write(codec.ext_header(EXT_NDARRAY, len(prefix) + source.nbytes) + prefix)
        copy.write(self.out, source)


def _require_utf8(node: Any, path: tuple[str | int, ...]) -> None:
    """msgpack strings are UTF-8: refuse, with its path, a str (key or value) holding a lone surrogate."""
    if type(node) is str:
        _check_utf8(node, path)
    elif isinstance(node, dict):
        for key, value in node.items():
            if type(key) is str:
                _check_utf8(key, path)
            _require_utf8(value, (*path, key))
        if hasattr(node, "_metadata"):
            _require_utf8(node._metadata, (*path, "_metadata"))
    elif isinstance(node, (list, tuple)):
        for index, value in enumerate(node):
            _require_utf8(value, (*path, index))


def _check_utf8(text: str, path: tuple[str | int, ...]) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UnsupportedValueError("msgpack strings are UTF-8; this one holds a lone surrogate", path=path) from None


def _native_keys(keys: list[str | int]) -> list[str]:
    """The msgpack (string) key of each dict key: str keys as they are, int keys in decimal.

    An int key whose decimal spelling is also a str key of the same dict gets ``#2``, ``#3``, ...
    appended; the metadata tree keeps the real key either way.
    """
    taken = {key for key in keys if type(key) is str}
    native = []
    for key in keys:
        if type(key) is str:
            native.append(key)
            continue
        candidate, n = str(key), 1
        while candidate in taken:
            n += 1
            candidate = f"{key}#{n}"
        taken.add(candidate)
        native.append(candidate)
    return native


class _Slot:
    """Where the metadata tree places a tensor; filled from the native tree by ``_merge``."""

    __slots__ = ("key",)

    def __init__(self, key: str) -> None:
        self.key = key


@dataclass(frozen=True)
class _Tied:
    """Ext 82 in the native tree: this place holds the tensor stored under ``key``."""

    key: str


class _TreeReader:
    def __init__(self, buffer: Any, path: Path, max_depth: int) -> None:
        self.buffer = buffer
        self.path = path
        self.parser = codec.Parser(buffer, path, max_depth=max_depth)
        self.stored: dict[str, TensorRef] = {}  # storage key -> tensor, for ext 82 to point at
        self.digests: dict[str, str] = {}

    def parse_root(self, size: int) -> Any:
        return self.parser.parse(0, size)

    def resolve(self, native: Any) -> Any:
        if type(native) is dict and META_KEY in native:
            return self._with_metadata(native)
        tree = self._plain(native, ())
        for path, leaf in walk(tree):
            if type(leaf) is _Tied:
                raise CorruptFileError(
                    f"ext {EXT_TIED} (a tied tensor) needs the {META_KEY!r} metadata", file=self.path, path=path
                )
        return tree

    def _with_metadata(self, native: dict[Any, Any]) -> Any:
        if next(iter(native)) != META_KEY:
            raise CorruptFileError(f"{META_KEY!r} must be the first key of the root map", file=self.path)
        ext = native.pop(META_KEY)
        if type(ext) is not codec.Ext or ext.code != EXT_METADATA:
            raise CorruptFileError(f"{META_KEY!r} must hold ext type {EXT_METADATA}", file=self.path)
        meta = codec.Parser(self.buffer, self.path).parse(ext.offset, ext.offset + ext.length, f"the {META_KEY!r} ext")
        if type(meta) is not dict or not {"version", "wrapped", "tree"} <= set(meta) <= {
            "version",
            "wrapped",
            "tree",
            "blake3",
        }:
            raise CorruptFileError(f"{META_KEY!r} must be a map of version, wrapped, tree (and blake3)", file=self.path)
        if "blake3" in meta:
            self.digests = read_digests(json.dumps(meta["blake3"]), self.path, f"{META_KEY!r} blake3")
        if meta["version"] != META_VERSION:
            raise UnsupportedValueError(
                f"{META_KEY!r} version {meta['version']!r} is not one this reader knows ({META_VERSION})",
                file=self.path,
            )
        if meta["wrapped"] is True:
            if set(native) != {WRAPPED_ROOT_KEY}:
                raise CorruptFileError(f"a wrapped root map must hold only {WRAPPED_ROOT_KEY!r}", file=self.path)
            native = native[WRAPPED_ROOT_KEY]
        elif meta["wrapped"] is not False:
            raise CorruptFileError(f"{META_KEY!r} 'wrapped' must be a bool", file=self.path)
        node = self._plain(meta["tree"], ())  # ext 81 big ints become ints
        expected = manifests.decode_tree(node, lambda key, _path: _Slot(key), file=self.path)
        return self._merge(expected, self._plain(native, ()), ())

    def _merge(self, expected: Any, native: Any, path: tuple[str | int, ...]) -> Any:
        """The metadata tree with its tensors taken from the native tree, after checking they agree."""
        kind = type(expected)
        if kind is _Slot:
            if type(native) is _Tied and native.key == expected.key and native.key in self.stored:
                return self.stored[native.key]
            if type(native) is not TensorRef or expected.key in self.stored:
                self._disagree(path, f"the tensor {expected.key!r}", native)
            self.stored[expected.key] = native.with_stored_digest(self.digests.get(expected.key))
            return self.stored[expected.key]
        if kind in MAPPING_TYPES:
            if type(native) is not dict:
                self._disagree(path, "a map", native)
            if list(native) != _native_keys(list(expected)):
                raise CorruptFileError(
                    f"the msgpack map keys {_short(list(native))} disagree with the metadata tree's "
                    f"{_short(list(expected))}",
                    file=self.path,
                    path=path,
                )
            merged = kind(
                {
                    key: self._merge(value, native[nk], (*path, key))
                    for (key, value), nk in zip(expected.items(), native, strict=True)
                }
            )
            if hasattr(expected, "_metadata"):
                merged._metadata = expected._metadata  # type: ignore[union-attr]
            return merged
        if kind is list or kind is tuple:
            if type(native) is not list or len(native) != len(expected):
                self._disagree(path, f"an array of {len(expected)}", native)
            return kind(self._merge(e, n, (*path, i)) for i, (e, n) in enumerate(zip(expected, native, strict=True)))
        same = type(native) is kind and (
            struct.pack(">d", native) == struct.pack(">d", expected) if kind is float else native == expected
        )
        if not same:
            self._disagree(path, repr(expected), native)
        return expected

    def _disagree(self, path: TreePath, expected: str, native: Any) -> None:
        found = {TensorRef: "a tensor", _Tied: "a tied-tensor reference"}.get(type(native)) or _short(native)
        raise CorruptFileError(
            f"the native msgpack value {found} disagrees with the metadata tree, which says {expected}",
            file=self.path,
            path=path,
        )

    def _plain(self, node: Any, path: tuple[str | int, ...]) -> Any:
        """The tree a plain msgpack value stands for (flax conventions for tensors)."""
        kind = type(node)
        if kind is dict:
            if CHUNKED_KEY in node:
                return self._chunked(node, path)
            return {key: self._plain(value, (*path, key)) for key, value in node.items()}
        if kind is list:
            return [self._plain(value, (*path, index)) for index, value in enumerate(node)]
        if kind is codec.Ext:
            return self._ext(node, path)
        if kind is codec.Bin:
            raise UnsupportedValueError(
                "raw msgpack bin values are not supported (only tensors)", file=self.path, path=path
            )
        return node

    def _ext(self, ext: codec.Ext, path: TreePath) -> Any:
        if ext.code in (EXT_NDARRAY, EXT_NPSCALAR):
            return self._ndarray(ext, path)
        if ext.code == EXT_TIED:
            key = bytes(self.buffer[ext.offset : ext.offset + ext.length])
            try:
                return _Tied(key.decode("utf-8"))
            except UnicodeDecodeError:
                raise CorruptFileError(
                    f"ext {EXT_TIED} must hold a UTF-8 storage key", file=self.path, path=path
                ) from None
        if ext.code == EXT_BIGINT:
            digits = bytes(self.buffer[ext.offset : ext.offset + ext.length])
            if not 0 < len(digits) <= MAX_BIGINT_DIGITS or not digits.lstrip(b"-").isdigit():
                raise CorruptFileError(
                    f"ext {EXT_BIGINT} must hold a decimal integer of at most {MAX_BIGINT_DIGITS} digits",
                    file=self.path,
                    path=path,
                )
            return int(digits)
        names = {2: " (flax: a Python complex scalar)", EXT_METADATA: f" (only as {META_KEY!r} of the root map)"}
        raise UnsupportedValueError(
            f"msgpack ext type {ext.code}{names.get(ext.code, '')} is not supported here", file=self.path, path=path
        )

    def _ndarray(self, ext: codec.Ext, path: TreePath) -> TensorRef:
        value = codec.Parser(self.buffer, self.path, max_depth=2).parse(
            ext.offset, ext.offset + ext.length, "an ndarray ext"
        )
        if (
            type(value) is not list
            or len(value) != 3
            or type(value[0]) is not list
            or any(type(d) is not int or d < 0 for d in value[0])
            or type(value[1]) is not str
            or type(value[2]) is not codec.Bin
        ):
            raise CorruptFileError(
                "an ndarray ext must hold [shape (non-negative ints), dtype name, bin]", file=self.path, path=path
            )
        shape, name, data = tuple(value[0]), value[1], value[2]
        if name not in dtypes.DTYPES:
            raise UnsupportedValueError(f"unknown dtype {name!r} in an ndarray ext", file=self.path, path=path)
        if ext.code == EXT_NPSCALAR and shape:
            raise CorruptFileError(
                f"a numpy scalar ext must have shape [], found {list(shape)}", file=self.path, path=path
            )
        expected = dtypes.numel(shape) * dtypes.DTYPES[name].itemsize
        if data.length != expected:
            raise CorruptFileError(
                f"{name}{list(shape)} needs {expected} bytes, the ndarray ext holds {data.length}",
                file=self.path,
                path=path,
            )
        return TensorRef(name, shape, FileRange(self.path, data.offset, data.length))

    def _chunked(self, node: dict[Any, Any], path: TreePath) -> TensorRef:
        if node.get(CHUNKED_KEY) is not True or set(node) != {CHUNKED_KEY, "shape", "chunks"}:
            raise CorruptFileError(
                "a chunked array map must hold exactly __msgpack_chunked_array__: true, shape, chunks",
                file=self.path,
                path=path,
            )
        shape = tuple(_indexed(node["shape"], self.path, path, "shape"))
        chunks = [self._plain(c, tuple(path)) for c in _indexed(node["chunks"], self.path, path, "chunks")]
        if any(type(d) is not int or d < 0 for d in shape):
            raise CorruptFileError("a chunked array's shape must be non-negative ints", file=self.path, path=path)
        if not chunks or any(
            type(c) is not TensorRef or len(c.shape) != 1 or c.dtype != chunks[0].dtype for c in chunks
        ):
            raise CorruptFileError(
                "a chunked array's chunks must be 1-D arrays of one dtype", file=self.path, path=path
            )
        total = sum(c.shape[0] for c in chunks)
        if total != dtypes.numel(shape):
            raise CorruptFileError(
                f"chunks hold {total} elements, the shape {list(shape)} needs {dtypes.numel(shape)}",
                file=self.path,
                path=path,
            )
        return TensorRef(chunks[0].dtype, shape, ConcatSource(tuple(c.source for c in chunks)))


def _indexed(value: Any, file: Path, path: TreePath, what: str) -> list[Any]:
    """flax's {"0": a, "1": b, ...} maps as the list [a, b, ...]."""
    if type(value) is not dict or list(value) != [str(i) for i in range(len(value))]:
        raise CorruptFileError(f"a chunked array's {what} must be a map with keys '0', '1', ...", file=file, path=path)
    return list(value.values())


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


FORMAT = MsgpackFormat()
