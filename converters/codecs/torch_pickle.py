"""The pickle stream inside a torch zip checkpoint (``archive/data.pkl``), read and written without torch.

Reading never executes pickled code. Three layers, each enough on its own for the common attacks:

1. A pre-scan of the opcode stream (``pickletools.genops``) refuses any opcode outside the set torch
   writes, any global outside :data:`ALLOWED_GLOBALS`, and memo indices that could make the C
   unpickler allocate far more than the stream's size.
2. ``find_class`` returns our own stand-ins, never the real torch functions, and refuses anything
   else: ``GLOBAL os system`` ends the read with :class:`UnsafeFileError`.
3. The stand-ins are bound methods and frozen, slotted objects, so ``BUILD`` cannot rewire them.

Writing emits the same opcodes ``torch.save`` does (protocol 2), so ``torch.load(weights_only=True)``
accepts our files: ``_rebuild_tensor_v2`` with a legacy typed storage for the classic dtypes and
``_rebuild_tensor_v3`` with an ``UntypedStorage`` for the rest (float8, uint16..uint64, ...).
"""

from __future__ import annotations

import io
import pickle
import pickletools
import struct
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core import dtypes
from ..core.errors import ConverterError, CorruptFileError, UnsafeFileError, UnsupportedValueError
from ..core.tree import MAPPING_TYPES, TensorRef

# Opcodes that torch.save (protocol 2) and older protocol-2 pickles use for plain data.
ALLOWED_OPCODES = frozenset(
    {
        *("PROTO", "FRAME", "STOP", "MARK", "POP", "POP_MARK", "DUP"),
        *("EMPTY_DICT", "DICT", "SETITEM", "SETITEMS", "EMPTY_LIST", "LIST", "APPEND", "APPENDS"),
        *("EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3"),
        *("NONE", "NEWTRUE", "NEWFALSE", "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4"),
        *("FLOAT", "BINFLOAT", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8"),
        *("STRING", "BINSTRING", "SHORT_BINSTRING"),
        *("GLOBAL", "STACK_GLOBAL", "REDUCE", "BUILD", "BINPERSID"),
        *("PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET", "MEMOIZE"),
    }
)

REBUILD_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): "rebuild_v2",
    ("torch._utils", "_rebuild_tensor_v3"): "rebuild_v3",
    ("torch._utils", "_rebuild_parameter"): "rebuild_parameter",
    ("torch._utils", "_rebuild_parameter_with_state"): "rebuild_parameter",
    ("collections", "OrderedDict"): "ordered_dict",
    ("collections", "Counter"): "counter",
}
# The typed-storage classes torch pickles for these dtypes (torch.<X>); other dtypes use the
# untyped storage and _rebuild_tensor_v3.
LEGACY_STORAGES: dict[str, str] = {
    "float64": "DoubleStorage", "float32": "FloatStorage", "float16": "HalfStorage",
    "bfloat16": "BFloat16Storage", "int8": "CharStorage", "int16": "ShortStorage", "int32": "IntStorage",
    "int64": "LongStorage", "uint8": "ByteStorage", "bool": "BoolStorage",
    "complex64": "ComplexFloatStorage", "complex128": "ComplexDoubleStorage",
}  # fmt: skip
STORAGE_GLOBALS = {("torch", storage): dtypes.DTYPES[name] for name, storage in LEGACY_STORAGES.items()}
UNTYPED_STORAGE_GLOBALS = {("torch.storage", "UntypedStorage"), ("torch", "UntypedStorage")}
DTYPE_GLOBALS = {("torch", name) for name in dtypes.DTYPES}
ALLOWED_GLOBALS = set(REBUILD_GLOBALS) | set(STORAGE_GLOBALS) | UNTYPED_STORAGE_GLOBALS | DTYPE_GLOBALS


@dataclass(frozen=True, slots=True)
class StorageType:
    dtype: dtypes.DType | None  # None: UntypedStorage (bytes; the tensor says its dtype)


