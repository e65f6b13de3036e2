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

Ints beyond 64 bits are ext type 81 (decimal ASCII). A tied tensor is an ext 1 array at every path
it has (its bytes again at the later ones, so flax reads an array everywhere), and the metadata
tree names the same storage key at each: our reader ties them back into one tensor. Files written
before that hold ext type 82 (the storage key of the first place) at the later places, and are
still read. Reading checks the native tree against the metadata tree and refuses a file where they
disagree.
"""

from __future__ import annotations

import functools
import mmap
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

from ..codecs import msgpack as codec
from ..core import dtypes, manifests
from ..core.atomic import atomic_output
from ..core.budget import MAX_DEPTH, Budget
from ..core.contract import FormatBase, NoOptions, WriteContext
from ..core.errors import CorruptFileError, TreePath, UnsupportedValueError
from ..core.objects import NumpyScalar, ObjectRecord
from ..core.sources import ByteSource, ConcatSource, FileRange, slice_source
from ..core.storage import RangeBuffer, RemotePath, location, open_read
from ..core.stored import check_casts, check_digests, check_tree_digest, paused_gc
from ..core.transfer import Checks, copy_into
from ..core.tree import CONTAINER_TYPES, MAPPING_TYPES, MAX_DIM, MAX_NDIM, CastOrigin, Checkpoint, TensorRef, walk
from ..core.writing import DIGEST_PLACEHOLDER, PiecewiseCopy, Reserved, TensorWriter

EXT_NDARRAY = 1  # flax: _MsgpackExtType.ndarray
EXT_NPSCALAR = 3  # flax: a numpy scalar, stored like a 0-d array
EXT_METADATA = 80
EXT_BIGINT = 81
EXT_TIED = 82  # read only (older files): a tied tensor's later places, the storage key of its first place
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

    def __init__(self, max_leaf_bytes: int = FLAX_MAX_LEAF_BYTES, max_depth: int = MAX_DEPTH) -> None:
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
        # the same length and rewritten in place at the end. The tree is packed once.
        unique = checkpoint.unique_tensors()
        digests = {keys[tensor_path]: DIGEST_PLACEHOLDER for tensor_path, _ in unique}
        casts = manifests.cast_records(unique, keys, final=False)  # placeholders until the bytes went by
        tensor_writer = TensorWriter(context, checkpoint.origin)
        own = checkpoint.carried_metadata()
        head = (
            codec.map_header(5 + bool(casts) + bool(own))
            + codec.pack_str("version")
            + codec.pack_int(META_VERSION)
            + codec.pack_str("wrapped")
            + codec.pack_bool(wrapped)
            + codec.pack_str("tree")
            + codec.pack_plain(node, bigint_ext=EXT_BIGINT)
            + (codec.pack_str("file_metadata") + codec.pack_plain(own, bigint_ext=EXT_BIGINT) if own else b"")
            + codec.pack_str("blake3")
            + codec.map_header(len(digests))
        )
        del node
        packed_keys = [codec.pack_str(key) for key in digests]
        tree_digest = [DIGEST_PLACEHOLDER]

        def pack_meta() -> bytes:
            entries = b"".join(
                packed + codec.pack_str(digest) for packed, digest in zip(packed_keys, digests.values(), strict=True)
            )
            tail = codec.pack_str("casts") + codec.pack_plain(casts) if casts else b""
            return head + entries + codec.pack_str("tree_blake3") + codec.pack_str(tree_digest[0]) + tail

        with atomic_output(Path(path), fsync=context.fsync, overwrite=context.overwrite) as out:
            out.write(codec.map_header(1 + (1 if wrapped else len(tree))))
            first = [pack_meta()]  # packed once for its length and its placeholder
            out.write(codec.pack_str(META_KEY) + codec.ext_header(EXT_METADATA, len(first[0])))
            reserved = Reserved(out, lambda: first.pop() if first else pack_meta())
            emit = _Emitter(self.max_leaf_bytes, out, keys, tensor_writer)
            if wrapped:
                out.write(codec.pack_str(WRAPPED_ROOT_KEY))
                emit.node(tree, ())
            else:
                emit.items(tree, ())
            digests.update(emit.digests)
            tree_digest[0] = tensor_writer.tree_digest(checkpoint)
            casts.update(manifests.cast_records(unique, keys, final=True))
            reserved.rewrite()

    # ------------------------------------------------------------------------------- reading

    def read(self, path: Path, budget: Budget) -> Checkpoint:
        path = location(path)  # not Path(): a remote path stays remote
        size = path.stat().st_size
        if size == 0:
            raise CorruptFileError("the file is empty; a msgpack file holds at least one value", file=path)
        if isinstance(path, RemotePath):
            # No index to jump by: the values are walked in place as over mmap, through blocks fetched
            # on demand; a bin (a tensor's bytes) is skipped by its length, never fetched.
            with open_read(path) as remote:
                reader = _TreeReader(RangeBuffer(remote), path, self.max_depth, budget)
                with paused_gc():
                    tree = reader.resolve(reader.parse_root(size))
        else:
            with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
                reader = _TreeReader(buffer, path, self.max_depth, budget)
                with paused_gc():
                    tree = reader.resolve(reader.parse_root(size))
        return Checkpoint(
            tree,
            path,
            tree_digest=reader.tree_digest,
            file_metadata=reader.file_metadata,
            expects_tree_digest=bool(reader.digests),
        )


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
        elif kind is TensorRef:
            # A tied tensor's later places hold its bytes again, so that flax (which has no
            # references) reads an array at every path; the metadata tree names the same storage
            # key at each place, which is how our reader ties them back into one tensor.
            key = self.keys[path]
            if id(node) in self.written:
                again = _Again(self.tensors.context.check)
                self.tensor(node, again)
                again.finish(self.digests[key])
            else:
                self.written.add(id(node))
                copy = self.tensors.piecewise(node, path)
                self.tensor(node, copy)
                self.digests[key] = copy.finish().digest
        elif kind is ObjectRecord or kind is NumpyScalar:
            # flax has no such values: nil stands in the native tree, the metadata tree holds them
            out.write(codec.pack_plain(None))
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

    def tensor(self, ref: TensorRef, copy: _Copy) -> None:
        if ref.nbytes > self.max_leaf_bytes:
            self.chunked(ref, copy)
        else:
            self.ndarray(ref.dtype, ref.shape, ref.source, copy)

    def chunked(self, ref: TensorRef, copy: _Copy) -> None:
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

    def ndarray(self, dtype: str, shape: tuple[int, ...], source: ByteSource, copy: _Copy) -> None:
        """flax's ext 1: [shape, dtype, bin]; the bin's bytes copied straight from the source."""
        prefix = (
            codec.array_header(3)
            + codec.array_header(len(shape))
            + b"".join([codec.pack_int(d) for d in shape])
            + _packed_name(dtype)
            + codec.bin_header(source.nbytes)
        )
        self.out.write(codec.ext_header(EXT_NDARRAY, len(prefix) + source.nbytes) + prefix)
        copy.write(self.out, source)


class _Again:
    """The bytes of a tied tensor written again at a later place: a plain copy (no progress: the
    progress total counts each tensor once); with ``check``, hashed and compared with the digest
    stored for its first place."""

    def __init__(self, check: bool) -> None:
        self.checks = Checks.make(digest=check)

    def write(self, out: BinaryIO, source: ByteSource) -> None:
        copy_into(out, source, self.checks)

    def finish(self, first: str) -> None:
        computed = self.checks.hexdigest()
        if computed is not None and computed != first:
            raise CorruptFileError(
                f"a tied tensor's bytes changed while they were written again (BLAKE3 {computed}, "
                f"its first place {first})"
            )


_Copy = PiecewiseCopy | _Again


@functools.cache
def _packed_name(dtype: str) -> bytes:
    return codec.pack_str(dtype)


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

    __slots__ = ("key", "numpy")

    def __init__(self, key: str, numpy: bool = False) -> None:
        self.key = key
        self.numpy = numpy  # the tree says a numpy array (manifest "ndarray" node)

    def as_numpy(self) -> _Slot:
        return _Slot(self.key, True)


@dataclass(frozen=True)
class _Tied:
    """Ext 82 in the native tree: this place holds the tensor stored under ``key``."""

    key: str


class _TreeReader:
    """The checkpoint tree from the parsed msgpack value. The parsed containers are reused in place
    (ext values become tensors and ints where they stand), so the tree costs one copy of the file's
    values, plus the metadata tree for our files: what the parser's per-value charge covers."""

    def __init__(self, buffer: Any, path: Path, max_depth: int, budget: Budget) -> None:
        self.buffer = buffer
        self.path = path
        self.max_depth = max_depth
        self.budget = budget
        self.parser = codec.Parser(buffer, path, budget=budget, max_depth=max_depth)
        self.ext_parser = codec.Parser(buffer, path, budget=budget, max_depth=2)
        self.stored: dict[str, TensorRef] = {}  # storage key -> tensor, for ext 82 to point at
        self.casts: dict[str, CastOrigin] = {}  # storage key -> what its tensor was cast from
        self.file_metadata: dict[str, Any] | None = None  # what the source file said about itself
        self.digests: dict[str, str] = {}
        self.tree_digest: str | None = None

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
        parser = codec.Parser(self.buffer, self.path, budget=self.budget, max_depth=self.max_depth)
        meta = parser.parse(ext.offset, ext.offset + ext.length, f"the {META_KEY!r} ext")
        if type(meta) is not dict or not _META_REQUIRED <= set(meta) <= _META_KEYS:
            raise CorruptFileError(
                f"{META_KEY!r} must be a map of version, wrapped, tree (and blake3, tree_blake3)", file=self.path
            )
        if "blake3" in meta:
            self.digests = check_digests(meta["blake3"], self.path, f"{META_KEY!r} blake3")
        if "tree_blake3" in meta:
            self.tree_digest = check_tree_digest(meta["tree_blake3"], self.path, f"{META_KEY!r} tree_blake3")
        self.casts = check_casts(meta.get("casts", {}), self.path, f"{META_KEY!r} casts")
        own = meta.get("file_metadata", {})
        if type(own) is not dict or not all(type(key) is str for key in own):
            raise CorruptFileError(f"{META_KEY!r} file_metadata must map str keys to values", file=self.path)
        self.file_metadata = self._plain(own, ()) if own else None
        if type(meta["version"]) is not int or meta["version"] != META_VERSION:
            raise UnsupportedValueError(
                f"{META_KEY!r} version {_short(meta['version'])} is not one this reader knows ({META_VERSION})",
                file=self.path,
            )
        if meta["wrapped"] is True:
            if set(native) != {WRAPPED_ROOT_KEY}:
                raise CorruptFileError(f"a wrapped root map must hold only {WRAPPED_ROOT_KEY!r}", file=self.path)
            native = native[WRAPPED_ROOT_KEY]
        elif meta["wrapped"] is not False:
            raise CorruptFileError(f"{META_KEY!r} 'wrapped' must be a bool", file=self.path)
        node = self._plain(meta.pop("tree"), ())  # ext 81 big ints become ints
        del meta
        expected = manifests.decode_tree(node, lambda key, _path: _Slot(key), file=self.path)
        del node
        merged = self._merge(expected, self._plain(native, ()), ())
        stray = next((key for key in self.casts if key not in self.stored), None)
        if stray is not None:
            raise CorruptFileError(f"{META_KEY!r} casts names {stray!r}, which is not a stored tensor", file=self.path)
        return merged

    def _merge(self, expected: Any, native: Any, path: tuple[str | int, ...]) -> Any:
        """The metadata tree (changed in place) with its tensors taken from the native tree, after
        checking they agree."""
        kind = type(expected)
        if kind is _Slot:
            first = self.stored.get(expected.key)
            if first is not None:  # a tied tensor's later place: a copy of its bytes (or an older file's ext 82)
                if type(native) is _Tied and native.key == expected.key:
                    return first
                if type(native) is TensorRef and (native.dtype, native.shape) == (first.dtype, first.shape):
                    return first
                self._disagree(path, f"the tensor {expected.key!r} again ({first.dtype}{list(first.shape)})", native)
            if type(native) is not TensorRef:
                self._disagree(path, f"the tensor {expected.key!r}", native)
            digest = self.digests.get(expected.key)
            ref = native if digest is None else native.with_stored_digest(digest)
            ref = ref.as_numpy() if expected.numpy else ref
            origin = self.casts.get(expected.key)
            self.stored[expected.key] = ref if origin is None else ref.with_cast_from(origin)
            return self.stored[expected.key]
        if kind in MAPPING_TYPES:
            if type(native) is not dict:
                self._disagree(path, "a map", native)
            native_keys = _native_keys(list(expected))
            if list(native) != native_keys:
                raise CorruptFileError(
                    f"the msgpack map keys {_short(list(native))} disagree with the metadata tree's "
                    f"{_short(list(expected))}",
                    file=self.path,
                    path=path,
                )
            for (key, value), native_key in zip(expected.items(), native_keys, strict=True):
                expected[key] = self._merge_item(value, native[native_key], path, key)
            return expected
        if kind is list or kind is tuple:
            if type(native) is not list or len(native) != len(expected):
                self._disagree(path, f"an array of {len(expected)}", native)
            if kind is tuple:
                return tuple(
                    self._merge_item(e, n, path, i) for i, (e, n) in enumerate(zip(expected, native, strict=True))
                )
            for index, (value, item) in enumerate(zip(expected, native, strict=True)):
                expected[index] = self._merge_item(value, item, path, index)
            return expected
        if kind in _NIL_NATIVE:  # records and numpy scalars: nil in the native tree
            if native is not None:
                self._disagree(path, f"a {type(expected).__name__} (nil in the native tree)", native)
            return expected
        self._check_same(expected, native, path)
        return expected

    def _merge_item(self, expected: Any, native: Any, path: tuple[str | int, ...], key: str | int) -> Any:
        """``_merge`` of one item of a container at ``path``; its path is built only when needed."""
        kind = type(expected)
        if kind is _Slot or kind in CONTAINER_TYPES or kind in _NIL_NATIVE:
            return self._merge(expected, native, (*path, key))
        if type(native) is not kind or not (
            struct.pack(">d", native) == struct.pack(">d", expected) if kind is float else native == expected
        ):
            self._check_same(expected, native, (*path, key))
        return expected

    def _check_same(self, expected: Any, native: Any, path: tuple[str | int, ...]) -> None:
        kind = type(expected)
        same = type(native) is kind and (
            struct.pack(">d", native) == struct.pack(">d", expected) if kind is float else native == expected
        )
        if not same:
            self._disagree(path, _short(expected), native)

    def _disagree(self, path: TreePath, expected: str, native: Any) -> None:
        found = {TensorRef: "a tensor", _Tied: "a tied-tensor reference"}.get(type(native)) or _short(native)
        raise CorruptFileError(
            f"the native msgpack value {found} disagrees with the metadata tree, which says {expected}",
            file=self.path,
            path=path,
        )

    def _plain(self, node: Any, path: tuple[str | int, ...]) -> Any:
        """The tree a plain msgpack value stands for (flax conventions for tensors), built in place:
        ext values are replaced where they stand, so no second copy of the containers is made."""
        kind = type(node)
        if kind is dict:
            if CHUNKED_KEY in node:
                return self._chunked(node, path)
            for key, value in node.items():  # replacing values (not keys) while iterating is safe
                if type(value) in _NOT_PLAIN:
                    node[key] = self._plain(value, (*path, key))
            return node
        if kind is list:
            for index, value in enumerate(node):
                if type(value) in _NOT_PLAIN:
                    node[index] = self._plain(value, (*path, index))
            return node
        if kind is codec.Ext:
            return self._ext(node, path)
        if kind is codec.Bin:  # bytes (flax writes none; other msgpack writers do)
            self.budget.materialize(node.length, "msgpack bin values")
            return bytes(self.buffer[node.offset : node.offset + node.length])
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
            digits = bytes(self.buffer[ext.offset : ext.offset + min(ext.length, MAX_BIGINT_DIGITS + 2)])
            if ext.length > MAX_BIGINT_DIGITS + 1 or not _BIGINT.fullmatch(digits):
                raise CorruptFileError(
                    f"ext {EXT_BIGINT} must hold a decimal integer of at most {MAX_BIGINT_DIGITS} digits "
                    f"(an optional '-', then the digits 0-9), found {_short(digits)}",
                    file=self.path,
                    path=path,
                )
            return int(digits)
        names = {2: " (flax: a Python complex scalar)", EXT_METADATA: f" (only as {META_KEY!r} of the root map)"}
        raise UnsupportedValueError(
            f"msgpack ext type {ext.code}{names.get(ext.code, '')} is not supported here", file=self.path, path=path
        )

    def _ndarray(self, ext: codec.Ext, path: TreePath) -> TensorRef:
        fast = self._canonical_ndarray(ext)
        if fast is not None:
            shape, name, data = fast
        else:
            shape, name, data = self._ndarray_fields(ext, path)
        _check_shape(shape, self.path, path, "an ndarray ext's shape")
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
        self.budget.tensors(1)
        return TensorRef(name, shape, FileRange(self.path, data.offset, data.length))

    def _canonical_ndarray(self, ext: codec.Ext) -> tuple[tuple[int, ...], str, codec.Bin] | None:
        """The payload as flax and our writer lay it out (fixarray of 3, a fixarray shape of unsigned
        ints, a fixstr dtype name, a bin), decoded without the generic parser; None for any other
        layout, which the generic parser then reads (and refuses, if it must)."""
        buffer, position, end = self.buffer, ext.offset, ext.offset + ext.length
        if ext.length < 4 or buffer[position] != 0x93 or not 0x90 <= buffer[position + 1] <= 0x9F:
            return None
        ndim = buffer[position + 1] & 0x0F
        position += 2
        dims = []
        for _ in range(ndim):
            if position >= end:
                return None
            code = buffer[position]
            if code < 0x80:
                dims.append(code)
                position += 1
                continue
            width = _UINT_WIDTHS.get(code)
            if width is None or position + 1 + width > end:
                return None
            dims.append(int.from_bytes(buffer[position + 1 : position + 1 + width], "big"))
            position += 1 + width
        if position >= end or not 0xA0 <= buffer[position] <= 0xBF:
            return None
        length = buffer[position] & 0x1F
        name = _DTYPE_NAMES.get(bytes(buffer[position + 1 : position + 1 + length]))
        position += 1 + length
        if name is None or position >= end or buffer[position] not in _BIN_WIDTHS:
            return None
        width = _BIN_WIDTHS[buffer[position]]
        if position + 1 + width > end:
            return None
        size = int.from_bytes(buffer[position + 1 : position + 1 + width], "big")
        position += 1 + width
        if position + size != end:
            return None
        self.budget.nodes(codec.ITEM_UNITS * (4 + ndim), "msgpack values")  # as the generic parser charges
        return tuple(dims), name, codec.Bin(position, size)

    def _ndarray_fields(self, ext: codec.Ext, path: TreePath) -> tuple[tuple[int, ...], str, codec.Bin]:
        value = self.ext_parser.parse(ext.offset, ext.offset + ext.length, "an ndarray ext")
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
        return tuple(value[0]), value[1], value[2]

    def _chunked(self, node: dict[Any, Any], path: TreePath) -> TensorRef:
        if node.get(CHUNKED_KEY) is not True or set(node) != {CHUNKED_KEY, "shape", "chunks"}:
            raise CorruptFileError(
                "a chunked array map must hold exactly __msgpack_chunked_array__: true, shape, chunks",
                file=self.path,
                path=path,
            )
        shape = tuple(_indexed(node["shape"], self.path, path, "shape"))
        if any(type(d) is not int or d < 0 for d in shape):
            raise CorruptFileError("a chunked array's shape must be non-negative ints", file=self.path, path=path)
        _check_shape(shape, self.path, path, "a chunked array's shape")
        chunks = [self._plain(c, tuple(path)) for c in _indexed(node["chunks"], self.path, path, "chunks")]
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
        self.budget.tensors(1)
        return TensorRef(chunks[0].dtype, shape, ConcatSource(tuple(c.source for c in chunks)))


