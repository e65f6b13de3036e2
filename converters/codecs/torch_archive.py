"""torch's zip archive (what ``torch.save`` writes): ``<archive>/data.pkl`` plus one record per
storage, read without torch and without running pickled code, and written (:func:`write_archive`).

Shared by the ``pt`` format (one archive per file) and ``dcp`` (one archive per tensor or value
inside its data files). A stored record is a plain byte range of the file that carries its zip
CRC-32 (checked whenever its bytes are used: a conversion, ``verify --deep``); a deflated record
(a zip tool re-compressed the file) is inflated in bounded pieces as it is read and checked too.
Every other record is read and checked here.

What the archive asks for is charged to the read's budget before it is built: the zip entries, the
pickle's objects (``torch_pickle``), each tensor, the bytes gathered into memory for strided views,
and the tensor bytes named beyond what the archive stores (overlapping views, inflated records).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple, cast

from ..core import dtypes
from ..core.budget import Budget
from ..core.errors import CorruptFileError, UnsafeFileError, UnsupportedValueError
from ..core.integrity import read_tree_digest
from ..core.sources import BufferSource, ByteSource, FileRange, slice_source
from ..core.storage import is_remote
from ..core.stored import check_casts, loads_json_strict, read_digests
from ..core.tree import CastOrigin, TensorRef
from . import torchscript as torchscript_codec
from .torch_pickle import Gather, SafeUnpickler, Storage, contiguous_strides, prescan, quoted, shown, unpickle
from .zip import InflatedRecord, Ranges, StoredEntry, ZipWriter, check_entry, read_entry, remote_ranges, stored_entries

# Our extra record: {storage key: BLAKE3 of its bytes}. torch.load reads records by name and
# ignores it; the manifest takes its digests from it instead of reading every byte.
DIGESTS_RECORD = "sdconvert/blake3.json"
# Our other extra record: the tree digest (manifests.tree_digest), 64 hex digits.
TREE_DIGEST_RECORD = "sdconvert/tree.blake3"
# And, when a tensor was made by a dtype cast, what it was cast from (manifests.cast_records).
CASTS_RECORD = "sdconvert/casts.json"
# And what the source file said about itself (another tool's metadata), carried: JSON {str: value}.
METADATA_RECORD = "sdconvert/metadata.json"
NUMPY_IMPORT_BYTES = 16 << 20  # what importing numpy costs (10 MiB measured), charged once per read


def read_archive(path: Path, base: int = 0, length: int | None = None, *, budget: Budget | None = None) -> Any:
    """The tree of the torch zip archive in ``length`` bytes of ``path`` from ``base``.

    The whole file by default; a DCP data file holds one such archive per tensor or value.
    ``budget``: the read's resource budget (by default one for the archive's byte range).
    """
    return read_archive_and_tree_digest(path, base, length, budget=budget)[0]


def read_archive_and_tree_digest(
    path: Path, base: int = 0, length: int | None = None, *, budget: Budget | None = None
) -> tuple[Any, str | None]:
    """``read_archive``'s tree, and the tree digest the archive stores (our files do)."""
    contents = read_archive_contents(path, base, length, budget=budget)
    return contents.tree, contents.tree_digest


class ArchiveContents(NamedTuple):
    tree: Any
    tree_digest: str | None  # the tree digest the archive stores (our files do)
    torchscript: bool  # a TorchScript archive: the tree is its modules' state_dict (codecs/torchscript.py)
    metadata: dict[str, Any] | None = None  # what the source of our file said about itself (METADATA_RECORD)
    ours: bool = False  # it stores our tensor digests (DIGESTS_RECORD), so it should store a tree digest


def read_archive_contents(
    path: Path,
    base: int = 0,
    length: int | None = None,
    *,
    budget: Budget | None = None,
    torchscript: bool = False,
    ranges: Ranges | None = None,
) -> ArchiveContents:
    """``read_archive_and_tree_digest``, and a TorchScript archive (``torch.jit.save``) read as its
    state_dict when ``torchscript`` is set (refused otherwise: a DCP data file never holds one).

    A remote file is read through ``ranges`` (the caller's, or new ones): its zip layout and the
    records read here come by a few range requests; the storages' bytes are not fetched."""
    size = path.stat().st_size - base if length is None else length
    budget = Budget(path, size) if budget is None else budget
    with remote_ranges(path, ranges) as held:
        return _read_contents(path, base, size, budget, torchscript, held)


def _read_here(name: str, size: int) -> int:
    """``stored_entries``'s ``ahead`` for a remote archive: every record but the storages
    (``<archive>/data/<key>``) is read here, so it is fetched with its local header."""
    return 0 if name.split("/", 2)[1:2] == ["data"] else size


