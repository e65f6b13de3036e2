"""Issue 16: a durable write has the kernel write its bytes back while later ones are copied
(``transfer.Writeback``, ``sync_file_range(2)``), so the final fsync finds little left to do.

Checked without timing: the bytes written are the same with and without it; it is started only
for durable writes, over every piece of the file in order with a bounded number in flight; its
errors are the destination's; where the platform has no ``sync_file_range`` (or the kernel
refuses it for a file) the write goes on without it.
"""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import builtin_suffixes

import converters
from converters.core import transfer
from converters.core.errors import DestinationError
from converters.core.sources import BufferSource, ConcatSource, FileRange

PIECE = 256 * 1024  # small pieces, so that a few MiB of tensors cross many piece boundaries
START, FINISH = 2, 1 | 2 | 4  # SYNC_FILE_RANGE_WRITE; WAIT_BEFORE | WRITE | WAIT_AFTER


class Recorder:
    """Stands in for libc's sync_file_range: records (fd, offset, nbytes, flags), calls the real
    one (so the test also runs the ctypes binding), or fails with ``fail`` at call ``at``."""

    def __init__(self, fail: int | None = None, at: int = 0, real: bool = True) -> None:
        self.calls: list[tuple[int, int, int, int]] = []
        self.fail, self.at, self.real = fail, at, real

    def __call__(self, fd: int, offset: int, nbytes: int, flags: int) -> None:
        self.calls.append((fd, offset, nbytes, flags))
        if self.fail is not None and len(self.calls) > self.at:
            raise OSError(self.fail, os.strerror(self.fail))
        if self.real:
            real_sync_file_range(fd, offset, nbytes, flags)


