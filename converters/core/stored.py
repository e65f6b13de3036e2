"""What formats share about the trees and digests they store: strict JSON, digest maps, and the
stored tree (a manifest node) rebuilt around a format's tensors.

Every JSON text read from an input goes through :func:`loads_json_strict`, which charges the read's
budget for what the parse will create *before* parsing (an upper bound counted at C speed), refuses
duplicate keys, ``NaN``/``Infinity`` and integers past Python's int-to-str limit, all as
``CorruptFileError``.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import os
import re
import stat
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from . import dtypes, manifests
from .budget import Budget
from .errors import CorruptFileError, UnsafeFileError, shown
from .storage import RemoteError, RemotePath, open_read, pread
from .tree import CastOrigin, TensorRef

_HEX = re.compile(r"[0-9a-f]*")
_WIDE_UTF8 = re.compile(rb"[\xf0-\xff]")  # lead bytes of 4-byte UTF-8 sequences (and invalid ones)
DIGEST_HEX_DIGITS = 64


STR_OBJECT_BYTES = 50  # a str object besides its characters (CPython 3.11: 49 for ASCII)


def json_charge(text: bytes | str) -> tuple[int, int]:
    """An upper bound of what parsing ``text`` creates: (values, bytes of text and strings).

    Every value but the root follows a ``[``, a ``,`` or a ``:``, and every object key a ``{`` or a
    ``,``, so their count bounds the values and keys; each is charged the budget's NODE_COST.
    Strings are charged by size: a str object per pair of ``"``, plus their characters and the text
    decoded from bytes, one byte per character for ASCII, two when no 4-byte UTF-8 sequence occurs,
    else four. Counted at C speed without a copy, so punctuation inside strings counts too (a
    header holding JSON in its strings, as ours do, is charged for those values twice).

    Measured (tracemalloc, CPython 3.11), the peak of parsing per counted value: empty lists 34 B,
    empty dicts 38, empty strings 11, small ints 10, floats 36, 10-char strings 80, objects of
    distinct keys 114 (their key strings included: 75 once those are charged as strings), a
    safetensors header of 1-element tensors 68 (750 B an entry), manifest trees parsed and rebuilt
    64-97: all within the budget's NODE_COST (100 when measured).
    """
    if isinstance(text, str):
        counted = text.count("{") + text.count("[") + text.count(",") + text.count(":") + 1
        # The strings cut from a str are no wider than it.
        return counted, sys.getsizeof(text) + STR_OBJECT_BYTES * (text.count('"') // 2)
    counted = text.count(b"{") + text.count(b"[") + text.count(b",") + text.count(b":") + 1
    width = 1 if text.isascii() else 4 if _WIDE_UTF8.search(text) else 2
    # The decoded text, the strings cut from it, a str object for each.
    return counted, 2 * width * len(text) + STR_OBJECT_BYTES * (text.count(b'"') // 2)


def loads_json_strict(
    text: bytes | str, file: Path | str, what: str, budget: Budget | None = None, *, allow_nan: bool = False
) -> Any:
    """Parse JSON from an input, within ``budget`` (the read's; by default one sized for ``text``).

    Charged before parsing (:func:`json_charge`), so a header of millions of empty lists is refused
    before one is built. Refused, as ``CorruptFileError`` naming ``what``: invalid UTF-8 or JSON,
    duplicate keys (a reader must not silently keep the last one), ``NaN``/``Infinity`` (not JSON),
    integers past Python's 4300-digit int limit, nesting past the interpreter's recursion limit.
    ``allow_nan``: read ``NaN``/``Infinity``/``-Infinity`` as those floats (what Python's ``json``
    writes, for a file it wrote: a Trainer's ``trainer_state.json``).
    """
    budget = Budget(file, len(text)) if budget is None else budget
    values, text_bytes = json_charge(text)
    budget.nodes(values, f"values in {what}")
    budget.materialize(text_bytes, f"the text of {what}")

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result = dict(pairs)
        if len(result) != len(pairs):
            seen: set[str] = set()
            for key, _ in pairs:
                if key in seen:
                    raise CorruptFileError(f"{what} has the key {key!r} twice", file=file)
                seen.add(key)
        return result

    def no_constants(name: str) -> Any:
        raise CorruptFileError(f"{what} is not valid JSON: {name} is not a JSON value", file=file)

    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        with paused_gc():
            constant = float if allow_nan else no_constants
            return json.loads(text, object_pairs_hook=no_duplicates, parse_constant=constant)
    except CorruptFileError:
        raise
    except UnicodeDecodeError as exc:
        raise CorruptFileError(f"{what} is not valid UTF-8 ({exc.reason} at byte {exc.start})", file=file) from None
    except json.JSONDecodeError as exc:
        raise CorruptFileError(f"{what} is not valid JSON: {exc.msg} at char {exc.pos}", file=file) from None
    except RecursionError:
        raise CorruptFileError(f"{what} is nested too deeply", file=file) from None
    except ValueError as exc:  # int(): "Exceeds the limit (4300 digits) for integer string conversion"
        if "integer string conversion" in str(exc):
            limit = sys.get_int_max_str_digits()
            raise CorruptFileError(f"{what} holds an integer of more than {limit} digits", file=file) from None
        raise CorruptFileError(f"{what} is not valid JSON: {exc}", file=file) from None


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Run a block that creates many acyclic objects (parsed JSON, msgpack values, tensor refs)
    without the cyclic garbage collector: it would walk the growing heap again and again for
    nothing (measured: ~40% of the time of parsing a header of 50k tensors)."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def read_digests(text: bytes | str, file: Path | str, what: str, budget: Budget | None = None) -> dict[str, str]:
    """A stored {key: BLAKE3 hex} map in JSON, checked for shape (the digests themselves by verify --deep)."""
    return check_digests(loads_json_strict(text, file, what, budget), file, what)


def check_digests(value: Any, file: Path | str, what: str) -> dict[str, str]:
    """``value`` if it is a {str key: 64 lowercase hex digits} map (parsed from any encoding), else
    ``CorruptFileError``: a map holding bytes, numbers or short digests is refused, never coerced."""
    if (
        type(value) is not dict
        or not all(type(k) is str for k in value)
        or not all(type(v) is str and len(v) == DIGEST_HEX_DIGITS for v in value.values())
        or not _HEX.fullmatch("".join(value.values()))
    ):
        raise CorruptFileError(f"{what} must map str keys to {DIGEST_HEX_DIGITS}-digit hex BLAKE3 digests", file=file)
    return value


def check_casts(value: Any, file: Path | str, what: str) -> dict[str, CastOrigin]:
    """A stored cast record (``manifests.cast_records``: ``{key: {"from": dtype, "blake3": digest}}``,
    parsed from any encoding) as the origin of each key's tensor. A dtype that is not a cast source
    or a malformed digest is refused: a cast is history the manifest shows, so it is never guessed."""
    if type(value) is not dict:
        raise CorruptFileError(f"{what} must map tensor keys to cast records", file=file)
    origins = {}
    for key, record in value.items():
        if (
            type(key) is not str
            or type(record) is not dict
            or record.keys() != {"from", "blake3"}
            or record["from"] not in dtypes.CASTABLE
            or type(record["blake3"]) is not str
            or len(record["blake3"]) != DIGEST_HEX_DIGITS
            or not _HEX.fullmatch(record["blake3"])
        ):
            raise CorruptFileError(
                f"{what}[{shown(key, 80)}] must be {{'from': one of {', '.join(dtypes.CASTABLE)}, "
                f"'blake3': {DIGEST_HEX_DIGITS} hex digits}}, found {shown(record, 120)}",
                file=file,
            )
        origins[key] = CastOrigin(record["from"], record["blake3"])
    return origins


def read_casts(value: Any, refs: dict[str, TensorRef], file: Path | str, what: str) -> None:
    """Attach a stored cast record (see :func:`check_casts`) to the tensors of ``refs`` by storage
    key, in place; a record naming no stored tensor is refused."""
    for key, origin in check_casts(value, file, what).items():
        if key not in refs:
            raise CorruptFileError(f"{what} names {shown(key, 80)}, which is not a stored tensor", file=file)
        refs[key] = refs[key].with_cast_from(origin)


def check_tree_digest(value: Any, file: Path | str, what: str) -> str:
    """A stored tree digest (``manifests.tree_digest``): 64 lowercase hex digits, else ``CorruptFileError``."""
    if type(value) is not str or len(value) != DIGEST_HEX_DIGITS or not _HEX.fullmatch(value):
        raise CorruptFileError(f"{what} must be {DIGEST_HEX_DIGITS} lowercase hex digits (a BLAKE3 digest)", file=file)
    return value


def tree_from_stored(
    text: Any,
    refs: Mapping[str, TensorRef],
    file: Path | str,
    what: str,
    *,
    holder: str,
    unused_name: str,
    budget: Budget | None = None,
) -> Any:
    """The tree stored as a manifest node (JSON text) whose tensors are ``refs`` by storage key.

    Every key it names must be in ``refs`` (else "... which {holder} lacks") and every tensor of
    ``refs`` must be named by it (else "{unused_name} ... is not part of the stored tree"). The
    tree rebuilt from the node has at most one value per ``:`` of the text (each node is a one-key
    object), charged one node each before it is rebuilt.
    """
    if type(text) is not str:
        raise CorruptFileError(f"{what} must be a JSON string", file=file)
    budget = Budget(file, len(text)) if budget is None else budget
    node = loads_json_strict(text, file, what, budget)
    budget.nodes(text.count(":"), f"the tree of {what}")
    used: set[str] = set()

    def tensor(key: str, tree_path: Any) -> TensorRef:
        ref = refs.get(key)
        if ref is None:
            raise CorruptFileError(
                f"the tree refers to tensor {key!r}, which {holder} lacks", file=file, path=tree_path
            )
        used.add(key)
        return ref

    with paused_gc():
        tree = manifests.decode_tree(node, tensor, file=file)
    if len(used) != len(refs):
        unused = sorted(set(refs) - used)
        raise CorruptFileError(f"{unused_name} {unused[0]!r} is not part of the stored tree", file=file)
    return tree


def read_folder_file(path: Path, what: str, where: str, limit: int, budget: Budget) -> bytes:
    """The bytes of a checkpoint folder's own metadata file (a shard index, DCP's ``.metadata``):
    opened without following symlinks and without blocking, refused unless a regular file of at most
    ``limit`` bytes, charged to ``budget`` before it is read. ``FileNotFoundError`` is left to the
    caller, which knows what a missing file means. A remote object (a store has no symlinks, FIFOs
    or devices) is refused if it is a folder, then read by one range request."""
    if isinstance(path, RemotePath):
        return _read_remote_folder_file(path, what, limit, budget)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise
    except OSError as exc:
        if path.is_symlink():
            raise CorruptFileError(
                f"{what} is a symbolic link, not a regular file in {where}; refusing to follow it", file=path
            ) from None
        raise CorruptFileError(f"{what} cannot be opened: {exc.strerror}", file=path) from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise CorruptFileError(f"{what} is not a regular file", file=path)
        if info.st_size > limit:
            raise CorruptFileError(f"{what} is larger than {limit} bytes", file=path)
        budget.materialize(info.st_size, what)
        data = handle.read(info.st_size)
    if len(data) != info.st_size:
        raise CorruptFileError(f"{what} changed size while it was read", file=path)
    return data


def _read_remote_folder_file(path: RemotePath, what: str, limit: int, budget: Budget) -> bytes:
    try:
        info = path.stat()
    except RemoteError as exc:
        if exc.missing:  # the callers' FileNotFoundError: they say what a missing file means
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(path)) from None
        raise
    if not stat.S_ISREG(info.st_mode):
        raise CorruptFileError(f"{what} is not a regular file", file=path)
    if info.st_size > limit:
        raise CorruptFileError(f"{what} is larger than {limit} bytes", file=path)
    budget.materialize(info.st_size, what)
    with open_read(path) as handle:
        data = pread(handle, info.st_size, 0)  # fewer bytes only if the object shrank: refused below
    if len(data) != info.st_size:
        raise CorruptFileError(f"{what} changed size while it was read", file=path)
    return data


# ------------------------------------------------------------------ Hugging Face shard folders
# A folder of shard files plus an index {"metadata": {...}, "weight_map": {tensor key: shard file}}:
# ``model.safetensors.index.json`` (safetensors shards), ``pytorch_model.bin.index.json`` (torch.save
# shards). Each format reads its own shards; finding and reading the index, and checking the shard
# file names it gives, are the same for both.


def find_index(folder: Path, preferred: str, suffix: str) -> Path | None:
    """The index file of a shard folder: ``preferred`` when present, else the only file whose name
    ends with ``suffix``; None when ``folder`` is not a folder or holds none (or several). A
    symlinked index is found too, so that reading it refuses it with a clear message."""
    if not folder.is_dir():
        return None
    first = folder / preferred
    if first.is_symlink() or first.is_file():
        return first
    found = sorted(p for p in folder.iterdir() if p.name.endswith(suffix) and (p.is_symlink() or p.is_file()))
    return found[0] if len(found) == 1 else None


def read_shard_index(index_path: Path, limit: int, budget: Budget) -> tuple[dict[str, str], dict[str, Any]]:
    """The ``weight_map`` and ``metadata`` of a shard index: a regular file of its folder (no
    symlink), at most ``limit`` bytes, strict JSON (duplicate keys refused), charged to ``budget``."""
    try:
        raw = read_folder_file(index_path, "the shard index", "its folder", limit, budget)
    except FileNotFoundError as exc:
        raise CorruptFileError(f"the shard index cannot be opened: {exc.strerror}", file=index_path) from None
    index = loads_json_strict(raw, index_path, "the shard index", budget)
    del raw
    weight_map = index.get("weight_map") if type(index) is dict else None
    metadata = index.get("metadata", {}) if type(index) is dict else None
    if (
        type(weight_map) is not dict
        or type(metadata) is not dict
        or not all(type(v) is str for v in weight_map.values())
    ):
        raise CorruptFileError(
            "the shard index must hold a weight_map of tensor key to shard file name", file=index_path
        )
    return weight_map, metadata


def shard_file(index_path: Path, name: str, kind: str) -> Path:
    """The shard ``name`` of the index's ``weight_map``: a plain file name (no folder, no ``..``) of
    a regular file beside the index (no symlink), never an index (indexes are not followed).
    ``kind``: what a shard is, for messages ("a safetensors file")."""
    relative = Path(name)
    if relative.is_absolute() or len(relative.parts) != 1 or name in ("", ".", ".."):
        raise UnsafeFileError(
            f"shard file name {name!r} must be a plain file name in the index's folder", file=index_path
        )
    if name.endswith(".json") or relative.name == index_path.name:
        raise CorruptFileError(f"shard {name!r} names an index, not {kind}; indexes are not followed", file=index_path)
    shard = index_path.parent / relative
    if shard.is_symlink() or not shard.is_file():
        raise CorruptFileError(f"shard {name!r} is not a regular file beside the index", file=index_path)
    return shard
