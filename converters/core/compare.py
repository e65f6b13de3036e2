"""Bit-exact comparison of two trees: exact types, key order, float bits, tensor dtype/shape/bytes."""

from __future__ import annotations

import json
import math
import struct
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .dtypes import DTYPES, numel
from .errors import ConverterError, format_tree_path
from .manifests import encode_tree
from .objects import ObjectRecord
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
        if a.numpy != b.numpy:
            found.append(
                f"{where}: {'numpy array' if a.numpy else 'tensor'} vs {'numpy array' if b.numpy else 'tensor'}"
            )
    elif type(a) is ObjectRecord:
        # Records hold plain values and records only: their manifest nodes say everything they are.
        if _record_text(a) != _record_text(b):
            found.append(
                f"{where}: {a.name} objects with different state"
                if a.name == b.name
                else f"{where}: {a.name} vs {b.name}"
            )
    elif type(a) is float:
        if struct.pack(">d", a) != struct.pack(">d", b):
            found.append(f"{where}: float {a!r} vs {b!r}")
    elif a != b:
        found.append(f"{where}: {a!r:.60} vs {b!r:.60}")


# safetensors' framework marker: every writer sets it (ours "pt"), so it says nothing about the weights
NOT_COMPARED_METADATA = frozenset({"format"})


def metadata_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The differences of two files' own metadata (``Checkpoint.carried_metadata``: LoRA
    trainers' ``ss_*`` keys, a model card's fields...), ``format`` aside."""
    a = {key: value for key, value in a.items() if key not in NOT_COMPARED_METADATA}
    b = {key: value for key, value in b.items() if key not in NOT_COMPARED_METADATA}
    found = []
    # sorted: other writers keep no order here (safetensors' own writer stores a hash map)
    only_a, only_b = sorted(key for key in a if key not in b), sorted(key for key in b if key not in a)
    if only_a:
        found.append(f"file metadata: keys only in the first: {_keys(only_a)}")
    if only_b:
        found.append(f"file metadata: keys only in the second: {_keys(only_b)}")
    for key in sorted(a):
        if key in b and (type(a[key]) is not type(b[key]) or a[key] != b[key]):
            found.append(f"file metadata {key!r}: {a[key]!r:.60} vs {b[key]!r:.60}")
    return found


def _record_text(record: ObjectRecord) -> str:
    """A record as canonical JSON text (``-0.0`` and ``0.0`` differ here, as their bits do)."""
    return json.dumps(encode_tree(record, {}), separators=(",", ":"), ensure_ascii=True)


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


def _blocks(source: ByteSource, size: int = BLOCK) -> Iterator[bytes]:
    """The source's bytes in blocks of exactly ``size`` bytes (the last may be shorter)."""
    pending = bytearray()
    for chunk in source.chunks(size):
        pending += chunk
        while len(pending) >= size:
            yield bytes(pending[:size])
            del pending[:size]
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


FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16")  # what a tolerance compares (as float64)
_LITTLE = {"float64": "<f8", "float32": "<f4", "float16": "<f2"}
TOLERANCE_ELEMENTS = 1 << 18  # elements per block of a tolerance comparison: ~2 MiB per float64 array


@dataclass
class TensorReport:
    """Two checkpoints' tensors matched by tree path, whatever their containers and key order.

    ``identical``: bit-identical (for the paths in ``cast_from``, after the caller cast the first's
    tensor to the second's dtype); ``within``: not bit-identical but every element within the
    tolerance (path, what differs, the largest absolute difference); ``differ``: anything else.
    ``atol``/``rtol`` are None when no tolerance was asked for (bit-exact comparison).
    """

    identical: list[str] = field(default_factory=list)
    within: list[tuple[str, str, float]] = field(default_factory=list)  # (path, what differs, max |Δ|)
    differ: list[tuple[str, str]] = field(default_factory=list)  # (path, what differs)
    only_first: list[str] = field(default_factory=list)
    only_second: list[str] = field(default_factory=list)
    cast_from: dict[str, str] = field(default_factory=dict)  # path -> the first's dtype before the cast
    atol: float | None = None
    rtol: float | None = None

    @property
    def tolerance(self) -> bool:
        return self.atol is not None or self.rtol is not None

    @property
    def same(self) -> bool:
        """Every tensor matched, and bit-identical or within the tolerance."""
        return not (self.differ or self.only_first or self.only_second)

    @property
    def bit_identical(self) -> bool:
        """Every tensor matched and bit-identical as stored (no tolerance, no cast needed)."""
        return self.same and not self.within and not self.cast_from

    def tolerance_text(self) -> str:
        return f"atol {self.atol or 0:g}, rtol {self.rtol or 0:g}"

    def summary(self) -> str:
        identical = f"{len(self.identical)} bit-identical"
        if self.cast_from:
            identical += f" ({len(self.cast_from)} compared after casting the first's tensor to the second's dtype)"
        within = f"{len(self.within)} within tolerance ({self.tolerance_text()}), " if self.tolerance else ""
        return (
            f"tensors: {identical}, {within}{len(self.differ)} differ, "
            f"{len(self.only_first)} only in the first, {len(self.only_second)} only in the second"
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "identical": self.identical,
            "within_tolerance": [
                {"path": path, "difference": text, "max_abs_diff": largest} for path, text, largest in self.within
            ],
            "differ": [{"path": path, "difference": text} for path, text in self.differ],
            "only_in_first": self.only_first,
            "only_in_second": self.only_second,
            "compared_after_cast": [{"path": path, "from_dtype": dtype} for path, dtype in self.cast_from.items()],
            "tolerance": {"atol": self.atol or 0.0, "rtol": self.rtol or 0.0} if self.tolerance else None,
            "counts": {
                "bit_identical": len(self.identical),
                "within_tolerance": len(self.within),
                "differ": len(self.differ),
                "only_in_first": len(self.only_first),
                "only_in_second": len(self.only_second),
                "compared_after_cast": len(self.cast_from),
            },
        }