real_sync_file_range = transfer._sync_file_range


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    recorder = Recorder()
    monkeypatch.setattr(transfer, "_sync_file_range", recorder)
    monkeypatch.setattr(transfer, "WRITEBACK_PIECE", PIECE)
    return recorder


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A torch.save checkpoint (no stored digests: hashed while copied) with tensors above and
    below transfer.INLINE_COPY, about 5 MiB in all."""
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "big": torch.randn(640, 1024, generator=generator),  # 2.5 MiB, copied by the kernel
        "mid": torch.randn(300, 1000, generator=generator),  # 1.2 MB, copied by the kernel
        "bias": torch.randn(10, generator=generator),  # read and written inline
        "last": torch.randn(512, 512, generator=generator),  # 1 MiB
    }
    path = tmp_path_factory.mktemp("writeback") / "source.pt"
    torch.save(tensors, path)
    return path


def supported() -> bool:
    return transfer._libc_sync_file_range() is not None


needs_sync_file_range = pytest.mark.skipif(not supported(), reason="no sync_file_range on this platform")


def pieces(recorder: Recorder, flags: int) -> list[tuple[int, int]]:
    return [(offset, nbytes) for _, offset, nbytes, called in recorder.calls if called == flags]


@needs_sync_file_range
@pytest.mark.parametrize("suffix", builtin_suffixes())
def test_durable_write_is_written_back_piece_by_piece_and_bytes_do_not_change(
    tmp_path: Path, source: Path, recorder: Recorder, suffix: str
) -> None:
    fast = converters.convert(source, tmp_path / f"fast{suffix}", fsync=False)
    assert recorder.calls == [], "writeback with fsync=False: that mode is compared with plain cp"
    durable = converters.convert(source, tmp_path / f"durable{suffix}")
    assert durable.read_bytes() == fast.read_bytes()
    assert converters.verify(source, durable) == []
    started, finished = pieces(recorder, START), pieces(recorder, FINISH)
    size = durable.stat().st_size
    # Every whole piece of the file, in order from its start; the tail is left to the fsync.
    assert started == [(offset, PIECE) for offset in range(0, size - PIECE + 1, PIECE)]
    assert len(started) >= 15
    # Waited for in the same order, each after it was started, never more than lag + 1 in flight.
    assert finished == started[: len(finished)]
    assert len(started) - len(finished) == min(len(started), transfer.WRITEBACK_LAG)
    in_flight = 0
    for _, _, _, flags in recorder.calls:
        in_flight += 1 if flags == START else -1
        assert 0 <= in_flight <= transfer.WRITEBACK_LAG + 1
    assert len({fd for fd, *_ in recorder.calls}) == 1


@needs_sync_file_range
def test_each_output_of_a_group_is_written_back(tmp_path: Path, source: Path, recorder: Recorder) -> None:
    # ONNX with external data: the model and its .data file, published together; the tensors go
    # to the .data file, which is written back from its own start.
    converters.convert(source, tmp_path / "m.onnx", external_data=True)
    data = tmp_path / "m.onnx.data"
    assert data.exists()
    started = pieces(recorder, START)
    assert started == [(offset, PIECE) for offset in range(0, data.stat().st_size - PIECE + 1, PIECE)]
    fast = converters.convert(source, tmp_path / "f.onnx", external_data=True, fsync=False)
    assert data.read_bytes() == (tmp_path / "f.onnx.data").read_bytes()
    assert len(fast.read_bytes()) == len((tmp_path / "m.onnx").read_bytes())


def test_kernel_copies_stop_at_piece_boundaries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    payload = os.urandom(5 * PIECE + 12345)  # above transfer.INLINE_COPY
    (tmp_path / "src").write_bytes(payload)
    counts: list[int] = []
    real = os.copy_file_range

    def spy(src: int, dst: int, count: int, *args: Any) -> int:
        counts.append(count)
        return real(src, dst, count, *args)

    monkeypatch.setattr(os, "copy_file_range", spy)
    recorder = Recorder(real=False)
    monkeypatch.setattr(transfer, "_sync_file_range", recorder)
    monkeypatch.setattr(transfer, "_libc_sync_file_range", lambda: object())
    with open(tmp_path / "out", "wb") as out:
        transfer.start_writeback(out, str(tmp_path / "out"), piece=PIECE)
        out.write(b"H" * 1000)
        transfer.copy_into(out, FileRange(tmp_path / "src", 0, len(payload)))
        transfer.finish_writeback(out)
    assert (tmp_path / "out").read_bytes() == b"H" * 1000 + payload
    assert counts == [PIECE - 1000, PIECE, PIECE, PIECE, PIECE, 12345 + 1000]
    assert pieces(recorder, START) == [(index * PIECE, PIECE) for index in range(5)]


def test_small_ranges_and_headers_are_written_back_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    payload = os.urandom(PIECE // 2)  # below transfer.INLINE_COPY: read and written by Python
    (tmp_path / "src").write_bytes(payload)
    recorder = Recorder(real=False)
    monkeypatch.setattr(transfer, "_sync_file_range", recorder)
    monkeypatch.setattr(transfer, "_libc_sync_file_range", lambda: object())
    with open(tmp_path / "out", "wb") as out:
        transfer.start_writeback(out, piece=PIECE)
        for _ in range(5):
            out.write(b"header" * 1000)  # written by the format itself, handed over with the next copy
            transfer.copy_into(out, FileRange(tmp_path / "src", 0, len(payload)))
        transfer.finish_writeback(out)
        size = out.tell()
    assert pieces(recorder, START) == [(index * PIECE, PIECE) for index in range(size // PIECE)]


@pytest.mark.parametrize(
    "written",
    [
        [5 * PIECE],  # one write of several pieces
        [100, PIECE - 1, PIECE, PIECE + 1, 3 * PIECE - 1, 7 * PIECE + 9],  # grows bit by bit
        [2 * PIECE, PIECE, 2 * PIECE, 4 * PIECE],  # a header rewritten at the start in between
    ],
)
@pytest.mark.parametrize("lag", [1, 2, 3])
def test_writeback_covers_whole_pieces_once_in_order_with_bounded_lag(
    monkeypatch: pytest.MonkeyPatch, written: list[int], lag: int
) -> None:
    recorder = Recorder(real=False)
    monkeypatch.setattr(transfer, "_sync_file_range", recorder)
    writeback = transfer.Writeback(7, "f", piece=PIECE, lag=lag)
    for end in written:
        writeback.advance(end)
    writeback.close()
    whole = max(written) // PIECE
    started, finished = pieces(recorder, START), pieces(recorder, FINISH)
    assert started == [(index * PIECE, PIECE) for index in range(whole)]
    assert finished == started[: max(0, whole - lag)]
    assert len({fd for fd, *_ in recorder.calls}) == 1  # the thread's own copy of the descriptor


def test_an_error_of_the_last_wait_is_raised_by_close(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transfer, "_sync_file_range", Recorder(fail=errno.EIO, at=4, real=False))
    with open(tmp_path / "f", "wb") as out:
        writeback = transfer.Writeback(out.fileno(), "the name", piece=PIECE, lag=1)
        writeback.advance(3 * PIECE)  # start 0, start 1, wait 0, start 2, wait 1: the fifth call fails
        with pytest.raises(OSError) as caught:
            writeback.close()
    assert (caught.value.errno, caught.value.filename) == (errno.EIO, "the name")
    assert not writeback_threads()


def writeback_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "sdconvert-writeback"]


@needs_sync_file_range
def test_no_writeback_without_fsync_even_through_the_api(tmp_path: Path, source: Path, recorder: Recorder) -> None:
    converters.convert(source, tmp_path / "a.safetensors", fsync=False)
    converters.convert(tmp_path / "a.safetensors", tmp_path / "b.gguf", fsync=False)
    assert recorder.calls == []


@needs_sync_file_range
@pytest.mark.parametrize(
    ("code", "words"),
    [(errno.EIO, "cannot write it: Input/output error"), (errno.ENOSPC, "no space left on the device")],
)
@pytest.mark.parametrize("at", [0, 5])  # the first call (a start), the sixth (the first wait)
def test_writeback_errors_are_the_destinations(
    tmp_path: Path, source: Path, monkeypatch: pytest.MonkeyPatch, code: int, words: str, at: int
) -> None:
    monkeypatch.setattr(transfer, "_sync_file_range", Recorder(fail=code, at=at))
    monkeypatch.setattr(transfer, "WRITEBACK_PIECE", PIECE)
    target = tmp_path / "out.safetensors"
    with pytest.raises(DestinationError) as caught:
        converters.convert(source, target)
    assert caught.value.file == str(target)
    assert words in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "nothing published, no temporary file left"
    assert not writeback_threads(), "the failed write's thread was stopped"


@needs_sync_file_range
def test_an_error_of_the_very_last_writeback_call_is_raised_before_publishing(
    tmp_path: Path, source: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The last call happens in the thread after the writer's last advance: only the atomic output
    # waiting for the thread (finish_writeback) before its fsync can see it; the fsync would not.
    monkeypatch.setattr(transfer, "WRITEBACK_PIECE", PIECE)
    counting = Recorder()
    monkeypatch.setattr(transfer, "_sync_file_range", counting)
    converters.convert(source, tmp_path / "first.safetensors")
    monkeypatch.setattr(transfer, "_sync_file_range", Recorder(fail=errno.EIO, at=len(counting.calls) - 1))
    target = tmp_path / "out.safetensors"
    with pytest.raises(DestinationError, match="Input/output error"):
        converters.convert(source, target)
    assert not target.exists()


@pytest.mark.parametrize("code", [errno.ENOSYS, errno.EINVAL, errno.ESPIPE, errno.EOPNOTSUPP])
def test_a_kernel_that_refuses_writeback_for_a_file_only_loses_the_head_start(
    tmp_path: Path, source: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    recorder = Recorder(fail=code, real=False)
    monkeypatch.setattr(transfer, "_sync_file_range", recorder)
    monkeypatch.setattr(transfer, "_libc_sync_file_range", lambda: object())
    monkeypatch.setattr(transfer, "WRITEBACK_PIECE", PIECE)
    durable = converters.convert(source, tmp_path / "d.safetensors")
    assert len(recorder.calls) == 1, "asked once, then left to the fsync"
    assert durable.read_bytes() == converters.convert(source, tmp_path / "f.safetensors", fsync=False).read_bytes()


@needs_sync_file_range
def test_no_descriptor_left_for_the_thread_only_loses_the_head_start(
    tmp_path: Path, source: Path, recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_more(fd: int) -> int:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    monkeypatch.setattr(os, "dup", no_more)
    durable = converters.convert(source, tmp_path / "d.npz")
    assert recorder.calls == [] and not writeback_threads()
    assert durable.read_bytes() == converters.convert(source, tmp_path / "f.npz", fsync=False).read_bytes()


def test_a_platform_without_sync_file_range_still_writes(
    tmp_path: Path, source: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = Recorder(real=False)
    monkeypatch.setattr(transfer, "_sync_file_range", recorder)
    monkeypatch.setattr(transfer, "_libc_sync_file_range", lambda: None)
    monkeypatch.setattr(transfer, "WRITEBACK_PIECE", PIECE)
    durable = converters.convert(source, tmp_path / "d.gguf")
    assert recorder.calls == []
    assert durable.read_bytes() == converters.convert(source, tmp_path / "f.gguf", fsync=False).read_bytes()
    with pytest.raises(OSError) as caught:  # what Writeback would be told, were it asked
        real_sync_file_range(0, 0, 0, START)
    assert caught.value.errno == errno.ENOSYS


@needs_sync_file_range
def test_the_libc_binding_works_and_reports_errno(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(os.urandom(3 * PIECE))
    fd = os.open(path, os.O_RDWR)
    try:
        transfer._sync_file_range(fd, 0, PIECE, START)
        transfer._sync_file_range(fd, PIECE, 2 * PIECE, FINISH)
        with pytest.raises(OSError) as caught:
            transfer._sync_file_range(fd, 0, PIECE, 1 << 10)  # a flag that does not exist
        assert caught.value.errno == errno.EINVAL
    finally:
        os.close(fd)
    read, write = os.pipe()
    try:
        with pytest.raises(OSError) as caught:
            transfer._sync_file_range(write, 0, PIECE, START)
        assert caught.value.errno == errno.ESPIPE
    finally:
        os.close(read)
        os.close(write)


def test_only_regular_files_get_writeback(tmp_path: Path) -> None:
    import io

    memory = io.BytesIO()
    transfer.start_writeback(memory)  # no file descriptor: nothing to do
    read, write = os.pipe()
    with os.fdopen(write, "wb") as pipe:
        transfer.start_writeback(pipe)
        assert transfer._WRITEBACKS.get(pipe) is None
    os.close(read)
    with open(tmp_path / "f", "wb") as regular:
        transfer.start_writeback(regular)
        assert (transfer._WRITEBACKS.get(regular) is not None) == supported()
        payload = os.urandom(2 * 1024 * 1024)
        (tmp_path / "src").write_bytes(payload)
        source = ConcatSource((BufferSource.of(b"x" * 10), FileRange(tmp_path / "src", 0, len(payload))))
        transfer.copy_into(regular, source)
    assert (tmp_path / "f").read_bytes() == b"x" * 10 + payload
