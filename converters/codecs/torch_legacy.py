"""torch's legacy (non-zip) checkpoint, read without torch and without running pickled code.

What ``torch.save(obj, f, _use_new_zipfile_serialization=False)`` writes, and what every
``torch.save`` before torch 1.6 wrote: pickles back to back, then the storages' raw bytes::

    pickle   the magic number 0x1950a86a20f9469cfc6c
    pickle   the protocol version, 1001
    pickle   sys_info: {"protocol_version": 1001, "little_endian": True, "type_sizes": {...}}
    pickle   the object; a storage is a persistent id
             ('storage', storage type, root key, location, numel, view metadata or None)
    pickle   the list of the storage keys whose bytes follow, in their order
    for each key of that list: its element count (int64, little-endian), then count x element size bytes

Each pickle is found by walking its opcodes' lengths (nothing is built; its bytes are read as the
walk needs them, charged first, and a newline-terminated argument may not pass 64 KiB: protocol 2
writes only short ones), then pre-scanned and interpreted exactly like a zip archive's ``data.pkl``
(``torch_pickle``: allowlisted opcodes and globals, inert stand-ins, the budget charged before
anything is built). The storages' element
sizes come from their persistent ids, and where each record starts depends on the sizes of all
records before it, so the object pickle is interpreted twice: once to learn its storages (a tree
of placeholders, charged to a copy of the budget and dropped), once with every storage a checked
byte range of the file. Tensors view those ranges through the zip reader's own view code
(``torch_archive.storage_views``): same bounds checks, same budget charges, strided views gathered
into C order; a contiguous view stays a ``FileRange``, so its bytes are streamed from the file.

Refused, naming the file (and the tensor path when one tensor is concerned): a record whose count
differs from its persistent id's numel or runs past the end of the file, a storage the object
refers to whose bytes are not in the file, a key listed twice or never referred to, a storage
referred to with two types or sizes, a storage view past its storage, bytes after the last record,
big-endian files. torch before 0.4 also wrote a tar archive (members ``sys_info``, ``storages``,
``tensors``, ``pickle``); :func:`is_legacy_tar` recognises it so the format can refuse it clearly.
"""

from __future__ import annotations

import copy
import io
import pickle
import pickletools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from ..core import dtypes
from ..core.budget import Budget
from ..core.errors import ConverterError, CorruptFileError, UnsupportedValueError
from ..core.errors import shown as shown_value
from ..core.sources import CHUNK_SIZE, FileRange, slice_source
from ..core.storage import FIRST_FETCH, is_remote, size_of
from ..core.tree import TensorRef, walk
from .torch_archive import storage_views
from .torch_pickle import (
    ALLOWED_OPCODES,
    INT64_MAX,
    LEGACY_STORAGES,
    Gather,
    SafeUnpickler,
    Storage,
    StorageType,
    describe,
    prescan,
    quoted,
    unpickle,
)
from .zip import Ranges, remote_ranges

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001
MAGIC_LONG = b"\x8a\x0a" + MAGIC_NUMBER.to_bytes(10, "little") + b"."  # LONG1 of 10 bytes, STOP
MAGIC_PICKLE = b"\x80\x02" + MAGIC_LONG  # as torch.save writes it (protocol 2)
TAR_MEMBERS = (b"sys_info", b"storages", b"tensors", b"pickle")
READ_AHEAD = 1 << 16  # bytes read at a time while walking a pickle
# ... of a remote file's pickles, which _RemotePrefix fetches in growing blocks: less, so that the
# read-ahead of the last pickle does not ask for a block of the storages' bytes past them.
REMOTE_READ_AHEAD = 1 << 12
MAX_LINE = 1 << 16  # a newline-terminated opcode argument (GLOBAL, INT, FLOAT, ...) longer than this is refused

TAR_MESSAGE = (
    "this is a tar checkpoint of torch before 0.4 (members sys_info, storages, tensors, pickle), which is "
    "not read (torch.load(weights_only=True) refuses it too); load it with an old torch and save it again"
)


def is_legacy(head: bytes) -> bool:
    """Whether ``head`` (a file's first bytes) starts with torch's magic-number pickle: protocol 2
    as ``torch.save`` writes it (``80 02 8a 0a 6c fc 9c 46 f9 20 6a a8 50 19 2e``), or 3 to 5."""
    if len(head) < 2 or head[0] != 0x80 or not 2 <= head[1] <= 5:
        return False
    body = head[2:]
    if body[:1] == b"\x95":  # FRAME (protocol 4 and 5)
        body = body[9:]
    return body.startswith(MAGIC_LONG)


