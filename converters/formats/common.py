"""Small helpers every format module shares."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .. import manifests
from ..errors import ConverterError, CorruptFileError, UnsupportedValueError
from ..tree import Checkpoint, TensorRef

# Options every writer takes: a progress callback (bytes done), whether to fsync, and whether to
# re-hash tensors that carry a digest from their source (see converters.integrity).
WRITE_OPTIONS = ("progress", "fsync", "check")


def read_digests(text: bytes | str, file: Path, what: str) -> dict[str, str]:
    """A stored {key: BLAKE3 hex} map, checked for shape (the digests themselves by verify --deep)."""
    digests = loads_json_strict(text, file, what)
    if type(digests) is not dict or not all(
        type(v) is str and len(v) == 64 and all(c in "0123456789abcdef" for c in v) for v in digests.values()
    ):
        raise CorruptFileError(f"{what} must map keys to 64-digit hex BLAKE3 digests", file=file)
    return digests


def reject_options(format_name: str, options: dict[str, Any], accepted: tuple[str, ...] = ()) -> None:
    unknown = sorted(set(options) - set(accepted) - set(WRITE_OPTIONS))
    if unknown:
        takes = f"takes only {', '.join(accepted)}" if accepted else "takes no options"
        raise ConverterError(f"the {format_name} writer {takes}; got {', '.join(unknown)}")


def require_dtypes(checkpoint: Checkpoint, format_name: str, supported: frozenset[str]) -> None:
    """Refuse, naming the tensor, any dtype the format cannot hold (never convert it silently)."""
    for path, ref in checkpoint.tensors():
        if ref.dtype not in supported:
            raise UnsupportedValueError(
                f"{format_name} cannot hold dtype {ref.dtype}; formats that can: see `sdconvert formats`",
                path=path,
            )


def tree_from_stored(
    text: Any, refs: dict[str, TensorRef], file: Path, what: str, *, holder: str, unused_name: str
) -> Any:
    """The tree stored as a manifest node (JSON text) whose tensors are ``refs`` by storage key.

    Every key it names must be in ``refs`` (else "... which {holder} lacks") and every tensor of
    ``refs`` must be named by it (else "{unused_name} ... is not part of the stored tree").
    """
    if type(text) is not str:
        raise CorruptFileError(f"{what} must be a JSON string", file=file)
    node = loads_json_strict(text, file, what)
    used: set[str] = set()

    def tensor(key: str, tree_path: Any) -> TensorRef:
        if key not in refs:
            raise CorruptFileError(
                f"the tree refers to tensor {key!r}, which {holder} lacks", file=file, path=tree_path
            )
        used.add(key)
        return refs[key]

    tree = manifests.decode_tree(node, tensor, file=file)
    unused = set(refs) - used
    if unused:
        raise CorruptFileError(f"{unused_name} {sorted(unused)[0]!r} is not part of the stored tree", file=file)
    return tree


def loads_json_strict(text: bytes | str, file: Path, what: str) -> Any:
    """Parse JSON, refusing duplicate keys (a reader must not silently keep the last one)."""

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key, value in pairs:
            if key in result:
                raise CorruptFileError(f"{what} has the key {key!r} twice", file=file)
            result[key] = value
        return result

    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return json.loads(text, object_pairs_hook=no_duplicates)
    except UnicodeDecodeError as exc:
        raise CorruptFileError(f"{what} is not valid UTF-8 ({exc.reason} at byte {exc.start})", file=file) from None
    except json.JSONDecodeError as exc:
        raise CorruptFileError(f"{what} is not valid JSON: {exc.msg} at char {exc.pos}", file=file) from None
    except RecursionError:
        raise CorruptFileError(f"{what} is nested too deeply", file=file) from None
