"""The library API: thin verbs over readers, writers and the neutral tree.

``read``/``write``/``convert``/``verify``/``manifest`` never import torch; ``load``/``save`` do,
because they hand out or take torch objects.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import compare, integrity, manifests
from .errors import ConverterError, CorruptFileError, DestinationError, PathLike, UnknownFormatError
from .plugins import SNIFF_BYTES, Format, registry
from .tree import Checkpoint, parse_select, select

# Importing the package registers the built-in formats.
from . import formats  # noqa: F401  isort: skip


def read(path: PathLike, format: str | None = None, *, select_path: str | None = None) -> Checkpoint:
    """The checkpoint stored at ``path`` as a neutral tree (tensors are not loaded).

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
        _check_contents_match_name(source, fmt)
    checkpoint = fmt.read(source)
    if select_path:
        checkpoint = Checkpoint(select(checkpoint.tree, parse_select(select_path), file=source), source)
    return checkpoint


def stored_size(path: PathLike) -> int:
    """Bytes on disk: the file's, or for a folder (sharded checkpoint) all its files'."""
    source = Path(path)
    if source.is_dir():
        return sum(p.stat().st_size for p in source.iterdir() if p.is_file())
    return source.stat().st_size


def _check_contents_match_name(source: Path, fmt: Format) -> None:
    """A file whose suffix names one format but whose bytes are another's gets a helpful error."""
    if source.is_dir():
        return
    with open(source, "rb") as handle:
        head = handle.read(SNIFF_BYTES)
    if fmt.sniff(head):
        return
    actual = registry.search(lambda known: next((f for f in known if f is not fmt and f.sniff(head)), None))
    if actual is not None:
        raise UnknownFormatError(
            f"the name says {fmt.name} but the contents are {actual.name}; "
            f"pass --from {actual.name} (format={actual.name!r}) or rename the file",
            file=source,
        )


def write(checkpoint: Checkpoint, path: PathLike, format: str | None = None, **options: Any) -> None:
    """Write a neutral tree to ``path`` (atomically) in ``format`` or the one its suffix names."""
    destination = Path(path)
    registry.resolve(destination, format, for_write=True).write(checkpoint, destination, **options)


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
    progress: Callable[[int, int], None] | None = None,
    **options: Any,
) -> Path:
    """Convert ``src`` to ``dst`` bit for bit; ``select`` keeps one sub-tree (``model_state_dict``).

    The destination is replaced atomically if it exists; it may never be the source itself.
    ``progress(bytes_done_now, bytes_total)`` is called as tensor bytes are written.

    Example::

        convert("checkpoint.pt", "checkpoint.safetensors")
        # PosixPath('checkpoint.safetensors')
    """
    source, destination = Path(src), Path(dst)
    if destination.exists() and source.exists() and os.path.samefile(source, destination):
        raise DestinationError("the destination is the source file; refusing to write over it", file=destination)
    writer = registry.resolve(destination, dst_format, for_write=True)  # fail before reading
    checkpoint = read(source, src_format, select_path=select)
    if progress is not None:
        total = sum(ref.nbytes for _, ref in checkpoint.unique_tensors())
        options["progress"] = lambda done: progress(done, total)
    writer.write(checkpoint, destination, **options)
    return destination


def verify(a: PathLike | Checkpoint, b: PathLike | Checkpoint | None = None, *, deep: bool = False) -> list[str]:
    """Differences between two checkpoints, in any formats; an empty list means bit-identical.

    With ``deep``, each file's tensors are also re-hashed against the BLAKE3 digests it stores, so
    a flipped bit is reported with its tensor's path even without a second file to compare with.

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
            problems, _ = integrity.check(checkpoint)
            found += [f"{checkpoint.origin or 'checkpoint'}: {problem}" for problem in problems]
    if len(checkpoints) == 2:
        found += compare.differences(checkpoints[0].tree, checkpoints[1].tree)
    return found


def manifest(path: PathLike, format: str | None = None, *, digests: bool = True) -> dict[str, Any]:
    """The manifest (JSON "schema" of keys, dtypes, shapes, digests) of the checkpoint at ``path``.

    It validates against ``schemas/manifest.schema.json``.
    """
    source = Path(path)
    fmt = registry.resolve(source, format)
    result = manifests.build(read(source, fmt.name), digests=digests)
    result["file"] = {"name": source.name, "format": fmt.name, "bytes": stored_size(source)}
    return result
