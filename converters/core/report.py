"""Human-readable descriptions of a checkpoint, for ``sdconvert inspect`` and the demo.

Keys and values come from the file: each is shown through :func:`converters.core.errors.shown`
(control characters, escape sequences and line breaks escaped, long texts shortened), so a key
like ``"a\\n/tmp/x.pt: pt, 1 GiB"`` or ``"\\x1b[2J"`` cannot forge a line or drive the terminal.
"""

from __future__ import annotations

import re
import struct
from collections import Counter
from dataclasses import dataclass
from typing import Any

from .dtypes import itemsize, numel
from .errors import shown
from .objects import NumpyScalar, ObjectRecord
from .tree import MAPPING_TYPES, TensorRef, walk

INDENT = "  "
INLINE_LIMIT = 100
KEY_LIMIT = 120  # characters of a key
VALUE_LIMIT = 300  # of a value shown alone on its line (`inspect --json` gives it whole)


def describe(tree: Any, *, patterns: bool = False) -> list[str]:
    """Lines listing every tensor (key, dtype, shape) and every other value, nested like the tree.
    With ``patterns``, tensor keys that differ only in their numbers (layer indexes) are shown once,
    the numbers as ``#``, with how many keys share the pattern.

    >>> print("\\n".join(describe({"epoch": 3, "lr": [0.1, 0.01]})))
    epoch: 3
    lr: [0.1, 0.01]
    """
    lines: list[str] = []
    if patterns:
        tree = _collapse(tree)
    if _is_mapping(tree):
        _mapping(tree, 0, lines)
    else:
        lines.append(_inline(tree) if not _has_tensor(tree) else "<root>:")
        if _has_tensor(tree):
            _children(tree, 1, lines)
    return lines


def _mapping(node: Any, depth: int, lines: list[str]) -> None:
    items = [(_key(key), value) for key, value in (node.items() if _is_mapping(node) else enumerate(node))]
    width = max((len(key) for key, value in items if isinstance(value, (TensorRef, _Pattern))), default=0)
    for key, value in items:
        prefix = INDENT * depth + key
        if isinstance(value, TensorRef):
            lines.append(f"{prefix.ljust(len(INDENT * depth) + width)}  {tensor_text(value)}")
        elif isinstance(value, _Pattern):
            lines.append(f"{prefix.ljust(len(INDENT * depth) + width)}  {value.text()}")
        elif _small(value) and not _has_tensor(value) and len(_inline(value)) <= INLINE_LIMIT:
            lines.append(f"{prefix}: {_inline(value)}")
        else:
            lines.append(f"{prefix}:")
            _children(value, depth + 1, lines)


def _children(node: Any, depth: int, lines: list[str]) -> None:
    if _is_mapping(node) or isinstance(node, (list, tuple)):
        _mapping(node, depth, lines)
    else:
        lines.append(INDENT * depth + _inline(node))


@dataclass(frozen=True)
class _Pattern:
    """Several tensors of one mapping whose keys differ only in their numbers."""

    refs: tuple[TensorRef, ...]

    def text(self) -> str:
        kinds = {(ref.dtype, ref.shape) for ref in self.refs}
        if len(kinds) == 1:
            return f"{tensor_text(self.refs[0])}  ×{len(self.refs)}"
        dtypes = sorted({ref.dtype for ref in self.refs})
        return f"{'/'.join(dtypes):<9} (shapes differ)  ×{len(self.refs)}"


_NUMBER = re.compile(r"(?<![A-Za-z])\d+(?![A-Za-z])")


def _collapse(node: Any) -> Any:
    """The tree for ``describe(patterns=True)``: in each mapping, tensors under str keys that are
    equal once their numbers become ``#`` are replaced by one ``_Pattern`` (keys ``layers.#.w``)."""
    if _is_mapping(node):
        groups: dict[Any, list[tuple[Any, Any]]] = {}
        for key, value in node.items():
            pattern = _NUMBER.sub("#", key) if isinstance(key, str) and isinstance(value, TensorRef) else None
            groups.setdefault(pattern if pattern is not None and pattern != key else ("key", key), []).append(
                (key, value)
            )
        out: dict[Any, Any] = {}
        for group_key, members in groups.items():
            if isinstance(group_key, str) and len(members) > 1:
                out[group_key] = _Pattern(tuple(value for _, value in members))
            else:
                for key, value in members:
                    out[key] = _collapse(value)
        return out
    if isinstance(node, (list, tuple)):
        return type(node)(_collapse(value) for value in node)
    return node