def _read_contents(
    path: Path, base: int, size: int, budget: Budget, torchscript: bool, ranges: Ranges | None
) -> ArchiveContents:
    if ranges is not None:
        head = ranges.read(base, 4)
    else:
        with open(path, "rb") as handle:
            handle.seek(base)
            head = handle.read(4)
    if head[:1] == b"\x80":
        raise UnsafeFileError(
            "this is a legacy (pre-1.6, non-zip) torch file where a zip archive was expected; "
            "the pt format reads such files (torch_legacy), a DCP data file never holds one",
            file=path,
        )
    entries = stored_entries(path, size, base, budget=budget, ranges=ranges, ahead=_read_here)
    prefix = _archive_prefix(entries, path)
    scripted = prefix + torchscript_codec.CONSTANTS in entries
    if scripted and not torchscript:
        raise UnsupportedValueError(
            "this is a TorchScript archive (torch.jit.save) where a torch.save archive was expected", file=path
        )
    # Every record but the storages is read here and checked against its CRC-32 (the ones used in
    # memory by read_entry, the others streamed); a storage's bytes are checked when they are used
    # (each tensor's source carries its record).
    ours = (DIGESTS_RECORD, TREE_DIGEST_RECORD, CASTS_RECORD, METADATA_RECORD)
    used = {prefix + name for name in ("byteorder", "data.pkl", *ours)}
    for name, entry in entries.items():
        if not name.startswith(prefix + "data/") and name not in used:
            check_entry(path, entry, budget, ranges)
    byteorder = entries.get(prefix + "byteorder")
    if byteorder is not None and read_entry(path, byteorder, budget, ranges) != b"little":
        raise UnsupportedValueError("big-endian torch checkpoints are not supported", file=path)
    data = read_entry(path, entries[prefix + "data.pkl"], budget, ranges)
    if scripted:
        tensors = _Tensors(path, entries, prefix, {}, {}, budget)
        state_dict = torchscript_codec.read_modules(
            path, data, entries, prefix, tensors.storage, tensors.view, budget, ranges=ranges
        )
        return ArchiveContents(state_dict, None, True)
    prescan(data, path, budget=budget)
    record = entries.get(prefix + DIGESTS_RECORD)
    digests = {}
    if record is not None:
        digests = read_digests(bytes(read_entry(path, record, budget, ranges)), path, DIGESTS_RECORD, budget)
    record = entries.get(prefix + TREE_DIGEST_RECORD)
    tree_digest = None
    if record is not None:
        text = bytes(read_entry(path, record, budget, ranges)).decode("ascii", "replace")
        tree_digest = read_tree_digest(text, path, TREE_DIGEST_RECORD)
    record = entries.get(prefix + CASTS_RECORD)
    casts = {}
    if record is not None:
        value = loads_json_strict(bytes(read_entry(path, record, budget, ranges)), path, CASTS_RECORD, budget)
        casts = check_casts(value, path, CASTS_RECORD)
    record = entries.get(prefix + METADATA_RECORD)
    metadata = None
    if record is not None:
        metadata = loads_json_strict(bytes(read_entry(path, record, budget, ranges)), path, METADATA_RECORD, budget)
        if type(metadata) is not dict:
            raise CorruptFileError(f"{METADATA_RECORD} must be a JSON object", file=path)
    tensors = _Tensors(path, entries, prefix, digests, casts, budget)
    tree = unpickle(SafeUnpickler(data, path, tensors.storage, tensors.view, budget), path)
    return ArchiveContents(tree, tree_digest, False, metadata, prefix + DIGESTS_RECORD in entries)


