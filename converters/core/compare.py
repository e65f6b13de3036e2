"""Bit-exact comparison of two trees: exact types, key order, float bits, tensor dtype/shape/bytes."""

from __future__ import annotations

import struct
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

from .errors import format_tree_path
from .sources import ByteSource
from .tree import MAPPING_TYPES, TensorRef, walk

BLOCK = 4 * 1024 * 1024


def differences(a: Any, b: Any) -> list[str]:
    """Every way ``b`` differs from ``a``, as readable lines naming the tree path; empty if identical.

    >>> differences({"lr": 0.001, "steps": (1, 2)}, {"lr": 0.001, "steps": [1, 2]})
    ['steps: tuple vs list']
    """
    found: list[str] = []
    _diff(a, b, (), found)
    found.extend(_tie_differences(a, b))
    return found


def _tie_differences(a: Any, b: Any) -> list[str]:
    """Paths tied together (one tensor at both) in one tree but not in the other."""
    groups = []
    for tree in (a, b):
        first_path: dict[int, tuple[str | int, ...]] = {}
        tied_to = {}
        for path, leaf in walk(tree):
            if type(leaf) is TensorRef:
                tied_to[path] = first_path.setdefault(id(leaf), path)
        groups.append(tied_to)
    found = []
    for path in groups[0].keys() & groups[1].keys():
        first, second = groups[0][path], groups[1][path]
        if first != second:
            where = format_tree_path(path)
            found.append(
                f"{where}: tied to {format_tree_path(first) if first != path else 'nothing earlier'} in the first, "
                f"to {format_tree_path(second) if second != path else 'nothing earlier'} in the second"
            )
    return sorted(found)


def _diff(a: Any, b: Any, path: tuple[str | int, ...], found: list[str]) -> None:
    where = format_tree_path(path)
    if type(a) is not type(b):
        found.append(f"{where}: {_type_name(a)} vs {_type_name(b)}")
        # dict vs OrderedDict, list vs tuple: the contents can still be compared.
        if not (_kind(a) == _kind(b) != "other"):
            return
    if type(a) in MAPPING_TYPES:
        _diff_mapping(a, b, path, found)
    elif type(a) is list or type(a) is tuple:
        if len(a) != len(b):
            found.append(f"{where}: length {len(a)} vs {len(b)}")
        for index, (x, y) in enumerate(zip(a, b, strict=False)):
            _diff(x, y, (*path, index), found)
    elif type(a) is TensorRef:
        _diff_tensor(a, b, where, found)
    elif type(a) is float:
        if struct.pack(">d", a) != struct.pack(">d", b):
            found.append(f"{where}: float {a!r} vs {b!r}")
    elif a != b:
        found.append(f"{where}: {a!r:.60} vs {b!r:.60}")


def _diff_mapping(a: Any, b: Any, path: tuple[str | int, ...], found: list[str]) -> None:
    where = format_tree_path(path)
    only_a = [k for k in a if k not in b]
    only_b = [k for k in b if k not in a]
    if only_a:
        found.append(f"{where}: keys only in the first: {_keys(only_a)}")
    if only_b:
        found.append(f"{where}: keys only in the second: {_keys(only_b)}")
    if not only_a and not only_b and list(a) != list(b):
        found.append(f"{where}: same keys in a different order")
    for key in a:
        if key in b:
            _diff(a[key], b[key], (*path, key), found)
    if type(a) is OrderedDict and type(b) is OrderedDict:
        has_a, has_b = hasattr(a, "_metadata"), hasattr(b, "_metadata")
        if has_a != has_b:
            found.append(f"{where}: _metadata present in {'the first' if has_a else 'the second'} only")
        elif has_a:
            _diff(a._metadata, b._metadata, (*path, "_metadata"), found)  # type: ignore[attr-defined]


def _diff_tensor(a: TensorRef, b: TensorRef, where: str, found: list[str]) -> None:
    if a.dtype != b.dtype or a.shape != b.shape:
        found.append(f"{where}: tensor {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}")
        return
    position = 0
    for block_a, block_b in zip(_blocks(a.source), _blocks(b.source), strict=True):
        if block_a != block_b:
            first = next(i for i, (x, y) in enumerate(zip(block_a, block_b, strict=True)) if x != y)
            found.append(f"{where}: tensor bytes differ, first at byte {position + first}")
            return
        position += len(block_a)


def _blocks(source: ByteSource) -> Iterator[bytes]:
    """The source's bytes in blocks of exactly BLOCK bytes (the last may be shorter)."""
    pending = bytearray()
    for chunk in source.chunks(BLOCK):
        pending += chunk
        while len(pending) >= BLOCK:
            yield bytes(pending[:BLOCK])
            del pending[:BLOCK]
    if pending:
        yield bytes(pending)


def _kind(value: Any) -> str:
    if type(value) in MAPPING_TYPES:
        return "mapping"
    if type(value) is list or type(value) is tuple:
        return "sequence"
    return "other"


def _keys(keys: list[Any]) -> str:
    shown = ", ".join(repr(k) for k in keys[:5])
    return shown + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")


def _type_name(value: Any) -> str:
    if type(value) is TensorRef:
        return "tensor"
    return type(value).__name__
