"""The library API: reader → transforms → writer, and the verbs built on it.

``read``/``write``/``convert``/``verify``/``manifest`` never import torch; ``load``/``save`` do,
because they hand out or take torch objects. Nothing here names a format: what is format-specific
is declared by the format (``converters.core.contract``) and looked up in the registry.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .core import integrity, manifests
from .core.atomic import EXISTS
from .core.budget import Budget
from .core.contract import Format, WriteContext, make_options, writes_in_parallel
from .core.errors import ConverterError, CorruptFileError, DestinationError, PathLike, UnsupportedValueError
from .core.parallel import Group, check_workers, default_workers
from .core.registry import registry
from .core.storage import RemotePath, location

__all__ = ["convert", "load", "manifest", "read", "registry", "save", "verify", "verify_report", "write"]
from .core.tree import Checkpoint, validate
from .transforms.base import NoMatchError, Transform, apply

# Importing the package registers the built-in formats.
from . import formats  # noqa: F401  isort: skip

if TYPE_CHECKING:
    from .core import compare
    from .transforms.select import Select


def read(
    path: PathLike,
    format: str | None = None,
    *,
    transforms: Iterable[Transform] = (),
    storage_options: dict[str, Any] | None = None,
) -> Checkpoint:
    """The checkpoint stored at ``path`` as a neutral tree (tensors are not loaded).

    ``path`` may be an fsspec URL (``s3://bucket/model.safetensors``, ``https://...``, ``hf://...``;
    the ``[remote]`` extra): headers are read by range requests, tensor bytes only when used;
    ``storage_options`` are the file system's arguments (credentials, ``endpoint_url``...).

    Whatever chose the format (``format``, the suffix or the contents), the contents are checked
    against it first; the tree the reader returns is validated whatever reader produced it.

    When ``transforms`` start with a ``Select`` and the format can use it (``read_selected``, see
    ``core/contract.py``), the reader leaves out what the selection would drop: a shard folder reads
    only the shards holding selected tensors. The result is the same; the ``Select``'s report then
    counts among the dropped tensors only those the reader returned.

    Example::

        ckpt = read("checkpoint.safetensors")
        [path for path, _ in ckpt.tensors()][:1]
        # [('model_state_dict', 'conv1.weight')]
    """
    source = location(path, storage_options)
    require_readable(source)
    fmt = registry.resolve(source, format)
    if format is None:
        registry.check_contents(source, fmt)
    steps = list(transforms)
    read_selected = getattr(fmt, "read_selected", None)  # optional (core/contract.py): may skip files
    if steps and callable(read_selected):
        from .transforms.select import Select as SelectStep  # there are steps: transformations are imported

        if isinstance(steps[0], SelectStep):
            return apply(_selected(fmt, source, steps[0], read_selected), steps[1:])
    return apply(_checked(fmt, source, fmt.read(source, Budget.for_path(source))), steps)


def _checked(fmt: Format, source: Path, checkpoint: Checkpoint) -> Checkpoint:
    """What a reader returned, validated (whatever reader produced it) and labelled."""
    validate(checkpoint.tree, file=source)
    return dataclasses.replace(checkpoint, origin=checkpoint.origin or source, format=fmt.name)


def _selected(fmt: Format, source: Path, select: Select, read_selected: Callable[..., Checkpoint]) -> Checkpoint:
    """``select`` applied to what the format's ``read_selected`` gives: a tree that may lack the
    tensors the selection does not cover (and so the files holding only those: the shards of a
    folder), and that the selection turns into what it makes of the whole tree."""
    pruned = _checked(fmt, source, read_selected(source, Budget.for_path(source), select.covers))
    try:
        return select(pruned)
    except NoMatchError:
        # It fails on the pruned tree when it fails on the whole one; but the message shows what is
        # there (the keys beside a typo, a deeper path that would match), so it is the whole tree's.
        pass
    return select(_checked(fmt, source, fmt.read(source, Budget.for_path(source))))


NOT_REGULAR = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


def require_readable(source: Path) -> None:
    """Refuse a source that does not exist or is not a regular file or a folder: reading a FIFO,
    a socket or a device would block or never end (a symlink to a regular file is followed)."""
    if isinstance(source, RemotePath):
        source.stat()  # missing, access denied, unreachable: one RemoteError naming it
        return
    try:
        mode = os.stat(source).st_mode
    except FileNotFoundError:
        raise ConverterError("no such file", file=source) from None
    except OSError as exc:
        raise ConverterError(f"cannot read it: {exc.strerror or exc}", file=source) from None
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        what = NOT_REGULAR.get(stat.S_IFMT(mode), "not a regular file")
        raise ConverterError(f"is {what}, not a regular file or folder; refusing to read it", file=source)


def stored_size(path: PathLike) -> int:
    """Bytes on disk: the file's, or for a folder (sharded checkpoint) all its files'."""
    source = location(path)
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
    overwrite: bool = True,
    workers: int | None = None,
    group: Group | None = None,
    storage_options: dict[str, Any] | None = None,
    **options: Any,
) -> None:
    """Write a neutral tree to ``path`` (atomically) in ``format`` or the one its suffix names.

    ``options`` are the format's write options (``sdconvert formats`` lists them); ``progress(n)``
    is told as ``n`` more tensor bytes are written; ``check`` re-hashes tensors that carry a stored
    digest and refuses bytes that do not match it. An existing destination is replaced atomically;
    with ``overwrite=False`` it is kept and ``DestinationError`` raised, also when it appears while
    the file is being written (``sdconvert convert`` without ``--force``). A folder of several
    files (shards, DCP) is written on ``workers`` threads (default: ``core.parallel.default_workers``);
    with a ``group`` (``converters.distributed``) each rank writes its share of the files.
    ``path`` may be an fsspec URL (see ``read``): written locally, then uploaded atomically.
    """
    destination = location(path, storage_options)
    fmt = registry.resolve(destination, format, for_write=True, options=options)
    _write(fmt, checkpoint, destination, _context(progress, fsync, check, overwrite, workers, group), options)


def _context(
    progress: Callable[[int], None] | None,
    fsync: bool,
    check: bool,
    overwrite: bool,
    workers: int | None,
    group: Group | None,
) -> WriteContext:
    chosen = default_workers() if workers is None else check_workers(workers)
    return WriteContext(progress, fsync, check, overwrite, chosen, group)


def _write(
    fmt: Format, checkpoint: Checkpoint, destination: Path, context: WriteContext, options: dict[str, Any]
) -> None:
    if isinstance(destination, RemotePath):
        _write_remote(fmt, checkpoint, destination, context, options)
        return
    if not context.overwrite and os.path.lexists(destination):  # before any work; the writer checks again
        raise DestinationError(EXISTS, file=destination)
    built = make_options(fmt, options)
    if context.group is not None and context.group.size > 1 and not writes_in_parallel(fmt, built):
        raise ConverterError(
            f"a distributed conversion splits the files of a folder between ranks; this {fmt.name} destination "
            "is one file: write a sharded folder (safetensors --max-shard-size, dcp), or convert in one process",
            file=destination,
        )
    for tensor_path, ref in checkpoint.tensors():
        if ref.dtype not in fmt.dtype_codes:
            raise UnsupportedValueError(
                f"{fmt.name} cannot hold dtype {ref.dtype}; formats that can: see `sdconvert formats`",
                path=tensor_path,
            )
    fmt.write(checkpoint, destination, context, built)


def _write_remote(
    fmt: Format, checkpoint: Checkpoint, destination: RemotePath, context: WriteContext, options: dict[str, Any]
) -> None:
    """Written to a local staging folder by the format's writer, then uploaded: the store has no
    rename, its atomic step is the upload's completion (``core.upload``)."""
    from .core.upload import staged

    if context.group is not None and context.group.size > 1:
        raise ConverterError(
            "a distributed conversion writes to a shared filesystem; to a store, convert in one process",
            file=destination,
        )
    with staged(
        destination,
        overwrite=context.overwrite,
        replaceable=getattr(fmt, "replaceable", None),
        written_last=getattr(fmt, "written_last", None),
    ) as local:
        # durability is the store's once the upload completes: the staged copy needs no fsync
        _write(fmt, checkpoint, local, dataclasses.replace(context, fsync=False), options)