class _Tensors:
    """Storages and the tensors viewing them, each charged to the budget before it is made.

    Tensor bytes the tree names beyond those its storages hold are charged to the budget's output
    limit: the views of a storage up to its size are what the file stores; every byte past that
    (overlapping views, a stride-0 expansion) is output the file does not pay for. So are inflated
    records. Bytes gathered into memory (strided views) are charged to its memory limit.
    """

    def __init__(
        self,
        path: Path,
        entries: dict[str, StoredEntry],
        prefix: str,
        digests: dict[str, str],
        casts: dict[str, CastOrigin],
        budget: Budget,
    ) -> None:
        self._path, self._entries, self._prefix, self._digests, self._budget = path, entries, prefix, digests, budget
        self._casts = casts
        self._named: dict[str, int] = {}  # storage key -> bytes its views name so far
        self._numpy_charged = False

    def storage(self, key: str) -> tuple[ByteSource, int]:
        """The byte source of storage ``key`` (its record) and its size."""
        entry = self._entries.get(f"{self._prefix}data/{key}")
        if entry is None:
            raise CorruptFileError(
                f"data.pkl refers to storage {quoted(key)}, but there is no record data/{shown(key)}", file=self._path
            )
        if entry.compressed:
            # Inflated once here (bounded memory, charged first) so that a bad record is refused at
            # read time (verify --deep included); every later read checks it again. Not from a
            # remote file, where that would download the tensor: there it is checked when it is used
            # (charged all the same).
            if is_remote(self._path):
                self._budget.output(entry.file_size, f"data inflated from {entry.label}")
            else:
                check_entry(self._path, entry, self._budget)
        return entry.source(self._path), entry.file_size

    def view(
        self, storage: Storage, row: dtypes.DType, offset: int, shape: tuple[int, ...], stride: tuple[int, ...]
    ) -> TensorRef:
        """A tensor viewing ``storage`` (with the digest the file stores when it is the whole storage)."""
        nbytes = _check_view(self._path, storage, row, offset, shape, stride)
        self._budget.tensors(1)
        before = self._named.get(storage.key, 0)
        after = self._named[storage.key] = before + nbytes
        excess = max(0, after - storage.nbytes) - max(0, before - storage.nbytes)
        if excess:
            self._budget.output(excess, f"tensor bytes viewed more than once in storage {quoted(storage.key)}")
        ref = self._tensor(storage, row, offset, shape, stride)
        # An empty tensor is a new empty source, but when its storage is empty too it is that whole
        # storage: the storage's digest is its digest.
        if ref.source is not storage.source and not (ref.nbytes == 0 == storage.nbytes):
            return ref
        return ref.with_stored_digest(self._digests.get(storage.key)).with_cast_from(self._casts.get(storage.key))

    def _tensor(
        self, storage: Storage, row: dtypes.DType, offset: int, shape: tuple[int, ...], stride: tuple[int, ...]
    ) -> TensorRef:
        count = dtypes.numel(shape)
        if count == 0:
            return TensorRef(row.name, shape, BufferSource.of(b""))
        nbytes = count * row.itemsize
        start = offset * row.itemsize
        if _is_contiguous(shape, stride):
            whole = start == 0 and nbytes == storage.nbytes
            return TensorRef(row.name, shape, storage.source if whole else _slice(storage.source, start, nbytes))
        # A strided view (a transposed or sliced tensor saved as is): copy its elements into C order.
        # The span it reads and the bytes it keeps are charged first (per file, not per view).
        if not self._numpy_charged:
            self._budget.materialize(NUMPY_IMPORT_BYTES, "numpy, imported to gather strided views")
            self._numpy_charged = True
        last = offset + sum((dim - 1) * step for dim, step in zip(shape, stride, strict=True))
        span = (last - offset + 1) * row.itemsize
        self._budget.materialize(span + nbytes, "tensor bytes gathered into memory (strided views)")
        buffer = bytearray(span)
        _slice(storage.source, start, span).readinto(memoryview(buffer))
        import numpy as np  # only strided views need it; keeps start-up fast

        elements = np.frombuffer(buffer, dtype=np.dtype(f"V{row.itemsize}"))
        view = np.lib.stride_tricks.as_strided(
            elements, shape=shape, strides=tuple(step * row.itemsize for step in stride), writeable=False
        )
        gathered = np.ascontiguousarray(view).view(np.uint8).reshape(-1)  # one copy, kept as the tensor's bytes
        return TensorRef(row.name, shape, BufferSource.of(gathered.data, owner=gathered))


def storage_views(path: Path, budget: Budget) -> Gather:
    """The archive reader's tensor views for storages found elsewhere (a legacy file's raw
    records, each a ``FileRange``): the same bounds checks, budget charges and C-order gathering of
    strided views. No storage record, stored digest or cast is known to it."""
    return _Tensors(path, {}, "", {}, {}, budget).view


def _archive_prefix(entries: dict[str, StoredEntry], path: Path) -> str:
    pickles = [name for name in entries if name.endswith("/data.pkl") and name.count("/") == 1]
    if len(pickles) != 1:
        raise CorruptFileError(f"expected one <archive>/data.pkl record in the zip, found {len(pickles)}", file=path)
    prefix = pickles[0][: -len("data.pkl")]
    stray = [name for name in entries if not name.startswith(prefix)]
    if stray:
        raise CorruptFileError(
            f"zip record {quoted(stray[0])} lies outside the archive folder {quoted(prefix)}", file=path
        )
    return prefix


def _check_view(
    path: Path, storage: Storage, row: dtypes.DType, offset: int, shape: tuple[int, ...], stride: tuple[int, ...]
) -> int:
    """The view's size in bytes, once it is known to lie inside its storage."""
    count = dtypes.numel(shape)
    if count == 0:
        return 0
    last = offset + sum((dim - 1) * step for dim, step in zip(shape, stride, strict=True))
    needed = (last + 1) * row.itemsize
    if needed > storage.nbytes:
        raise CorruptFileError(
            f"a {row.name}{list(shape)} tensor needs {needed} bytes of storage {quoted(storage.key)}, "
            f"which holds {storage.nbytes}",
            file=path,
        )
    return count * row.itemsize


