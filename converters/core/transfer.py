"""Moving tensor bytes from their source into an output file, at the speed of ``cp``.

A byte range of a file is copied by the kernel (``os.copy_file_range``): Python never touches the
bytes. What must look at them — the zip CRC-32 of a ``.pt`` record, the BLAKE3 digest stored in
our files — reads the same range into a reused buffer in a second thread while the kernel copies; both
release the GIL, so on two cores the digest costs little wall time. Buffers already in memory are
written and hashed directly. Memory stays flat: nothing is read whole.

A durable output (``start_writeback``: the atomic output does it when it will fsync) has the
kernel write its bytes to disk while later ones are still being copied (:class:`Writeback`), so
the final fsync finds little left to do: ``cp && sync`` copies everything first and only then
waits for the disk, we do both at once.
"""

from __future__ import annotations

import errno
import os
import queue
import stat
import sys
import threading
import weakref
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
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

# A durable output is written back in pieces of this size, by a thread that waits for the piece
# this many pieces behind the newest (and the copy waits when this many are queued for it): dirty
# pages stay bounded (about 9 x 32 MiB) and the disk stays busy. 16 MiB x 8 and 64 MiB x 2 measured
# the same on the bench machine; 256 MiB x 1 was slower (the disk idled between pieces).
WRITEBACK_PIECE = 32 * 1024 * 1024
WRITEBACK_LAG = 4

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
    """Append ``source``'s bytes to ``out`` (at its position), updating ``checks`` in order.

    When ``out`` is written back as it grows (``start_writeback``), everything below the new end
    of ``out`` — these bytes and whatever was written before them, headers included — is handed
    to the kernel's writeback here.
    """
    writeback = _WRITEBACKS.get(out)
    _copy(out, source, checks or Checks(), progress, writeback)
    if writeback is not None:
        writeback.advance(out.tell())


def _copy(
    out: BinaryIO, source: ByteSource, checks: Checks, progress: Progress | None, writeback: Writeback | None
) -> None:
    if isinstance(source, ConcatSource):
        for part in source.parts:
            _copy(out, part, checks, progress, writeback)
        return
    if isinstance(source, FileRange) and not _remote(source):  # a remote range streams by its chunks
        if 0 < source.length < INLINE_COPY:
            _copy_small(out, source, checks, progress)
            return
        if source.length:
            _copy_file_range(out, source, checks, progress, writeback)
            return
    with _closing_chunks(source) as chunks:
        for chunk in chunks:
            out.write(chunk)
            checks.update(chunk)
            if progress:
                progress(len(chunk))
            if writeback is not None:  # a large tensor made in memory (a cast) goes by in chunks
                writeback.advance(out.tell())


@contextmanager
def _closing_chunks(source: ByteSource) -> Iterator[Iterator[memoryview]]:
    """``source.chunks()``, closed on leaving: a stream stopped by an error gives back at once
    what it holds (a remote range's fetch slots), not whenever the traceback is collected."""
    chunks = source.chunks()
    try:
        yield chunks
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()


def _remote(source: FileRange) -> bool:
    """Whether the range is in a remote object (read by range requests, not the kernel)."""
    return type(source.path).__name__.startswith("RemotePath")  # no import of storage for local files


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


def _copy_file_range(
    out: BinaryIO, source: FileRange, checks: Checks, progress: Progress | None, writeback: Writeback | None = None
) -> None:
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
            _kernel_copy(handle.fileno(), out.fileno(), source, start, progress, writeback)
    finally:
        if worker is not None:
            worker.join()
    if failure:
        raise failure[0]
    out.seek(start + source.length)


def _kernel_copy(
    src: int, dst: int, source: FileRange, start: int, progress: Progress | None, writeback: Writeback | None = None
) -> None:
    done = 0
    while done < source.length:
        count = min(COPY_CHUNK, source.length - done)
        if writeback is not None and writeback.active:  # up to the end of a piece, then write it back
            count = min(count, writeback.piece - (start + done) % writeback.piece)
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
        if writeback is not None:
            writeback.advance(start + done)


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
    if not isinstance(source, FileRange) or source.length == 0 or _remote(source):
        with _closing_chunks(source) as chunks:
            for chunk in chunks:
                update(chunk)
        return
    buffer = _take_buffer()
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
        _BUFFERS.append(buffer)


