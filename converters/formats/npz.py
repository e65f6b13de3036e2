"""``npz``: NumPy's ``.npz`` archive (``numpy.savez``, ``numpy.load``), and single ``.npy`` arrays.

Spec: ``schemas/npz.md``. In short, an ``.npz`` is a zip of one ``.npy`` member per array
(``codecs/npy.py``); ours holds:

- one member per distinct tensor, its ``.npy`` header exactly ``numpy.save``'s, stored
  (uncompressed) so the array is copied by the kernel and starts 64-byte aligned in the file
  (``--compress``: deflated, as ``numpy.savez_compressed``);
- member names as ``numpy.savez(**state_dict)`` gives them: a bare ``state_dict`` keeps its keys
  (``conv1.weight.npy``, so ``numpy.load(f)["conv1.weight"]``), other trees use the manifest's
  storage keys (``optimizer_state_dict/state/0/momentum_buffer.npy``);
- a first member ``__sdconvert__.npy``: JSON text, as a 1-d uint8 array so that every .npz reader
  reads it (MLX's mx.load takes every member for an array), holding the exact tree (manifest
  tree node), every tensor's BLAKE3 digest, the tree digest, dtypes numpy cannot name, cast
  records and the source's own metadata, so the file alone round-trips. ``numpy.load`` lists it
  as one more key, ``"__sdconvert__"``.

Dtypes numpy has no type for are written as raw bytes of their size: bfloat16 as ``'<V2'`` (what
``numpy.save`` writes for an ``ml_dtypes.bfloat16`` array), float8 and complex32 as ``'|V1'`` and
``'|V4'``; our metadata names them. Read: any ``.npz`` of ``numpy.savez``/``savez_compressed``
(a flat dict, in the archive's order; members that are not arrays as their bytes, as
``numpy.load`` gives them) and single ``.npy`` files (the array itself); big-endian and
Fortran-order arrays are turned into little-endian C order as they are read, in bounded memory;
object arrays, strings, dates, records and void types other than ``'<V2'`` are refused by name.
A ``.npy`` destination takes a checkpoint that is one tensor (``--select`` one) and stores no digests.
"""

from __future__ import annotations

import contextlib
import json
import os
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, ClassVar, cast

from ..codecs import npy
from ..codecs.zip import (
    InflatedRecord,
    Ranges,
    StoredEntry,
    ZipWriter,
    crc32_combine,
    crc32_tail,
    read_entry,
    remote_ranges,
    shown,
    stored_entries,
)
from ..core import manifests
from ..core.atomic import atomic_output
from ..core.budget import Budget
from ..core.contract import FormatBase, WriteContext, option
from ..core.dtypes import DTYPES, numel
from ..core.errors import CorruptFileError, TreePath, UnsupportedValueError, format_tree_path
from ..core.sources import CHUNK_SIZE, ByteSource, FileRange, Record
from ..core.storage import location, size_of
from ..core.stored import check_digests, check_tree_digest, loads_json_strict, paused_gc, read_casts, tree_from_stored
from ..core.tree import Checkpoint, TensorRef
from ..core.writing import DIGEST_PLACEHOLDER, TensorWriter

META = npy.NPZ_METADATA_MEMBER
META_KEY = META.removesuffix(".npy")  # what numpy.load calls it
META_VERSION = 1
META_FIELDS = frozenset({"version", "tree", "blake3", "tree_blake3", "members", "dtypes", "casts", "file_metadata"})
NPY_SUFFIX = ".npy"
# Of a remote .npz, each member's first bytes fetched with its local header: its .npy header (numpy
# writes 128 bytes, more for long shapes or structured dtypes: those are fetched on their own).
HEAD_AHEAD = 512
NUMPY_IMPORT_BYTES = 16 << 20  # what importing numpy costs, charged once by a read that needs it
KIND_OURS = "numpy .npz archive (statedict-convert)"
KIND_NPZ = "numpy .npz archive"
KIND_NPY = "numpy .npy array"


