"""Moving tensor bytes from their source into an output file, at the speed of ``cp``.

A byte range of a file is copied by the kernel (``os.copy_file_range``): Python never touches the
bytes. What must look at them — the zip CRC-32 of a ``.pt`` record, the BLAKE3 digest stored in
our files — reads the same range into a reused buffer in a second thread while the kernel copies; both
release the GIL, so on two cores the digest costs little wall time. Buffers already in memory are
written and hashed directly. Memory stays flat: nothing is read whole.
"""

from __future__ import annotations

import errno
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

HASH_CHUNK = 8 * 1024 * 1024  # large enough that hashing releases the GIL for long; small enough to stay cached
COPY_CHUNK = 1 << 30
INLINE_COPY = 1 << 20  # ranges smaller than this are read and written by Python (see _copy_small)

Progress = Callable[[int], None]
# copy_file_range cannot do this copy (but a plain read/write can): anything else is a real error.
_NO_KERNEL_COPY = frozenset({errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF, errno.ETXTBSY})


def new_digest(*, all_cores: bool = False) -> Any:
    return _blake3(max_threads=_blake3.AUTO) if all_cores else _blake3()


def blake3_hex(source: ByteSource) -> str:
    """The BLAKE3 digest of a source's bytes, using every core (nothing else runs meanwhile)."""
    digest = new_digest(all_cores=True)
    _feed(source, digest.update)
    return str(digest.hexdigest())


def crc32_of(source: ByteSource) -> int:
    """The zip CRC-32 of a source's bytes."""
    checks = Checks.make(crc=True)
    _feed(source, checks.update)
    return checks.crc or 0


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
    if isinstance(source, FileRange) and 0 < source.length < INLINE_COPY:
        _copy_small(out, source, checks, progress)
        return
    if isinstance(source, FileRange) and source.length:
        _copy_file_range(out, source, checks, progress)
        return
    for chunk in source.chunks():
        out.write(chunk)
        checks.update(chunk)
        if progress:
            progress(len(chunk))


def _copy_small(out: BinaryIO, source: FileRange, checks: Checks, progress: Progress | None) -> None:
    """A small range read once and written: a hashing thread and a kernel copy per tensor would
    cost more than the bytes (a checkpoint of many tiny tensors spent most of its time there)."""
    fd = os.open(source.path, os.O_RDONLY)
    try:
        data = os.pread(fd, source.length, source.offset)
    finally:
        os.close(fd)
    if len(data) != source.length:
        source._check_complete(len(data))
    out.write(data)
    checks.update(data)
    if progress:
        progress(len(data))


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
        except OSError as exc:
            if exc.errno not in _NO_KERNEL_COPY:  # a full disk, a file too large, an I/O error: report it
                raise
            # another filesystem, or a kernel without it: copy through a buffer
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
    """Pass ``source``'s bytes to ``update`` in pieces read into one reused buffer.

    Not through ``mmap``: mapped pages count in the process's memory for as long as the mapping
    lives (a 1 GiB tensor hashed through one mapping peaked at 1 GiB RSS), and a source truncated
    while mapped kills the process with SIGBUS instead of giving an error. A read that comes up
    short is reported as a truncated file.
    """
    if isinstance(source, ConcatSource):
        for part in source.parts:
            _feed(part, update)
        return
    if not isinstance(source, FileRange) or source.length == 0:
        for chunk in source.chunks():
            update(chunk)
        return
    buffer = memoryview(bytearray(min(HASH_CHUNK, source.length)))
    fd = os.open(source.path, os.O_RDONLY)
    try:
        done = 0
        while done < source.length:
            count = os.preadv(fd, [buffer[: min(len(buffer), source.length - done)]], source.offset + done)
            if count == 0:
                source._check_complete(done)
            update(buffer[:count])
            done += count
    finally:
        os.close(fd)
        buffer.release()
