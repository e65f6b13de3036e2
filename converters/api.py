"""The library API: reader → transforms → writer, and the verbs built on it.

``read``/``write``/``convert``/``verify``/``manifest`` never import torch; ``load``/``save`` do,
because they hand out or take torch objects. Nothing here names a format: what is format-specific
is declared by the format (``converters.core.contract``) and looked up in the registry.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .core import compare, integrity, manifests
from .core.budget import Budget
from .core.contract import Format, WriteContext, make_options
from .core.errors import ConverterError, CorruptFileError, DestinationError, PathLike, UnsupportedValueError
from .core.registry import registry

__all__ = ["convert", "load", "manifest", "read", "registry", "save", "verify", "write"]
from .core.tree import Checkpoint, validate
from .transforms import Select, Transform, apply

# Importing the package registers the built-in formats.
from . import formats  # noqa: F401  isort: skip


def read(path: PathLike, format: str | None = None, *, transforms: Iterable[Transform] = ()) -> Checkpoint:
    """The checkpoint stored at ``path`` as a neutral tree (tensors are not loaded).

    Whatever chose the format (``format``, the suffix or the contents), the contents are checked
    against it first; the tree the reader returns is validated whatever reader produced it.

    Example::

        ckpt = read("checkpoint.safetensors")
        [path for path, _ in ckpt.tensors()][:1]
        # [('model_state_dict', 'conv1.weight')]
    """
    source = Path(path)
    if not source.exists():
        raise ConverterError("no such file", file=source)
    fmt = registry.resolve(source, format)
    if format is None:
        registry.check_contents(source, fmt)
    checkpoint = fmt.read(source, Budget.for_path(source))
    validate(checkpoint.tree, file=source)
    checkpoint = Checkpoint(checkpoint.tree, checkpoint.origin or source, fmt.name, checkpoint.tree_digest)
    return apply(checkpoint, transforms)


def stored_size(path: PathLike) -> int:
    """Bytes on disk: the file's, or for a folder (sharded checkpoint) all its files'."""
    source = Path(path)
    if source.is_dir():
        return sum(p.stat().st_size for p in source.iterdir() if p.is_file())
    return source.stat().st_size


def write(
    checkpoint: Checkpoint,
    path: PathLike,
    format: str | None = None,
    *,
    progress: Callable[[int], None] | None = None,
    fsync: bool = True,
    check: bool = False,
    **options: Any,
) -> None:
    """Write a neutral tree to ``path`` (atomically) in ``format`` or the one its suffix names.

    ``options`` are the format's write options (``sdconvert formats`` lists them); ``progress(n)``
    is told as ``n`` more tensor bytes are written; ``check`` re-hashes tensors that carry a stored
    digest and refuses bytes that do not match it.
    """
    destination = Path(path)
    fmt = registry.resolve(destination, format, for_write=True)
    _write(fmt, checkpoint, destination, WriteContext(progress, fsync, check), options)


def _write(
    fmt: Format, checkpoint: Checkpoint, destination: Path, context: WriteContext, options: dict[str, Any]
) -> None:
    built = make_options(fmt, options)
    for tensor_path, ref in checkpoint.tensors():
        if ref.dtype not in fmt.dtype_codes:
            raise UnsupportedValueError(
                f"{fmt.name} cannot hold dtype {ref.dtype}; formats that can: see `sdconvert formats`",
                path=tensor_path,
            )
    fmt.write(checkpoint, destination, context, built)


def load(path: PathLike, format: str | None = None, *, mmap: bool = False, check: bool = False) -> Any:
    """What ``torch.load`` would return for the checkpoint at ``path``, from any format.

    Tensors stored 64-byte aligned (all of them in our ``.pt`` files) are mapped from the file
    (copy-on-write) instead of copied. ``mmap=True`` maps every tensor, as
    ``safetensors.torch.load_file`` does; reductions over tensors mapped at other alignments may
    round differently from freshly allocated ones. ``check=True`` first re-hashes every tensor that
    has a stored BLAKE3 digest and raises ``CorruptFileError`` naming the first that does not match.

    Example::

        sd = load("net.safetensors")
        Net().load_state_dict(sd)
    """
    from .torch_bridge import to_torch

    checkpoint = read(path, format)
    if check:
        problems, _ = integrity.check(checkpoint)
        if problems:
            raise CorruptFileError(problems[0], file=path)
    return to_torch(checkpoint, mmap_any=mmap)


def save(obj: Any, path: PathLike, format: str | None = None, **options: Any) -> None:
    """Save what ``torch.save`` takes (state_dicts, checkpoint dicts) in any format.

    Takes ``write``'s keyword arguments (``fsync``, ``progress``, the format's options).

    Example::

        save({"model_state_dict": net.state_dict(), "epoch": 3}, "ckpt.safetensors")
    """
    from .torch_bridge import from_torch

    write(from_torch(obj), path, format, **options)


def convert(
    src: PathLike,
    dst: PathLike,
    *,
    src_format: str | None = None,
    dst_format: str | None = None,
    select: str | None = None,
    transforms: Iterable[Transform] = (),
    progress: Callable[[int, int], None] | None = None,
    fsync: bool = True,
    check: bool = False,
    **options: Any,
) -> Path:
    """Convert ``src`` to ``dst`` bit for bit; ``select`` keeps one sub-tree (``model_state_dict``),
    ``transforms`` then run in order.

    The destination is replaced atomically if it exists; it may never be the source itself.
    ``progress(bytes_done_now, bytes_total)`` is called as tensor bytes are written; ``options``
    are the destination format's write options.

    Example::

        convert("checkpoint.pt", "checkpoint.safetensors")
        # PosixPath('checkpoint.safetensors')
    """
    source, destination = Path(src), Path(dst)
    if destination.exists() and source.exists() and os.path.samefile(source, destination):
        raise DestinationError("the destination is the source file; refusing to write over it", file=destination)
    writer = registry.resolve(destination, dst_format, for_write=True)
    make_options(writer, options)  # fail on a bad option before reading anything
    steps = ([Select(select)] if select else []) + list(transforms)
    checkpoint = read(source, src_format, transforms=steps)
    report = None
    if progress is not None:
        total = sum(ref.nbytes for _, ref in checkpoint.unique_tensors())
        report = lambda done: progress(done, total)  # noqa: E731
    _write(writer, checkpoint, destination, WriteContext(report, fsync, check), options)
    return destination


def verify(a: PathLike | Checkpoint, b: PathLike | Checkpoint | None = None, *, deep: bool = False) -> list[str]:
    """Differences between two checkpoints, in any formats; an empty list means bit-identical.

    With ``deep``, each file's tensors are also re-hashed against the BLAKE3 digests it stores (and
    its zip CRC-32s, and the digest of its tree), so a flipped bit is reported with its tensor's
    path even without a second file to compare with. Tensors without a stored digest cannot be
    checked that way, and say so: a file without digests is never reported intact.

    Example::

        verify("checkpoint.pt", "checkpoint.safetensors")
        # []
    """
    if b is None and not deep:
        raise ConverterError("verify needs a second checkpoint, or deep=True to check one against its digests")
    found = []
    checkpoints = []
    for item in (a, b):
        if item is None:
            continue
        checkpoint = item if isinstance(item, Checkpoint) else read(item)
        checkpoints.append(checkpoint)
        if deep:
            problems, unchecked = integrity.check(checkpoint)
            found += [f"{checkpoint.origin or 'checkpoint'}: {problem}" for problem in problems]
            if unchecked:  # "intact" would be a lie: these bytes were compared with nothing
                total = len(checkpoint.unique_tensors())
                found.append(
                    f"{checkpoint.origin or 'checkpoint'}: no stored digests for {unchecked} of {total} tensors: "
                    "cannot check them (the file's writer stores none; converting it to one of our formats "
                    "stores digests)"
                )
    if len(checkpoints) == 2:
        found += compare.differences(checkpoints[0].tree, checkpoints[1].tree)
    return found


def manifest(path: PathLike, format: str | None = None, *, digests: bool = True) -> dict[str, Any]:
    """The manifest (JSON "schema" of keys, dtypes, shapes, digests) of the checkpoint at ``path``.

    It validates against ``schemas/manifest.schema.json``.
    """
    source = Path(path)
    checkpoint = read(source, format)
    result = manifests.build(checkpoint, digests=digests)
    result["file"] = {"name": source.name, "format": checkpoint.format, "bytes": stored_size(source)}
    return result