def dtype_totals(tensors: list[TensorRef]) -> list[str]:
    """One line per dtype: tensors, parameters (elements) and bytes, the largest first.

    >>> from converters.core.sources import BufferSource
    >>> dtype_totals([TensorRef("float32", (2, 3), BufferSource.of(bytes(24)))])
    ['float32: 1 tensor, 6 parameters, 24 B']
    """
    totals: dict[str, list[int]] = {}
    for ref in tensors:
        entry = totals.setdefault(ref.dtype, [0, 0, 0])
        entry[0] += 1
        entry[1] += numel(ref.shape)
        entry[2] += ref.nbytes
    ordered = sorted(totals.items(), key=lambda item: -item[1][2])
    return [
        f"{dtype}: {count} tensor{'s' if count != 1 else ''}, {params:,} parameters, {human_bytes(nbytes)}"
        for dtype, (count, params, nbytes) in ordered
    ]


def cast_totals(tensors: list[TensorRef]) -> list[str]:
    """One line per (source, dtype) pair of the tensors a dtype cast made (empty when none was).

    >>> from converters.core.sources import BufferSource
    >>> from converters.core.tree import CastOrigin
    >>> ref = TensorRef("bfloat16", (2,), BufferSource.of(bytes(4))).with_cast_from(CastOrigin("float32", "0" * 64))
    >>> cast_totals([ref])
    ['1 tensor float32 → bfloat16 (8 B → 4 B)']
    """
    pairs: dict[tuple[str, str], list[int]] = {}
    for ref in tensors:
        if ref.cast_from is not None:
            entry = pairs.setdefault((ref.cast_from.dtype, ref.dtype), [0, 0, 0])
            entry[0] += 1
            entry[1] += numel(ref.shape) * itemsize(ref.cast_from.dtype)
            entry[2] += ref.nbytes
    return [
        f"{count} tensor{'s' if count != 1 else ''} {source} → {dtype} ({human_bytes(before)} → {human_bytes(after)})"
        for (source, dtype), (count, before, after) in pairs.items()
    ]


def _key(key: Any) -> str:
    return shown(key, KEY_LIMIT)


