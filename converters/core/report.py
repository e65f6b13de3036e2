"""Human-readable descriptions of a checkpoint, for ``sdconvert inspect`` and the demo.

Keys and values come from the file: each is shown through :func:`converters.core.errors.shown`
(control characters, escape sequences and line breaks escaped, long texts shortened), so a key
like ``"a\\n/tmp/x.pt: pt, 1 GiB"`` or ``"\\x1b[2J"`` cannot forge a line or drive the terminal.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

from .dtypes import itemsize, numel
from .errors import shown
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
    return f"{ref.dtype:<9} {shape}{cast}"


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
    return repr(value)


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