@dataclass(frozen=True, slots=True)
class DTypeMarker:
    name: str


@dataclass(frozen=True, slots=True)
class Storage:
    key: str
    dtype: dtypes.DType | None
    offset: int  # of the storage's bytes in the file
    nbytes: int  # actual size of the zip entry


# A function that returns the byte source for ``nbytes`` bytes at ``offset`` inside a storage.
SourceFor = Callable[[Storage, int, int], Any]


class SafeUnpickler(pickle.Unpickler):
    """Rebuilds a tree of plain containers and ``TensorRef``s from a torch ``data.pkl``."""

    def __init__(
        self,
        data: bytes,
        file: Path,
        storage_for_key: Callable[[str], tuple[int, int]],
        gather: Callable[[Storage, dtypes.DType, int, tuple[int, ...], tuple[int, ...]], TensorRef],
    ) -> None:
        super().__init__(io.BytesIO(data))
        self._file = file
        self._storage_for_key = storage_for_key
        self._gather = gather
        self._storages: dict[str, Storage] = {}
        # Two tensors viewing one storage the same way are tied: they become one TensorRef.
        self._views: dict[tuple[Any, ...], TensorRef] = {}

    def find_class(self, module: str, name: str) -> Any:
        target = (module, name)
        if target in REBUILD_GLOBALS:
            return getattr(self, "_" + REBUILD_GLOBALS[target])
        if target in STORAGE_GLOBALS:
            return StorageType(STORAGE_GLOBALS[target])
        if target in UNTYPED_STORAGE_GLOBALS:
            return StorageType(None)
        if target in DTYPE_GLOBALS:
            return DTypeMarker(name)
        raise UnsafeFileError(
            f"data.pkl asks for the global {module}.{name}, which is not a tensor or container; "
            "refusing to run pickled code",
            file=self._file,
        )

    def persistent_load(self, pid: Any) -> Storage:
        if (
            type(pid) is not tuple
            or len(pid) != 5
            or pid[0] != "storage"
            or type(pid[1]) is not StorageType
            or type(pid[2]) is not str
            or type(pid[4]) is not int
        ):
            raise CorruptFileError(f"data.pkl has a malformed storage reference {pid!r:.80}", file=self._file)
        storage_type, key = pid[1], pid[2]
        if key not in self._storages:
            offset, nbytes = self._storage_for_key(key)
            self._storages[key] = Storage(key, storage_type.dtype, offset, nbytes)
        return self._storages[key]

    def _ordered_dict(self, *args: Any) -> OrderedDict[Any, Any]:
        return OrderedDict(*args)

    def _counter(self, *args: Any) -> Counter[Any]:
        if len(args) > 1 or (args and type(args[0]) is not dict):
            raise CorruptFileError("collections.Counter must be rebuilt from one dict", file=self._file)
        return Counter(*args)

    def _rebuild_v2(self, storage: Any, offset: Any, size: Any, stride: Any, *_: Any) -> TensorRef:
        if type(storage) is not Storage or storage.dtype is None:
            raise CorruptFileError("_rebuild_tensor_v2 needs a typed storage", file=self._file)
        return self._rebuild(storage, storage.dtype, offset, size, stride)

    def _rebuild_v3(
        self, storage: Any, offset: Any, size: Any, stride: Any, _grad: Any, _hooks: Any, dtype: Any, *_: Any
    ) -> TensorRef:
        if type(storage) is not Storage or type(dtype) is not DTypeMarker:
            raise CorruptFileError("_rebuild_tensor_v3 needs a storage and a dtype", file=self._file)
        return self._rebuild(storage, dtypes.DTYPES[dtype.name], offset, size, stride)

    def _rebuild_parameter(self, data: Any, *_: Any) -> TensorRef:
        if type(data) is not TensorRef:
            raise CorruptFileError("_rebuild_parameter needs a tensor", file=self._file)
        return data  # a Parameter's data; requires_grad is not kept (state_dicts hold plain data)

    def _rebuild(self, storage: Storage, dtype: dtypes.DType, offset: Any, size: Any, stride: Any) -> TensorRef:
        if not _ints(size) or not _ints(stride) or len(size) != len(stride) or type(offset) is not int:
            raise CorruptFileError(
                f"tensor in storage {storage.key!r} has malformed size/stride/offset", file=self._file
            )
        if offset < 0 or any(d < 0 for d in size) or any(s < 0 for s in stride):
            raise CorruptFileError(
                f"tensor in storage {storage.key!r} has a negative size, stride or offset", file=self._file
            )
        view = (storage.key, dtype.name, offset, tuple(size), tuple(stride))
        if view not in self._views:
            self._views[view] = self._gather(storage, dtype, offset, tuple(size), tuple(stride))
        return self._views[view]


