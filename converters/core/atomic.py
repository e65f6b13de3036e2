"""Atomic file output: write beside the destination, fsync, publish in one step.

A reader of the destination sees either the old file, no file, or the complete new one; a writer
that fails (or is interrupted: any exception, ``KeyboardInterrupt`` and the CLI's SIGTERM/SIGHUP
included) removes its temporary file or staging folder.

Publishing:

- ``overwrite=True``: ``rename(2)`` over whatever is there. The new file keeps the permission bits
  of the regular file it replaces (as ``cp`` onto an existing file does); a new file gets
  ``0o666 & ~umask`` and a new folder ``0o777 & ~umask`` (as ``open``/``mkdir`` would).
- ``overwrite=False``: an existing destination is refused, and one that appears while we write is
  never replaced: the file is published with a no-replace primitive, ``renameat2(RENAME_NOREPLACE)``
  (Linux ≥ 3.15 on ext4, xfs, btrfs, tmpfs, ...), else ``link(2)`` + ``unlink(2)`` (``link`` fails
  with ``EEXIST`` atomically), else — only on a filesystem that has neither — a check just before
  ``rename(2)``, racy for microseconds. Any directory entry counts as existing, a dangling symlink
  included.

Errors name the destination, never the temporary file: a full disk (``ENOSPC``, ``EDQUOT``), a
file too large (``EFBIG``), a missing or unwritable destination folder.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, BinaryIO

from .errors import ConverterError, DestinationError
from .parallel import Group, from_rank_0, gather, stop_if_asked

EXISTS = "exists; pass --force (overwrite=True) to replace it"
APPEARED = "appeared while it was being written and was not replaced; pass --force (overwrite=True) to replace it"
FULL = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for its filesystem (or the process's file size limit)",
}
# link(2) and renameat2(2) errors that mean "not supported here", not "refused".
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM, errno.EXDEV, errno.EMLINK}


@contextmanager
def atomic_output(destination: Path, *, fsync: bool = True, overwrite: bool = True) -> Iterator[BinaryIO]:
    """Yield a binary file that becomes ``destination`` only when the block completes.

    Example::

        with atomic_output(Path("out.bin")) as handle:
            handle.write(b"complete or nothing")
    """
    with atomic_outputs([Path(destination)], fsync=fsync, overwrite=overwrite) as (handle,):
        yield handle


@contextmanager
def atomic_outputs(
    destinations: Sequence[Path], *, fsync: bool = True, overwrite: bool = True
) -> Iterator[list[BinaryIO]]:
    """Yield one binary file per destination; they become the destinations together, or not at all.

    For a file and its companion (an ONNX model and its ``.data``), published in the order given.
    An existing destination is first hard-linked aside (``.NAME.XXXX.old.partial``); if anything
    fails or interrupts the publishing (any exception, between any two steps), each destination
    that already holds a new file gets its old file (or its absence) back. What no process can
    undo — a power loss or SIGKILL between two renames — leaves the first destinations new and the
    rest old, with the set-aside old files beside them (see ``schemas/onnx.md``).
    """
    targets = [Path(d) for d in destinations]
    if not overwrite:
        for target in targets:
            if os.path.lexists(target):
                raise DestinationError(EXISTS, file=target)
    from .transfer import finish_writeback, start_writeback, stop_writeback  # with the hashing libraries: writes only

    temps: list[Path] = []
    handles: list[BinaryIO] = []
    stop_if_asked()  # a file of a folder whose other files failed (or Ctrl-C): no new file
    try:
        for target in targets:
            temp, handle = _temp_file(target)
            temps.append(temp)
            handles.append(handle)
            if fsync:  # the disk writes while the file is written, so its fsync has little left to do
                start_writeback(handle, str(temp))
        try:
            yield handles
        except OSError as exc:
            translated = _translate(exc, _being_written(targets, handles), temps)
            if translated is not None:
                raise translated from exc
            raise
        ours: dict[Path, tuple[int, int]] = {}
        for target, temp, handle in zip(targets, temps, handles, strict=True):
            with _naming(target, [temp]):
                handle.flush()
                if fsync:  # durable before it is visible; fsync=False trades that for speed
                    finish_writeback(handle)  # first: an error it saw, the fsync would not report
                    os.fsync(handle.fileno())
                os.fchmod(handle.fileno(), _mode_for(target, overwrite, folder=False))
                info = os.fstat(handle.fileno())
                ours[target] = (info.st_dev, info.st_ino)
                handle.close()
        # A worker thread whose folder was given up while it wrote (its staging folder may be
        # being deleted) must not put a file back into it.
        stop_if_asked()
        _publish(list(zip(temps, targets, strict=True)), ours, overwrite)
    except BaseException:
        for handle in handles:
            stop_writeback(handle)
            with suppress(OSError):
                handle.close()
        for temp in temps:
            _unlink_quietly(temp)  # gone already where it was renamed into place
        raise
    if fsync:
        for folder in dict.fromkeys(_parent(target) for target in targets):
            _fsync_folder(folder)


def _being_written(targets: list[Path], handles: list[BinaryIO]) -> Path:
    """The destination a write error is about: the last one whose file has bytes (files are written
    one after another), else the first."""
    for target, handle in reversed(list(zip(targets, handles, strict=True))):
        try:
            if handle.tell() or os.fstat(handle.fileno()).st_size:
                return target
        except (OSError, ValueError):
            continue
    return targets[0]


@contextmanager
def atomic_folder(
    destination: Path,
    replaceable: Callable[[Path], bool],
    *,
    fsync: bool = True,
    overwrite: bool = True,
    group: Group | None = None,
) -> Iterator[Path]:
    """Yield an empty staging folder that becomes ``destination`` when the block completes.

    An existing destination is replaced only with ``overwrite`` and only if ``replaceable`` (the
    format's word) accepts every entry in it, so a mistaken destination never deletes a user's
    folder. Without ``overwrite`` a destination that appears meanwhile (even an empty folder,
    which ``rename(2)`` would silently replace) is kept and the write refused.

    With a ``group`` (the ranks of a distributed job, on a filesystem they share), every rank is
    given the one staging folder rank 0 made; the folder is published by rank 0 once every rank's
    block completed, and only if all did; every rank then returns, or raises, together.
    """
    destination = Path(destination)
    if group is not None and group.size > 1:
        with _group_folder(destination, replaceable, fsync, overwrite, group) as staging:
            yield staging
        return
    staging = _make_staging(destination, overwrite)
    try:
        with _reported_as(destination, staging):
            yield staging
        _publish_folder(staging, destination, replaceable, fsync, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if fsync:
        _fsync_folder(_parent(destination))


@contextmanager
def _group_folder(
    destination: Path, replaceable: Callable[[Path], bool], fsync: bool, overwrite: bool, group: Group
) -> Iterator[Path]:
    # Every rank takes part in every step below whatever fails where (a rank that skipped one
    # would leave the others waiting), and the steps are checked to pair up (core.parallel).
    # What no step can cover — a rank killed, or one that failed before writing and left
    # (converters.distributed exits at once then) — breaks the group's connections: the others'
    # steps raise, and every rank removes the staging folder on its way out.
    staging: Path | None = None
    try:
        if group.rank == 0:
            try:
                staging = _make_staging(destination, overwrite)
            except ConverterError as exc:
                from_rank_0(group, "staging", ("failed", _one_line(exc)))
                raise
            from_rank_0(group, "staging", ("made", str(staging)))
        else:
            status, text = from_rank_0(group, "staging", None)
            if status != "made":
                raise ConverterError(f"rank 0 could not start the folder: {text}")
            staging = Path(text)
        failure: BaseException | None = None
        try:
            with _reported_as(destination, staging):
                yield staging
        except BaseException as exc:  # told to the other ranks first, then raised
            failure = exc
        reports = gather(group, "written", None if failure is None else _one_line(failure))
        failed = next(((rank, text) for rank, text in enumerate(reports) if text is not None), None)
        outcome: str | None = None
        if group.rank == 0:
            try:
                if failed is None:
                    _publish_folder(staging, destination, replaceable, fsync, overwrite)
                    staging = None  # it is the destination now
            except BaseException as exc:
                failure, outcome = exc, _one_line(exc)
            from_rank_0(group, "published", outcome)
        else:
            outcome = from_rank_0(group, "published", None)
            if failed is None and outcome is None:
                staging = None  # published by rank 0
        if failure is not None:
            raise failure
        if failed is not None:
            raise ConverterError(f"rank {failed[0]} of {group.size} failed: {failed[1]}", file=destination)
        if outcome is not None:
            raise ConverterError(f"rank 0 could not publish the folder: {outcome}", file=destination)
    finally:
        if staging is not None:  # not published: whatever any rank wrote goes
            shutil.rmtree(staging, ignore_errors=True)
    if fsync and group.rank == 0:
        _fsync_folder(_parent(destination))


def _one_line(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, ConverterError) else f"{type(exc).__name__}: {exc}"


def _make_staging(destination: Path, overwrite: bool) -> Path:
    if not overwrite and os.path.lexists(destination):
        raise DestinationError(EXISTS, file=destination)
    import tempfile  # imported by writes only: reading never needs it (nor the random it imports)

    with _naming(destination, creating=True):
        return Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".partial", dir=_parent(destination)))


@contextmanager
def _reported_as(destination: Path, staging: Path) -> Iterator[None]:
    """An error about a file in the staging folder names the destination instead."""
    try:
        yield
    except ConverterError as exc:
        if exc.file is not None and _inside(exc.file, staging):
            raise exc.naming(destination) from exc
        raise
    except OSError as exc:
        translated = _translate(exc, destination, [staging])
        if translated is not None:
            raise translated from exc
        raise


def _publish_folder(
    staging: Path, destination: Path, replaceable: Callable[[Path], bool], fsync: bool, overwrite: bool
) -> None:
    with _naming(destination, [staging]):
        if fsync:
            _fsync_folder(staging)
        os.chmod(staging, _mode_for(destination, overwrite, folder=True))
        if overwrite and os.path.lexists(destination):
            _replace_folder(staging, destination, replaceable)
        else:
            try:
                _rename_noreplace(staging, destination, folder=True)
            except FileExistsError:
                if not overwrite:
                    raise DestinationError(APPEARED, file=destination) from None
                _replace_folder(staging, destination, replaceable)


def _replace_folder(staging: Path, destination: Path, replaceable: Callable[[Path], bool]) -> None:
    """Move the old folder aside, put the new one in its place, then delete the old one. If that
    fails or is interrupted, the old folder goes back; if it cannot (something took its place), it
    is kept under its ``.old.partial`` name, never deleted."""
    import tempfile

    _require_replaceable(destination, replaceable)
    retired = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".old.partial", dir=_parent(destination)))
    old = retired / destination.name
    try:
        os.rename(destination, old)
        _rename_noreplace(staging, destination, folder=True)
    except BaseException:
        if os.path.lexists(old):
            with suppress(OSError):
                _rename_noreplace(old, destination, folder=True)
        if not os.path.lexists(old):
            shutil.rmtree(retired, ignore_errors=True)
        raise
    shutil.rmtree(retired, ignore_errors=True)


def _require_replaceable(destination: Path, replaceable: Callable[[Path], bool]) -> None:
    if not stat.S_ISDIR(os.lstat(destination).st_mode):
        raise DestinationError("exists and is not a folder; this checkpoint is written as a folder", file=destination)
    strangers = [p.name for p in destination.iterdir() if not replaceable(p)]
    if strangers:
        raise DestinationError(
            f"is a folder holding other files ({strangers[0]!r}); refusing to replace it", file=destination
        )


# ----------------------------------------------------------------------------------- publishing


def _publish(pairs: list[tuple[Path, Path]], ours: dict[Path, tuple[int, int]], overwrite: bool) -> None:
    """Rename each temporary file onto its destination; on any exception, undo what was done.

    Undoing never trusts bookkeeping that an interruption could have skipped: a destination is
    ours exactly when its inode is the one we wrote (``ours``), and only then is it put back.
    """
    if len(pairs) == 1 and overwrite:  # one rename: nothing to undo, no need to set the old file aside
        temp, target = pairs[0]
        with _naming(target, [temp]):
            os.replace(temp, target)
        return
    set_aside: dict[Path, Path] = {}
    try:
        for temp, target in pairs:
            with _naming(target, [temp]):
                if not overwrite:
                    try:
                        _rename_noreplace(temp, target)
                    except FileExistsError:
                        raise DestinationError(APPEARED, file=target) from None
                    continue
                if os.path.lexists(target):
                    set_aside[target] = _set_aside(target)
                os.replace(temp, target)
    except BaseException:
        for _, target in reversed(pairs):
            if _identity(target) == ours[target]:
                old = set_aside.get(target)
                if old is not None:
                    os.replace(old, target)
                else:
                    os.unlink(target)
        raise
    finally:
        for old in set_aside.values():
            _unlink_quietly(old)


def _set_aside(target: Path) -> Path:
    """A second name for the file at ``target`` (a hard link, so ``target`` never disappears), to
    put it back if the group cannot be completed. Without hard links, the file is moved aside."""
    while True:
        aside = target.with_name(f".{target.name}.{os.urandom(4).hex()}.old.partial")
        try:
            os.link(target, aside, follow_symlinks=False)
            return aside
        except FileExistsError:
            continue
        except OSError as exc:
            if exc.errno not in _UNSUPPORTED:
                raise
        os.rename(target, aside)
        return aside


def _rename_noreplace(source: Path, target: Path, *, folder: bool = False) -> None:
    """Give ``source`` the name ``target`` unless ``target`` exists; ``FileExistsError`` if it does."""
    renameat2 = _renameat2()
    if renameat2 is not None:
        if renameat2(-100, os.fsencode(source), -100, os.fsencode(target), 1) == 0:  # AT_FDCWD, RENAME_NOREPLACE
            return
        code = _errno()
        if code == errno.EEXIST:
            raise FileExistsError(code, os.strerror(code), str(target))
        if code not in _UNSUPPORTED:
            raise OSError(code, os.strerror(code), str(source), None, str(target))
    if not folder:
        try:
            os.link(source, target, follow_symlinks=False)
        except FileExistsError:
            raise
        except OSError as exc:
            if exc.errno not in _UNSUPPORTED:
                raise
        else:
            os.unlink(source)
            return
    # Neither primitive on this filesystem: the best left is to look just before renaming.
    if os.path.lexists(target):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target))
    os.rename(source, target)


_RENAMEAT2: list[Any] = []


def _renameat2() -> Any:
    """libc's ``renameat2``, or None where there is none (not Linux, old glibc, musl before 1.2.?)."""
    if not _RENAMEAT2:
        function = None
        if sys.platform.startswith("linux"):
            try:
                import ctypes

                libc = ctypes.CDLL(None, use_errno=True)
                function = libc.renameat2
                function.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
                function.restype = ctypes.c_int
            except (OSError, AttributeError):
                function = None
        _RENAMEAT2.append(function)
    return _RENAMEAT2[0]


def _errno() -> int:
    import ctypes

    return ctypes.get_errno()


# ----------------------------------------------------------------------------------- helpers


def _temp_file(target: Path) -> tuple[Path, BinaryIO]:
    import tempfile

    with _naming(target, creating=True):
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=_parent(target))
    return Path(name), os.fdopen(fd, "wb")


