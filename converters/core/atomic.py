"""Atomic file output: write beside the destination, fsync, rename into place.

A reader of the destination sees either the old file, no file, or the complete new one; a writer
that fails removes its temporary file.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from .errors import DestinationError


@contextmanager
def atomic_output(destination: Path, *, fsync: bool = True, overwrite: bool = True) -> Iterator[BinaryIO]:
    """Yield a binary file that becomes ``destination`` only when the block completes.

    Example::

        with atomic_output(Path("out.bin")) as handle:
            handle.write(b"complete or nothing")
    """
    destination = Path(destination)
    folder = destination.parent if str(destination.parent) else Path(".")
    fd, temp_name = tempfile.mkstemp(prefix=f".{destination.name}.", suffix=".partial", dir=folder)
    temp_path = Path(temp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            if fsync:  # durable before it is visible; fsync=False trades that for speed
                os.fsync(handle.fileno())
        os.chmod(temp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give what open() would
        os.replace(temp_path, destination)
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise
    if fsync:
        _fsync_folder(folder)


@contextmanager
def atomic_folder(
    destination: Path, replaceable: Callable[[Path], bool], *, fsync: bool = True, overwrite: bool = True
) -> Iterator[Path]:
    """Yield an empty staging folder that becomes ``destination`` when the block completes.

    An existing destination is replaced only if ``replaceable`` (the format's word) accepts every
    entry in it, so a mistaken destination never deletes a user's folder.
    """
    destination = Path(destination)
    parent = destination.parent if str(destination.parent) else Path(".")
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".partial", dir=parent))
    try:
        yield staging
        if fsync:
            _fsync_folder(staging)
        if destination.exists():
            _require_replaceable(destination, replaceable)
            retired = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".old", dir=parent))
            os.rename(destination, retired / destination.name)
            os.rename(staging, destination)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.rename(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if fsync:
        _fsync_folder(parent)


def _require_replaceable(destination: Path, replaceable: Callable[[Path], bool]) -> None:
    if not destination.is_dir():
        raise DestinationError("exists and is not a folder; this checkpoint is written as a folder", file=destination)
    strangers = [p.name for p in destination.iterdir() if not replaceable(p)]
    if strangers:
        raise DestinationError(
            f"is a folder holding other files ({strangers[0]!r}); refusing to replace it", file=destination
        )


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def _fsync_folder(folder: Path) -> None:
    # The rename is durable only once the folder entry is on disk; not every platform allows it.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