def _ints(value: Any) -> bool:
    return type(value) is tuple and all(type(v) is int for v in value)


def prescan(
    data: bytes,
    file: Path,
    *,
    opcodes: frozenset[str] = ALLOWED_OPCODES,
    allowed_globals: set[tuple[str, str]] | None = None,
    what: str = "data.pkl",
) -> None:
    """Refuse opcodes, globals and memo indices outside what torch writes (see module doc)."""
    allowed_globals = ALLOWED_GLOBALS if allowed_globals is None else allowed_globals
    memo_limit = len(data)
    try:
        for opcode, arg, position in pickletools.genops(data):
            if opcode.name not in opcodes:
                raise UnsafeFileError(
                    f"{what} uses the pickle opcode {opcode.name} at byte {position}, "
                    "which plain tensor data never needs",
                    file=file,
                )
            if opcode.name == "GLOBAL":
                module, _, name = str(arg).partition(" ")
                if (module, name) not in allowed_globals:
                    raise UnsafeFileError(
                        f"{what} asks for the global {module}.{name} at byte {position}; refusing to run pickled code",
                        file=file,
                    )
            memo_op = opcode.name in ("PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET")
            if memo_op and not (isinstance(arg, int) and 0 <= arg <= memo_limit):
                raise CorruptFileError(f"{what} has a memo index {arg!r} at byte {position}", file=file)
    except ConverterError:
        raise
    except Exception as exc:  # genops raises ValueError and friends on malformed streams
        raise CorruptFileError(f"{what} is not a valid pickle: {exc}", file=file) from None


def unpickle(unpickler: SafeUnpickler, file: Path) -> Any:
    try:
        return unpickler.load()
    except ConverterError:
        raise
    except Exception as exc:
        raise CorruptFileError(f"data.pkl could not be read: {type(exc).__name__}: {exc}", file=file) from None