@dataclass(frozen=True)
class NpzOptions:
    compress: bool = option(
        False, "deflate every .npz member, as numpy.savez_compressed (smaller; read by inflating)", kind="flag"
    )


class NpzFormat(FormatBase):
    name = "npz"
    suffixes: tuple[str, ...] = (".npz", NPY_SUFFIX)
    description = "NumPy .npz/.npy (numpy.savez / numpy.load): numpy, JAX, MLX, SciPy, any npy reader"
    dtype_codes: ClassVar[Mapping[str, Any]] = npy.DESCRS
    Options = NpzOptions

    def sniff(self, head: bytes) -> bool:
        # Chosen by its contents for an .npy or a zip whose first member is an .npy (the pt format,
        # asked first, leaves those); a name saying npz is accepted for any zip but torch.save's.
        return npy.may_be_npz(head)

    # ------------------------------------------------------------------------------- writing

    def write(self, checkpoint: Checkpoint, path: Path, context: WriteContext, options: NpzOptions) -> None:
        path = Path(path)
        tensor_writer = TensorWriter(context, checkpoint.origin)
        if path.name.lower().endswith(NPY_SUFFIX):
            _write_single(checkpoint, path, context, options, tensor_writer)
            return
        tree = checkpoint.tree
        keys = manifests.storage_keys(tree)
        unique = checkpoint.unique_tensors()
        names, escaped = _member_names([(keys[tensor_path], tensor_path) for tensor_path, _ in unique])
        digests = {key: DIGEST_PLACEHOLDER for key in names}
        casts = manifests.cast_records(unique, keys, final=False)  # placeholders until the bytes went by
        void = {keys[tensor_path]: ref.dtype for tensor_path, ref in unique if npy.DESCRS[ref.dtype][1] == "V"}
        own = checkpoint.carried_metadata()
        tree_text = json.dumps(manifests.encode_tree(tree, keys), separators=(",", ":"))
        tree_digest = [DIGEST_PLACEHOLDER]

        def metadata() -> bytes:
            """The metadata member: its JSON text as a uint8 .npy, so every .npz reader reads it."""
            document: dict[str, Any] = {"version": META_VERSION, "tree": tree_text, "blake3": digests}
            document["tree_blake3"] = tree_digest[0]
            if escaped:
                document["members"] = escaped
            if void:
                document["dtypes"] = void
            if casts:
                document["casts"] = casts
            if own:
                document["file_metadata"] = own
            text = json.dumps(document, separators=(",", ":")).encode("ascii")
            return npy.header_bytes("|u1", (len(text),)) + text

        with atomic_output(path, fsync=context.fsync, overwrite=context.overwrite) as out:
            archive = ZipWriter(out)
            # First, so that the file says what it is in its first bytes; rewritten once the
            # digests are known (same length: they are fixed-length hex).
            reserved = archive.add(META, metadata())
            for tensor_path, ref in unique:
                key = keys[tensor_path]
                header = npy.header_bytes(npy.DESCRS[ref.dtype], ref.shape)
                if options.compress:

                    def deflate(
                        sink: Any,
                        ref: TensorRef = ref,
                        tensor_path: TreePath = tensor_path,
                        key: str = key,
                        header: bytes = header,
                    ) -> None:
                        sink.write(header)
                        piecewise = tensor_writer.piecewise(ref, tensor_path)
                        piecewise.write(cast(BinaryIO, sink), npy.Streamed(ref.source))  # through deflate, in chunks
                        digests[key] = piecewise.finish().digest

                    archive.add_deflated(names[key], len(header) + ref.nbytes, deflate)
                    continue

                def copy(
                    out: BinaryIO,
                    ref: TensorRef = ref,
                    tensor_path: TreePath = tensor_path,
                    key: str = key,
                    header: bytes = header,
                ) -> int:
                    out.write(header)
                    copied = tensor_writer.copy(out, ref, tensor_path, crc32=True)  # the kernel copies
                    digests[key] = copied.digest
                    assert copied.crc32 is not None
                    return crc32_combine(zlib.crc32(header), copied.crc32, ref.nbytes)

                archive.add_copied(names[key], len(header) + ref.nbytes, copy)
            tree_digest[0] = tensor_writer.tree_digest(checkpoint)
            casts.update(manifests.cast_records(unique, keys, final=True))
            archive.rewrite(reserved, metadata())
            archive.close()

    # ------------------------------------------------------------------------------- reading

    def read(self, path: Path, budget: Budget) -> Checkpoint:
        path = location(path)  # not Path(path): that would make a remote path a local one
        # A remote file is read through one Ranges: its first fetch holds the first bytes (an .npy
        # header), then the zip's layout and the members' .npy headers come by few range requests.
        with remote_ranges(path) as ranges:
            if ranges is not None:
                size = size_of(ranges.handle)
                ranges.fetch([(0, HEAD_AHEAD)])  # exactly (an .npy header, most often): no read-ahead
                head = ranges.read(0, len(npy.NPY_MAGIC))
            else:
                with open(path, "rb") as handle:
                    size = os.fstat(handle.fileno()).st_size
                    head = handle.read(len(npy.NPY_MAGIC))
            if head.startswith(npy.NPY_MAGIC):
                return _read_single(path, size, budget, ranges)
            if not head.startswith(b"PK"):
                raise CorruptFileError(
                    f"neither an .npz (a zip archive) nor an .npy array (\\x93NUMPY): it starts with {head[:6]!r}",
                    file=path,
                )
            return _Archive(path, size, budget, ranges).read()