def is_legacy_tar(head: bytes) -> bool:
    """Whether ``head`` is the first tar header of torch's pre-0.4 tar checkpoint (a member named
    as torch named them, padded with NULs; the ``ustar`` magic when the header is all there)."""
    name, _, padding = head[:100].partition(b"\0")
    if name not in TAR_MEMBERS or padding.strip(b"\0"):
        return False
    return len(head) < 262 or head[257:262] == b"ustar"


class _RemotePrefix:
    """How a remote legacy file is read: its pickles lie back to back from its first byte and are
    read in order, each from where the one before ended, so the bytes from the start are kept as
    they are fetched, each fetch as big as all before (a few range requests however big the
    pickles); what lies past them (the storages' element counts) comes from ``ranges``. Memory:
    the pickles (charged as they are read) and as much again at most."""

    def __init__(self, ranges: Ranges) -> None:
        self.ranges, self.size = ranges, size_of(ranges.handle)
        self.data = bytearray()

    def read_at(self, offset: int, count: int) -> bytes:
        """``count`` bytes at ``offset`` (fewer at the end of the file), the prefix grown to hold them."""
        end = min(offset + count, self.size)
        if end > len(self.data):
            have = len(self.data)
            grow = min(max(end - have, have, FIRST_FETCH), self.size - have)
            self.data += self.ranges.read(have, grow)
        return bytes(self.data[offset:end])

    def held_or_fetched(self, offset: int, count: int) -> bytes:
        if offset + count <= len(self.data):
            return bytes(self.data[offset : offset + count])
        return self.ranges.read(offset, count)


def read_legacy(path: Path, budget: Budget, ranges: Ranges | None = None) -> Any:
    """The tree of the legacy torch checkpoint at ``path`` (see the module doc). A remote file is
    read through ``ranges`` (the caller's, whose first fetch may hold the pickles, or new ones)."""
    return _LegacyReader(path, budget).read(ranges)


# ------------------------------------------------------------------------- finding a pickle's end

_TWO_LINES = -100


def _argument_kinds() -> dict[int, int]:
    """Per allowed opcode byte: its argument's length, or pickletools' code for how it is found."""
    kinds = {}
    for op in pickletools.opcodes:
        if op.name in ALLOWED_OPCODES:
            code = op.code.encode("latin-1")[0]
            kinds[code] = _TWO_LINES if op.name == "GLOBAL" else (op.arg.n if op.arg is not None else 0)
    return kinds


_KINDS = _argument_kinds()
_STOP = pickle.STOP[0]
_LENGTH_WIDTHS = {
    pickletools.TAKEN_FROM_ARGUMENT1: (1, False),
    pickletools.TAKEN_FROM_ARGUMENT4: (4, True),
    pickletools.TAKEN_FROM_ARGUMENT4U: (4, False),
    pickletools.TAKEN_FROM_ARGUMENT8U: (8, False),
}


ReadAt = Callable[[int, int], bytes]  # (offset, count) -> the bytes there (fewer at the end of the file)