def tensor_report(
    a: Any,
    b: Any,
    *,
    atol: float | None = None,
    rtol: float | None = None,
    cast_from: dict[str, str] | None = None,
) -> TensorReport:
    """Which tensors of ``a`` and ``b`` (matched by path) are bit-identical, which differ and how
    (dtype, shape, or how many elements and the largest absolute difference), which are missing.

    With ``atol``/``rtol`` (either given; the other counts as 0), floating-point tensors (float64,
    float32, float16, bfloat16) that are not bit-identical are compared by value, as float64:
    within tolerance when every element has ``|x - y| <= atol + rtol * |y|`` (``x`` from ``a``,
    ``y`` from ``b``: ``numpy.isclose``), NaN where the other is NaN, and an infinity where the other
    is the same infinity. Two floating dtypes are then compared by value too (both widened to
    float64, exactly); without a tolerance a dtype difference is a difference. Bytes are read in
    blocks, never a whole tensor at once.

    ``cast_from``: paths whose tensor in ``a`` the caller has cast to the dtype ``b`` holds there
    (path -> the dtype before the cast); they are labelled and counted, nothing here casts.

    >>> from converters.core.sources import BufferSource
    >>> one = TensorRef("float32", (2,), BufferSource.of(struct.pack("<2f", 1.0, 2.0)))
    >>> two = TensorRef("float32", (2,), BufferSource.of(struct.pack("<2f", 1.0, 2.5)))
    >>> tensor_report({"w": one, "x": one}, {"w": two, "y": one}).differ
    [('w', '1 of 2 elements differ, max |Δ| 0.5')]
    >>> tensor_report({"w": one}, {"w": two}, atol=0.5).within
    [('w', 'max |Δ| 0.5, 1 of 2 elements differ in value', 0.5)]
    """
    for name, value in (("atol", atol), ("rtol", rtol)):
        check_tolerance(name, value)
    first = {format_tree_path(path): leaf for path, leaf in walk(a) if type(leaf) is TensorRef}
    second = {format_tree_path(path): leaf for path, leaf in walk(b) if type(leaf) is TensorRef}
    report = TensorReport(atol=atol, rtol=rtol)
    casts = cast_from or {}
    tolerance = report.tolerance
    for path, ref in first.items():
        other = second.get(path)
        if other is None:
            report.only_first.append(path)
            continue
        label = f"after casting the first's {casts[path]} to {ref.dtype}: " if path in casts else ""
        if path in casts:
            report.cast_from[path] = casts[path]
        floats = ref.dtype in FLOAT_DTYPES and other.dtype in FLOAT_DTYPES
        if ref.shape != other.shape or (ref.dtype != other.dtype and not (tolerance and floats)):
            report.differ.append((path, f"{label}{ref.dtype}{list(ref.shape)} vs {other.dtype}{list(other.shape)}"))
        elif ref.dtype == other.dtype and _same_bytes(ref.source, other.source):
            report.identical.append(path)
        elif tolerance and floats:
            close, text, largest = _closeness(ref, other, atol or 0.0, rtol or 0.0)
            if ref.dtype != other.dtype:
                text = f"{ref.dtype} vs {other.dtype} compared as float64: {text}"
            if close:
                report.within.append((path, label + text, largest))
            else:
                report.differ.append((path, label + text))
        else:
            report.differ.append((path, label + _how_values_differ(ref, other)))
    report.only_second = [path for path in second if path not in first]
    return report


@dataclass
class Verification:
    """What ``verify`` found between two checkpoints: the tensors matched by path, every other
    difference (containers, key order, values; what the tensor report already says left out), the
    integrity problems (``deep``), and what was done to the first before comparing (one line each).
    """

    tensors: TensorReport
    other: list[str]
    integrity: list[str] = field(default_factory=list)
    tensors_only: bool = False  # the other differences are listed but do not make it "not the same"
    transformed: list[str] = field(default_factory=list)

    @property
    def same(self) -> bool:
        return self.tensors.same and not self.integrity and (self.tensors_only or not self.other)

    @property
    def bit_identical(self) -> bool:
        """The two trees compared are bit-identical in every respect (no tolerance, no cast)."""
        return self.tensors.bit_identical and not self.other and not self.integrity

    def problems(self) -> list[str]:
        """Every line that makes the two not the same (empty when ``same``)."""
        found = [f"{path}: {text}" for path, text in self.tensors.differ]
        found += [f"{path}: only in the first" for path in self.tensors.only_first]
        found += [f"{path}: only in the second" for path in self.tensors.only_second]
        found += self.integrity
        if not self.tensors_only:
            found += self.other
        return found

    def as_json(self) -> dict[str, Any]:
        return {
            "same": self.same,
            "bit_identical": self.bit_identical,
            "tensors": self.tensors.as_json(),
            "other": self.other,
            "integrity": self.integrity,
            "tensors_only": self.tensors_only,
            "first_transformed": self.transformed,
        }