# ------------------------------------------------------------------------------------ writing


def _member_names(keys: list[tuple[str, TreePath]]) -> tuple[dict[str, str], dict[str, str]]:
    """The member of each storage key, and those that are not ``key.npy`` (for the metadata).

    A key is its own member, ``key.npy``, as numpy.savez names it, unless that member would be
    unsafe to extract (a NUL, where zip readers cut names; a leading ``/`` or ``\\``; a ``..``
    segment), cannot be UTF-8 (a lone surrogate), or would be the key numpy.load gives our
    metadata: such a key's member is its escaped spelling (``%XX``, ``%uXXXX``), ``#2``... added
    if another member has that name, and the metadata maps it back.
    """
    names: dict[str, str] = {}
    taken: set[str] = set()
    unsafe: list[tuple[str, TreePath]] = []
    for key, tensor_path in keys:
        if _safe_member(key):
            names[key] = key + NPY_SUFFIX
            taken.add(names[key])
        else:
            unsafe.append((key, tensor_path))
    escaped: dict[str, str] = {}
    for key, tensor_path in unsafe:
        stem, n = _escaped_member(key), 1
        name = stem + NPY_SUFFIX
        while name in taken:
            n += 1
            name = f"{stem}#{n}{NPY_SUFFIX}"
        if len(name.encode("utf-8")) > 0xFFFF:
            raise UnsupportedValueError(
                f"the key {shown(key)} is longer than a zip member name can be (65535 bytes); rename it (--rename)",
                path=tensor_path,
            )
        taken.add(name)
        names[key] = escaped[key] = name
    return names, escaped


def _safe_member(key: str) -> bool:
    segments = key.replace("\\", "/").split("/")
    if key == META_KEY or "\x00" in key or key.startswith(("/", "\\")) or ".." in segments:
        return False
    try:
        return len((key + NPY_SUFFIX).encode("utf-8")) <= 0xFFFF
    except UnicodeEncodeError:  # a lone surrogate
        return False


def _escaped_member(key: str) -> str:
    """``key`` spelled so that it is a safe member name, one-to-one (``%`` itself is escaped)."""
    text = "".join(
        f"%{ord(char):02X}" if char in "%\x00\\" else f"%u{ord(char):04X}" if 0xD800 <= ord(char) <= 0xDFFF else char
        for char in key
    )
    text = "/".join("%2E%2E" if segment == ".." else segment for segment in text.split("/"))
    if text.startswith("/"):
        text = "%2F" + text[1:]
    if text == META_KEY:
        text = "%5F" + text[1:]
    return text


