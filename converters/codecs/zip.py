"""Just enough ZIP for torch checkpoints and numpy's .npz: entries read in place (stored) or inflated
while they are read (deflated), written streaming (stored, or deflated a chunk at a time).

torch's archives store every record uncompressed with its data aligned to 64 bytes, so a tensor is a
plain byte range of the file. A zip tool may re-deflate the records and ``torch.load`` still reads
the result: such a record becomes an :class:`InflatedRecord`, inflated in bounded pieces and
checked against its declared size and CRC-32 whenever its bytes are used. Writing: local header
(sizes known up front, CRC patched after the data), data, then the central directory, with ZIP64
records when sizes or offsets need them.

Reading is strict, so that the archive holds exactly what its central directory says and nothing
else: the end-of-central-directory record (with its comment) ends the archive, the first entry
starts at its first byte, entries follow each other without gaps or overlaps, and the central
directory follows the last one. The entry count is taken from the end records and charged to the
read's budget before any entry is parsed.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import io
import struct
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from ..core.budget import Budget
from ..core.errors import CorruptFileError, UnsupportedValueError
from ..core.sources import CHUNK_SIZE, FileRange, Record, fill_from_chunks
from ..core.storage import RemoteFile, RemotePath, is_remote, open_read, pread, size_of

LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")
CENTRAL_HEADER = struct.Struct("<4sHHHHHHIIIHHHHHII")
EOCD = struct.Struct("<4sHHHHIIH")
ZIP64_EOCD = struct.Struct("<4sQHHIIQQQQ")
ZIP64_LOCATOR = struct.Struct("<4sIQI")
PADDING_EXTRA_ID = 0x4246  # "FB": the id torch's writer uses for alignment padding
ZIP64_EXTRA_ID = 0x0001
U16_MAX = 0xFFFF
U32_MAX = 0xFFFFFFFF
UTF8_FLAG = 0x0800
ENCRYPTED_FLAG = 0x0001
DATA_DESCRIPTOR_FLAG = 0x0008
STORED, DEFLATED = 0, 8
# What may follow an entry's data when its flags announce a data descriptor: CRC-32 and 32- or
# 64-bit sizes, with or without the optional signature.
DATA_DESCRIPTOR_SIZES = (12, 16, 20, 24)
# Memory one parsed entry costs beyond the budget's node (its name, offsets, dict slot), measured.
ENTRY_BYTES = 400
INFLATE_INPUT = 1 << 20  # compressed bytes read at a time
# From a remote file, the compressed bytes are read 64 KiB first, doubling up to INFLATE_INPUT: an
# .npz reader inflating a member's first bytes (its .npy header) fetches little of its array.
INFLATE_FIRST_REMOTE = 64 << 10
# Remote archives (``Ranges``): byte ranges less than RANGE_GAP apart are fetched by one range
# request, of at most RANGE_GROUP bytes; at most RECORDS_AHEAD bytes of records are fetched along
# with their local headers (what the caller reads of them: torch's data.pkl, an .npy header).
RANGE_GAP = 64 << 10
RANGE_GROUP = 8 << 20
RECORDS_AHEAD = 16 << 20
# Bytes of a local header's extra field assumed when a record's data is fetched with its header:
# torch's and our writer pad to 64 bytes (at most 64 + 4 bytes, plus 20 of a ZIP64 field).
EXTRA_AHEAD = 128
NAME_SHOWN = 100  # characters of an untrusted name shown in a message


def shown(name: str) -> str:
    """An untrusted name for a message: quoted and escaped (``repr``), shortened."""
    text = repr(name)
    return text if len(text) <= NAME_SHOWN else text[: NAME_SHOWN - 4] + "...'"


@dataclass(frozen=True, slots=True)
class StoredEntry:
    name: str
    data_offset: int  # of the entry's data in the file (the archive's base included)
    size: int  # bytes as stored (the deflate stream's length for a deflated entry)
    compressed: bool
    file_size: int  # bytes once inflated (== size for a stored entry)
    crc32: int  # of the inflated bytes, as the central directory states it

    @property
    def label(self) -> str:
        return f"zip record {shown(self.name)}"

    def source(self, path: Path) -> FileRange | InflatedRecord:
        """The entry's bytes: read in place with the record to check (stored), or inflated (deflated)."""
        if self.compressed:
            return InflatedRecord(path, self.data_offset, self.size, self.file_size, self.crc32, self.label)
        return FileRange(
            path, self.data_offset, self.size, Record(path, self.data_offset, self.size, self.crc32, self.label)
        )


# What a caller will read of a record, by its name and stored size: that many of its first bytes
# are fetched with its local header from a remote file (0: none).
Ahead = Callable[[str, int], int]