def load(
    path: PathLike,
    format: str | None = None,
    *,
    mmap: bool = False,
    check: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> Any:
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

    checkpoint = read(path, format, storage_options=storage_options)
    if check:
        problems, _ = integrity.check(checkpoint)
        if problems:
            raise CorruptFileError(problems[0], file=path)
    return to_torch(checkpoint, mmap_any=mmap)


def save(obj: Any, path: PathLike, format: str | None = None, *, overwrite: bool = True, **options: Any) -> None:
    """Save what ``torch.save`` takes (state_dicts, checkpoint dicts) in any format.

    Takes ``write``'s keyword arguments (``fsync``, ``progress``, ``overwrite``, the format's
    options).

    Example::

        save({"model_state_dict": net.state_dict(), "epoch": 3}, "ckpt.safetensors")
    """
    from .torch_bridge import from_torch

    write(from_torch(obj), path, format, overwrite=overwrite, **options)


def convert(
    src: PathLike,
    dst: PathLike,
    *,
    src_format: str | None = None,
    dst_format: str | None = None,
    select: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    strip_prefix: str | Iterable[str] | None = None,
    rename: str | Iterable[str] | None = None,
    dtype: str | None = None,
    dtype_include: str | Iterable[str] | None = None,
    dtype_exclude: str | Iterable[str] | None = None,
    ties: str | None = None,
    drop_objects: bool = False,
    layout: str | None = None,
    transforms: Iterable[Transform] = (),
    progress: Callable[[int, int], None] | None = None,
    fsync: bool = True,
    check: bool = False,
    overwrite: bool = True,
    workers: int | None = None,
    group: Group | None = None,
    storage_options: dict[str, Any] | None = None,
    **options: Any,
) -> Path:
    """Convert ``src`` to ``dst`` bit for bit, changing on the way only what is asked: ``select``
    and ``exclude`` (paths or globs: ``model_state_dict``, ``**/*.num_batches_tracked``),
    ``strip_prefix`` (``"module."``, or ``"auto"`` for DDP's ``module.`` and torch.compile's
    ``_orig_mod.``), ``rename`` (``"REGEX=REPLACEMENT"`` rules in order), ``ties`` (``keep``,
    ``materialize``, ``drop-aliases``), ``dtype`` (cast floating-point tensors exactly as
    ``tensor.to(dtype)``; ``dtype_include``/``dtype_exclude`` globs), in that order (``drop_objects``,
    which removes recorded objects such as an ``argparse.Namespace``, runs after ``exclude``), then
    ``layout`` (``"flax"``, ``"mlx"`` or a rules file: state_dicts as that framework's parameter
    tree, recorded in the output's metadata; ``"torch"`` undoes a recorded layout, and runs first);
    then ``transforms`` (``converters.transforms`` objects) run in order.

    The destination is replaced atomically if it exists (with ``overwrite=False`` it is kept and
    ``DestinationError`` raised, even if it appears during the conversion); it may never be the
    source itself, nor a folder holding the source. ``progress(bytes_done_now, bytes_total)`` is
    called as tensor bytes are written; ``options`` are the destination format's write options.
    ``workers`` and ``group`` are ``write``'s: files of a folder written side by side. ``src`` and
    ``dst`` may be fsspec URLs (``s3://``, ``https://``, ``hf://``...; the ``[remote]`` extra), with
    ``storage_options`` for their file system: tensor bytes are streamed by range requests; a remote
    destination is written locally and uploaded, appearing whole or not at all.

    Example::

        convert("checkpoint.pt", "checkpoint.safetensors")
        # PosixPath('checkpoint.safetensors')
    """
    source, destination = location(src, storage_options), location(dst, storage_options)
    _refuse_writing_over(source, destination)
    writer = registry.resolve(destination, dst_format, for_write=True, options=options)
    make_options(writer, options)  # fail on a bad option before reading anything
    from .transforms.options import from_options  # imports every transformation: not on read's path

    steps = from_options(
        select=select,
        exclude=exclude,
        strip_prefix=strip_prefix,
        rename=rename,
        dtype=dtype,
        dtype_include=dtype_include,
        dtype_exclude=dtype_exclude,
        ties=ties,
        drop_objects=drop_objects,
        layout=layout,
        check=check,
    ) + list(transforms)
    checkpoint = read(source, src_format, transforms=steps)
    report = None
    if progress is not None:
        total = sum(ref.nbytes for _, ref in checkpoint.unique_tensors())
        report = lambda done: progress(done, total)  # noqa: E731
    _write(writer, checkpoint, destination, _context(report, fsync, check, overwrite, workers, group), options)
    return destination


def _refuse_writing_over(source: Path, destination: Path) -> None:
    """The destination may be neither the source (by any name) nor a folder holding it: replacing
    such a folder (a sharded checkpoint's index converted onto its own folder, a DCP folder onto
    itself) would delete the source."""
    if isinstance(source, RemotePath) or isinstance(destination, RemotePath):
        if isinstance(source, RemotePath) and isinstance(destination, RemotePath):
            if source.url == destination.url:
                raise DestinationError("the destination is the source; refusing to write over it", file=destination)
            if source.url.startswith(destination.url.rstrip("/") + "/"):
                raise DestinationError(
                    f"the destination is a folder holding the source ({source}); replacing it would delete the source",
                    file=destination,
                )
        return
    real_source, real_destination = source.resolve(), destination.resolve()
    same = real_source == real_destination
    if not same and destination.exists() and source.exists():
        same = os.path.samefile(source, destination)  # hard links: one file, two names
    if same:
        what = "folder" if source.is_dir() else "file"
        raise DestinationError(f"the destination is the source {what}; refusing to write over it", file=destination)
    if real_destination in real_source.parents:
        raise DestinationError(
            f"the destination is a folder holding the source ({source}); replacing it would delete the source",
            file=destination,
        )


def verify(
    a: PathLike | Checkpoint,
    b: PathLike | Checkpoint | None = None,
    *,
    deep: bool = False,
    tensors_only: bool = False,
    atol: float | None = None,
    rtol: float | None = None,
    cast_aware: bool = False,
    select: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    strip_prefix: str | Iterable[str] | None = None,
    rename: str | Iterable[str] | None = None,
    transforms: Iterable[Transform] = (),
) -> list[str]:
    """Differences between two checkpoints, in any formats; an empty list means bit-identical
    (or, with the options below, the same as far as they ask).

    With ``deep``, each file's tensors are also re-hashed against the BLAKE3 digests it stores (and
    its zip CRC-32s, and the digest of its tree), so a flipped bit is reported with its tensor's
    path even without a second file to compare with. Tensors without a stored digest cannot be
    checked that way, and say so: a file without digests is never reported intact.

    The other options are those of :func:`verify_report` (tolerances, ``cast_aware``, ``convert``'s
    key options applied to ``a``, ``tensors_only``); with any of them the result is its
    ``problems()``: one line per tensor that differs (``path: what``) or is missing, then every
    other difference unless ``tensors_only``. Tensors within the tolerance are not differences.

    Example::

        verify("checkpoint.pt", "checkpoint.safetensors")
        # []
        verify("ddp.pt", "weights.safetensors", strip_prefix="auto", select="model_state_dict", tensors_only=True)
        # []
    """
    loose: dict[str, Any] = {
        "tensors_only": tensors_only,
        "atol": atol,
        "rtol": rtol,
        "cast_aware": cast_aware,
        "select": select,
        "exclude": exclude,
        "strip_prefix": strip_prefix,
        "rename": rename,
    }
    transforms = list(transforms)
    asked = [name for name, value in loose.items() if value is not None and value is not False]
    asked += ["transforms"] if transforms else []
    if b is None and not deep:
        raise ConverterError("verify needs a second checkpoint, or deep=True to check one against its digests")
    if b is None and asked:
        raise ConverterError(f"verify: {asked[0]} goes with a second checkpoint to compare with")
    if b is not None and asked:
        return verify_report(a, b, deep=deep, transforms=transforms, **loose).problems()
    found = []
    checkpoints = []
    for item in (a, b):
        if item is None:
            continue
        checkpoint = item if isinstance(item, Checkpoint) else read(item)
        checkpoints.append(checkpoint)
        if deep:
            found += _integrity_problems(checkpoint)
    if len(checkpoints) == 2:
        from .core import compare

        found += compare.differences(checkpoints[0].tree, checkpoints[1].tree)
        found += compare.metadata_differences(checkpoints[0].carried_metadata(), checkpoints[1].carried_metadata())
    return found


def verify_report(
    a: PathLike | Checkpoint,
    b: PathLike | Checkpoint,
    *,
    deep: bool = False,
    tensors_only: bool = False,
    atol: float | None = None,
    rtol: float | None = None,
    cast_aware: bool = False,
    select: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    strip_prefix: str | Iterable[str] | None = None,
    rename: str | Iterable[str] | None = None,
    transforms: Iterable[Transform] = (),
) -> compare.Verification:
    """Everything ``sdconvert verify A B`` reports: the tensors matched by path (bit-identical,
    within tolerance with the largest difference, differing with how many elements and by how much,
    missing on either side), then the other differences (containers, key order, values), then with
    ``deep`` what each file's stored digests say. ``.same`` answers "are these the same weights?";
    ``.problems()`` is what makes them not; ``.as_json()`` is ``verify --json``.

    - ``atol``/``rtol`` (finite, >= 0; None: bit for bit): floating-point tensors (float64/32/16,
      bfloat16) whose bytes differ are the same when every element has ``|a - b| <= atol + rtol *
      |b|`` (``numpy.isclose``; NaN only where the other is NaN, infinities equal only to
      themselves). Tensors of two floating dtypes are then compared by value, both widened to
      float64; without a tolerance a dtype difference is a difference.
    - ``cast_aware``: where ``a`` and ``b`` hold one path's tensor in two floating dtypes (same
      shape), ``a``'s is cast to ``b``'s dtype exactly as ``convert(dtype=...)`` (and torch's
      ``tensor.to``) does, and that is compared with ``b``'s: "is B A converted with --dtype?"
      (bit for bit; with ``atol``/``rtol`` too, within them).
    - ``select``, ``exclude``, ``strip_prefix``, ``rename`` (and ``transforms``): as in
      :func:`convert`, same checks and errors, applied to ``a`` (the first) before comparing: "is B
      A's weights renamed?". ``b`` is compared as it is.
    - ``tensors_only``: the other differences are listed but do not count (``verify --tensors``).

    Tensor bytes are read block by block (flat memory), also through casts.
    """
    from .core import compare
    from .transforms.options import from_options

    compare.check_tolerance("atol", atol)
    compare.check_tolerance("rtol", rtol)
    steps = from_options(select=select, exclude=exclude, strip_prefix=strip_prefix, rename=rename) + list(transforms)
    first, second = (item if isinstance(item, Checkpoint) else read(item) for item in (a, b))
    problems = _integrity_problems(first) + _integrity_problems(second) if deep else []
    first = apply(first, steps)
    cast_from: dict[str, str] = {}
    if cast_aware:
        first, cast_from = _cast_like(first, second)
    return compare.verification(
        first.tree,
        second.tree,
        atol=atol,
        rtol=rtol,
        cast_from=cast_from,
        tensors_only=tensors_only,
        integrity=problems,
        transformed=[_step_summary(step) for step in steps],
        metadata=compare.metadata_differences(first.carried_metadata(), second.carried_metadata()),
    )


def _integrity_problems(checkpoint: Checkpoint) -> list[str]:
    """What re-hashing ``checkpoint``'s tensors against its stored digests finds (``verify --deep``)."""
    problems, unchecked = integrity.check(checkpoint)
    found = [f"{checkpoint.origin or 'checkpoint'}: {problem}" for problem in problems]
    if unchecked:  # "intact" would be a lie: these bytes were compared with nothing
        total = len(checkpoint.unique_tensors())
        found.append(
            f"{checkpoint.origin or 'checkpoint'}: no stored digests for {unchecked} of {total} tensors: "
            "cannot check them (the file's writer stores none; converting it to one of our formats "
            "stores digests)"
        )
    return found


def _cast_like(first: Checkpoint, second: Checkpoint) -> tuple[Checkpoint, dict[str, str]]:
    """``first`` with each floating-point tensor whose path holds a tensor of another floating dtype
    (and the same shape) in ``second`` cast to that dtype (``CastSource``: torch's ``tensor.to``,
    streamed); the cast paths with the dtype each had. A tied tensor is cast once per target dtype."""
    from .core.errors import format_tree_path
    from .core.tree import TensorRef, map_leaves
    from .transforms import FLOAT_DTYPES, CastSource
    from .transforms.base import replace_tree

    targets = {format_tree_path(path): ref for path, ref in second.tensors()}
    cast_from: dict[str, str] = {}
    made: dict[tuple[int, str], TensorRef] = {}

    def cast(path: tuple[str | int, ...], leaf: Any) -> Any:
        if type(leaf) is not TensorRef or leaf.dtype not in FLOAT_DTYPES:
            return leaf
        where = format_tree_path(path)
        target = targets.get(where)
        if target is None or target.dtype == leaf.dtype or target.dtype not in FLOAT_DTYPES:
            return leaf
        if target.shape != leaf.shape:
            return leaf
        cast_from[where] = leaf.dtype
        key = (id(leaf), target.dtype)
        if key not in made:
            made[key] = leaf.derive(dtype=target.dtype, source=CastSource(leaf.source, leaf.dtype, target.dtype))
        return made[key]

    return replace_tree(first, map_leaves(first.tree, cast)), cast_from


def _step_summary(step: Transform) -> str:
    summary = getattr(step, "summary", None)
    return str(summary()) if callable(summary) else repr(step)


def manifest(
    path: PathLike,
    format: str | None = None,
    *,
    digests: bool = True,
    storage_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest (JSON "schema" of keys, dtypes, shapes, digests) of the checkpoint at ``path``.

    It validates against ``schemas/manifest.schema.json``.
    """
    source = location(path, storage_options)
    checkpoint = read(source, format)
    result = manifests.build(checkpoint, digests=digests)
    result["file"] = {"name": source.name, "format": checkpoint.format, "bytes": stored_size(source)}
    if checkpoint.file_metadata:
        result["file"]["metadata"] = checkpoint.file_metadata
    if checkpoint.kind:
        result["file"]["kind"] = checkpoint.kind
    if checkpoint.notes:
        result["file"]["notes"] = list(checkpoint.notes)
    return result


def plan(
    src: PathLike, *, src_format: str | None = None, transforms: Iterable[Transform] = (), **chosen: Any
) -> dict[str, Any]:
    """What ``convert`` with the same transformation options would write, without writing:
    every tensor's path, dtype, shape and bytes after the transformations, and what was dropped
    (``sdconvert convert --dry-run``). ``chosen``: ``convert``'s transformation keywords.

    Example::

        plan("ddp.pt", strip_prefix="auto", dtype="bfloat16")["tensors"][0]["path"]
        # 'model_state_dict/conv1.weight'
    """
    from .transforms import describe_plan
    from .transforms.options import from_options

    steps = from_options(**chosen) + list(transforms)
    before = read(src, src_format)
    after = apply(before, steps)
    return describe_plan(before, after, steps)