# Buffers of HASH_CHUNK bytes for _feed, kept for the next range: each range is hashed in a new
# thread, and a buffer allocated and freed per range stayed resident in the malloc arena of the
# thread that freed it (peak RSS 30 to 49 MiB over runs of one conversion, by how many arenas the
# threads happened to use); a fresh anonymous mapping per range instead cost its page faults
# every time (hashing 1 GiB took twice as long). One buffer per range hashed at the same time.
_BUFFERS: list[memoryview] = []


def _take_buffer() -> memoryview:
    try:
        return _BUFFERS.pop()  # atomic: two threads never take the same one
    except IndexError:
        return memoryview(bytearray(HASH_CHUNK))


# ----------------------------------------------------------------------------------- writeback

_START = 2  # SYNC_FILE_RANGE_WRITE: start writing the range's dirty pages, do not wait
_FINISH = 1 | 2 | 4  # SYNC_FILE_RANGE_WAIT_BEFORE | WRITE | WAIT_AFTER: the range is written out
# sync_file_range(2) cannot work here (another OS, a file it does not apply to): the final fsync
# alone makes the file durable, as it always does. Any other error is the disk's and is raised.
_NO_WRITEBACK = frozenset({errno.ENOSYS, errno.EINVAL, errno.ESPIPE, errno.EOPNOTSUPP, errno.ENOTSUP})
_WRITEBACKS: weakref.WeakKeyDictionary[BinaryIO, Writeback] = weakref.WeakKeyDictionary()


def start_writeback(out: BinaryIO, name: str | None = None, *, piece: int | None = None) -> None:
    """Have the bytes that ``copy_into`` puts in ``out`` written to disk while it goes on.

    For an output that will be fsynced (the atomic output does this when asked to fsync): the
    fsync is still what makes it durable, it just finds little left to do. Call
    ``finish_writeback`` before that fsync (it raises what went wrong). ``name`` (the file's path)
    is given to the ``OSError`` a failed writeback raises, so that it is reported as an error of
    the destination. Nothing happens where ``out`` is not a regular file or the platform has no
    ``sync_file_range``. ``piece``: see :class:`Writeback` (default ``WRITEBACK_PIECE``).

    Example::

        with open("out.bin", "wb") as out:
            start_writeback(out, "out.bin")
            copy_into(out, FileRange(Path("in.bin"), 0, size))
            out.flush()
            finish_writeback(out)
            os.fsync(out.fileno())  # little left to write
    """
    try:
        fd = out.fileno()
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both of the last two
        return
    if regular and _libc_sync_file_range() is not None:
        writeback = Writeback(fd, name, piece=piece or WRITEBACK_PIECE, lag=WRITEBACK_LAG)
        _WRITEBACKS[out] = writeback
        weakref.finalize(out, writeback.stop)  # a writer that never finished: stop its thread


def finish_writeback(out: BinaryIO) -> None:
    """Wait until ``out``'s writeback thread is done, and raise the first error it met (an
    ``OSError`` naming the file). Before fsyncing ``out``: a write error that the writeback saw
    is not reported again by the fsync. Nothing to do for a file not written back."""
    writeback = _WRITEBACKS.pop(out, None)
    if writeback is not None:
        writeback.close()


def stop_writeback(out: BinaryIO) -> None:
    """Stop ``out``'s writeback thread, if any, without a word (the write failed already)."""
    writeback = _WRITEBACKS.pop(out, None)
    if writeback is not None:
        writeback.stop()