class _Window:
    """The bytes of one pickle of the file from ``start``, read as the walk needs them (charged
    to the budget first), never past the file's end."""

    def __init__(
        self, read_at: ReadAt, start: int, size: int, what: str, path: Path, budget: Budget, read_ahead: int
    ) -> None:
        self.read_at, self.start, self.size, self.what = read_at, start, size, what
        self.path, self.budget, self.read_ahead = path, budget, read_ahead
        self.data = bytearray()

    def cover(self, end: int) -> None:
        """Read until the window holds ``end`` bytes; a pickle that needs more than the file holds is cut off."""
        if self.start + end > self.size:
            raise CorruptFileError(
                f"{self.what} (from byte {self.start}) is truncated: the {self.size}-byte file ends inside it",
                file=self.path,
            )
        have = len(self.data)
        if end <= have:
            return
        count = min(max(end - have, self.read_ahead), self.size - self.start - have)
        self.budget.materialize(count, f"the pickles of a legacy torch file ({self.what})")
        chunk = self.read_at(self.start + have, count)
        if len(chunk) != count:
            raise CorruptFileError(f"the file changed size while {self.what} was read", file=self.path)
        self.data += chunk

    def line_end(self, position: int) -> int:
        """One past the newline that ends the argument starting at ``position``: a global's name,
        a number's digits (protocol 2 writes no text longer than that)."""
        while True:
            found = self.data.find(b"\n", position, position + MAX_LINE + 1)
            if found >= 0:
                return found + 1
            if len(self.data) > position + MAX_LINE:
                raise CorruptFileError(
                    f"{self.what} has a newline-terminated argument longer than {MAX_LINE} bytes at byte "
                    f"{self.start + position}",
                    file=self.path,
                )
            self.cover(len(self.data) + 1)

    def pickle(self) -> bytearray:
        """The pickle's bytes: up to its STOP, or up to the first opcode that is not allowed (the
        pre-scan then names it) or a negative length (likewise)."""
        position = 0
        data = self.data
        while True:
            if position >= len(data):
                self.cover(position + 1)
            code = data[position]
            kind = _KINDS.get(code)
            position += 1
            if kind is None or code == _STOP:
                break
            if kind >= 0:
                position += kind
            elif kind == pickletools.UP_TO_NEWLINE:
                position = self.line_end(position)
            elif kind == _TWO_LINES:
                position = self.line_end(self.line_end(position))
            else:
                width, signed = _LENGTH_WIDTHS[kind]
                self.cover(position + width)
                length = int.from_bytes(data[position : position + width], "little", signed=signed)
                position += width
                if length < 0:
                    break
                position += length
        self.cover(position)
        del data[position:]
        return data


# ----------------------------------------------------------------------------------- the reader


@dataclass(frozen=True)
class _Placeholder:
    """The byte source of a tensor of the first pass: only its size (nothing reads it)."""

    nbytes: int

    def readinto(self, buffer: memoryview) -> None:
        raise AssertionError("a placeholder of the legacy reader's first pass was read")

    def chunks(self, chunk_size: int = CHUNK_SIZE) -> Any:
        raise AssertionError("a placeholder of the legacy reader's first pass was read")


@dataclass(frozen=True)
class _Root:
    storage_type: StorageType
    numel: int

    @property
    def width(self) -> int:
        return 1 if self.storage_type.dtype is None else self.storage_type.dtype.itemsize


@dataclass(frozen=True)
class _View:
    root: str
    offset: int  # in elements of the root
    numel: int


ViewKey = tuple[str, str, int, tuple[int, ...], tuple[int, ...]]