def _slice(source: Any, start: int, length: int) -> ByteSource:
    if isinstance(source, InflatedRecord):
        return source.window(start, length)  # still inflates and checks the whole record
    assert isinstance(source, FileRange)
    return slice_source(source, start, length)  # keeps the record, checked before the bytes are used


def _is_contiguous(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    expected = contiguous_strides(shape)
    return all(dim == 1 or step == want for dim, step, want in zip(shape, stride, expected, strict=True))


# ------------------------------------------------------------------------------------------- writing

ARCHIVE = "archive"  # the folder torch.save names the records of a file-like destination under
# A storage record to write: its key (the record is <archive>/data/<key>), its size, and
# copy(out) that appends exactly that many bytes at the file's position and returns their CRC-32.
StorageCopy = tuple[str, int, Callable[[BinaryIO], int]]


def write_archive(
    out: BinaryIO,
    pickled: bytes,
    storages: Sequence[StorageCopy],
    records: Callable[[], Sequence[tuple[str, bytes]]],
    *,
    prefix: str = ARCHIVE,
) -> None:
    """Write torch.save's zip archive at ``out``'s position: ``data.pkl`` (``pickled``), ``byteorder``,
    one stored record per storage (64-byte aligned, copied by ``copy(out)``), torch's version records,
    then ``records()`` (our own records, asked for once the storages are written: their digests are
    known then).

    Offsets inside the archive count from its first byte, so an archive may start anywhere in a
    bigger file (a DCP data file holds one per tensor or value; ``torch.load`` reads it from a view
    of the file that starts there). The layout depends only on the names and sizes, so
    :func:`archive_length` knows the length before anything is written.
    """
    base = out.tell()
    target = out if base == 0 else cast(BinaryIO, _Shifted(out, base))
    archive = ZipWriter(target)
    archive.add(f"{prefix}/data.pkl", pickled)
    archive.add(f"{prefix}/byteorder", b"little")
    for key, size, copy in storages:
        archive.add_copied(f"{prefix}/data/{key}", size, _on(out, copy))
    archive.add(f"{prefix}/.format_version", b"1")
    archive.add(f"{prefix}/.storage_alignment", b"64")
    archive.add(f"{prefix}/version", b"3\n")
    for name, data in records():
        archive.add(f"{prefix}/{name}", data)
    archive.close()


def archive_length(
    pickled_length: int,
    storages: Sequence[tuple[str, int]],
    records: Sequence[tuple[str, int]],
    *,
    prefix: str = ARCHIVE,
) -> int:
    """The length :func:`write_archive` writes for a pickle of ``pickled_length`` bytes, storages
    ``(key, size)`` and records ``(name, length)``: the same writer, run over a sink that only counts."""
    sink = _CountingSink()

    def skip(size: int) -> Callable[[BinaryIO], int]:
        def copy(out: BinaryIO) -> int:
            out.seek(out.tell() + size)
            return 0

        return copy

    write_archive(
        cast(BinaryIO, sink),
        bytes(pickled_length),
        [(key, size, skip(size)) for key, size in storages],
        lambda: [(name, bytes(length)) for name, length in records],
        prefix=prefix,
    )
    return sink.end


def _on(out: BinaryIO, copy: Callable[[BinaryIO], int]) -> Callable[[BinaryIO], int]:
    """``copy`` given the real file, whatever the zip writer passes: kernel copies write at its
    absolute positions."""
    return lambda _target: copy(out)


class _Shifted:
    """``out`` as the zip writer sees it: positions counted from ``base`` (the archive's first byte)."""

    def __init__(self, out: BinaryIO, base: int) -> None:
        self._out, self._base = out, base

    def tell(self) -> int:
        return self._out.tell() - self._base

    def seek(self, position: int, whence: int = 0) -> int:
        if whence == 0:
            position += self._base
        return self._out.seek(position, whence) - self._base

    def write(self, data: bytes) -> int:
        return self._out.write(data)


class _CountingSink:
    """A file that keeps only its position and length (what the zip writer's layout needs)."""

    def __init__(self) -> None:
        self.position = self.end = 0

    def tell(self) -> int:
        return self.position

    def seek(self, position: int, whence: int = 0) -> int:
        self.position = position if whence == 0 else self.position + position if whence == 1 else self.end + position
        self.end = max(self.end, self.position)
        return self.position

    def write(self, data: bytes) -> int:
        self.position += len(data)
        self.end = max(self.end, self.position)
        return len(data)
