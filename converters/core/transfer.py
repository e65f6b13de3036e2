"""Moving tensor bytes from their source into an output file, at the speed of ``cp``.

A byte range of a file is copied by the kernel (``os.copy_file_range``): Python never touches the
bytes. What must look at them — the zip CRC-32 of a ``.pt`` record, the BLAKE3 digest stored in
our files — reads the same range through ``mmap`` in a second thread while the kernel copies; both
release the GIL, so on two cores the digest costs little wall time. Buffers already in memory are
written and hashed directly. Memory stays flat: nothing is read whole.
"""

from __future__ import annotations

import mmap
import os
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

from .sources import ByteSource, ConcatSource, FileRange

try:  # ISA-L's CRC-32 is ~5x faster than zlib's; the result is the same number
    from isal.isal_zlib import crc32 as _crc32
except ImportError:  # pragma: no cover - isal ships wheels for every platform we test
    _crc32 = zlib.crc32

from blake3 import blake3 as _blake3

HASH_CHUNK = 64 * 1024 * 1024  # large enough that the hash functions release the GIL for long
COPY_CHUNK = 1 << 30

Progress = Callable[[int], None]


def new_digest(*, all_cores: bool = False) -> Any:
    return _blake3(max_threads=_blake3.AUTO) if all_cores else _blake3()


def blake3_hex(source: ByteSource) -> str:
    """The BLAKE3 digest of a source's bytes, using every core (nothing else runs meanwhile)."""
    digest = new_digest(all_cores=True)
    _feed(source, digest.update)
    return str(digest.hexdigest())


@dataclass
class Checks:
    """What to compute while copying: the zip CRC-32 and/or the BLAKE3 digest."""

    crc: int | None = None
    digest: Any = None

    @classmethod
    def make(cls, *, crc: bool = False, digest: bool = False) -> Checks:
        return cls(0 if crc else None, new_digest() if digest else None)

    @property
    def needed(self) -> bool:
        return self.crc is not None or self.digest is not None

    def update(self, data: memoryview | bytes) -> None:
        if self.crc is not None:
            self.crc = _crc32(data, self.crc)
        if self.digest is not None:
            self.digest.update(data)

    def hexdigest(self) -> str | None:
        return None if self.digest is None else str(self.digest.hexdigest())


def copy_into(
    out: BinaryIO, source: ByteSource, checks: Checks | None = None, progress: Progress | None = None
) -> None:
    """Append ``source``'s bytes to ``out`` (at its position), updating ``checks`` in order."""
    checks = checks or Checks()
    if isinstance(source, ConcatSource):
        for part in source.parts:
            copy_into(out, part, checks, progress)
        return
    if isinstance(source, FileRange) and source.length:
        _copy_file_range(out, source, checks, progress)
        return
    for chunk in source.chunks():
        out.write(chunk)
        checks.update(chunk)
        if progress:
            progress(len(chunk))


def _copy_file_range(out: BinaryIO, source: FileRange, checks: Checks, progress: Progress | None) -> None:
    out.flush()
    start = out.tell()
    worker: threading.Thread | None = None
    failure: list[BaseException] = []
    if checks.needed:

        def hash_range() -> None:
            try:
                _feed(source, checks.update)
            except BaseException as exc:  # re-raised in the caller's thread
                failure.append(exc)

        worker = threading.Thread(target=hash_range, name="sdconvert-hash")
        worker.start()
    try:
        with open(source.path, "rb", buffering=0) as handle:
            _kernel_copy(handle.fileno(), out.fileno(), source, start, progress)
    finally:
        if worker is not None:
            worker.join()
    if failure:
        raise failure[0]
    out.seek(start + source.length)


def _kernel_copy(src: int, dst: int, source: FileRange, start: int, progress: Progress | None) -> None:
    done = 0
    while done < source.length:
        count = min(COPY_CHUNK, source.length - done)
        try:
            copied = os.copy_file_range(src, dst, count, source.offset + done, start + done)
        except OSError:  # another filesystem, or a kernel without it: copy through a buffer
            copied = _buffered_copy(src, dst, count, source.offset + done, start + done)
        if copied == 0:
            source._check_complete(done)
        done += copied
        if progress:
            progress(copied)


def _buffered_copy(src: int, dst: int, count: int, src_offset: int, dst_offset: int) -> int:
    data = os.pread(src, min(count, 8 << 20), src_offset)
    written = 0
    while written < len(data):
        written += os.pwrite(dst, data[written:], dst_offset + written)
    return len(data)


def _feed(source: ByteSource, update: Callable[[memoryview], None]) -> None:
    """Pass ``source``'s bytes to ``update`` in large pieces, through mmap for file ranges."""
    if isinstance(source, ConcatSource):
        for part in source.parts:
            _feed(part, update)
        return
    if not isinstance(source, FileRange) or source.length == 0:
        for chunk in source.chunks():
            update(chunk)
        return
    base = source.offset - source.offset % mmap.ALLOCATIONGRANULARITY
    with open(source.path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if source.offset + source.length > size:
            source._check_complete(max(0, size - source.offset))
        with mmap.mmap(
            handle.fileno(), source.offset + source.length - base, access=mmap.ACCESS_READ, offset=base
        ) as mapped:
            view = memoryview(mapped)
            try:
                skip = source.offset - base
                for begin in range(0, source.length, HASH_CHUNK):
                    update(view[skip + begin : skip + min(begin + HASH_CHUNK, source.length)])
            finally:
                view.release()