class _LegacyReader:
    def __init__(self, path: Path, budget: Budget) -> None:
        self.path, self.budget = path, budget
        self.roots: dict[str, _Root] = {}  # storage key -> its type and numel, from the persistent ids
        self.views: dict[str, _View] = {}  # storage view key (torch < 0.4) -> where it lies in its root
        self.storage_paths: dict[str, tuple[str | int, ...]] = {}  # storage key -> first tensor path
        self.view_paths: dict[ViewKey, tuple[str | int, ...]] = {}

    def read(self, ranges: Ranges | None = None) -> Any:
        if ranges is not None or is_remote(self.path):
            with remote_ranges(self.path, ranges) as held:
                assert held is not None
                prefix = _RemotePrefix(held)
                return self._read(held.handle, prefix.read_at, prefix)
        with open(self.path, "rb") as handle:

            def read_at(offset: int, count: int) -> bytes:
                handle.seek(offset)
                return handle.read(count)

            return self._read(handle, read_at, None)

    def _read(self, handle: io.RawIOBase | BinaryIO, read_at: ReadAt, remote: _RemotePrefix | None) -> Any:
        size = size_of(handle)
        read_ahead = READ_AHEAD if remote is None else REMOTE_READ_AHEAD
        head = read_at(0, 32)
        if not is_legacy(head):
            if len(head) < len(MAGIC_PICKLE) and MAGIC_PICKLE.startswith(head):
                raise CorruptFileError(
                    f"the file is {len(head)} bytes: it ends inside torch's magic-number pickle", file=self.path
                )
            raise CorruptFileError(
                "starts with a pickle that is not torch's magic number: a plain Python pickle, not a "
                "torch.save checkpoint (plain pickles are not read: they may run code)",
                file=self.path,
            )
        position = 0

        def next_pickle(what: str) -> bytearray:
            nonlocal position
            data = _Window(read_at, position, size, what, self.path, self.budget, read_ahead).pickle()
            prescan(data, self.path, what=what, budget=self.budget)
            position += len(data)
            return data

        for what, expected in (
            ("the magic-number pickle", MAGIC_NUMBER),
            ("the protocol-version pickle", PROTOCOL_VERSION),
        ):
            found = self._plain(next_pickle(what), what)
            if type(found) is not int or found != expected:
                shown = shown_value(found) if type(found) is int else describe(found)
                raise UnsupportedValueError(f"{what} holds {shown}, expected {expected}", file=self.path)
        self._check_sys_info(self._plain(next_pickle("the sys_info pickle"), "the sys_info pickle"))
        objects = next_pickle("the object pickle")
        keys = self._storage_keys(self._plain(next_pickle("the storage-key pickle"), "the storage-key pickle"))
        self._learn_storages(objects)
        records = self._records(read_at, position, size, keys, remote)
        return self._tree(objects, records)

    def _count_ranges(self, position: int, keys: list[str]) -> list[tuple[int, int]]:
        """Where each record's element count lies if the object pickle tells the truth."""
        wanted = []
        for key in keys:
            root = self.roots.get(key)
            if root is None:
                break
            wanted.append((position, 8))
            position += 8 + root.numel * root.width
        return wanted

    # -- the small pickles

    def _plain(self, data: bytearray, what: str) -> Any:
        def no_storage(pid: Any) -> Storage:
            raise CorruptFileError(f"{what} refers to a storage; only the object pickle does", file=self.path)

        return self._interpret(data, what, no_storage, _no_gather, self.budget)

    def _check_sys_info(self, sys_info: Any) -> None:
        if type(sys_info) is not dict:
            raise CorruptFileError(f"the sys_info pickle holds {describe(sys_info)}, expected a dict", file=self.path)
        if sys_info.get("little_endian", True) is not True:
            raise UnsupportedValueError(
                "this legacy torch file was written on a big-endian machine (sys_info little_endian is not True); "
                "big-endian checkpoints are not supported",
                file=self.path,
            )

    def _storage_keys(self, keys: Any) -> list[str]:
        if type(keys) is not list or any(type(key) is not str for key in keys):
            raise CorruptFileError(
                f"the storage-key pickle holds {describe(keys)}, expected a list of storage keys (str)", file=self.path
            )
        seen: set[str] = set()
        for key in keys:
            if key in seen:
                raise CorruptFileError(
                    f"the storage-key pickle lists storage {quoted(key)} twice; each storage's bytes are stored once",
                    file=self.path,
                )
            seen.add(key)
        return keys

    def _interpret(
        self, data: bytearray, what: str, load: Callable[[Any], Storage], gather: Gather, budget: Budget
    ) -> Any:
        unpickler = SafeUnpickler(data, self.path, _no_storage_key, gather, budget, persistent_load=load)
        try:
            return unpickle(unpickler, self.path)
        except ConverterError as exc:
            # The interpreter names the zip archive's data.pkl; here the stream is one of the file's pickles.
            if "data.pkl" not in exc.message:
                raise
            raise type(exc)(exc.message.replace("data.pkl", what), file=exc.file, path=exc.path) from None

    # -- persistent ids

    def _storage_id(self, pid: Any) -> tuple[str, _Root, str | None, _View | None]:
        """(root key, its type and numel, view key, view) of a persistent id, checked and recorded;
        a key met before must come with the same type and size."""
        if type(pid) is not tuple or not pid or pid[0] != "storage":
            raise CorruptFileError(
                f"the object pickle has a persistent id ({describe(pid)}) that is not a storage reference",
                file=self.path,
            )
        if len(pid) != 6:
            raise CorruptFileError(
                f"the object pickle has a storage reference of {len(pid)} fields; a legacy one has 6 "
                "('storage', storage type, key, location, numel, view)",
                file=self.path,
            )
        _, storage_type, key, location, numel, view = pid
        if type(key) is not str:
            raise CorruptFileError(f"the object pickle has a storage key that is {describe(key)}", file=self.path)
        if type(storage_type) is not StorageType:
            raise UnsupportedValueError(
                f"storage {quoted(key)} has {_named(storage_type)} as its type; expected a torch storage class "
                "of a dtype that is read (torch.FloatStorage, torch.HalfStorage, ...)",
                file=self.path,
            )
        if type(location) is not str:
            raise CorruptFileError(f"storage {quoted(key)} has a location that is {describe(location)}", file=self.path)
        if type(numel) is not int or not 0 <= numel <= INT64_MAX:
            raise CorruptFileError(
                f"storage {quoted(key)} has a size that is not an int in 0..2**63-1 ({describe(numel)})", file=self.path
            )
        root = _Root(storage_type, numel)
        known = self.roots.get(key)
        if known is None:
            if key in self.views:
                raise CorruptFileError(f"{quoted(key)} names both a storage and a storage view", file=self.path)
            self.roots[key] = root
        elif known != root:
            raise CorruptFileError(
                f"storage {quoted(key)} is referred to as {_type_name(known)} of {known.numel} elements and as "
                f"{_type_name(root)} of {root.numel}",
                file=self.path,
            )
        if view is None:
            return key, root, None, None
        if (
            type(view) is not tuple
            or len(view) != 3
            or type(view[0]) is not str
            or any(type(v) is not int or not 0 <= v <= INT64_MAX for v in view[1:])
        ):
            raise CorruptFileError(
                f"storage {quoted(key)} has a malformed view (expected (view key, offset, size)): {describe(view)}",
                file=self.path,
            )
        view_key, offset, view_numel = view
        if offset + view_numel > numel:
            raise CorruptFileError(
                f"storage view {quoted(view_key)} spans elements {offset}..{offset + view_numel} of storage "
                f"{quoted(key)}, which holds {numel}",
                file=self.path,
            )
        record = _View(key, offset, view_numel)
        known_view = self.views.get(view_key)
        if known_view is None:
            if view_key in self.roots:
                raise CorruptFileError(f"{quoted(view_key)} names both a storage and a storage view", file=self.path)
            self.views[view_key] = record
        elif known_view != record:
            raise CorruptFileError(f"storage view {quoted(view_key)} is defined twice, differently", file=self.path)
        return key, root, view_key, record

    def _learn_storages(self, objects: bytearray) -> None:
        """The first pass: every storage's type and size, and the first tensor path of each storage
        and view (for messages); the tree of placeholders is charged to a copy of the budget."""
        scratch = copy.copy(self.budget)
        placeholders: dict[int, ViewKey] = {}

        def load(pid: Any) -> Storage:
            key, root, view_key, view = self._storage_id(pid)
            if view_key is None or view is None:
                return Storage(key, root.storage_type.dtype, None, root.numel * root.width)
            return Storage(view_key, root.storage_type.dtype, None, view.numel * root.width)

        def placeholder(
            storage: Storage, row: dtypes.DType, offset: int, shape: tuple[int, ...], stride: tuple[int, ...]
        ) -> TensorRef:
            scratch.tensors(1)
            ref = TensorRef(row.name, shape, _Placeholder(dtypes.numel(shape) * row.itemsize))
            placeholders[id(ref)] = (storage.key, row.name, offset, shape, stride)
            return ref

        tree = self._interpret(objects, "the object pickle", load, placeholder, scratch)
        for tree_path, leaf in walk(tree):
            view = placeholders.get(id(leaf)) if type(leaf) is TensorRef else None
            if view is not None:
                self.view_paths.setdefault(view, tree_path)
                stored = self.views[view[0]].root if view[0] in self.views else view[0]
                self.storage_paths.setdefault(stored, tree_path)

    # -- the storages' records

    def _records(
        self, read_at: ReadAt, position: int, size: int, keys: list[str], remote: _RemotePrefix | None
    ) -> dict[str, FileRange]:
        if remote is not None:
            # Each record's element count lies after the bytes of the one before: from a remote file
            # they are fetched together where the object pickle says they are (one request for
            # counts close to each other, not one each); a file that lies is refused below as ever.
            counts = self._count_ranges(position, keys)
            remote.ranges.fetch(where for where in counts if where[0] + where[1] > len(remote.data))
            read_at = remote.held_or_fetched
        records = {}
        for key in keys:
            root = self.roots.get(key)
            where = self.storage_paths.get(key)
            if root is None:
                what = (
                    "a storage view, not a storage"
                    if key in self.views
                    else "a storage the object pickle never refers to"
                )
                raise CorruptFileError(f"the storage-key pickle lists {quoted(key)}, {what}", file=self.path)
            if position + 8 > size:
                raise CorruptFileError(
                    f"the file ends at byte {size}, where the element count of storage {quoted(key)} was expected",
                    file=self.path,
                    path=where,
                )
            raw = read_at(position, 8)
            if len(raw) != 8:
                raise CorruptFileError("the file changed size while it was read", file=self.path)
            count = int.from_bytes(raw, "little", signed=True)
            nbytes = count * root.width
            if count < 0:
                raise CorruptFileError(
                    f"storage {quoted(key)} ({_type_name(root)}) declares a negative element count ({count}) "
                    f"at byte {position}",
                    file=self.path,
                    path=where,
                )
            if position + 8 + nbytes > size:
                raise CorruptFileError(
                    f"storage {quoted(key)} ({_type_name(root)}) declares {count} elements at byte {position}, "
                    f"which do not fit in the {size}-byte file",
                    file=self.path,
                    path=where,
                )
            if count != root.numel:
                raise CorruptFileError(
                    f"storage {quoted(key)} ({_type_name(root)}) holds {count} elements at byte {position}, "
                    f"but the object pickle says {root.numel}",
                    file=self.path,
                    path=where,
                )
            records[key] = FileRange(self.path, position + 8, nbytes)
            position += 8 + nbytes
        missing = next((key for key in self.roots if key not in records), None)
        if missing is not None:
            raise CorruptFileError(
                f"the object pickle refers to storage {quoted(missing)}, whose bytes the file does not hold "
                "(the storage-key pickle does not list it)",
                file=self.path,
                path=self.storage_paths.get(missing),
            )
        if position != size:
            raise CorruptFileError(
                f"{size - position} bytes follow the last storage (at byte {position}); the file should end there",
                file=self.path,
            )
        return records

    # -- the tree

    def _tree(self, objects: bytearray, records: dict[str, FileRange]) -> Any:
        """The second pass: the same pickle, each storage a byte range of the file."""
        views = storage_views(self.path, self.budget)
        storages: dict[str, Storage] = {}
        viewed: dict[str, int] = {}  # root key -> bytes of its distinct storage views

        def load(pid: Any) -> Storage:
            key, root, view_key, view = self._storage_id(pid)
            name = key if view_key is None else view_key
            found = storages.get(name)
            if found is not None:
                return found
            dtype = root.storage_type.dtype
            if view is None:
                found = Storage(key, dtype, records[key], root.numel * root.width)
            else:
                # A storage view (torch < 0.4) is a range of its root; views of one root beyond its
                # size name the same bytes again: output the file does not pay for.
                nbytes = view.numel * root.width
                before = viewed.get(key, 0)
                viewed[key] = before + nbytes
                excess = max(0, before + nbytes - records[key].nbytes) - max(0, before - records[key].nbytes)
                if excess:
                    self.budget.output(excess, f"storage views of storage {quoted(key)}")
                found = Storage(name, dtype, slice_source(records[key], view.offset * root.width, nbytes), nbytes)
            storages[name] = found
            return found

        def gather(
            storage: Storage, row: dtypes.DType, offset: int, shape: tuple[int, ...], stride: tuple[int, ...]
        ) -> TensorRef:
            try:
                return views(storage, row, offset, shape, stride)
            except ConverterError as exc:
                where = self.view_paths.get((storage.key, row.name, offset, shape, stride))
                if exc.path is not None or where is None:
                    raise
                raise type(exc)(exc.message, file=exc.file, path=where) from None

        return self._interpret(objects, "the object pickle", load, gather, self.budget)


def _type_name(root: _Root) -> str:
    dtype = root.storage_type.dtype
    return "torch.UntypedStorage" if dtype is None else f"torch.{LEGACY_STORAGES.get(dtype.name, dtype.name)}"


def _named(value: Any) -> str:
    """What a value is, with the name it carries when it has one (a global the pickle named)."""
    name = getattr(value, "name", None)
    return f"{describe(value)} ({shown_value(name, 80)})" if type(name) is str else describe(value)


def _no_storage_key(key: str) -> tuple[Any, int]:
    raise AssertionError("the legacy reader resolves its own persistent ids")


def _no_gather(
    storage: Storage, row: dtypes.DType, offset: int, shape: tuple[int, ...], stride: tuple[int, ...]
) -> TensorRef:
    raise AssertionError("no tensor can be built without a storage")
