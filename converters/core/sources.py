"""Where a tensor's bytes live while they are in flight: a range of a file, or a buffer.

Both hand out little-endian, C-order bytes and never interpret them. Writers pull bytes in bounded
chunks (``chunks``) so that memory does not grow with the size of a checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

CHUNK_SIZE = 8 * 1024 * 1024


class ByteSource(Protocol):
    """A fixed number of bytes that can be read whole or streamed."""

    @property
    def nbytes(self) -> int: ...

    def readinto(self, buffer: memoryview) -> None:
        """Fill ``buffer`` (exactly ``nbytes`` long) with the bytes."""

    def chunks(self, chunk_size: int = CHUNK_SIZE) -> Iterator[memoryview]:
        """Yield the bytes in order, each chunk at most ``chunk_size`` long.

        A chunk may share memory with the next one: use it before asking for the next.
        """


def fill_from_chunks(source: ByteSource, buffer: memoryview) -> None:
    """``readinto`` for sources that can only be streamed: their chunks, in order, into ``buffer``."""
    position = 0
    for chunk in source.chunks():
        buffer[position : position + len(chunk)] = chunk
        position += len(chunk)


def read_all(source: ByteSource) -> bytearray:
    """All bytes of ``source`` in a fresh, writable buffer."""
    buffer = bytearray(source.nbytes)
    source.readinto(memoryview(buffer))
    return buffer


@dataclass(frozen=True)
class BufferSource:
    """Bytes already in memory (a torch tensor's storage viewed as uint8, a bytes object, ...)."""

    buffer: memoryview
    # The object that owns the memory behind ``buffer``, kept alive as long as this source is.
    owner: object = field(default=None, compare=False, repr=False)

    @classmethod
    def of(cls, data: bytes | bytearray | memoryview, owner: object = None) -> BufferSource:
        view = memoryview(data).cast("B")
        return cls(view, owner)

    @property
    def nbytes(self) -> int:
        return self.buffer.nbytes

    def readinto(self, buffer: memoryview) -> None:
        buffer[:] = self.buffer

    def chunks(self, chunk_size: int = CHUNK_SIZE) -> Iterator[memoryview]:
        for start in range(0, self.nbytes, chunk_size):
            yield self.buffer[start : start + chunk_size]


@dataclass(frozen=True)
class Record:
    """A checksummed unit of a container file that holds tensor bytes (a zip record): its extent
    and the CRC-32 the container stores for it. Checked whenever its bytes are used (a conversion,
    ``verify --deep``), so a flipped bit is never laundered into a fresh digest."""

    path: Path
    offset: int
    length: int
    crc32: int
    name: str  # for messages: "zip record 'archive/data/0'"


@dataclass(frozen=True)
class FileRange:
    """``length`` bytes of the file at ``path`` starting at ``offset``.

    Readers create these only after checking the range lies inside the file. Reading re-checks the
    count actually returned, so a file truncated after it was opened gives an error, not short data.
    ``record``: the checksummed record holding the range, when the container has one.
    """

    path: Path
    offset: int
    length: int
    record: Record | None = field(default=None, compare=False)

    @property
    def is_whole_record(self) -> bool:
        record = self.record
        return record is not None and (record.path, record.offset, record.length) == (
            self.path,
            self.offset,
            self.length,
        )

    @property
    def nbytes(self) -> int:
        return self.length

    def readinto(self, buffer: memoryview) -> None:
        from .storage import open_read

        with open_read(self.path) as handle:
            handle.seek(self.offset)
            filled = 0
            while filled < self.length:
                count = handle.readinto(buffer[filled:])
                if not count:
                    break
                filled += count
        self._check_complete(filled)

    def chunks(self, chunk_size: int = CHUNK_SIZE) -> Iterator[memoryview]:
        from .storage import RemotePath, open_read, stream_range

        if isinstance(self.path, RemotePath):  # range requests, the next one on its way meanwhile
            with closing(stream_range(self.path, self.offset, self.length, chunk_size)) as fetched:
                for chunk in fetched:
                    yield memoryview(chunk)
            return
        buffer = memoryview(bytearray(min(chunk_size, max(self.length, 1))))
        with open_read(self.path) as handle:
            handle.seek(self.offset)
            remaining = self.length
            while remaining:
                count = handle.readinto(buffer[: min(remaining, len(buffer))])
                if not count:
                    self._check_complete(self.length - remaining)
                remaining -= count
                yield buffer[:count]

    def _check_complete(self, filled: int) -> None:
        if filled != self.length:
            from .errors import CorruptFileError

            raise CorruptFileError(
                f"expected {self.length} bytes at offset {self.offset}, the file ended after {filled}",
                file=self.path,
            )


@dataclass(frozen=True)
class ConcatSource:
    """Several sources read one after another (the chunks of a chunked msgpack array)."""

    parts: tuple[ByteSource, ...]

    @property
    def nbytes(self) -> int:
        return sum(part.nbytes for part in self.parts)

    def readinto(self, buffer: memoryview) -> None:
        position = 0
        for part in self.parts:
            part.readinto(buffer[position : position + part.nbytes])
            position += part.nbytes

    def chunks(self, chunk_size: int = CHUNK_SIZE) -> Iterator[memoryview]:
        for part in self.parts:
            yield from part.chunks(chunk_size)


def slice_source(source: ByteSource, offset: int, length: int) -> ByteSource:
    """``length`` bytes of ``source`` from ``offset``, without reading them."""
    if not 0 <= offset <= offset + length <= source.nbytes:
        raise ValueError(f"slice [{offset}, {offset + length}) outside a {source.nbytes}-byte source")
    if isinstance(source, FileRange):
        return FileRange(source.path, source.offset + offset, length, source.record)
    if isinstance(source, BufferSource):
        return BufferSource(source.buffer[offset : offset + length], source.owner)
    if isinstance(source, ConcatSource):
        parts: list[ByteSource] = []
        position = 0
        for part in source.parts:
            begin, end = max(offset, position), min(offset + length, position + part.nbytes)
            if begin < end:
                parts.append(slice_source(part, begin - position, end - begin))
            position += part.nbytes
        return ConcatSource(tuple(parts))
    return StreamSlice(source, offset, length)


@dataclass(frozen=True)
class StreamSlice:
    """A slice of a source that can only be streamed (a plugin's own source): read up to it."""

    source: ByteSource
    offset: int
    length: int

    @property
    def nbytes(self) -> int:
        return self.length

    def readinto(self, buffer: memoryview) -> None:
        fill_from_chunks(self, buffer)

    def chunks(self, chunk_size: int = CHUNK_SIZE) -> Iterator[memoryview]:
        position, end = 0, self.offset + self.length
        for chunk in self.source.chunks(chunk_size):
            begin, stop = max(self.offset, position), min(end, position + len(chunk))
            if begin < stop:
                yield memoryview(chunk)[begin - position : stop - position]
            position += len(chunk)
            if position >= end:
                return