class Ranges:
    """Byte ranges of a remote file fetched ahead, many of them by one range request.

    Each request is a round trip: reading the local header of every record where it lies would be
    one request per record (they lie between the tensors). :meth:`fetch` merges the ranges asked
    for into few requests (RANGE_GAP, RANGE_GROUP) and keeps only the ranges asked for, so memory is
    what they hold; :meth:`read` serves a range from them, or fetches it alone. Local files need
    none of this: a read there is a ``pread``.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.handle: io.RawIOBase = open_read(path)
        self._starts: list[int] = []
        self._held: list[bytes] = []
        head = path._heads.get(path.url) if isinstance(path, RemotePath) else None
        if head:  # what sniffing the format fetched already
            self._hold(0, head)

    def close(self) -> None:
        self.handle.close()
        self._starts, self._held = [], []

    def __enter__(self) -> Ranges:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def get(self, offset: int, count: int) -> bytes | None:
        """The ``count`` bytes at ``offset`` if a range held covers them, else None."""
        index = bisect.bisect_right(self._starts, offset) - 1
        if index < 0:
            return None
        start, held = self._starts[index], self._held[index]
        if offset + count > start + len(held):
            return None
        return held[offset - start : offset - start + count]

    def read(self, offset: int, count: int) -> bytes:
        """``count`` bytes at ``offset`` (fewer at the end of the file), held or fetched."""
        held = self.get(offset, count)
        return held if held is not None else pread(self.handle, count, offset)

    def fetch(self, ranges: Iterable[tuple[int, int]]) -> None:
        """Fetch and hold the ``(offset, count)`` ranges not held yet (cut at the end of the file)."""
        size = size_of(self.handle)
        cut = ((offset, min(count, size - offset)) for offset, count in ranges)
        wanted = sorted((offset, count) for offset, count in cut if count > 0 and self.get(offset, count) is None)
        groups: list[tuple[int, int, list[tuple[int, int]]]] = []  # start, end, ranges
        for offset, count in wanted:
            if groups:
                start, end, members = groups[-1]
                if offset - end <= RANGE_GAP and max(end, offset + count) - start <= RANGE_GROUP:
                    members.append((offset, count))
                    groups[-1] = (start, max(end, offset + count), members)
                    continue
            groups.append((offset, offset + count, [(offset, count)]))
        for start, end, members in groups:
            block = self._fetch(start, end)
            for offset, count in members:
                self._hold(offset, block[offset - start : offset - start + count])

    def _fetch(self, start: int, end: int) -> bytes:
        if isinstance(self.handle, RemoteFile):
            return self.handle.fetch(start, end)  # exactly the range: no read-ahead past it
        return pread(self.handle, end - start, start)

    def _hold(self, offset: int, data: bytes) -> None:
        index = bisect.bisect_right(self._starts, offset)
        self._starts.insert(index, offset)
        self._held.insert(index, data)


@contextlib.contextmanager
def remote_ranges(path: Path, ranges: Ranges | None = None) -> Iterator[Ranges | None]:
    """``ranges`` if given; else, for a remote file, new :class:`Ranges` (closed on exit); for a
    local file None (its readers ``pread`` where they read)."""
    if ranges is not None or not is_remote(path):
        yield ranges
        return
    made = Ranges(path)
    try:
        yield made
    finally:
        made.close()


def stored_entries(
    path: Path,
    file_size: int,
    base: int = 0,
    *,
    budget: Budget | None = None,
    ranges: Ranges | None = None,
    ahead: Ahead | None = None,
) -> dict[str, StoredEntry]:
    """Every entry of the archive with where its bytes are; refuses archives that lie about their layout.

    The archive is the ``file_size`` bytes of ``path`` from ``base`` (0: the whole file; DCP files
    hold one archive per tensor). Offsets returned are of ``path``. ``budget`` (by default one for
    the archive's size) is charged for the entries before they are parsed.

    A remote file is read through ``ranges`` (new ones by default): the end records, the central
    directory and the local headers, by few range requests; ``ahead(name, size)`` says how many
    first bytes of each record to fetch with its header, for the caller to read from ``ranges``.
    """
    budget = Budget(path, file_size) if budget is None else budget
    with remote_ranges(path, ranges) as held:
        if held is not None:
            return _ArchiveReader(held.handle, path, base, file_size, budget, held, ahead).entries()
        with open_read(path) as handle:
            return _ArchiveReader(handle, path, base, file_size, budget).entries()


class _ArchiveReader:
    def __init__(
        self,
        handle: io.RawIOBase,
        path: Path,
        base: int,
        length: int,
        budget: Budget,
        ranges: Ranges | None = None,
        ahead: Ahead | None = None,
    ) -> None:
        self.handle, self.path, self.base, self.length, self.budget = handle, path, base, length, budget
        self.ranges, self.ahead = ranges, ahead

    def corrupt(self, message: str) -> CorruptFileError:
        return CorruptFileError(message, file=self.path)

    def unsupported(self, message: str) -> UnsupportedValueError:
        return UnsupportedValueError(message, file=self.path)

    def read(self, offset: int, count: int) -> bytes:
        """``count`` bytes at ``offset`` of the archive (fewer at its end)."""
        count = max(0, min(count, self.length - offset))
        if not count:
            return b""
        held = self.ranges.get(self.base + offset, count) if self.ranges is not None else None
        data = held if held is not None else pread(self.handle, count, self.base + offset)
        if len(data) != count:
            raise self.corrupt(f"the file ended while reading {count} bytes at offset {self.base + offset}")
        return data

    def entries(self) -> dict[str, StoredEntry]:
        count, cd_offset, cd_size = self._end_records()
        # Every central directory entry takes its fixed 46 bytes at least: a count that cannot fit is
        # a lie, refused before anything is allocated for it.
        if count * CENTRAL_HEADER.size > cd_size:
            raise self.corrupt(
                f"the zip archive declares {count} entries in a {cd_size}-byte central directory, "
                f"which has room for {cd_size // CENTRAL_HEADER.size}"
            )
        self.budget.nodes(count, "zip entries")
        self.budget.materialize(cd_size + count * ENTRY_BYTES, "zip central directory")
        directory = self.read(cd_offset, cd_size)
        return self._check_layout(self._central_directory(directory, count), cd_offset)

    def _end_records(self) -> tuple[int, int, int]:
        """(entry count, central directory offset and size) from the end records, which must end the archive."""
        if self.length < EOCD.size:
            raise self.corrupt("not a readable zip archive: File is not a zip file (it is too short)")
        tail_start = max(0, self.length - EOCD.size - U16_MAX)
        if self.ranges is not None:  # held: the ZIP64 records, often the central directory, lie in it
            self.ranges.fetch([(self.base + tail_start, self.length - tail_start)])
        tail = self.read(tail_start, self.length - tail_start)
        position = tail.rfind(b"PK\x05\x06")
        appended = None
        while position >= 0:
            if position + EOCD.size <= len(tail):
                end = position + EOCD.size + struct.unpack_from("<H", tail, position + 20)[0]
                if end == len(tail):
                    break
                if end < len(tail) and appended is None:
                    appended = len(tail) - end
            position = tail.rfind(b"PK\x05\x06", 0, position)
        if position < 0:
            if appended is not None:
                raise self.corrupt(
                    f"{appended} bytes follow the end of the zip archive (its end-of-central-directory "
                    "record and comment); refusing appended data"
                )
            raise self.corrupt(
                "not a readable zip archive: File is not a zip file (no end-of-central-directory record)"
            )
        eocd_at = tail_start + position
        _, disk, cd_disk, disk_count, count, cd_size, cd_offset, _ = EOCD.unpack_from(tail, position)
        if disk != 0 or cd_disk != 0 or disk_count != count:
            raise self.unsupported("multi-disk (split) zip archives are not supported")
        region_end = eocd_at
        locator_at = eocd_at - ZIP64_LOCATOR.size
        if locator_at >= 0 and self.read(locator_at, 4) == b"PK\x06\x07":
            _, z64_disk, z64_at, disks = ZIP64_LOCATOR.unpack(self.read(locator_at, ZIP64_LOCATOR.size))
            if z64_disk != 0 or disks > 1:
                raise self.unsupported("multi-disk (split) zip archives are not supported")
            if z64_at + ZIP64_EOCD.size > locator_at:
                raise self.corrupt(f"the ZIP64 end record at offset {z64_at} overlaps its locator")
            (signature, record_size, _, _, disk64, cd_disk64, disk_count64, count64, cd_size64,
             cd_offset64) = ZIP64_EOCD.unpack(self.read(z64_at, ZIP64_EOCD.size))  # fmt: skip
            if signature != b"PK\x06\x06" or z64_at + 12 + record_size != locator_at:
                raise self.corrupt(f"no ZIP64 end record where its locator says (offset {z64_at})")
            if disk64 != 0 or cd_disk64 != 0 or disk_count64 != count64:
                raise self.unsupported("multi-disk (split) zip archives are not supported")
            pairs = ((count, count64, U16_MAX), (cd_size, cd_size64, U32_MAX), (cd_offset, cd_offset64, U32_MAX))
            if any(small not in (saturated, wide) for small, wide, saturated in pairs):
                raise self.corrupt("the zip end record and its ZIP64 end record disagree")
            count, cd_size, cd_offset, region_end = count64, cd_size64, cd_offset64, z64_at
        if cd_offset + cd_size != region_end:
            raise self.corrupt(
                f"the central directory ({cd_size} bytes at offset {cd_offset}) does not end where the "
                f"end records start ({region_end}): bytes were added before or inside the archive"
            )
        return count, cd_offset, cd_size

    def _central_directory(self, directory: bytes, count: int) -> list[tuple[int, str, bytes, int, int, int, int, int]]:
        """(local header offset, name, raw name, flags, method, stored size, inflated size, CRC-32) per entry."""
        rows = []
        names: set[str] = set()
        position = 0
        for index in range(count):
            if position + CENTRAL_HEADER.size > len(directory):
                raise self.corrupt(f"the central directory ends after {index} of its {count} entries")
            (signature, _, _, flags, method, _, _, crc, csize, usize, name_len, extra_len, comment_len,
             disk, _, _, offset) = CENTRAL_HEADER.unpack_from(directory, position)  # fmt: skip
            if signature != b"PK\x01\x02":
                raise self.corrupt(f"central directory entry {index} has no signature")
            name_at = position + CENTRAL_HEADER.size
            extra_at = name_at + name_len
            position = extra_at + extra_len + comment_len
            if position > len(directory):
                raise self.corrupt(f"central directory entry {index} runs past the central directory")
            raw_name = directory[name_at:extra_at]
            try:
                name = raw_name.decode("utf-8" if flags & UTF8_FLAG else "cp437")
            except UnicodeDecodeError:
                raise self.corrupt(f"central directory entry {index} has a name that is not UTF-8") from None
            if name in names:
                raise self.corrupt(f"zip entry {shown(name)} appears twice")
            names.add(name)
            if usize == U32_MAX or csize == U32_MAX or offset == U32_MAX or disk == U16_MAX:
                usize, csize, offset, disk = self._zip64(
                    name, directory[extra_at : extra_at + extra_len], usize, csize, offset, disk
                )
            if disk != 0:
                raise self.unsupported("multi-disk (split) zip archives are not supported")
            if flags & ENCRYPTED_FLAG:
                raise self.unsupported(f"zip record {shown(name)} is encrypted")
            if method not in (STORED, DEFLATED):
                raise self.unsupported(
                    f"zip record {shown(name)} uses compression method {method}; only stored and deflated "
                    "records are read (as torch.load)"
                )
            if method == STORED and csize != usize:
                raise self.corrupt(f"zip entry {shown(name)} is stored with {csize} bytes but declares {usize}")
            rows.append((offset, name, raw_name, flags, method, csize, usize, crc))
        if position != len(directory):
            raise self.corrupt(f"{len(directory) - position} bytes follow the last central directory entry")
        return rows

    def _zip64(
        self, name: str, extra: bytes, usize: int, csize: int, offset: int, disk: int
    ) -> tuple[int, int, int, int]:
        """The saturated sizes, offset and disk replaced by the ZIP64 extra field's values (in that order)."""
        position = 0
        while position + 4 <= len(extra):
            field_id, field_len = struct.unpack_from("<HH", extra, position)
            body = extra[position + 4 : position + 4 + field_len]
            position += 4 + field_len
            if field_id != ZIP64_EXTRA_ID:
                continue
            values = []
            for value, size in ((usize, 8), (csize, 8), (offset, 8), (disk, 4)):
                saturated = U16_MAX if size == 4 else U32_MAX
                if value != saturated:
                    values.append(value)
                    continue
                if len(body) < size:
                    raise self.corrupt(f"zip entry {shown(name)} has a truncated ZIP64 extra field")
                values.append(int.from_bytes(body[:size], "little"))
                body = body[size:]
            return values[0], values[1], values[2], values[3]
        raise self.corrupt(f"zip entry {shown(name)} needs a ZIP64 extra field and has none")

    def _check_layout(
        self, rows: list[tuple[int, str, bytes, int, int, int, int, int]], cd_offset: int
    ) -> dict[str, StoredEntry]:
        """Entries from their local headers, which must tile the archive up to its central directory."""
        if self.ranges is not None:
            self._fetch_local_headers(rows)
        entries: dict[str, StoredEntry] = {}
        expected = 0  # where the next local header must start
        slack: tuple[int, ...] = (0,)  # gaps allowed there (a data descriptor after the previous entry)
        previous = None
        for offset, name, raw_name, flags, method, csize, usize, crc in sorted(rows):
            if offset + LOCAL_HEADER.size > self.length:
                raise self.corrupt(f"zip entry {shown(name)} starts at {offset}, past the end ({self.length})")
            if offset - expected not in slack:
                raise self._misplaced(name, previous, offset, expected)
            header = self.read(offset, LOCAL_HEADER.size + len(raw_name))
            fields = LOCAL_HEADER.unpack_from(header)
            if fields[0] != b"PK\x03\x04":
                raise self.corrupt(f"zip entry {shown(name)} has no local header")
            if header[LOCAL_HEADER.size :] != raw_name or fields[9] != len(raw_name):
                raise self.corrupt(f"zip entry {shown(name)}: its local header names another entry")
            data_offset = offset + LOCAL_HEADER.size + fields[9] + fields[10]
            if data_offset + csize > self.length:
                raise self.corrupt(
                    f"zip entry {shown(name)} declares {csize} bytes at offset {self.base + data_offset}, "
                    f"beyond the file's {self.base + self.length} bytes"
                )
            entries[name] = StoredEntry(name, self.base + data_offset, csize, method == DEFLATED, usize, crc)
            expected = data_offset + csize
            slack = DATA_DESCRIPTOR_SIZES if flags & DATA_DESCRIPTOR_FLAG else (0,)
            previous = name
        if cd_offset - expected not in slack:
            raise self._misplaced(None, previous, cd_offset, expected)
        return {name: entries[name] for _, name, *_ in rows}  # central directory order

    def _fetch_local_headers(self, rows: list[tuple[int, str, bytes, int, int, int, int, int]]) -> None:
        """A remote archive's local headers (and the first bytes of the records ``ahead`` asks for),
        fetched together: one range request for headers close to each other, not one per record."""
        assert self.ranges is not None
        wanted, records = [], 0
        for offset, name, raw_name, _, _, csize, _, _ in rows:
            if offset + LOCAL_HEADER.size > self.length:
                continue  # refused by the layout check
            count = LOCAL_HEADER.size + len(raw_name)
            first = min(self.ahead(name, csize), csize, RECORDS_AHEAD - records) if self.ahead is not None else 0
            if first > 0:
                records += first
                count += EXTRA_AHEAD + first
            wanted.append((self.base + offset, min(count, self.length - offset)))
        self.ranges.fetch(wanted)

    def _misplaced(self, name: str | None, previous: str | None, offset: int, expected: int) -> CorruptFileError:
        what = f"zip entry {shown(name)}" if name is not None else "the central directory"
        if previous is None:
            return self.corrupt(f"{what} starts at offset {offset}: the archive has bytes before its first entry")
        if offset < expected:
            return self.corrupt(
                f"{what} at offset {offset} overlaps zip entry {shown(previous)} (which ends at {expected})"
            )
        return self.corrupt(
            f"{offset - expected} unaccounted bytes lie between zip entry {shown(previous)} "
            f"and {what} (offset {offset})"
        )


@dataclass(frozen=True)
class InflatedRecord:
    """The bytes of a deflated zip record, inflated as they are read in pieces of at most the chunk size.

    Every read inflates the whole record and checks its declared size and CRC-32 at the end (a
    view of part of it still reads it all), so a corrupted or lying record gives an error, never
    wrong bytes. ``start``/``length`` select the inflated bytes this source hands out.
    """

    path: Path
    offset: int  # of the deflate stream in the file
    compressed_size: int
    size: int  # inflated, as the central directory declares it
    crc32: int
    name: str  # for messages: "zip record 'archive/data/0'"
    start: int = 0
    length: int | None = None

    @property
    def nbytes(self) -> int:
        return self.size - self.start if self.length is None else self.length

    def window(self, start: int, length: int) -> InflatedRecord:
        """``length`` of its bytes from ``start``, without reading them."""
        if not 0 <= start <= start + length <= self.nbytes:
            raise ValueError(f"window [{start}, {start + length}) outside a {self.nbytes}-byte source")
        return InflatedRecord(
            self.path, self.offset, self.compressed_size, self.size, self.crc32, self.name, self.start + start, length
        )

    def readinto(self, buffer: memoryview) -> None:
        fill_from_chunks(self, buffer)

    def chunks(self, chunk_size: int = CHUNK_SIZE) -> Iterator[memoryview]:
        begin, end = self.start, self.start + self.nbytes
        position = 0
        for piece in self._inflate(chunk_size):
            low, high = max(begin, position), min(end, position + len(piece))
            if low < high:
                yield piece[low - position : high - position]
            position += len(piece)

    def _inflate(self, chunk_size: int) -> Iterator[memoryview]:
        step = INFLATE_FIRST_REMOTE if is_remote(self.path) else INFLATE_INPUT
        with open_read(self.path) as handle:
            handle.seek(self.offset)

            def read(remaining: int) -> bytes:
                nonlocal step
                data = handle.read(min(remaining, step)) or b""
                step = min(step * 2, INFLATE_INPUT)
                return data

            yield from self._inflated(read, chunk_size)

    def inflate_held(self, compressed: bytes) -> Iterator[memoryview]:
        """The whole record inflated from its ``compressed`` bytes in memory (a remote record
        fetched with its local header), checked as any read of it is."""
        return self._inflated(lambda remaining: compressed[len(compressed) - remaining :], CHUNK_SIZE)

    def _inflated(self, read: Callable[[int], bytes], chunk_size: int) -> Iterator[memoryview]:
        """What the deflate stream inflates to, its input from ``read(bytes remaining)``."""
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        produced, crc, pending = 0, 0, b""
        remaining = self.compressed_size
        while not inflater.eof:
            if not pending and remaining:
                pending = read(remaining)
                if not pending:
                    raise self._corrupt("the file ends inside it")
                remaining -= len(pending)
            try:
                # At most one byte past the declared size: enough to see a record that lies.
                piece = inflater.decompress(pending, min(chunk_size, self.size - produced + 1))
            except zlib.error as exc:
                raise self._corrupt(f"it is not a valid deflate stream ({exc})") from None
            pending = inflater.unconsumed_tail
            # All input consumed is not the end: a long match may still be pending output (a
            # record of zeros); only a call that gives nothing more, with no input left, is.
            if not piece and not pending and not remaining and not inflater.eof:
                raise self._corrupt("its deflate stream ends early")
            if piece:
                produced += len(piece)
                if produced > self.size:
                    raise self._corrupt(f"it inflates to more than the {self.size} bytes it declares")
                crc = zlib.crc32(piece, crc)
                yield memoryview(piece)
        if produced != self.size:
            raise self._corrupt(f"it inflates to {produced} bytes, not the {self.size} it declares")
        if crc != self.crc32:
            raise self._corrupt(f"it does not match its CRC-32 (stored {self.crc32:08x}, bytes give {crc:08x})")

    def _corrupt(self, problem: str) -> CorruptFileError:
        return CorruptFileError(f"{self.name} (deflated): {problem}", file=self.path)


def read_entry(path: Path, entry: StoredEntry, budget: Budget, ranges: Ranges | None = None) -> bytearray:
    """A small record's bytes, in memory (charged to ``budget``), checked against its CRC-32
    (from ``ranges`` when they hold it: fetched with its local header)."""
    budget.materialize(entry.file_size, f"{entry.label} read into memory")
    held = _held(path, entry, ranges)
    if held is not None:
        check_crc(entry, zlib.crc32(held), path)
        return bytearray(held)
    source = entry.source(path)
    buffer = bytearray(entry.file_size)
    source.readinto(memoryview(buffer))  # an inflated record checks its own size and CRC-32
    if not entry.compressed:
        check_crc(entry, zlib.crc32(buffer), path)
    return buffer


def check_entry(path: Path, entry: StoredEntry, budget: Budget, ranges: Ranges | None = None) -> None:
    """Read a record through (bounded memory) and check it against its CRC-32. What a deflated
    record inflates to is charged to ``budget``'s output first (the work is proportional to it).
    A record ``ranges`` hold is checked from them."""
    if entry.compressed:
        budget.output(entry.file_size, f"data inflated from {entry.label}")
    held = ranges.get(entry.data_offset, entry.size) if ranges is not None else None
    if held is not None and entry.compressed:
        record = entry.source(path)
        assert isinstance(record, InflatedRecord)
        for _ in record.inflate_held(held):  # checks its size and CRC-32; memory stays bounded
            pass
        return
    if held is not None:
        check_crc(entry, zlib.crc32(held), path)
        return
    crc = 0
    for chunk in entry.source(path).chunks():
        crc = zlib.crc32(chunk, crc)
    check_crc(entry, crc, path)


def _held(path: Path, entry: StoredEntry, ranges: Ranges | None) -> bytes | bytearray | None:
    """The record's bytes if ``ranges`` hold them (inflated and checked when it is deflated)."""
    data = ranges.get(entry.data_offset, entry.size) if ranges is not None else None
    if data is None or not entry.compressed:
        return data
    record = entry.source(path)
    assert isinstance(record, InflatedRecord)
    inflated = bytearray()
    for piece in record.inflate_held(data):  # at most the size it declares
        inflated += piece
    return inflated


def check_crc(entry: StoredEntry, actual: int, path: Path) -> None:
    if actual != entry.crc32:
        raise CorruptFileError(
            f"{entry.label} does not match its CRC-32 (stored {entry.crc32:08x}, bytes give {actual:08x})", file=path
        )


# ---------------------------------------------------------------------------- CRC-32 arithmetic
# The zip CRC-32 of bytes A+B from the CRCs of A and B, without reading them again (zlib's
# crc32_combine, which Python's zlib does not expose): CRC-32 is linear over GF(2), so appending
# n bytes multiplies A's CRC by x^(8n) modulo the polynomial. A record holding a small header and
# then an array (an .npy member) gets the CRC of its array part this way, so the array is checked
# in the same pass that copies it; and the writer gets the record's CRC from the array's.

_CRC_POLYNOMIAL = 0xEDB88320  # zip's CRC-32, bit-reflected
_X_POWERS: list[int] = [1 << 30]  # x^(2^k) mod P: x^1, x^2, x^4, ... (bit-reflected, x^0 is 1 << 31)


def _multiply(a: int, b: int) -> int:
    """a * b modulo the CRC-32 polynomial (zlib's multmodp)."""
    mask, product = 1 << 31, 0
    while True:
        if a & mask:
            product ^= b
            if not a & (mask - 1):
                return product
        mask >>= 1
        b = (b >> 1) ^ _CRC_POLYNOMIAL if b & 1 else b >> 1


while len(_X_POWERS) < 72:
    _X_POWERS.append(_multiply(_X_POWERS[-1], _X_POWERS[-1]))


@functools.lru_cache(maxsize=4096)
def _append_zeros(nbytes: int) -> int:
    """x^(8 * nbytes) modulo the polynomial: what appending ``nbytes`` bytes does to a CRC, one
    multiplication per byte of ``nbytes`` (cached: a checkpoint's arrays have few distinct sizes)."""
    power, j = 1 << 31, 0
    while nbytes:
        if nbytes & 0xFF:
            power = _multiply(_digit_power(j, nbytes & 0xFF), power)
        nbytes >>= 8
        j += 1
    return power


@functools.cache  # at most 8 x 255 of them
def _digit_power(j: int, digit: int) -> int:
    """x^(8 * digit * 256**j) modulo the polynomial."""
    power, k = 1 << 31, 3 + 8 * j
    while digit:
        if digit & 1:
            power = _multiply(_X_POWERS[k], power)
        digit >>= 1
        k += 1
    return power


def crc32_combine(head: int, tail: int, tail_length: int) -> int:
    """The CRC-32 of A+B from A's (``head``), B's (``tail``) and B's length.

    >>> crc32_combine(zlib.crc32(b"abc"), zlib.crc32(b"defg"), 4) == zlib.crc32(b"abcdefg")
    True
    """
    return _multiply(_append_zeros(tail_length), head) ^ tail


def crc32_tail(whole: int, head: int, tail_length: int) -> int:
    """The CRC-32 of B from the CRC of A+B (``whole``), A's (``head``) and B's length.

    >>> crc32_tail(zlib.crc32(b"abcdefg"), zlib.crc32(b"abc"), 4) == zlib.crc32(b"defg")
    True
    """
    return _multiply(_append_zeros(tail_length), head) ^ whole


def first_member_name(head: bytes) -> bytes | None:
    """The name of a zip's first record as its local header spells it, when ``head`` (a file's
    first bytes) holds the whole name; None otherwise (not a zip, or a longer name)."""
    if len(head) < LOCAL_HEADER.size or not head.startswith(b"PK\x03\x04"):
        return None
    name_length = LOCAL_HEADER.unpack_from(head)[9]
    name = head[LOCAL_HEADER.size : LOCAL_HEADER.size + name_length]
    return name if len(name) == name_length else None


class ZipWriter:
    """Writes entries to a seekable binary file. Call ``add``/``add_copied``/``add_deflated`` per
    entry, then ``close``. Each returns the entry's index, for ``rewrite``."""

    def __init__(self, out: BinaryIO, *, align: int = 64) -> None:
        self._out = out
        self._align = align
        self._central: list[bytes] = []
        self._stored: list[tuple[int, int, int]] = []  # per entry: local header offset, data offset, size
        self._count = 0
        self._dos_time, self._dos_date = _dos_datetime()

    def add(self, name: str, data: bytes) -> int:
        """Append a stored record of small, in-memory bytes."""
        return self.add_copied(name, len(data), lambda out: _write_with_crc(out, data))

    def add_copied(self, name: str, size: int, copy: Callable[[BinaryIO], int]) -> int:
        """Append a stored record of ``size`` bytes that ``copy(out)`` writes at the file's position,
        returning their CRC-32 (so big records are copied and checked in one pass by the caller)."""
        out = self._out
        encoded = name.encode("utf-8")
        offset = out.tell()
        zip64 = size >= U32_MAX
        version = self._local_header(encoded, STORED, size, size, zip64)
        data_start = out.tell()
        crc = copy(out)
        end = out.tell()
        if end - data_start != size:
            raise AssertionError(f"zip record {name!r}: {end - data_start} bytes written, {size} declared")
        out.seek(offset + 14)  # the CRC field of the local header
        out.write(struct.pack("<I", crc))
        out.seek(end)
        self._stored.append((offset, data_start, size))
        self._add_central(encoded, crc, size, offset, version)
        return self._count - 1

    def add_deflated(self, name: str, size: int, write: Callable[[Deflater], None], *, level: int = -1) -> int:
        """Append a deflated record of ``size`` bytes that ``write(sink)`` passes to ``sink.write``
        in pieces; each piece is deflated and written at once (memory does not grow with the record).
        The sink is not a file: bytes reach it through ``write`` only (no kernel copy into it).
        ``level``: zlib's (-1 its default); with ISA-L installed its levels 0-3 are used instead."""
        out = self._out
        encoded = name.encode("utf-8")
        offset = out.tell()
        # Deflate may grow incompressible bytes a little (5 bytes per stored block): ZIP64 is chosen
        # when even a grown record could pass 4 GiB, since the header's size cannot grow later.
        zip64 = size + (size >> 8) + 1024 >= U32_MAX
        version = self._local_header(encoded, DEFLATED, 0, size, zip64)
        data_start = out.tell()
        sink = Deflater(out, level)
        write(sink)
        sink.finish()
        end = out.tell()
        if sink.size != size:
            raise AssertionError(f"zip record {name!r}: {sink.size} bytes deflated, {size} declared")
        compressed = end - data_start
        if compressed >= U32_MAX and not zip64:
            raise AssertionError(f"zip record {name!r}: deflated to {compressed} bytes without ZIP64")
        out.seek(offset + 14)  # CRC, compressed size, size
        out.write(struct.pack("<III", sink.crc, U32_MAX if zip64 else compressed, U32_MAX if zip64 else size))
        if zip64:  # the ZIP64 extra field's sizes follow the name: size, then compressed size
            out.seek(offset + LOCAL_HEADER.size + len(encoded) + 4)
            out.write(struct.pack("<QQ", size, compressed))
        out.seek(end)
        self._stored.append((offset, data_start, -1))
        self._add_central(encoded, sink.crc, size, offset, version, DEFLATED, compressed)
        return self._count - 1

    def rewrite(self, index: int, data: bytes) -> None:
        """Replace the bytes of stored entry ``index`` by as many others (a header whose digests are
        known only at the end), CRC-32 included; the file's position is kept."""
        offset, data_start, size = self._stored[index]
        if len(data) != size:
            raise AssertionError(f"zip entry {index}: rewritten with {len(data)} bytes, it holds {size}")
        out = self._out
        end = out.tell()
        crc = struct.pack("<I", zlib.crc32(data))
        out.seek(data_start)
        out.write(data)
        out.seek(offset + 14)
        out.write(crc)
        out.seek(end)
        record = self._central[index]
        self._central[index] = record[:16] + crc + record[20:]

    def _local_header(self, encoded: bytes, method: int, compressed: int, size: int, zip64: bool) -> int:
        """Write a local header (its CRC and sizes patched after the data), padded so that the data
        starts aligned; the version needed to read the entry."""
        out = self._out
        offset = out.tell()
        zip64_extra = struct.pack("<HHQQ", ZIP64_EXTRA_ID, 16, size, compressed) if zip64 else b""
        start = offset + LOCAL_HEADER.size + len(encoded) + len(zip64_extra)
        padding = (-start) % self._align
        if padding and padding < 4:  # an extra field needs 4 bytes of its own header
            padding += self._align
        pad_extra = struct.pack("<HH", PADDING_EXTRA_ID, padding - 4) + bytes(padding - 4) if padding else b""
        extra = zip64_extra + pad_extra
        version = 45 if zip64 else 20
        out.write(
            LOCAL_HEADER.pack(
                b"PK\x03\x04",
                version,
                UTF8_FLAG,
                method,
                self._dos_time,
                self._dos_date,
                0,
                U32_MAX if zip64 else compressed,
                U32_MAX if zip64 else size,
                len(encoded),
                len(extra),
            )
        )
        out.write(encoded + extra)
        return version

    def _add_central(
        self,
        encoded: bytes,
        crc: int,
        size: int,
        offset: int,
        version: int,
        method: int = STORED,
        compressed: int | None = None,
    ) -> None:
        compressed = size if compressed is None else compressed
        big = size >= U32_MAX or compressed >= U32_MAX  # both sizes then go in the ZIP64 extra field
        extra_values = [size, compressed] if big else []
        if offset >= U32_MAX:
            extra_values.append(offset)
        extra = (
            struct.pack(f"<HH{len(extra_values)}Q", ZIP64_EXTRA_ID, 8 * len(extra_values), *extra_values)
            if extra_values
            else b""
        )
        if extra_values:
            version = 45
        self._central.append(
            CENTRAL_HEADER.pack(
                b"PK\x01\x02",
                version,
                version,
                UTF8_FLAG,
                method,
                self._dos_time,
                self._dos_date,
                crc,
                U32_MAX if big else compressed,
                U32_MAX if big else size,
                len(encoded),
                len(extra),
                0,
                0,
                0,
                0,
                min(offset, U32_MAX),
            )
            + encoded
            + extra
        )
        self._count += 1

    def close(self) -> None:
        out = self._out
        central_offset = out.tell()
        for record in self._central:
            out.write(record)
        central_size = out.tell() - central_offset
        if self._count >= 0xFFFF or central_offset >= U32_MAX or central_size >= U32_MAX:
            zip64_offset = out.tell()
            out.write(
                ZIP64_EOCD.pack(
                    b"PK\x06\x06",
                    ZIP64_EOCD.size - 12,
                    45,
                    45,
                    0,
                    0,
                    self._count,
                    self._count,
                    central_size,
                    central_offset,
                )
            )
            out.write(ZIP64_LOCATOR.pack(b"PK\x06\x07", 0, zip64_offset, 1))
        out.write(
            EOCD.pack(
                b"PK\x05\x06",
                0,
                0,
                min(self._count, 0xFFFF),
                min(self._count, 0xFFFF),
                min(central_size, U32_MAX),
                min(central_offset, U32_MAX),
                0,
            )
        )


class Deflater:
    """The sink of ``ZipWriter.add_deflated``: what is written to it is deflated into the archive
    at once, its CRC-32 and size counted on the way."""

    def __init__(self, out: BinaryIO, level: int = -1) -> None:
        self._out = out
        self._deflate = _compressor(level)
        self.crc = 0
        self.size = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self.crc = zlib.crc32(data, self.crc)
        self.size += len(data)
        packed = self._deflate.compress(data)
        if packed:
            self._out.write(packed)
        return len(data)

    def finish(self) -> None:
        self._out.write(self._deflate.flush())


def _compressor(level: int) -> Any:
    """A raw deflate compressor: ISA-L's when installed (several times faster than zlib's, the
    same format), else zlib's."""
    try:
        from isal import isal_zlib
    except ImportError:  # pragma: no cover - isal ships wheels for every platform we test
        return zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS)
    isal_level = isal_zlib.ISAL_DEFAULT_COMPRESSION if level < 0 else min(level, isal_zlib.ISAL_BEST_COMPRESSION)
    return isal_zlib.compressobj(isal_level, isal_zlib.DEFLATED, -isal_zlib.MAX_WBITS)


def _write_with_crc(out: BinaryIO, data: bytes) -> int:
    out.write(data)
    return zlib.crc32(data)


def _dos_datetime() -> tuple[int, int]:
    # A fixed timestamp keeps our output byte-for-byte reproducible (1980-01-01 00:00).
    return 0, (0 << 9) | (1 << 5) | 1
