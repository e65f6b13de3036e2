"""Writers are atomic: a failure leaves the old destination (or none) and no temporary file."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import builtin_suffixes

import converters
from converters.core.tree import Checkpoint, TensorRef


class FailingSource:
    """A byte source that breaks after its first chunk, like a disk error mid-conversion."""

    nbytes = 16

    def readinto(self, buffer: memoryview) -> None:
        raise OSError("simulated read error")

    def chunks(self, chunk_size: int = 0) -> Iterator[memoryview]:
        yield memoryview(b"\x00" * 8)
        raise OSError("simulated read error")


@pytest.mark.parametrize("suffix", builtin_suffixes())
def test_failed_write_keeps_the_old_destination_and_leaves_no_temp_file(tmp_path: Path, suffix: str) -> None:
    destination = tmp_path / f"out{suffix}"
    converters.save({"old": torch.ones(1)}, destination)
    before = destination.read_bytes()
    broken = Checkpoint({"w": TensorRef("float32", (4,), FailingSource())})
    with pytest.raises(OSError, match="simulated read error"):
        converters.write(broken, destination)
    assert destination.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [destination.name]


def test_convert_never_writes_over_its_source(tmp_path: Path) -> None:
    source = tmp_path / "same.pt"
    converters.save({"w": torch.ones(1)}, source)
    before = source.read_bytes()
    with pytest.raises(converters.DestinationError, match="the destination is the source file"):
        converters.convert(source, source)
    link = tmp_path / "link.pt"
    link.symlink_to(source)
    with pytest.raises(converters.DestinationError):
        converters.convert(source, link)
    assert source.read_bytes() == before


def test_output_files_get_ordinary_permissions(tmp_path: Path) -> None:
    destination = tmp_path / "perm.safetensors"
    converters.save({"w": torch.ones(1)}, destination)
    assert destination.stat().st_mode & 0o777 != 0o600


def test_a_failed_folder_replacement_puts_the_old_folder_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from converters.core import atomic

    destination = tmp_path / "out"
    destination.mkdir()
    (destination / "old.safetensors").write_bytes(b"old")
    real = atomic._rename_noreplace

    def interrupted(source: Path, target: Path, *, folder: bool = False) -> None:
        if Path(source).name.endswith(".partial"):  # the new folder, not the old one going back
            raise KeyboardInterrupt
        real(source, target, folder=folder)

    monkeypatch.setattr(atomic, "_rename_noreplace", interrupted)
    with pytest.raises(KeyboardInterrupt), atomic.atomic_folder(destination, lambda p: True) as staging:
        (staging / "new.safetensors").write_bytes(b"new")
    assert [p.name for p in destination.iterdir()] == ["old.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_errors_about_temporary_names_name_the_destination(tmp_path: Path) -> None:
    import errno
    import re

    from converters.core.atomic import atomic_folder, atomic_output

    destination = tmp_path / "out.bin"
    full = re.escape(f"{destination}: no space left on the device")
    with pytest.raises(converters.DestinationError, match=full) as caught, atomic_output(destination):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert caught.value.errno == errno.ENOSPC
    folder = tmp_path / "shards"
    too_large = re.escape(f"{folder}: file too large")
    with (
        pytest.raises(converters.DestinationError, match=too_large),
        atomic_folder(folder, lambda p: True) as staging,
        atomic_output(staging / "a.bin") as out,
    ):
        out.write(b"x")
        raise OSError(errno.EFBIG, "File too large")
    bad = "^" + re.escape(f"{folder}: bad bytes") + "$"
    with pytest.raises(converters.CorruptFileError, match=bad), atomic_folder(folder, lambda p: True) as staging:
        raise converters.CorruptFileError("bad bytes", file=staging / "a.bin")
    assert [p.name for p in tmp_path.iterdir()] == []
