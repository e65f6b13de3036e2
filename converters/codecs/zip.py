"""Just enough ZIP for torch checkpoints: stored (uncompressed) entries, read in place, written streaming.

torch's archives store every record uncompressed with its data aligned to 64 bytes, so a tensor is a
plain byte range of the file. Writing: local header (sizes known up front, CRC patched after the
data), data, then the central directory, with ZIP64 records when sizes or offsets need them.
"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from ..core.errors import CorruptFileError

LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")
CENTRAL_HEADER = struct.Struct("<4sHHHHHHIIIHHHHHII")
EOCD = struct.Struct("<4sHHHHIIH")
ZIP64_EOCD = struct.Struct("<4sQHHIIQQQQ")
ZIP64_LOCATOR = struct.Struct("<4sIQI")
PADDING_EXTRA_ID = 0x4246  # "FB": the id torch's writer uses for alignment padding
ZIP64_EXTRA_ID = 0x0001
U32_MAX = 0xFFFFFFFF
UTF8_FLAG = 0x0800


@dataclass(frozen=True)
class StoredEntry:
    name: str
    data_offset: int
    size: int  # bytes as stored (compressed size for a compressed entry)
    compressed: bool


class _Window(io.RawIOBase):
    """``length`` bytes of an open file from ``base``, seen as a whole file (an archive inside a file)."""

    def __init__(self, handle: BinaryIO, base: int, length: int) -> None:
        self._handle, self._base, self._length, self._position = handle, base, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        origin = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._length}[whence]
        self._position = max(0, origin + offset)
        return self._position

    def readinto(self, buffer: Any) -> int:
        count = max(0, min(len(buffer), self._length - self._position))
        self._handle.seek(self._base + self._position)
        data = self._handle.read(count)
        buffer[: len(data)] = data
        self._position += len(data)
        return len(data)


def stored_entries(path: Path, file_size: int, base: int = 0) -> dict[str, StoredEntry]:
    """Every entry of the archive with where its bytes are; refuses entries that lie about their place.

    The archive is the ``file_size`` bytes of ``path`` from ``base`` (0: the whole file; DCP files
    hold one archive per tensor). Offsets returned are of ``path``.
    """
    with open(path, "rb") as handle:
        window = io.BufferedReader(_Window(handle, base, file_size))
        try:
            archive = zipfile.ZipFile(window)
        except (
            zipfile.BadZipFile,
            OSError,
            ValueError,
            EOFError,
            struct.error,
            OverflowError,
            NotImplementedError,
        ) as exc:
            raise CorruptFileError(f"not a readable zip archive: {exc}", file=path) from None
        with archive:
            return _entries(path, archive, window, file_size, base)


def _entries(path: Path, archive: zipfile.ZipFile, handle: Any, file_size: int, base: int) -> dict[str, StoredEntry]:
    entries: dict[str, StoredEntry] = {}
    for info in archive.infolist():
        if info.filename in entries:
            raise CorruptFileError(f"zip entry {info.filename!r} appears twice", file=path)
        if info.header_offset < 0 or info.header_offset + LOCAL_HEADER.size > file_size:
            raise CorruptFileError(
                f"zip entry {info.filename!r} starts at {info.header_offset}, past the end ({file_size})",
                file=path,
            )
        handle.seek(info.header_offset)
        fields = LOCAL_HEADER.unpack(handle.read(LOCAL_HEADER.size))
        if fields[0] != b"PK\x03\x04":
            raise CorruptFileError(f"zip entry {info.filename!r} has no local header", file=path)
        data_offset = info.header_offset + LOCAL_HEADER.size + fields[9] + fields[10]
        compressed = info.compress_type != zipfile.ZIP_STORED
        if (not compressed and info.compress_size != info.file_size) or data_offset + info.compress_size > file_size:
            raise CorruptFileError(
                f"zip entry {info.filename!r} declares {info.compress_size} bytes at offset "
                f"{data_offset}, beyond the file's {file_size} bytes",
                file=path,
            )
        entries[info.filename] = StoredEntry(info.filename, base + data_offset, info.compress_size, compressed)
    return entries


class ZipWriter:
    """Writes stored entries to a seekable binary file. Call ``add`` per entry, then ``close``."""

    def __init__(self, out: BinaryIO, *, align: int = 64) -> None:
        self._out = out
        self._align = align
        self._central: list[bytes] = []
        self._count = 0
        self._dos_time, self._dos_date = _dos_datetime()

    def add(self, name: str, data: bytes) -> None:
        """Append a stored record of small, in-memory bytes."""
        self.add_copied(name, len(data), lambda out: _write_with_crc(out, data))

    def add_copied(self, name: str, size: int, copy: Callable[[BinaryIO], int]) -> None:
        """Append a stored record of ``size`` bytes that ``copy(out)`` writes at the file's position,
        returning their CRC-32 (so big records are copied and checked in one pass by the caller)."""
        out = self._out
        encoded = name.encode("utf-8")
        offset = out.tell()
        zip64 = size >= U32_MAX
        zip64_extra = struct.pack("<HHQQ", ZIP64_EXTRA_ID, 16, size, size) if zip64 else b""
        start = offset + LOCAL_HEADER.size + len(encoded) + len(zip64_extra)
        padding = (-start) % self._align
        if padding and padding < 4:  # an extra field needs 4 bytes of its own header
            padding += self._align
        pad_extra = struct.pack("<HH", PADDING_EXTRA_ID, padding - 4) + bytes(padding - 4) if padding else b""
        extra = zip64_extra + pad_extra
        version = 45 if zip64 else 20
        small_size = U32_MAX if zip64 else size
        out.write(
            LOCAL_HEADER.pack(
                b"PK\x03\x04",
                version,
                UTF8_FLAG,
                0,
                self._dos_time,
                self._dos_date,
                0,
                small_size,
                small_size,
                len(encoded),
                len(extra),
            )
        )
        out.write(encoded + extra)
        data_start = out.tell()
        crc = copy(out)
        end = out.tell()
        if end - data_start != size:
            raise AssertionError(f"zip record {name!r}: {end - data_start} bytes written, {size} declared")
        out.seek(offset + 14)  # the CRC field of the local header
        out.write(struct.pack("<I", crc))
        out.seek(end)
        self._add_central(encoded, crc, size, offset, version)

    def _add_central(self, encoded: bytes, crc: int, size: int, offset: int, version: int) -> None:
        extra_values = []
        if size >= U32_MAX:
            extra_values += [size, size]
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
                0,
                self._dos_time,
                self._dos_date,
                crc,
                min(size, U32_MAX),
                min(size, U32_MAX),
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


def _write_with_crc(out: BinaryIO, data: bytes) -> int:
    out.write(data)
    return zlib.crc32(data)


def _dos_datetime() -> tuple[int, int]:
    # A fixed timestamp keeps our output byte-for-byte reproducible (1980-01-01 00:00).
    return 0, (0 << 9) | (1 << 5) | 1
