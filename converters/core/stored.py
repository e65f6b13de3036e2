"""What formats share about the trees and digests they store: strict JSON, digest maps, and the
stored tree (a manifest node) rebuilt around a format's tensors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import manifests
from .errors import CorruptFileError
from .tree import TensorRef


def read_digests(text: bytes | str, file: Path, what: str) -> dict[str, str]:
    """A stored {key: BLAKE3 hex} map, checked for shape (the digests themselves by verify --deep)."""
    digests = loads_json_strict(text, file, what)
    if type(digests) is not dict or not all(
        type(v) is str and len(v) == 64 and all(c in "0123456789abcdef" for c in v) for v in digests.values()
    ):
        raise CorruptFileError(f"{what} must map keys to 64-digit hex BLAKE3 digests", file=file)
    return digests


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