class Writeback:
    """Writes a file's bytes back to disk in fixed pieces, in a thread, while the writer goes on.

    The writer (``advance``) hands over each piece once it is complete; the thread starts its
    writeback (``sync_file_range(2)``) and then waits for the piece ``lag`` pieces back, so the
    disk is kept busy; the writer waits when ``lag`` more pieces are queued, so dirty pages stay
    bounded (about ``(2 * lag + 1) * piece``). In a thread because starting writeback is work —
    the filesystem allocates blocks and builds the requests — that would otherwise stop the copy.
    It is no substitute for the final fsync, which also writes the file's metadata and flushes
    the disk's cache: the fsync just finds at most the last pieces and the tail left to write.

    Errors are raised, never swallowed (by ``advance`` and ``close``): waiting on a range clears
    the write error the kernel recorded for this open file, so the fsync after it would not
    report it again.
    """

    def __init__(
        self, fd: int, name: str | None = None, *, piece: int = WRITEBACK_PIECE, lag: int = WRITEBACK_LAG
    ) -> None:
        if piece <= 0 or lag <= 0:
            raise ValueError(f"piece and lag must be positive, got {piece} and {lag}")
        self.fd, self.name, self.piece, self.lag = fd, name, piece, lag
        self.active = True  # False once the kernel said it cannot do it for this file, or once stopped
        self.started = 0  # bytes [0, started) were handed to the thread
        self._pieces: queue.Queue[int | None] = queue.Queue(maxsize=lag)  # offsets; None: stop
        self._thread: threading.Thread | None = None
        self._failure: Exception | None = None  # the thread's first error; it then only drains the queue

    def advance(self, end: int) -> None:
        """The file's bytes up to ``end`` were written: write back every whole piece below it."""
        self._raise_failure()
        while self.active and end - self.started >= self.piece:
            if self._thread is None and not self._start_thread():
                return
            self._pieces.put(self.started)  # waits while `lag` pieces are queued
            self.started += self.piece

    def _start_thread(self) -> bool:
        """Start the thread; where it cannot be (no descriptor or thread left), the fsync alone will do."""
        try:
            fd = os.dup(self.fd)  # its own: the thread never acts on a number the writer closed and reused
        except OSError:
            self.active = False
            return False
        thread = threading.Thread(target=self._run, args=(fd,), name="sdconvert-writeback", daemon=True)
        try:
            thread.start()
        except RuntimeError:
            os.close(fd)
            self.active = False
            return False
        self._thread = thread
        return True

    def close(self) -> None:
        """Stop the thread once it has handed every queued piece to the kernel; raise its error."""
        self.stop()
        self._raise_failure()

    def stop(self) -> None:
        """Stop the thread once it has handed every queued piece to the kernel."""
        thread, self._thread = self._thread, None
        if thread is threading.current_thread():  # a finalizer run by the garbage collector there
            with suppress(queue.Full):
                self._pieces.put_nowait(None)
        elif thread is not None:
            self._pieces.put(None)
            thread.join()
        self.active = False  # nothing more is handed over

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    def _run(self, fd: int) -> None:
        in_flight: deque[int] = deque()  # pieces started and not yet waited for
        try:
            while (offset := self._pieces.get()) is not None:
                if not self.active or self._failure is not None:
                    continue  # taken from the queue all the same, so that the writer never waits in vain
                try:
                    self._call(fd, offset, _START)
                    in_flight.append(offset)
                    if len(in_flight) > self.lag:
                        self._call(fd, in_flight.popleft(), _FINISH)
                except Exception as exc:  # raised in the writer's thread (advance, close)
                    self._failure = exc
        finally:
            os.close(fd)

    def _call(self, fd: int, offset: int, flags: int) -> None:
        try:
            _sync_file_range(fd, offset, self.piece, flags)
        except OSError as exc:
            if exc.errno not in _NO_WRITEBACK:
                raise OSError(exc.errno, exc.strerror, self.name) from exc
            self.active = False


def _sync_file_range(fd: int, offset: int, nbytes: int, flags: int) -> None:
    """libc's ``sync_file_range``; an ``OSError`` when it fails (ENOSYS where there is none)."""
    function = _libc_sync_file_range()
    if function is None:
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))
    if function(fd, offset, nbytes, flags) != 0:
        import ctypes

        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


_SYNC_FILE_RANGE: list[Any] = []


def _libc_sync_file_range() -> Any:
    """libc's ``sync_file_range`` (Linux only; ``os`` has no binding), or None where there is none."""
    if not _SYNC_FILE_RANGE:
        function = None
        if sys.platform.startswith("linux"):
            try:
                import ctypes

                function = ctypes.CDLL(None, use_errno=True).sync_file_range
                function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
                function.restype = ctypes.c_int
            except (OSError, AttributeError):
                function = None
        _SYNC_FILE_RANGE.append(function)
    return _SYNC_FILE_RANGE[0]