class PickleWriter:
    """Emits the protocol-2 pickle of a tree, tensors as torch persistent storage references."""

    BATCH = 1000

    def __init__(self, storage_key: Callable[[tuple[str | int, ...], TensorRef], str]) -> None:
        self._out = io.BytesIO()
        self._storage_key = storage_key

    def dumps(self, tree: Any) -> bytes:
        self._out.write(b"\x80\x02")
        self._node(tree, ())
        self._out.write(pickle.STOP)
        return self._out.getvalue()

    def _node(self, node: Any, path: tuple[str | int, ...]) -> None:
        out = self._out
        kind = type(node)
        if kind in MAPPING_TYPES:
            if kind is OrderedDict:
                out.write(b"ccollections\nOrderedDict\n" + pickle.EMPTY_TUPLE + pickle.REDUCE)
            elif kind is Counter:
                out.write(b"ccollections\nCounter\n" + pickle.EMPTY_DICT)  # Counter(dict), as pickle does
            else:
                out.write(pickle.EMPTY_DICT)
            items = list(node.items())
            for start in range(0, len(items), self.BATCH):
                out.write(pickle.MARK)
                for key, value in items[start : start + self.BATCH]:
                    self._node(key, path)
                    self._node(value, (*path, key))
                out.write(pickle.SETITEMS)
            if kind is Counter:
                out.write(pickle.TUPLE1 + pickle.REDUCE)
            if kind is OrderedDict and hasattr(node, "_metadata"):
                out.write(pickle.EMPTY_DICT)
                self._str("_metadata")
                self._node(node._metadata, (*path, "_metadata"))
                out.write(pickle.SETITEM + pickle.BUILD)
        elif kind is list:
            out.write(pickle.EMPTY_LIST)
            for start in range(0, len(node), self.BATCH):
                out.write(pickle.MARK)
                for index in range(start, min(start + self.BATCH, len(node))):
                    self._node(node[index], (*path, index))
                out.write(pickle.APPENDS)
        elif kind is tuple:
            out.write(pickle.MARK)
            for index, value in enumerate(node):
                self._node(value, (*path, index))
            out.write(pickle.TUPLE)
        elif node is None:
            out.write(pickle.NONE)
        elif kind is bool:
            out.write(pickle.NEWTRUE if node else pickle.NEWFALSE)
        elif kind is int:
            self._int(node)
        elif kind is float:
            out.write(pickle.BINFLOAT + struct.pack(">d", node))
        elif kind is str:
            self._str(node)
        elif kind is TensorRef:
            self._tensor(node, path)
        else:
            raise UnsupportedValueError(f"cannot pickle {kind.__name__}", path=path)

    def _int(self, value: int) -> None:
        if 0 <= value < 0x100:
            self._out.write(pickle.BININT1 + bytes([value]))
        elif 0 <= value < 0x10000:
            self._out.write(pickle.BININT2 + struct.pack("<H", value))
        elif -(2**31) <= value < 2**31:
            self._out.write(pickle.BININT + struct.pack("<i", value))
        else:
            encoded = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
            if len(encoded) < 256:
                self._out.write(pickle.LONG1 + bytes([len(encoded)]) + encoded)
            else:
                self._out.write(pickle.LONG4 + struct.pack("<i", len(encoded)) + encoded)

    def _str(self, value: str) -> None:
        encoded = value.encode("utf-8", "surrogatepass")
        self._out.write(pickle.BINUNICODE + struct.pack("<I", len(encoded)) + encoded)

    def _tensor(self, ref: TensorRef, path: tuple[str | int, ...]) -> None:
        row = dtypes.DTYPES[ref.dtype]
        key = self._storage_key(path, ref)
        out = self._out
        legacy_storage = LEGACY_STORAGES.get(row.name)
        legacy = legacy_storage is not None
        out.write(b"ctorch._utils\n_rebuild_tensor_v2\n" if legacy else b"ctorch._utils\n_rebuild_tensor_v3\n")
        out.write(pickle.MARK + pickle.MARK)
        self._str("storage")
        if legacy:
            out.write(f"ctorch\n{legacy_storage}\n".encode())
            numel_in_storage = dtypes.numel(ref.shape)
        else:
            out.write(b"ctorch.storage\nUntypedStorage\n")
            numel_in_storage = ref.nbytes
        self._str(key)
        self._str("cpu")
        self._int(numel_in_storage)
        out.write(pickle.TUPLE + pickle.BINPERSID)
        self._int(0)
        self._tuple_of_ints(ref.shape)
        self._tuple_of_ints(contiguous_strides(ref.shape))
        out.write(pickle.NEWFALSE + b"ccollections\nOrderedDict\n" + pickle.EMPTY_TUPLE + pickle.REDUCE)
        if not legacy:
            out.write(f"ctorch\n{ref.dtype}\n".encode())
        out.write(pickle.TUPLE + pickle.REDUCE)

    def _tuple_of_ints(self, values: tuple[int, ...]) -> None:
        self._out.write(pickle.MARK)
        for value in values:
            self._int(value)
        self._out.write(pickle.TUPLE)


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides = []
    step = 1
    for dim in reversed(shape):
        strides.append(step)
        step *= max(dim, 1)
    return tuple(reversed(strides))
