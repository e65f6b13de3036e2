"""Bit-exact comparison of two trees: exact types, key order, float bits, tensor dtype/shape/bytes."""

from __future__ import annotations

import struct
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .dtypes import DTYPES, numel
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


@dataclass
class TensorReport:
    """Two checkpoints' tensors matched by tree path, whatever their containers and key order."""

    identical: list[str] = field(default_factory=list)
    differ: list[tuple[str, str]] = field(default_factory=list)  # (path, what differs)
    only_first: list[str] = field(default_factory=list)
    only_second: list[str] = field(default_factory=list)

    @property
    def same(self) -> bool:
        return not (self.differ or self.only_first or self.only_second)

    def summary(self) -> str:
        return (
            f"tensors: {len(self.identical)} bit-identical, {len(self.differ)} differ, "
            f"{len(self.only_first)} only in the first, {len(self.only_second)} only in the second"
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "identical": self.identical,
            "differ": [{"path": path, "difference": text} for path, text in self.differ],
            "only_in_first": self.only_first,
            "only_in_second": self.only_second,
        }


def tensor_report(a: Any, b: Any) -> TensorReport:
    """Which tensors of ``a`` and ``b`` (matched by path) are bit-identical, which differ and how
    (dtype, shape, or how many elements and the largest absolute difference), which are missing.

    >>> from converters.core.sources import BufferSource
    >>> one = TensorRef("float32", (2,), BufferSource.of(struct.pack("<2f", 1.0, 2.0)))
    >>> two = TensorRef("float32", (2,), BufferSource.of(struct.pack("<2f", 1.0, 2.5)))
    >>> tensor_report({"w": one, "x": one}, {"w": two, "y": one}).differ
    [('w', '1 of 2 elements differ, max |Δ| 0.5')]
    """
    first = {format_tree_path(path): leaf for path, leaf in walk(a) if type(leaf) is TensorRef}
    second = {format_tree_path(path): leaf for path, leaf in walk(b) if type(leaf) is TensorRef}
    report = TensorReport()
    for path, ref in first.items():
        other = second.get(path)
        if other is None:
            report.only_first.append(path)
        elif ref.dtype != other.dtype or ref.shape != other.shape:
            report.differ.append((path, f"{ref.dtype}{list(ref.shape)} vs {other.dtype}{list(other.shape)}"))
        elif _same_bytes(ref.source, other.source):
            report.identical.append(path)
        else:
            report.differ.append((path, _how_values_differ(ref, other)))
    report.only_second = [path for path in second if path not in first]
    return report


def _same_bytes(a: ByteSource, b: ByteSource) -> bool:
    return all(x == y for x, y in zip(_blocks(a), _blocks(b), strict=True))


def _how_values_differ(a: TensorRef, b: TensorRef) -> str:
    """How many elements differ and, for real numbers, by how much at most (bytes read block-wise)."""
    import numpy as np

    numeric = {"float64": "<f8", "float32": "<f4", "float16": "<f2", "int8": "i1", "int16": "<i2", "int32": "<i4",
               "int64": "<i8", "uint8": "u1", "uint16": "<u2", "uint32": "<u4", "uint64": "<u8"}  # fmt: skip
    itemsize = DTYPES[a.dtype].itemsize  # BLOCK is a multiple of every element size
    count, largest = 0, 0.0
    for left, right in zip(_blocks(a.source), _blocks(b.source), strict=True):
        x = np.frombuffer(left, dtype=f"V{itemsize}")
        y = np.frombuffer(right, dtype=f"V{itemsize}")
        count += int(np.count_nonzero(x != y))
        if a.dtype in numeric or a.dtype == "bfloat16":
            if a.dtype == "bfloat16":  # the top half of a float32: exact
                xv = (np.frombuffer(left, "<u2").astype("<u4") << 16).view("<f4").astype(np.float64)
                yv = (np.frombuffer(right, "<u2").astype("<u4") << 16).view("<f4").astype(np.float64)
            else:
                xv = np.frombuffer(left, numeric[a.dtype]).astype(np.float64)
                yv = np.frombuffer(right, numeric[a.dtype]).astype(np.float64)
            with np.errstate(invalid="ignore", over="ignore"):
                delta = np.abs(xv - yv)
            if delta.size:
                largest = max(largest, float(np.nanmax(delta)) if not np.all(np.isnan(delta)) else float("nan"))
    total = numel(a.shape)
    text = f"{count} of {total} elements differ"
    if a.dtype in numeric or a.dtype == "bfloat16":
        text += f", max |Δ| {largest:.3g}"
    return text