_NOT_PLAIN = (dict, list, codec.Ext, codec.Bin)
_UINT_WIDTHS = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}
_BIN_WIDTHS = {0xC4: 1, 0xC5: 2, 0xC6: 4}
_DTYPE_NAMES = {name.encode(): name for name in dtypes.DTYPES}
_NIL_NATIVE = (ObjectRecord, NumpyScalar)
_META_REQUIRED = frozenset({"version", "wrapped", "tree"})
_META_KEYS = _META_REQUIRED | {"blake3", "tree_blake3", "casts", "file_metadata"}
_BIGINT = re.compile(rb"-?[0-9]+")


def _check_shape(shape: tuple[Any, ...], file: Path, path: TreePath, what: str) -> None:
    """At most MAX_NDIM dims, each below 2**63: what ``TensorRef`` takes (and torch, and numpy)."""
    if len(shape) > MAX_NDIM or any(d > MAX_DIM for d in shape):
        raise CorruptFileError(
            f"{what} {_short(list(shape))} must have at most {MAX_NDIM} dims, each below 2**63",
            file=file,
            path=path,
        )


def _indexed(value: Any, file: Path, path: TreePath, what: str) -> list[Any]:
    """flax's {"0": a, "1": b, ...} maps as the list [a, b, ...]."""
    if type(value) is not dict or list(value) != [str(i) for i in range(len(value))]:
        raise CorruptFileError(f"a chunked array's {what} must be a map with keys '0', '1', ...", file=file, path=path)
    return list(value.values())


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


FORMAT = MsgpackFormat()