def _write_single(
    checkpoint: Checkpoint, path: Path, context: WriteContext, options: NpzOptions, tensor_writer: TensorWriter
) -> None:
    """A ``.npy`` file: the checkpoint must be one tensor; the file holds it and nothing else."""
    ref = checkpoint.tree
    if options.compress:
        raise UnsupportedValueError(
            "--compress deflates the members of an .npz; a .npy file is never compressed", file=path
        )
    if type(ref) is not TensorRef:
        tensors = checkpoint.unique_tensors()
        example = f" (--select {format_tree_path(tensors[0][0])})" if tensors else ""
        raise UnsupportedValueError(
            f"a .npy file holds one array, and this checkpoint is a {type(ref).__name__} holding {len(tensors)} "
            f"tensor(s): select one{example} or write an .npz",
            file=path,
        )
    descr = npy.DESCRS[ref.dtype]
    if descr.startswith("|V"):
        raise UnsupportedValueError(
            f"a .npy file cannot name the dtype {ref.dtype} (numpy has no such type; it would be read back as raw "
            "bytes): write an .npz, whose metadata names it",
            file=path,
        )
    with atomic_output(path, fsync=context.fsync, overwrite=context.overwrite) as out:
        out.write(npy.header_bytes(descr, ref.shape))
        tensor_writer.copy(out, ref, ())


# ------------------------------------------------------------------------------------ reading


class _Charges:
    """What a read charges once for all its arrays (numpy, a band of a Fortran array, a buffer of
    byte-swapped elements: one array is read at a time) and what it notes."""

    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        self.numpy = False
        self.band = 0
        self.swapping = False
        self.inferred = 0  # '<V2' arrays read as bfloat16

    def fortran(self, band: int) -> None:
        if not self.numpy:
            self.budget.materialize(NUMPY_IMPORT_BYTES, "numpy, imported to reorder Fortran-order arrays")
            self.numpy = True
        if band > self.band:  # the band and its transposed copy, and a chunk read
            self.budget.materialize(
                2 * (band - self.band) + (CHUNK_SIZE if not self.band else 0), "Fortran-order bands"
            )
            self.band = band

    def swap(self) -> None:
        if not self.swapping:
            self.budget.materialize(2 * CHUNK_SIZE, "big-endian elements swapped")
            self.swapping = True

    def notes(self) -> tuple[str, ...]:
        if not self.inferred:
            return ()
        return (
            f"{self.inferred} array(s) with descr '<V2' read as bfloat16 (what numpy.save writes for ml_dtypes' "
            "bfloat16 and mx.savez for MLX's; no other type is '<V2')",
        )


def _array(
    header: npy.NpyHeader,
    data: ByteSource,
    where: str,
    file: Path,
    dtype: str | None,
    charges: _Charges,
) -> TensorRef:
    """The tensor of an .npy whose bytes after the header are ``data``; ``dtype``: the one our
    metadata names for a void descr."""
    descr = header.descr
    if dtype is not None:
        size = DTYPES[dtype].itemsize
        if descr not in (f"<V{size}", f"|V{size}"):
            raise CorruptFileError(
                f"{where}its descr is {descr!r}, but the metadata says {dtype}, stored as raw {size}-byte elements",
                file=file,
            )
        big = False
    elif descr in npy.VOID_INFERRED:
        dtype, big = npy.VOID_INFERRED[descr], False
        charges.inferred += 1
    else:
        try:
            dtype, big = npy.dtype_for_descr(descr)
        except npy.NpyError as error:
            npy.raise_at(error, where, file)
            raise  # never reached: raise_at raises
    shape = header.shape
    itemsize = DTYPES[dtype].itemsize
    nbytes = numel(shape) * itemsize
    if data.nbytes != nbytes:
        raise CorruptFileError(
            f"{where}its header says {descr} {list(shape)}: {nbytes} bytes of array data, and {data.nbytes} "
            "follow the header",
            file=file,
        )
    source: ByteSource = data
    fortran = header.fortran_order and not npy.fortran_is_c_order(shape)
    if nbytes and (big or fortran):
        if isinstance(source, FileRange):
            source = npy.RecordChecked(source)  # streamed below: its record is checked on the way
        if big:
            charges.swap()
            source = npy.ByteSwapped(source, npy.swap_unit(dtype))
        if fortran:
            reordered = npy.FortranOrder(source, shape, itemsize, npy.FORTRAN_BAND)
            charges.fortran(reordered.band_bytes())
            source = reordered
    charges.budget.tensors(1)
    return TensorRef(dtype, shape, source)


