"""The pickle stream inside a torch zip checkpoint (``archive/data.pkl``), read and written without torch.

Reading never executes pickled code, and what a file asks for is paid for before it is built:

1. A pre-scan of the opcode stream (:func:`prescan`, one pass, O(size)) refuses any opcode outside
   the set torch writes, any global outside :data:`ALLOWED_GLOBALS`, memo indices past the
   stream's size, integers past Python's int-to-str limit and bytes after ``STOP``; it counts the
   objects the stream would create and charges them to the read's :class:`Budget` as it goes, so a
   pickle of millions of empty dicts is refused before one is built.
2. :class:`SafeUnpickler` is our own interpreter of exactly those opcodes (not ``pickle``'s): globals
   become our stand-ins (never the real torch functions; anything else ends the read with
   :class:`UnsafeFileError`), ``REDUCE`` calls stand-ins only, and the opcodes that mutate an object
   act on plain containers only: ``SETITEM(S)`` on a ``dict``/``OrderedDict``/``Counter`` with str or
   int keys, ``APPEND(S)`` on a ``list``, ``BUILD`` on an ``OrderedDict`` and only to set its
   ``_metadata`` (as ``torch.load(weights_only=True)`` does). ``BUILD`` on a tensor, a storage, a
   dtype or a rebuild function is refused.
3. The stand-ins are inert: slotted, frozen, with a ``__setstate__`` that refuses, so even another
   unpickler (DCP's ``.metadata`` reader uses :class:`DTypeMarker`) cannot rewire them.
4. The tree built is checked as a whole: a container that contains itself, nesting deeper than
   the budget's limit, a tensor inside an ``_metadata``, and containers shared so often that the
   tree as walked (what every writer walks) outgrows the budget are refused.

Writing emits the same opcodes ``torch.save`` does (protocol 2), so ``torch.load(weights_only=True)``
accepts our files: ``_rebuild_tensor_v2`` with a legacy typed storage for the classic dtypes and
``_rebuild_tensor_v3`` with an ``UntypedStorage`` for the rest (float8, uint16..uint64, ...).
"""

from __future__ import annotations

import codecs
import io
import pickle
import pickletools
import re
import struct
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

from ..core import dtypes
from ..core.budget import MAX_DEPTH, Budget
from ..core.errors import ConverterError, CorruptFileError, UnsafeFileError, UnsupportedValueError
from ..core.objects import NUMPY_DESCR, NumpyScalar, ObjectRecord, Unreadable, torch_dtype
from ..core.sources import read_all
from ..core.tree import MAPPING_TYPES, TensorRef
from . import pickle_objects as objects

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
        # objects beyond the tree become records (NEWOBJ: a class made with arguments), bytes, and
        # the protocol-4 spellings of sets that pickle.dumps(protocol=4) users write
        *("NEWOBJ", "SHORT_BINBYTES", "BINBYTES", "BINBYTES8", "EMPTY_SET", "ADDITEMS", "FROZENSET"),
    }
)