def tensor_text(ref: TensorRef) -> str:
    shape = str(list(ref.shape)) if len(ref.shape) <= 64 else shown(list(ref.shape[:64]), VALUE_LIMIT // 2) + "…"
    cast = f"  (cast from {ref.cast_from.dtype})" if ref.cast_from is not None else ""
    array = "  (numpy array)" if ref.numpy else ""
    return f"{ref.dtype:<9} {shape}{array}{cast}"


def _inline(value: Any) -> str:
    """A value on one line, as ``repr`` writes it, each string and number shortened and the whole
    made safe to print."""
    return shown(_repr(value), VALUE_LIMIT)


def _repr(value: Any) -> str:
    kind = type(value)
    if kind is TensorRef:
        return tensor_text(value)
    if kind is str:
        if len(value) > 2 * VALUE_LIMIT:  # never repr megabytes to show a few hundred characters
            return shown(repr(value[:VALUE_LIMIT] + value[-VALUE_LIMIT:]), VALUE_LIMIT)
        return repr(value)
    if kind is int and value.bit_length() > 4 * VALUE_LIMIT:  # repr would be slow, or refused
        return f"<int of {value.bit_length()} bits>"
    if kind in MAPPING_TYPES:
        inner = "{" + ", ".join(f"{_repr(k)}: {_repr(v)}" for k, v in value.items()) + "}"
        return f"Counter({inner})" if kind is Counter else inner
    if kind is list:
        return "[" + ", ".join(map(_repr, value)) + "]"
    if kind is tuple:
        return "(" + ", ".join(map(_repr, value)) + (",)" if len(value) == 1 else ")")
    if kind is ObjectRecord:
        return record_text(value)
    if kind is NumpyScalar:
        return numpy_scalar_text(value)
    return repr(value)


def record_text(record: ObjectRecord, depth: int = 0) -> str:
    """A record as the call that would make it, from its recorded parts (never by running it):
    ``argparse.Namespace(lr=0.1)``, ``pathlib.PurePosixPath('/', 'a')``, ``typing.Any``."""
    if record.how == "global":
        return record.name
    if depth > 3 or any(outer is record for outer in _SHOWING):  # deep, or a parent pointer
        return f"{record.name}(…)"
    _SHOWING.append(record)
    try:
        return _record_call(record, depth)
    finally:
        _SHOWING.pop()


_SHOWING: list[ObjectRecord] = []  # the records being shown, outermost first (parent pointers end there)


def _record_call(record: ObjectRecord, depth: int) -> str:
    parts = [_repr_in(value, depth) for value in record.args]
    state = record.state
    if record.built and type(state) is dict and all(type(key) is str for key in state):
        parts += [f"{key}={_repr_in(value, depth)}" for key, value in state.items()]
    elif record.built:
        parts.append(f"state={_repr_in(state, depth)}")
    if record.items:
        parts.append(
            "items={" + ", ".join(f"{_repr_in(k, depth)}: {_repr_in(v, depth)}" for k, v in record.items) + "}"
        )
    if record.elements:
        parts.append("elements=[" + ", ".join(_repr_in(v, depth) for v in record.elements) + "]")
    text = f"{record.name}({', '.join(parts)})"
    return text if len(text) <= 2 * VALUE_LIMIT else text[: 2 * VALUE_LIMIT] + "…"


def _repr_in(value: Any, depth: int) -> str:
    return record_text(value, depth + 1) if type(value) is ObjectRecord else _repr(value)


_SCALAR_CODES = {"f8": "d", "f4": "f", "f2": "e", "i8": "q", "i4": "i", "i2": "h", "i1": "b"}
_SCALAR_CODES |= {"u8": "Q", "u4": "I", "u2": "H", "u1": "B", "b1": "?"}


def numpy_scalar_text(scalar: NumpyScalar) -> str:
    """``numpy.float64(0.75)``: the numpy type and the value its bytes hold."""
    kind = scalar.dtype[1:]
    code = _SCALAR_CODES.get(kind)
    names = {"f": "float", "i": "int", "u": "uint", "c": "complex"}
    name = "bool" if kind == "b1" else f"{names.get(kind[:1], kind[:1])}{int(kind[1:] or 0) * 8}"
    if code is None or len(scalar.data) != struct.calcsize(code):
        return f"numpy.{name}(0x{scalar.data.hex()})"
    value = struct.unpack(("<" if scalar.dtype[0] != ">" else ">") + code, scalar.data)[0]
    return f"numpy.{name}({value!r})"


def records(tree: Any) -> list[str]:
    """One line per recorded object of the tree (path: class), for ``inspect``'s own section."""
    from .errors import format_tree_path

    return [
        f"{shown(format_tree_path(path), KEY_LIMIT)}: {shown(leaf.name, KEY_LIMIT)}"
        for path, leaf in walk(tree)
        if type(leaf) is ObjectRecord
    ]


def _small(value: Any) -> bool:
    """At most ``INLINE_LIMIT`` values in all (so showing it inline costs little to find out)."""
    count, stack = 0, [value]
    while stack:
        node = stack.pop()
        count += 1
        if count > INLINE_LIMIT:
            return False
        kind = type(node)
        if kind in MAPPING_TYPES:
            stack.extend(node.values())
        elif kind is list or kind is tuple:
            stack.extend(node)
    return True


def _is_mapping(node: Any) -> bool:
    return type(node) in MAPPING_TYPES


def _has_tensor(node: Any) -> bool:
    return any(isinstance(leaf, (TensorRef, _Pattern)) for _, leaf in walk(node))


def human_bytes(count: int) -> str:
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{count} B"  # pragma: no cover - the loop always returns