def _read_single(path: Path, size: int, budget: Budget, ranges: Ranges | None = None) -> Checkpoint:
    """A ``.npy`` file: its array, as ``numpy.load`` gives it."""
    if ranges is not None:  # a remote file: the header is in the first fetch
        try:
            header = npy.parse_header(lambda n: ranges.read(0, min(n, size)), size)
        except npy.NpyError as error:
            npy.raise_at(error, "", path)
            raise
        return _single(path, size, budget, header)
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            header = npy.parse_header(lambda n: os.pread(fd, min(n, size), 0), size)
        except npy.NpyError as error:
            npy.raise_at(error, "", path)
            raise
    finally:
        os.close(fd)
    return _single(path, size, budget, header)


def _single(path: Path, size: int, budget: Budget, header: npy.NpyHeader) -> Checkpoint:
    budget.materialize(header.data_offset, "the .npy header")
    charges = _Charges(budget)
    data = FileRange(path, header.data_offset, size - header.data_offset)
    ref = _array(header, data, "", path, None, charges)
    return Checkpoint(ref, path, kind=KIND_NPY, notes=charges.notes())


class _Archive:
    """One .npz: its members in the zip's order, our metadata member if it has one."""

    def __init__(self, path: Path, size: int, budget: Budget, ranges: Ranges | None = None) -> None:
        self.path, self.size, self.budget = path, size, budget
        self.charges = _Charges(budget)
        self.fd = -1
        self.ranges = ranges  # a remote file's (the .npy headers are read from it), else None

    def read(self) -> Checkpoint:
        path, budget = self.path, self.budget
        entries = stored_entries(path, self.size, budget=budget, ranges=self.ranges, ahead=_read_here)
        meta_entry = entries.get(META)
        meta = self._metadata(meta_entry) if meta_entry is not None else None
        dtypes = self._dtypes(meta)
        key_of = self._members(meta, entries)  # our escaped member names, by member name
        values: dict[str, Any] = {}
        member_of: dict[str, str] = {}
        descriptor: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        if self.ranges is None:
            self.fd = os.open(path, os.O_RDONLY)  # the headers of stored members are read through it
            descriptor = contextlib.closing(_Descriptor(self.fd))
        with paused_gc(), descriptor:
            for name, entry in entries.items():
                if name == META and meta is not None:
                    continue
                key = key_of.get(name, name.removesuffix(NPY_SUFFIX))
                if key in member_of:
                    raise CorruptFileError(
                        f"members {shown(member_of[key])} and {shown(name)} both give the key {shown(key)} "
                        "(numpy.load would give one of them)",
                        file=path,
                    )
                member_of[key] = name
                budget.nodes(1, "archive members")
                values[key] = self._member(entry, key, dtypes.get(key), ours=meta is not None)
        if meta is None:
            return Checkpoint(values, path, kind=KIND_NPZ, notes=self.charges.notes())
        return self._ours(meta, values, dtypes)

    def _metadata(self, entry: StoredEntry) -> dict[str, Any] | None:
        """Our metadata: JSON text as a 1-d uint8 array (None: an array of that name that is not ours)."""
        what = META
        data = bytes(read_entry(self.path, entry, self.budget, self.ranges))
        try:
            header = npy.parse_header(lambda n: data[:n], len(data))
        except npy.NpyError:
            return None  # read as the member it is, refused as such
        plain = header.descr == "|u1" and not header.fortran_order and len(header.shape) == 1
        text = data[header.data_offset :]
        if not plain or header.shape[0] != len(text) or not text.startswith(b"{"):
            return None
        meta = loads_json_strict(text, self.path, what, self.budget)
        if type(meta) is not dict or not set(meta) <= META_FIELDS or not {"version", "tree"} <= set(meta):
            raise CorruptFileError(
                f"{what} must be an object with version, tree and optionally blake3, tree_blake3, members, dtypes, "
                "casts, file_metadata",
                file=self.path,
            )
        if meta["version"] != META_VERSION or type(meta["version"]) is not int:
            raise UnsupportedValueError(
                f"{what} has version {meta['version']!r:.40}; this reader knows version {META_VERSION}",
                file=self.path,
            )
        return meta

    def _members(self, meta: dict[str, Any] | None, entries: Mapping[str, StoredEntry]) -> dict[str, str]:
        """The keys of the members our writer named other than ``key.npy``, by member name."""
        members = {} if meta is None else meta.get("members", {})
        if type(members) is not dict or not all(
            type(name) is str and name.endswith(NPY_SUFFIX) and name in entries for name in members.values()
        ):
            raise CorruptFileError(
                f"{META}'s members must map array keys to .npy members of the archive", file=self.path
            )
        key_of = {name: key for key, name in members.items()}
        if len(key_of) != len(members):
            raise CorruptFileError(f"{META}'s members names one member for two keys", file=self.path)
        return key_of

    def _dtypes(self, meta: dict[str, Any] | None) -> dict[str, str]:
        dtypes = {} if meta is None else meta.get("dtypes", {})
        if type(dtypes) is not dict or not all(
            type(value) is str and npy.DESCRS.get(value, "")[1:2] == "V" for value in dtypes.values()
        ):
            raise CorruptFileError(
                f"{META}'s dtypes must map array keys to the dtypes stored as raw bytes "
                f"({', '.join(name for name, descr in npy.DESCRS.items() if descr[1] == 'V')})",
                file=self.path,
            )
        return dtypes

    def _member(self, entry: StoredEntry, key: str, dtype: str | None, *, ours: bool) -> Any:
        """The value numpy.load gives for a member: its array, or its bytes when it is not an .npy."""
        path, budget = self.path, self.budget
        where = f"member {shown(entry.name)}: "
        if entry.compressed:  # bytes the file does not store: charged to the output limit first
            budget.output(entry.file_size, f"data inflated from {entry.label}")
            record = entry.source(path)
            assert isinstance(record, InflatedRecord)
            inflated: InflatedRecord = record

            held = self.ranges.get(entry.data_offset, min(entry.size, HEAD_AHEAD)) if self.ranges else None

            def read(n: int) -> bytes:
                count = min(n, entry.file_size)
                if held is not None and count > 0:  # a remote member's first compressed bytes, held
                    head = _inflated_head(held, count)
                    if len(head) == count:
                        return head
                return _inflated_prefix(inflated, count)

        elif self.ranges is not None:
            ranges = self.ranges  # a remote member's header: held, fetched with its local header

            def read(n: int) -> bytes:
                return ranges.read(entry.data_offset, min(n, entry.size))

        else:

            def read(n: int) -> bytes:
                return os.pread(self.fd, min(n, entry.size), entry.data_offset)

        head = read(len(npy.NPY_MAGIC))
        if not head.startswith(npy.NPY_MAGIC):
            if entry.name.endswith(NPY_SUFFIX):  # numpy.load would give its bytes; the name promises an array
                found = "it is a pickle, never unpickled here" if head[:1] == b"\x80" else f"it starts {head!r}"
                raise CorruptFileError(f"{where}not an .npy array ({found})", file=path)
            if ours:
                raise CorruptFileError(
                    f"{where}an .npz written by statedict-convert holds .npy arrays and {META} only", file=path
                )
            # not an array: its bytes, as numpy.load gives them
            return bytes(read_entry(path, entry, budget, self.ranges))
        try:
            header = npy.parse_header(read, entry.file_size)
        except npy.NpyError as error:
            npy.raise_at(error, where, path)
            raise
        prefix = read(header.data_offset)
        budget.materialize(header.data_offset, "the .npy headers")
        length = entry.file_size - header.data_offset
        if entry.compressed:
            data: ByteSource = inflated.window(header.data_offset, length)
        else:
            # The member's CRC-32 covers its header and its array: the array's own CRC follows from
            # it and the header's, so the array is checked in the pass that copies it.
            crc = crc32_tail(entry.crc32, zlib.crc32(prefix), length)
            offset = entry.data_offset + header.data_offset
            label = f"{entry.label} (its array data)"
            data = FileRange(path, offset, length, Record(path, offset, length, crc, label))
        return _array(header, data, where, path, dtype, self.charges)

    def _ours(self, meta: dict[str, Any], values: dict[str, Any], dtypes: dict[str, str]) -> Checkpoint:
        path, budget = self.path, self.budget
        refs: dict[str, TensorRef] = {}
        for key, value in values.items():
            if type(value) is not TensorRef:  # _member refused those already
                raise AssertionError(key)
            refs[key] = value
        unknown = sorted(set(dtypes) - set(refs))
        if unknown:
            raise CorruptFileError(
                f"{META}'s dtypes names {shown(unknown[0])}, which is not an array of the archive", file=path
            )
        digests = check_digests(meta.get("blake3"), path, f"{META}'s blake3")
        if set(digests) != set(refs):
            missing = sorted(set(refs) - set(digests))
            problem = (
                f"has no digest for array {shown(missing[0])}"
                if missing
                else (f"names {shown(sorted(set(digests) - set(refs))[0])}, which is not an array of the archive")
            )
            raise CorruptFileError(f"{META}'s blake3 {problem}", file=path)
        for key, ref in refs.items():
            refs[key] = ref.with_stored_digest(digests[key])
        if "casts" in meta:
            read_casts(meta["casts"], refs, path, f"{META}'s casts")
        tree_digest = check_tree_digest(meta.get("tree_blake3"), path, f"{META}'s tree_blake3")
        own = meta.get("file_metadata")
        if own is not None and type(own) is not dict:
            raise CorruptFileError(f"{META}'s file_metadata must be an object", file=path)
        tree = tree_from_stored(
            meta["tree"],
            refs,
            path,
            f"{META}'s tree",
            holder="the archive",
            unused_name="archive member",
            budget=budget,
        )
        return Checkpoint(
            tree,
            path,
            tree_digest=tree_digest,
            file_metadata=own or None,
            kind=KIND_OURS,
            notes=self.charges.notes(),
            expects_tree_digest=True,
        )


@dataclass(frozen=True)
class _Descriptor:
    fd: int

    def close(self) -> None:
        os.close(self.fd)


def _read_here(name: str, size: int) -> int:
    """``stored_entries``'s ``ahead`` for a remote archive: our metadata member whole, and the first
    bytes of every other member (its .npy header), fetched with the local headers."""
    return size if name == META else min(size, HEAD_AHEAD)


def _inflated_head(compressed: bytes, count: int) -> bytes:
    """What the first bytes of a deflate stream inflate to, up to ``count`` (fewer when they do not
    hold that many, or are not valid: the caller then inflates the record, which says why)."""
    try:
        return zlib.decompressobj(-zlib.MAX_WBITS).decompress(compressed, count)
    except zlib.error:
        return b""


def _inflated_prefix(record: InflatedRecord, count: int) -> bytes:
    """The first ``count`` bytes a deflated member inflates to (fewer if it is shorter), without
    inflating the rest; the whole record is checked whenever its array is read."""
    out = bytearray()
    if count <= 0:
        return b""
    for piece in record.chunks(count):  # the generator is closed (its file too) when it is dropped
        out += piece[: count - len(out)]
        if len(out) >= count:
            break
    return bytes(out)


FORMAT = NpzFormat()