REBUILD_GLOBALS = {
    ("torch._utils", "_rebuild_tensor"): "rebuild_v1",  # torch < 0.4 (legacy files); weights_only allows it
    ("torch._utils", "_rebuild_tensor_v2"): "rebuild_v2",
    ("torch._utils", "_rebuild_tensor_v3"): "rebuild_v3",
    ("torch._utils", "_rebuild_parameter"): "rebuild_parameter",
    ("torch._utils", "_rebuild_parameter_with_state"): "rebuild_parameter",
    ("collections", "OrderedDict"): "ordered_dict",
    ("collections", "Counter"): "counter",
}
# Globals that torch's safe loader accepts and that are interpreted (method name, "") or that make
# tensors this reader does not read ("", what to say instead), by dotted name.
_NOT_READ = {
    "_rebuild_sparse_tensor": "a sparse tensor is not read: save tensor.to_dense(), or its indices and values",
    "_rebuild_qtensor": "a quantized tensor is not read: save tensor.dequantize(), or int_repr() and its scales",
    "_rebuild_nested_tensor": "a nested tensor is not read: save its components (tensor.unbind())",
    "_rebuild_wrapper_subclass": "a tensor subclass such as DTensor is not read: save tensor.full_tensor()",
    "_rebuild_meta_tensor_no_storage": "a meta tensor is not read: it has no data",
    "_rebuild_xla_tensor": "an XLA tensor is not read: move it to the CPU before saving",
    "_rebuild_mtia_tensor": "an MTIA tensor is not read: move it to the CPU before saving",
}
_SPECIAL_GLOBALS: dict[str, tuple[str, str]] = {
    "_codecs.encode": ("_encode", ""),
    **{f"{core}.scalar": ("_numpy_scalar", "") for core in ("numpy.core.multiarray", "numpy._core.multiarray")},
    "torch._tensor._rebuild_from_type_v2": ("_rebuild_from_type", ""),
    "torch._utils._rebuild_device_tensor_from_cpu_tensor": ("_from_device", ""),
    "torch._utils._rebuild_device_tensor_from_numpy": ("_from_device", ""),
    **{f"torch._utils.{name}": ("", what) for name, what in _NOT_READ.items()},
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

# Integers are kept only while Python can print them (its default int-to-str limit): every message,
# manifest and other format spells ints in decimal, so a bigger one could only fail later.
MAX_INT_DIGITS = 4300
INT_LIMIT = 10**MAX_INT_DIGITS
MAX_INT_BYTES = (MAX_INT_DIGITS * 3322 // 1000 + 8) // 8 + 1  # two's complement bytes that can hold one
MAX_DIMS = 64  # a tensor's rank (torch's own limit)
INT64_MAX = 2**63 - 1  # sizes, strides and offsets are int64 in torch
# Memory a reference costs (a stack or container slot), charged for opcodes that push an existing
# object (GET, DUP, None, small ints); opcodes that create an object cost the budget's node.
REFERENCE_BYTES = 16
SEEN_BYTES = 120  # what the tree check remembers per distinct container (a dict slot and two ints)
SEEN_CHARGE_EVERY = 1 << 12
NUMPY_CORE = "numpy.core.multiarray"  # what numpy 1.x pickles; numpy 2 reads it too (numpy._core is 2.x only)
SCAN_WINDOW = 1 << 16  # the pre-scan charges the budget after each this many bytes, so refusals come early

_Class = TypeVar("_Class", bound=type)


def _refuse_setstate(self: object, state: object) -> None:
    raise TypeError(f"{type(self).__name__} is an inert stand-in: pickle's BUILD cannot change it")


def _inert(cls: _Class) -> _Class:
    """A frozen slotted dataclass whose ``__setstate__`` (which dataclasses add) refuses instead."""
    setattr(cls, "__setstate__", _refuse_setstate)  # noqa: B010  (assigning a method on purpose)
    return cls


@_inert
@dataclass(frozen=True, slots=True)
class StorageType:
    dtype: dtypes.DType | None  # None: UntypedStorage (bytes; the tensor says its dtype)


@_inert
@dataclass(frozen=True, slots=True)
class DTypeMarker:
    name: str


@_inert
@dataclass(frozen=True, slots=True)
class Storage:
    key: str
    dtype: dtypes.DType | None
    source: Any  # a ByteSource of the storage's bytes (a zip record)
    nbytes: int


class StandIn:
    """What ``find_class`` gives for an allowed function or class: calling it rebuilds a value
    (through our own code); nothing about it can be changed."""

    __slots__ = ("_call", "name")
    name: str
    _call: Callable[..., Any]

    def __init__(self, name: str, call: Callable[..., Any]) -> None:
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "_call", call)

    def __call__(self, *args: Any) -> Any:
        return self._call(*args)

    def __setattr__(self, name: str, value: Any) -> None:
        raise TypeError(f"the stand-in for {self.name} is inert")

    def __delattr__(self, name: str) -> None:
        raise TypeError(f"the stand-in for {self.name} is inert")

    __setstate__ = _refuse_setstate

    def __repr__(self) -> str:
        return f"<stand-in for {self.name}>"


def describe(value: Any) -> str:
    """What a value is, for messages, without printing it (it may be huge or hostile)."""
    kind = type(value)
    if kind is TensorRef:
        return "a tensor"
    if kind is StandIn:
        return f"the stand-in for {value.name}"
    if kind is Storage:
        return "a storage"
    if kind is StorageType:
        return "a storage type"
    if kind is DTypeMarker:
        return f"the dtype torch.{value.name}"
    if kind is ObjectRecord:
        return f"the global {shown(value.name)}" if value.how == "global" else f"a {shown(value.name)} object"
    name = kind.__name__
    return ("an " if name[:1] in "aeiouAEIOU" else "a ") + name


def quoted(text: str, limit: int = 100) -> str:
    """An untrusted string for a message, quoted: ``repr`` (so escaped), shortened."""
    text = repr(text)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def shown(text: str, limit: int = 100) -> str:
    """An untrusted string for a message: escaped (no control characters), shortened."""
    escaped = text.encode("unicode_escape").decode("ascii")
    return escaped if len(escaped) <= limit else escaped[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------- pre-scan

_TWO_LINES = -100  # GLOBAL's argument: two newline-terminated lines
_GLOBAL, _MEMO, _BIG_INT, _TEXT_INT, _STOP, _PROTO = 1, 2, 3, 4, 5, 6  # what the scan checks
_CREATES = {
    *("EMPTY_DICT", "EMPTY_LIST", "DICT", "LIST", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "MARK"),
    *("INT", "BININT", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT"),
    *("UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "STRING", "BINSTRING", "SHORT_BINSTRING"),
    *("GLOBAL", "STACK_GLOBAL", "REDUCE", "BUILD", "BINPERSID"),
    *("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"),  # a memo entry
    *("INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "EMPTY_SET", "FROZENSET", "BINBYTES", "SHORT_BINBYTES"),
    *("BINBYTES8", "BYTEARRAY8", "PERSID", "EXT1", "EXT2", "EXT4"),
}
_PUSHES = {"GET", "BINGET", "LONG_BINGET", "DUP", "NONE", "NEWTRUE", "NEWFALSE", "EMPTY_TUPLE", "BININT1"}
_CHECKS = {
    "GLOBAL": _GLOBAL,
    **dict.fromkeys(("PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET"), _MEMO),
    **dict.fromkeys(("LONG1", "LONG4"), _BIG_INT),
    **dict.fromkeys(("INT", "LONG"), _TEXT_INT),
    "STOP": _STOP,
    "PROTO": _PROTO,
}
_NAMES = {op.code.encode("latin-1")[0]: op.name for op in pickletools.opcodes}


@cache
def _scan_tables(opcodes: frozenset[str], small: bool) -> tuple[list[int], list[tuple[int, int] | None]]:
    """Per opcode byte: its whole length when it has a fixed-size argument and needs no check (0
    otherwise: the fast path), and (argument length or kind, check), or None for opcodes not allowed.
    ``small``: a stream shorter than 256 bytes, where even one-byte memo indices are checked."""
    fast = [0] * 256
    table: list[tuple[int, int] | None] = [None] * 256
    for op in pickletools.opcodes:
        if op.name not in opcodes:
            continue
        code = op.code.encode("latin-1")[0]
        length = _TWO_LINES if op.name in ("GLOBAL", "INST") else (op.arg.n if op.arg is not None else 0)
        check = _CHECKS.get(op.name, 0)
        if check == _MEMO and op.name in ("BINPUT", "BINGET") and not small:
            check = 0  # an index below 256 is below the stream's size
        table[code] = (length, check)
        if length >= 0 and not check:
            fast[code] = 1 + length
    return fast, table


@cache
def _costs(opcodes: frozenset[str]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The opcode bytes that create an object, and those that push a reference to one."""
    named = {op.name: op.code.encode("latin-1")[0] for op in pickletools.opcodes if op.name in opcodes}
    return (
        tuple(code for name, code in named.items() if name in _CREATES),
        tuple(code for name, code in named.items() if name in _PUSHES),
    )


@cache
def _containers(opcodes: frozenset[str]) -> tuple[int, ...]:
    """The opcode bytes that create a value that can grow (a dict, list or set filled later)."""
    return tuple(op.code.encode("latin-1")[0] for op in pickletools.opcodes if op.name in opcodes and op.name in _GROWS)


_GROWS = {"EMPTY_DICT", "EMPTY_LIST", "DICT", "LIST", "EMPTY_SET", "FROZENSET", "INST", "OBJ"}


def _text_factor(data: bytes | bytearray) -> int:
    """Bytes of memory per byte of UTF-8 a str can take: 4 once any character needs 4 bytes of
    UTF-8 (the whole str is then stored 4 bytes a character), 2 past U+00FF, else 1."""
    if re.search(rb"[\xf0-\xf4]", data):
        return 4
    return 2 if re.search(rb"[\xc4-\xef]", data) else 1


def prescan(
    data: bytes | bytearray,
    file: Path,
    *,
    opcodes: frozenset[str] = ALLOWED_OPCODES,
    allowed_globals: set[tuple[str, str]] | None = None,  # None: all but the dangerous ones (records)
    also_allowed: frozenset[str] = frozenset(),  # dotted names allowed besides (TorchScript's list builders)
    what: str = "data.pkl",
    budget: Budget | None = None,
) -> None:
    """Refuse opcodes, globals, memo indices and integers outside what torch writes (see module doc),
    and charge ``budget`` for the objects the stream would create, before any is created.

    One pass; the budget is charged after every ``SCAN_WINDOW`` bytes, so a stream that asks for
    too much is refused after scanning about as much of it as the budget allows.
    """
    budget = Budget(file, len(data)) if budget is None else budget
    end = len(data)
    fast, table = _scan_tables(opcodes, end < 256)
    creates, pushes = _costs(opcodes)
    containers = _containers(opcodes)
    factor = _text_factor(data)
    counts = [0] * 256
    payload = 0  # bytes of variable-length arguments (strings, big ints): copied into objects
    charged = [0, 0, 0, 0]

    def charge() -> None:
        nodes = sum(counts[code] for code in containers)
        small = sum(counts[code] for code in creates) - nodes
        references = sum(counts[code] for code in pushes)
        budget.nodes(nodes - charged[0], "pickle containers")
        budget.small_values(small - charged[3], "pickle values")
        budget.materialize((references - charged[1]) * REFERENCE_BYTES, "pickle references")
        budget.materialize((payload - charged[2]) * factor, "pickle strings and integers")
        charged[:] = nodes, references, payload, small

    position = at = 0
    stopped = False
    try:
        while not stopped:
            if position >= end:
                raise CorruptFileError(f"{what} is not a valid pickle: it ends without a STOP opcode", file=file)
            limit = min(end, position + SCAN_WINDOW)
            while position < limit:
                code = data[position]
                step = fast[code]
                if step:  # the common case: a fixed-size argument and nothing to check
                    position += step
                    counts[code] += 1
                    continue
                at = position
                spec = table[code]
                if spec is None:
                    _refuse_opcode(code, at, what, file)
                length, check = spec  # type: ignore[misc]
                counts[code] += 1
                position += 1
                argument = position
                if length >= 0:
                    position += length
                elif length == pickletools.TAKEN_FROM_ARGUMENT4U or length == pickletools.TAKEN_FROM_ARGUMENT4:
                    size = int.from_bytes(
                        data[position : position + 4], "little", signed=length == pickletools.TAKEN_FROM_ARGUMENT4
                    )
                    if size < 0:
                        raise CorruptFileError(f"{what} has a negative length at byte {at}", file=file)
                    argument = position + 4
                    position = argument + size
                elif length == pickletools.TAKEN_FROM_ARGUMENT1:
                    argument = position + 1
                    position = argument + data[position]
                elif length == pickletools.UP_TO_NEWLINE:
                    position = data.index(b"\n", position) + 1
                elif length == pickletools.TAKEN_FROM_ARGUMENT8U:
                    argument = position + 8
                    position = argument + int.from_bytes(data[position:argument], "little")
                else:  # _TWO_LINES
                    position = data.index(b"\n", data.index(b"\n", position) + 1) + 1
                if position > end:
                    break
                if length < 0:
                    payload += position - argument
                if check:
                    if check == _STOP:
                        stopped = True
                        break
                    _check(check, data, at, argument, position, what, file, allowed_globals, end, also_allowed)
            if position > end:
                raise CorruptFileError(f"{what} is not a valid pickle: it is truncated", file=file)
            charge()
    except ConverterError:
        raise
    except Exception as exc:  # ValueError (no newline), IndexError (cut short), UnicodeDecodeError, ...
        raise CorruptFileError(f"{what} is not a valid pickle: {type(exc).__name__} at byte {at}", file=file) from None
    if position != end:
        raise CorruptFileError(f"{what} has {end - position} bytes after its STOP opcode", file=file)


def _refuse_opcode(code: int, at: int, what: str, file: Path) -> None:
    name = _NAMES.get(code)
    if name is None:
        raise CorruptFileError(f"{what} is not a valid pickle: unknown opcode 0x{code:02x} at byte {at}", file=file)
    raise UnsafeFileError(
        f"{what} uses the pickle opcode {name} at byte {at}, which plain tensor data never needs", file=file
    )


def _check(
    check: int,
    data: bytes | bytearray,
    at: int,
    argument: int,
    end: int,
    what: str,
    file: Path,
    allowed_globals: set[tuple[str, str]] | None,
    size: int,
    also_allowed: frozenset[str] = frozenset(),
) -> None:
    """The checks of one opcode's argument (``data[argument:end]``), found at byte ``at``."""
    if check == _GLOBAL:
        newline = data.index(b"\n", argument)
        module, name = data[argument:newline].decode("utf-8"), data[newline + 1 : end - 1].decode("utf-8")
        if not _global_allowed(module, name, allowed_globals) and objects.normalized(module, name) not in also_allowed:
            why = ", which can run code" if allowed_globals is None else ""
            global_name = f"{shown(module)}.{shown(name)}"
            raise UnsafeFileError(
                f"{what} asks for the global {global_name} at byte {at}{why}; refusing to run pickled code", file=file
            )
    elif check == _MEMO:
        opcode = data[at]
        if opcode in (pickle.PUT[0], pickle.GET[0]):
            index = int(data[argument : end - 1])
        else:
            index = int.from_bytes(data[argument:end], "little")
        if not 0 <= index <= size:
            raise CorruptFileError(f"{what} has a memo index {index} at byte {at}", file=file)
    elif check == _BIG_INT:
        count = end - argument
        if count > MAX_INT_BYTES or (
            count * 8 > MAX_INT_DIGITS * 3
            and abs(int.from_bytes(data[argument:end], "little", signed=True)) >= INT_LIMIT
        ):
            raise _big_int(what, at, file)
    elif check == _TEXT_INT:
        text = data[argument : end - 1]
        if len(text) > MAX_INT_DIGITS + 8:
            raise _big_int(what, at, file)
        if text not in (b"00", b"01") and abs(_text_int(text)) >= INT_LIMIT:
            raise _big_int(what, at, file)
    elif check == _PROTO and data[argument] > pickle.HIGHEST_PROTOCOL:
        raise CorruptFileError(f"{what} uses pickle protocol {data[argument]}, which does not exist", file=file)


def _global_allowed(module: str, name: str, allowed_globals: set[tuple[str, str]] | None) -> bool:
    if allowed_globals is not None:
        return (module, name) in allowed_globals
    dotted = objects.normalized(module, name)
    return (module, name) in ALLOWED_GLOBALS or dotted in _SPECIAL_GLOBALS or not objects.is_dangerous(dotted)


def _big_int(what: str, at: int, file: Path) -> UnsupportedValueError:
    return UnsupportedValueError(
        f"{what} holds an integer of more than {MAX_INT_DIGITS} decimal digits at byte {at}; such integers are "
        "refused (past Python's int-to-str limit: no message, manifest or other format could spell them)",
        file=file,
    )


def _text_int(text: bytes | bytearray) -> int:
    """An INT or LONG opcode's text as pickle reads it (``int(text, 0)``, a trailing L dropped)."""
    return int(text[:-1] if text.endswith(b"L") else text, 0)


# -------------------------------------------------------------------------------- the interpreter

SourceFor = Callable[[str], tuple[Any, int]]  # storage key -> (its byte source, its size)
# A reader's own persistent ids (a legacy file's 6-tuples): the id as built -> the Storage it names.
PersistentLoad = Callable[[Any], "Storage"]
Gather = Callable[[Storage, dtypes.DType, int, tuple[int, ...], tuple[int, ...]], TensorRef]
SET_ITEM_TYPES = (dict, OrderedDict, Counter)
CONTAINER_TYPES = (*MAPPING_TYPES, list, tuple)


# The opcode bytes the interpreter dispatches on.
MARK = pickle.MARK[0]
STOP = pickle.STOP[0]
POP = pickle.POP[0]
POP_MARK = pickle.POP_MARK[0]
DUP = pickle.DUP[0]
FLOAT = pickle.FLOAT[0]
INT = pickle.INT[0]
BININT = pickle.BININT[0]
BININT1 = pickle.BININT1[0]
LONG = pickle.LONG[0]
BININT2 = pickle.BININT2[0]
NONE = pickle.NONE[0]
BINPERSID = pickle.BINPERSID[0]
REDUCE = pickle.REDUCE[0]
STRING = pickle.STRING[0]
BINSTRING = pickle.BINSTRING[0]
SHORT_BINSTRING = pickle.SHORT_BINSTRING[0]
UNICODE = pickle.UNICODE[0]
BINUNICODE = pickle.BINUNICODE[0]
APPEND = pickle.APPEND[0]
BUILD = pickle.BUILD[0]
GLOBAL = pickle.GLOBAL[0]
DICT = pickle.DICT[0]
EMPTY_DICT = pickle.EMPTY_DICT[0]
APPENDS = pickle.APPENDS[0]
GET = pickle.GET[0]
BINGET = pickle.BINGET[0]
LONG_BINGET = pickle.LONG_BINGET[0]
LIST = pickle.LIST[0]
EMPTY_LIST = pickle.EMPTY_LIST[0]
PUT = pickle.PUT[0]
BINPUT = pickle.BINPUT[0]
LONG_BINPUT = pickle.LONG_BINPUT[0]
SETITEM = pickle.SETITEM[0]
TUPLE = pickle.TUPLE[0]
EMPTY_TUPLE = pickle.EMPTY_TUPLE[0]
SETITEMS = pickle.SETITEMS[0]
BINFLOAT = pickle.BINFLOAT[0]
PROTO = pickle.PROTO[0]
TUPLE1 = pickle.TUPLE1[0]
TUPLE2 = pickle.TUPLE2[0]
TUPLE3 = pickle.TUPLE3[0]
NEWTRUE = pickle.NEWTRUE[0]
NEWFALSE = pickle.NEWFALSE[0]
LONG1 = pickle.LONG1[0]
LONG4 = pickle.LONG4[0]
SHORT_BINUNICODE = pickle.SHORT_BINUNICODE[0]
BINUNICODE8 = pickle.BINUNICODE8[0]
STACK_GLOBAL = pickle.STACK_GLOBAL[0]
MEMOIZE = pickle.MEMOIZE[0]
FRAME = pickle.FRAME[0]
NEWOBJ = pickle.NEWOBJ[0]
SHORT_BINBYTES = pickle.SHORT_BINBYTES[0]
BINBYTES = pickle.BINBYTES[0]
BINBYTES8 = pickle.BINBYTES8[0]
EMPTY_SET = pickle.EMPTY_SET[0]
ADDITEMS = pickle.ADDITEMS[0]
FROZENSET = pickle.FROZENSET[0]


class SafeUnpickler:
    """Rebuilds a tree of plain containers and ``TensorRef``s from a torch ``data.pkl``.

    An interpreter of the opcodes in :data:`ALLOWED_OPCODES` with pickle's semantics for plain
    data, and torch's ``weights_only`` rules for the opcodes that mutate (see the module doc).
    Run :func:`prescan` with the same budget first: it is what charges for the objects built here.
    """

    def __init__(
        self,
        data: bytes | bytearray,
        file: Path,
        storage_for_key: SourceFor,
        gather: Gather,
        budget: Budget | None = None,
        *,
        persistent_load: PersistentLoad | None = None,
    ) -> None:
        self._data = data
        self._file = file
        self._storage_for_key = storage_for_key
        self._persistent_hook = persistent_load  # replaces the zip archive's 5-tuple storage ids
        self._gather = gather
        self._budget = Budget(file, len(data)) if budget is None else budget
        self._globals: dict[tuple[str, str], Any] = {}
        self._storages: dict[str, Storage] = {}
        # Two tensors viewing one storage the same way are tied: they become one TensorRef.
        self._views: dict[tuple[Any, ...], TensorRef] = {}

    def load(self) -> Any:
        root = self._run()
        TreeCheck(self._file, self._budget).check(root)
        return root

    def _run(self) -> Any:  # one branch per opcode, in one loop: the interpreter's speed is its dispatch
        data, end = self._data, len(self._data)
        stack: list[Any] = []
        metastack: list[list[Any]] = []
        memo: dict[int, Any] = {}
        records_put: dict[int, list[int]] = {}  # id of a record -> the memo indices holding it
        push = stack.append
        position = 0

        def line() -> bytes | bytearray:  # a newline-terminated argument, without its newline
            nonlocal position
            newline = data.index(b"\n", position)
            text, position = data[position:newline], newline + 1
            return text

        def sized(width: int, signed: bool = False) -> bytes | bytearray:  # a length-prefixed argument
            nonlocal position
            count = int.from_bytes(data[position : position + width], "little", signed=signed)
            if count < 0:
                raise CorruptFileError("data.pkl has a negative length", file=self._file)
            start, position = position + width, position + width + count
            if position > end:
                raise CorruptFileError("data.pkl is truncated", file=self._file)
            return data[start:position]

        # No bounds check per opcode: reading past the end raises IndexError (a corrupt file), and a
        # short fixed-size argument can only be the stream's last: the next read past it raises.
        while True:
            code = data[position]
            position += 1
            if code == BINPUT:
                value = memo[data[position]] = stack[-1]
                if type(value) is ObjectRecord:
                    records_put.setdefault(id(value), []).append(data[position])
                position += 1
            elif code == LONG_BINPUT:
                index = int.from_bytes(data[position : position + 4], "little")
                value = memo[index] = stack[-1]
                if type(value) is ObjectRecord:
                    records_put.setdefault(id(value), []).append(index)
                position += 4
            elif code == MEMOIZE:
                index = len(memo)
                value = memo[index] = stack[-1]
                if type(value) is ObjectRecord:
                    records_put.setdefault(id(value), []).append(index)
            elif code == BINGET:
                push(memo[data[position]])
                position += 1
            elif code == LONG_BINGET:
                push(memo[int.from_bytes(data[position : position + 4], "little")])
                position += 4
            elif code == MARK:
                metastack.append(stack)
                stack = []
                push = stack.append
            elif code == BININT1:
                push(data[position])
                position += 1
            elif code == BINUNICODE:
                push(str(sized(4), "utf-8", "surrogatepass"))
            elif code == SHORT_BINUNICODE:
                push(str(sized(1), "utf-8", "surrogatepass"))
            elif code == REDUCE:
                arguments = stack.pop()
                function = stack[-1]
                if type(function) is ObjectRecord and function.how == "global":
                    if type(arguments) is not tuple:
                        arguments = self._not_a_tuple(function, arguments)
                    stack[-1] = ObjectRecord(function.name, "call", arguments)  # recorded, never called
                    continue
                if type(function) is not StandIn:
                    raise UnsafeFileError(
                        f"data.pkl calls {describe(function)}; only rebuild functions and the classes GLOBAL "
                        "names are called (the latter recorded, not run)",
                        file=self._file,
                    )
                if type(arguments) is not tuple:
                    raise CorruptFileError(
                        f"data.pkl calls {function.name} with {describe(arguments)} as arguments", file=self._file
                    )
                stack[-1] = function._call(*arguments)
            elif code == NEWOBJ:
                arguments = stack.pop()
                cls = stack[-1]
                if type(cls) is not ObjectRecord or cls.how != "global" or type(arguments) is not tuple:
                    raise UnsafeFileError(
                        f"data.pkl's NEWOBJ makes {describe(cls)} from {describe(arguments)}; only a class named "
                        "by GLOBAL with a tuple of arguments is recorded",
                        file=self._file,
                    )
                stack[-1] = ObjectRecord(cls.name, "new", arguments)
            elif code == SHORT_BINBYTES:
                push(bytes(sized(1)))
            elif code == BINBYTES:
                push(bytes(sized(4)))
            elif code == BINBYTES8:
                push(bytes(sized(8)))
            elif code == EMPTY_SET:
                push(ObjectRecord("builtins.set", "call", ([],)))
            elif code == ADDITEMS:
                items = stack
                stack = metastack.pop()
                push = stack.append
                target = stack[-1]
                if type(target) is not ObjectRecord or target.name != "builtins.set" or len(target.args) != 1:
                    raise UnsafeFileError(f"data.pkl applies ADDITEMS to {describe(target)}", file=self._file)
                target.args[0].extend(items)
            elif code == FROZENSET:
                items = stack
                stack = metastack.pop()
                push = stack.append
                push(ObjectRecord("builtins.frozenset", "call", (items,)))
            elif code == TUPLE:
                items = stack
                stack = metastack.pop()
                push = stack.append
                push(tuple(items))
            elif code == TUPLE1:
                stack[-1] = (stack[-1],)
            elif code == TUPLE2:
                second = stack.pop()
                stack[-1] = (stack[-1], second)
            elif code == TUPLE3:
                third = stack.pop()
                second = stack.pop()
                stack[-1] = (stack[-1], second, third)
            elif code == EMPTY_TUPLE:
                push(())
            elif code == EMPTY_DICT:
                push({})
            elif code == EMPTY_LIST:
                push([])
            elif code == NONE:
                push(None)
            elif code == NEWFALSE:
                push(False)
            elif code == NEWTRUE:
                push(True)
            elif code == BINPERSID:
                stack[-1] = self._persistent_load(stack[-1])
            elif code == SETITEMS:
                items = stack
                stack = metastack.pop()
                push = stack.append
                self._set_items(stack[-1], items, "SETITEMS")
            elif code == SETITEM:
                value = stack.pop()
                key = stack.pop()
                self._set_items(stack[-1], [key, value], "SETITEM")
            elif code == APPENDS:
                items = stack
                stack = metastack.pop()
                push = stack.append
                self._list(stack[-1], "APPENDS").extend(items)
            elif code == APPEND:
                value = stack.pop()
                self._list(stack[-1], "APPEND").append(value)
            elif code == BUILD:
                state = stack.pop()
                target = stack[-1]
                built = self._build(target, state)
                if built is not target:  # a numpy array: the memo entries naming it name the tensor
                    stack[-1] = built
                    for index in records_put.pop(id(target), ()):
                        if memo.get(index) is target:
                            memo[index] = built
            elif code == GLOBAL:
                module = line().decode("utf-8")
                push(self.find_class(module, line().decode("utf-8")))
            elif code == STACK_GLOBAL:
                name = stack.pop()
                module = stack.pop()
                if type(module) is not str or type(name) is not str:
                    raise CorruptFileError("data.pkl's STACK_GLOBAL needs two strings", file=self._file)
                push(self.find_class(module, name))
            elif code == BININT:
                push(int.from_bytes(data[position : position + 4], "little", signed=True))
                position += 4
            elif code == BININT2:
                push(int.from_bytes(data[position : position + 2], "little"))
                position += 2
            elif code == BINFLOAT:
                push(struct.unpack_from(">d", data, position)[0])
                position += 8
            elif code == LONG1:
                push(_long(sized(1)))
            elif code == LONG4:
                push(_long(sized(4, signed=True)))
            elif code == BINUNICODE8:
                push(str(sized(8), "utf-8", "surrogatepass"))
            elif code == SHORT_BINSTRING:
                push(str(sized(1), "utf-8"))
            elif code == BINSTRING:
                push(str(sized(4, signed=True), "utf-8"))
            elif code == STRING:
                text = line()
                if len(text) < 2 or text[0] != text[-1] or text[0] not in b"\"'":
                    raise CorruptFileError("data.pkl's STRING argument must be quoted", file=self._file)
                push(str(codecs.escape_decode(text[1:-1])[0], "utf-8"))
            elif code == UNICODE:
                push(str(line(), "raw-unicode-escape"))
            elif code == INT:
                text = line()
                push(False if text == b"00" else True if text == b"01" else _int(_text_int(text)))
            elif code == LONG:
                push(_int(_text_int(line())))
            elif code == FLOAT:
                push(float(line()))
            elif code == PUT:
                index = int(line())
                if index < 0:
                    raise CorruptFileError("data.pkl has a negative memo index", file=self._file)
                value = memo[index] = stack[-1]
                if type(value) is ObjectRecord:
                    records_put.setdefault(id(value), []).append(index)
            elif code == GET:
                push(memo[int(line())])
            elif code == DUP:
                push(stack[-1])
            elif code == POP:
                if stack:
                    stack.pop()
                else:
                    stack = metastack.pop()
                    push = stack.append
            elif code == POP_MARK:
                stack = metastack.pop()
                push = stack.append
            elif code == DICT:
                items = stack
                stack = metastack.pop()
                push = stack.append
                mapping: dict[Any, Any] = {}
                self._set_items(mapping, items, "DICT")
                push(mapping)
            elif code == LIST:
                items = stack
                stack = metastack.pop()
                push = stack.append
                push(items)
            elif code == PROTO:
                if data[position] > pickle.HIGHEST_PROTOCOL:
                    raise CorruptFileError(f"data.pkl uses pickle protocol {data[position]}", file=self._file)
                position += 1
            elif code == FRAME:
                position += 8  # frames only group the opcodes that follow
            elif code == STOP:
                return stack.pop()
            else:
                _refuse_opcode(code, position - 1, "data.pkl", self._file)

    def _not_a_tuple(self, function: ObjectRecord, arguments: Any) -> tuple[Any, ...]:
        """The arguments of a recorded call given something else than a tuple: refused (a
        TorchScript enum member is one value; ``codecs/torchscript.py`` takes it)."""
        raise CorruptFileError(
            f"data.pkl calls {function.name} with {describe(arguments)} as arguments", file=self._file
        )

    # -- what the mutating opcodes may act on

    def _set_items(self, target: Any, items: list[Any], opcode: str) -> None:
        if type(target) is ObjectRecord and target.how != "global":
            if len(items) % 2:
                raise CorruptFileError(f"data.pkl's {opcode} has a key without a value", file=self._file)
            target.items.extend(zip(items[::2], items[1::2], strict=True))  # as pickle sets them on the object
            return
        if type(target) not in SET_ITEM_TYPES:
            raise UnsafeFileError(
                f"data.pkl applies {opcode} to {describe(target)}; only a dict, OrderedDict or Counter takes items",
                file=self._file,
            )
        if len(items) % 2:
            raise CorruptFileError(f"data.pkl's {opcode} has a key without a value", file=self._file)
        for index in range(0, len(items), 2):
            key = items[index]
            if type(key) is not str and type(key) is not int:
                raise UnsupportedValueError(
                    f"data.pkl uses {describe(key)} as a dict key; keys must be str or int", file=self._file
                )
            target[key] = items[index + 1]

    def _list(self, target: Any, opcode: str) -> list[Any]:
        if type(target) is ObjectRecord and target.how != "global":
            return target.elements  # a deque, a list subclass: pickle appends its items
        if type(target) is not list:
            raise UnsafeFileError(
                f"data.pkl applies {opcode} to {describe(target)}; only a list takes appended items", file=self._file
            )
        return target

    def _build(self, target: Any, state: Any) -> Any:
        """BUILD as torch.load(weights_only=True) allows it for plain data: an OrderedDict's attributes
        (of which the tree keeps ``_metadata``, what ``state_dict()`` sets); a record's state is
        recorded (once). A numpy array's state makes it a tensor: the value that replaces the record."""
        if type(target) is ObjectRecord and target.how != "global":
            if target.built:
                raise UnsafeFileError(f"data.pkl applies BUILD twice to a {target.name} object", file=self._file)
            if target.name in objects.RECONSTRUCT:
                return objects.numpy_array(target, state, self._file)
            target.state, target.built = state, True
            return target
        if type(target) is not OrderedDict:
            raise UnsafeFileError(
                f"data.pkl applies BUILD to {describe(target)}; only an OrderedDict's _metadata may be set that way",
                file=self._file,
            )
        if type(state) is not dict or len(state) > 1 or (state and "_metadata" not in state):
            raise UnsupportedValueError(
                f"data.pkl's BUILD gives an OrderedDict {describe(state)} of attributes; only _metadata is kept",
                file=self._file,
            )
        if state:
            target._metadata = state["_metadata"]  # type: ignore[attr-defined]
        return target

    # -- globals and storages

    def find_class(self, module: str, name: str) -> Any:
        target = (module, name)
        found = self._globals.get(target)
        if found is not None:
            return found
        if target in REBUILD_GLOBALS:
            found = StandIn(f"{module}.{name}", getattr(self, "_" + REBUILD_GLOBALS[target]))
        elif target in STORAGE_GLOBALS:
            found = StorageType(STORAGE_GLOBALS[target])
        elif target in UNTYPED_STORAGE_GLOBALS:
            found = StorageType(None)
        else:
            dotted = objects.normalized(module, name)
            special = _SPECIAL_GLOBALS.get(dotted)
            if special is not None:
                kind, detail = special
                call = getattr(self, kind) if not detail else self._not_read(detail)
                found = StandIn(dotted, call)
            elif objects.is_dangerous(dotted):
                raise UnsafeFileError(
                    f"data.pkl asks for the global {shown(module)}.{shown(name)}, which can run code; "
                    "refusing to run pickled code",
                    file=self._file,
                )
            else:  # a class (or a function, or a constant) by name: recorded, never imported
                found = ObjectRecord(dotted, "global")
        self._globals[target] = found
        return found

    def _persistent_load(self, pid: Any) -> Storage:
        if self._persistent_hook is not None:
            return self._persistent_hook(pid)
        if type(pid) is tuple and len(pid) == 5 and type(pid[1]) is ObjectRecord and pid[1].name.endswith("Storage"):
            raise UnsupportedValueError(
                f"a tensor stored in a {shown(pid[1].name)} (a quantized tensor) is not read: save "
                "tensor.dequantize(), or int_repr() and its scales",
                file=self._file,
            )
        if (
            type(pid) is not tuple
            or len(pid) != 5
            or pid[0] != "storage"
            or type(pid[1]) is not StorageType
            or type(pid[2]) is not str
            or type(pid[4]) is not int
        ):
            raise CorruptFileError(f"data.pkl has a malformed storage reference ({describe(pid)})", file=self._file)
        storage_type, key = pid[1], pid[2]
        if key not in self._storages:
            source, nbytes = self._storage_for_key(key)
            self._storages[key] = Storage(key, storage_type.dtype, source, nbytes)
        return self._storages[key]

    # -- the stand-ins' calls

    def _ordered_dict(self, *args: Any) -> OrderedDict[Any, Any]:
        if len(args) > 1 or (args and type(args[0]) is not dict):
            raise CorruptFileError("collections.OrderedDict must be rebuilt from nothing or one dict", file=self._file)
        if args:
            self._budget.nodes(len(args[0]), "dict entries copied")
        return OrderedDict(*args)

    def _counter(self, *args: Any) -> Counter[Any]:
        if len(args) > 1 or (args and type(args[0]) is not dict):
            raise CorruptFileError("collections.Counter must be rebuilt from one dict", file=self._file)
        if args:
            self._budget.nodes(len(args[0]), "dict entries copied")
        return Counter(*args)

    def _rebuild_v1(self, storage: Any, offset: Any, size: Any, stride: Any) -> TensorRef:
        if type(storage) is not Storage or storage.dtype is None:
            raise CorruptFileError("_rebuild_tensor needs a typed storage", file=self._file)
        return self._rebuild(storage, storage.dtype, offset, size, stride)

    def _rebuild_v2(self, storage: Any, offset: Any, size: Any, stride: Any, *_: Any) -> TensorRef:
        if type(storage) is not Storage or storage.dtype is None:
            raise CorruptFileError("_rebuild_tensor_v2 needs a typed storage", file=self._file)
        return self._rebuild(storage, storage.dtype, offset, size, stride)

    def _rebuild_v3(
        self, storage: Any, offset: Any, size: Any, stride: Any, _grad: Any, _hooks: Any, dtype: Any, *_: Any
    ) -> TensorRef:
        name = torch_dtype(dtype, dtypes.DTYPES)
        if type(storage) is not Storage or name is None:
            raise CorruptFileError("_rebuild_tensor_v3 needs a storage and a dtype", file=self._file)
        return self._rebuild(storage, dtypes.DTYPES[name], offset, size, stride)

    # -- values torch's safe loader makes and tensors it makes that are not read

    def _encode(self, text: Any, encoding: Any = "latin1") -> bytes:
        """``_codecs.encode``: how protocol 2 spells ``bytes`` (latin-1 text of the bytes)."""
        if type(text) is not str or encoding not in ("latin1", "latin-1"):
            raise CorruptFileError("_codecs.encode must turn latin-1 text into bytes", file=self._file)
        self._budget.materialize(len(text), "bytes values")
        return text.encode("latin-1")

    def _numpy_scalar(self, dtype: Any, data: Any = None) -> NumpyScalar:
        return objects.numpy_scalar(dtype, data, self._file)

    def _rebuild_from_type(self, function: Any, new_type: Any, args: Any, state: Any = None) -> Any:
        """How torch pickles a tensor of a subclass (or with attributes): the plain tensor when the
        class is torch.Tensor or Parameter and there are no attributes; else it is not read."""
        if type(function) is not StandIn or type(args) is not tuple:
            raise CorruptFileError("_rebuild_from_type_v2 needs a rebuild function and its arguments", file=self._file)
        kind = new_type.name if type(new_type) is ObjectRecord else describe(new_type)
        if kind not in ("torch.Tensor", "torch.nn.parameter.Parameter"):
            return Unreadable(
                f"a tensor of the subclass {kind} is not read: save the plain tensor (t.as_subclass(torch.Tensor))"
            )
        if state not in (None, {}) and not (type(state) is OrderedDict and not state):
            return Unreadable("a tensor with Python attributes set on it is not read: save the plain tensor")
        return function._call(*args)

    def _from_device(self, data: Any, *_: Any) -> Any:
        """A tensor saved from an accelerator through its CPU copy: the CPU copy's bytes."""
        if type(data) is not TensorRef:
            raise CorruptFileError("a device tensor must be rebuilt from a CPU tensor", file=self._file)
        return TensorRef(data.dtype, data.shape, data.source)

    def _not_read(self, what: str) -> Callable[..., Unreadable]:
        return lambda *_: Unreadable(what)

    def _rebuild_parameter(self, data: Any, *_: Any) -> TensorRef:
        if type(data) is not TensorRef:
            raise CorruptFileError("_rebuild_parameter needs a tensor", file=self._file)
        return data  # a Parameter's data; requires_grad is not kept (state_dicts hold plain data)

    def _rebuild(self, storage: Storage, dtype: dtypes.DType, offset: Any, size: Any, stride: Any) -> TensorRef:
        if (
            type(size) is not tuple
            or type(stride) is not tuple
            or type(offset) is not int
            or len(size) != len(stride)
            or len(size) > MAX_DIMS
        ):
            raise CorruptFileError(
                f"tensor in storage {quoted(storage.key)} has malformed size/stride/offset", file=self._file
            )
        for value in (offset, *size, *stride):
            if type(value) is not int or not 0 <= value <= INT64_MAX:
                raise CorruptFileError(
                    f"tensor in storage {quoted(storage.key)} has a size, stride or offset that is not an "
                    "int in 0..2**63-1",
                    file=self._file,
                )
        view = (storage.key, dtype.name, offset, size, stride)
        found = self._views.get(view)
        if found is None:
            found = self._views[view] = self._gather(storage, dtype, offset, size, stride)
        return found


def _long(encoded: bytes | bytearray) -> int:
    return _int(int.from_bytes(encoded, "little", signed=True))


def _int(value: int) -> int:
    if abs(value) >= INT_LIMIT:  # the pre-scan refuses these first; kept for the interpreter alone
        raise UnsupportedValueError(f"data.pkl holds an integer of more than {MAX_INT_DIGITS} decimal digits")
    return value


class TreeCheck:
    """The tree as a whole: no container inside itself, nesting within ``MAX_DEPTH``, no tensor in
    an ``_metadata``, and the tree *as walked* within the budget. Pickle's memo lets a file name one
    container at many places (a few bytes per reference, doubling at each level); every writer
    walks each place, so the repeats are charged to the budget like the values they stand for.

    One visit per distinct container (what it walks to is remembered), itself charged to the budget.
    """

    def __init__(self, file: Path, budget: Budget) -> None:
        self._file, self._budget = file, budget
        # id(container) -> 2 * its size as walked + 1 if it holds a tensor
        self._seen: dict[int, int] = {}
        self._open: set[int] = set()
        self._stored = 1  # the values the containers hold, each counted once

    def check(self, root: Any) -> None:
        walked = self._visit(root, 0) >> 1 if type(root) in CONTAINER_TYPES else 1
        self._budget.materialize(len(self._seen) % SEEN_CHARGE_EVERY * SEEN_BYTES, "checking the tree's shape")
        if walked > self._stored:
            self._budget.nodes(walked - self._stored, "values repeated by reference (shared containers)")

    def _visit(self, node: Any, depth: int) -> int:
        key = id(node)
        known = self._seen.get(key)
        if known is not None:
            return known
        kind = type(node)
        if key in self._open:
            if kind is ObjectRecord:  # a record inside itself: a parent pointer, kept as a back-reference
                return 2
            raise CorruptFileError("data.pkl builds a container that contains itself", file=self._file)
        if depth >= MAX_DEPTH:
            raise CorruptFileError(f"data.pkl nests containers deeper than {MAX_DEPTH} levels", file=self._file)
        self._open.add(key)
        mapping = kind in MAPPING_TYPES
        children = node.values() if mapping else node.children() if kind is ObjectRecord else node
        walked, tensor = 1 + (len(node) if mapping else 0), 0
        for child in children:
            child_kind = type(child)
            if child_kind in CONTAINER_TYPES or child_kind is ObjectRecord:
                found = self._visit(child, depth + 1)
                walked += found >> 1
                tensor |= found & 1
            else:
                walked += 1
                tensor |= child_kind is TensorRef
        self._stored += len(node) * (2 if mapping else 1) if kind is not ObjectRecord else len(node.children())
        if kind is OrderedDict and "_metadata" in vars(node):
            metadata = node._metadata
            found = (
                self._visit(metadata, depth + 1)
                if type(metadata) in CONTAINER_TYPES
                else 2 + (type(metadata) is TensorRef)
            )
            if found & 1:
                raise UnsupportedValueError(
                    "data.pkl gives an OrderedDict a _metadata that holds a tensor; only plain values are kept there",
                    file=self._file,
                )
            walked += found >> 1
            self._stored += 1
        self._open.discard(key)
        found = self._seen[key] = walked << 1 | tensor
        if len(self._seen) % SEEN_CHARGE_EVERY == 0:
            self._budget.materialize(SEEN_CHARGE_EVERY * SEEN_BYTES, "checking the tree's shape")
        return found


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

    def __init__(
        self,
        storage_key: Callable[[tuple[str | int, ...], TensorRef], str],
        may_write: Callable[[ObjectRecord], bool] | None = None,
    ) -> None:
        self._out = io.BytesIO()
        self._storage_key = storage_key
        # Which records may become objects again (pickle_objects.writable); by default none. Asked
        # of every record written, wherever it sits (state, _metadata, arguments): the last guard.
        self._may_write = may_write or (lambda _record: False)
        self._memo: dict[int, int] = {}  # id of a record or numpy array -> its memo index
        self._making: set[int] = set()  # records whose arguments are being written

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
            if node.numpy:
                self._ndarray(node)
            else:
                self._tensor(node, path)
        elif kind is bytes:
            self._bytes(node)
        elif kind is NumpyScalar:
            self._global(f"{NUMPY_CORE}.scalar")
            self._numpy_dtype(node.dtype)
            self._bytes(node.data)
            out.write(pickle.TUPLE2 + pickle.REDUCE)
        elif kind is ObjectRecord:
            self._record(node, path)
        else:
            raise UnsupportedValueError(f"cannot pickle {kind.__name__}", path=path)

    # -- values beyond the plain tree, in the form pickle itself gives them (protocol 2)

    def _memoized(self, key: int) -> bool:
        """Write a reference to the object ``key`` (an id) when it was written before."""
        index = self._memo.get(key)
        if index is None:
            return False
        self._out.write(
            pickle.BINGET + bytes([index]) if index < 256 else pickle.LONG_BINGET + struct.pack("<I", index)
        )
        return True

    def _memoize(self, key: int) -> None:
        index = self._memo[key] = len(self._memo)
        self._out.write(
            pickle.BINPUT + bytes([index]) if index < 256 else pickle.LONG_BINPUT + struct.pack("<I", index)
        )

    def _global(self, dotted: str) -> None:
        module, _, name = dotted.rpartition(".")
        self._out.write(b"c" + module.encode("utf-8") + b"\n" + name.encode("utf-8") + b"\n")

    def _bytes(self, value: bytes) -> None:
        """``_codecs.encode(latin-1 text, "latin1")``: protocol 2's bytes, as pickle writes them."""
        self._global("_codecs.encode")
        self._str(value.decode("latin-1"))
        self._str("latin1")
        self._out.write(pickle.TUPLE2 + pickle.REDUCE)

    def _numpy_dtype(self, descr: str) -> None:
        self._global("numpy.dtype")
        self._str(descr[1:])
        self._out.write(pickle.NEWFALSE + pickle.NEWTRUE + pickle.TUPLE3 + pickle.REDUCE + pickle.MARK)
        self._int(3)
        self._str(descr[0])
        self._out.write(pickle.NONE * 3)
        self._int(-1)
        self._int(-1)
        self._int(0)
        self._out.write(pickle.TUPLE + pickle.BUILD)

    def _ndarray(self, ref: TensorRef) -> None:
        """A numpy array as numpy pickles one: ``_reconstruct(ndarray, (0,), b"b")`` and its state."""
        if self._memoized(id(ref)):
            return
        self._global(f"{NUMPY_CORE}._reconstruct")
        self._global("numpy.ndarray")
        self._int(0)
        self._out.write(pickle.TUPLE1)
        self._bytes(b"b")
        self._out.write(pickle.TUPLE3 + pickle.REDUCE)
        self._memoize(id(ref))
        self._out.write(pickle.MARK)
        self._int(1)
        self._tuple_of_ints(ref.shape)
        self._numpy_dtype(NUMPY_DESCR[ref.dtype])
        self._out.write(pickle.NEWFALSE)
        self._bytes(bytes(read_all(ref.source)))
        self._out.write(pickle.TUPLE + pickle.BUILD)

    def _record(self, record: ObjectRecord, path: tuple[str | int, ...]) -> None:
        """The pickle that made the object: the class, its arguments, REDUCE or NEWOBJ, then its
        items, elements and state; only records ``may_write`` allows."""
        if id(record) in self._making:  # pickle makes an object after its arguments: no cycle there
            raise UnsupportedValueError(
                f"a {shown(record.name)} object is among its own constructor arguments; pickle cannot write that",
                path=path,
            )
        if self._memoized(id(record)):  # shared, or a parent pointer: the object written before
            return
        if not self._may_write(record):
            raise UnsupportedValueError(
                f"the recorded object of class {shown(record.name)} may not be re-created in a .pt", path=path
            )
        out = self._out
        self._global(record.name)
        if record.how != "global":
            self._making.add(id(record))
            self._node(tuple(record.args), path)
            self._making.discard(id(record))
            out.write(pickle.REDUCE if record.how == "call" else pickle.NEWOBJ)
        self._memoize(id(record))
        if record.how == "global":
            return
        if record.elements:
            out.write(pickle.MARK)
            for value in record.elements:
                self._node(value, path)
            out.write(pickle.APPENDS)
        if record.items:
            out.write(pickle.MARK)
            for key, value in record.items:
                self._node(key, path)
                self._node(value, path)
            out.write(pickle.SETITEMS)
        if record.built:
            self._node(record.state, path)
            out.write(pickle.BUILD)

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