@contextmanager
def _naming(destination: Path, temps: Sequence[Path] = (), *, creating: bool = False) -> Iterator[None]:
    """Report an ``OSError`` about the temporary file or the destination folder as one about the
    destination (its folder when it is missing or unwritable)."""
    try:
        yield
    except OSError as exc:
        translated = _translate(exc, destination, temps, creating=creating)
        if translated is not None:
            raise translated from exc
        raise


def _translate(
    exc: OSError, destination: Path, temps: Sequence[Path] = (), *, creating: bool = False
) -> DestinationError | None:
    code = exc.errno
    if code in FULL:
        error = DestinationError(f"{FULL[code]} (while writing it)", file=destination)
        error.errno = code
        return error
    if creating:
        folder = _parent(destination)
        if code == errno.ENOENT:
            return DestinationError(f"no such folder: {folder}", file=destination)
        if code == errno.ENOTDIR:
            return DestinationError(f"not a folder: {folder}", file=destination)
        return DestinationError(f"cannot create a file in {folder}: {exc.strerror or exc}", file=destination)
    names = [name for name in (exc.filename, exc.filename2) if name is not None]
    if any(_inside(os.fsdecode(name), temp) for name in names for temp in temps):
        return DestinationError(f"cannot write it: {exc.strerror or exc}", file=destination)
    if any(os.fsdecode(name) == str(destination) for name in names):
        return DestinationError(f"cannot write it: {exc.strerror or exc}", file=destination)
    return None


def _inside(name: str | os.PathLike[str], folder: Path) -> bool:
    path = Path(name)
    return path == folder or folder in path.parents


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        info = os.lstat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def _mode_for(destination: Path, overwrite: bool, *, folder: bool) -> int:
    """The permission bits of the replaced file/folder when overwriting one, else what umask gives."""
    if overwrite:
        try:
            info = os.lstat(destination)
        except OSError:
            info = None
        if info is not None and (stat.S_ISDIR(info.st_mode) if folder else stat.S_ISREG(info.st_mode)):
            return stat.S_IMODE(info.st_mode) & 0o777
    return (0o777 if folder else 0o666) & ~_umask()


def _umask() -> int:
    """The process's umask, read without changing it where the kernel says it (Linux ≥ 4.7): setting
    it to read it would give files created meanwhile by other threads the wrong mode."""
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    current = os.umask(0o022)
    os.umask(current)
    return current


def _parent(destination: Path) -> Path:
    return destination.parent if str(destination.parent) else Path(".")


def _unlink_quietly(path: Path) -> None:
    with suppress(OSError):
        os.unlink(path)


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