def verification(
    a: Any,
    b: Any,
    *,
    atol: float | None = None,
    rtol: float | None = None,
    cast_from: dict[str, str] | None = None,
    tensors_only: bool = False,
    integrity: list[str] | None = None,
    transformed: list[str] | None = None,
    metadata: list[str] | None = None,
) -> Verification:
    """The tensors of ``a`` and ``b`` (:func:`tensor_report`), then every other difference
    (:func:`differences`) but the tensor lines the tensor report already holds, then ``metadata``
    (:func:`metadata_differences` of the two files)."""
    report = tensor_report(a, b, atol=atol, rtol=rtol, cast_from=cast_from)
    reported = {path for path, _, _ in report.within} | {path for path, _ in report.differ}
    reported |= set(report.only_first) | set(report.only_second)
    others = [line for line in differences(a, b) if not _about(line, reported)] + list(metadata or ())
    return Verification(report, others, list(integrity or ()), tensors_only, list(transformed or ()))


def _about(line: str, paths: set[str]) -> bool:
    """Whether ``line`` is a tensor line (``path: tensor ...``) of one of ``paths``."""
    at = line.find(": tensor")
    while at >= 0:
        if line[:at] in paths:
            return True
        at = line.find(": tensor", at + 1)
    return False


def check_tolerance(name: str, value: Any) -> None:
    """A tolerance is None (not asked for) or a finite number >= 0."""
    if value is None:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise ConverterError(f"--{name} {value!r}: a tolerance is a finite number >= 0")


def _same_bytes(a: ByteSource, b: ByteSource) -> bool:
    return all(x == y for x, y in zip(_blocks(a), _blocks(b), strict=True))


def _as_float64(np: Any, data: bytes, dtype: str) -> Any:
    """The elements of ``data`` (little-endian ``dtype``) as float64: exact for every floating dtype."""
    if dtype == "bfloat16":  # the top half of a float32
        return (np.frombuffer(data, "<u2").astype("<u4") << 16).view("<f4").astype(np.float64)
    return np.frombuffer(data, _LITTLE[dtype]).astype(np.float64)


def _closeness(a: TensorRef, b: TensorRef, atol: float, rtol: float) -> tuple[bool, str, float]:
    """Whether every element of ``a`` is within ``atol + rtol * |b|`` of ``b``'s (NaN only where
    the other is NaN, infinities only equal to themselves), how it differs, and the largest |Δ|
    over the elements that are not NaN on either side. Reads TOLERANCE_ELEMENTS at a time."""
    import numpy as np

    size_a, size_b = DTYPES[a.dtype].itemsize, DTYPES[b.dtype].itemsize
    outside = unequal = nan_mismatch = 0
    largest = 0.0
    blocks_a = _blocks(a.source, TOLERANCE_ELEMENTS * size_a)
    blocks_b = _blocks(b.source, TOLERANCE_ELEMENTS * size_b)
    for left, right in zip(blocks_a, blocks_b, strict=True):
        x, y = _as_float64(np, left, a.dtype), _as_float64(np, right, b.dtype)
        nan_x, nan_y = np.isnan(x), np.isnan(y)
        with np.errstate(invalid="ignore", over="ignore"):
            delta = np.abs(x - y)  # inf - inf is NaN: those are equal or counted below
            equal = (x == y) | (nan_x & nan_y)
            near = np.isfinite(x) & np.isfinite(y) & (delta <= atol + rtol * np.abs(y))
        outside += int(np.count_nonzero(~(equal | near)))
        unequal += int(np.count_nonzero(~equal))
        nan_mismatch += int(np.count_nonzero(nan_x ^ nan_y))
        compared = delta[~(equal | nan_x | nan_y)]
        if compared.size:
            largest = max(largest, float(compared.max()))
    total = numel(a.shape)
    if unequal == 0:
        if a.dtype != b.dtype:
            return True, "max |Δ| 0: equal values", 0.0
        return True, "max |Δ| 0: equal values, different bits (signed zeros or NaN payloads)", 0.0
    text = f"max |Δ| {largest:.3g}, {unequal} of {total} elements differ in value"
    if outside:
        text = f"{outside} of {total} elements outside the tolerance, max |Δ| {largest:.3g}"
        if nan_mismatch:
            text += f", {nan_mismatch} NaN where the other is not"
    return outside == 0, text, largest


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
