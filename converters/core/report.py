"""Human-readable descriptions of a checkpoint, for ``sdconvert inspect`` and the demo.

Keys and values come from the file: each is shown through :func:`converters.core.errors.shown`
(control characters, escape sequences and line breaks escaped, long texts shortened), so a key
like ``"a\\n/tmp/x.pt: pt, 1 GiB"`` or ``"\\x1b[2J"`` cannot forge a line or drive the terminal.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from .errors import shown
from .tree import MAPPING_TYPES, TensorRef, walk

INDENT = "  "
INLINE_LIMIT = 100
KEY_LIMIT = 120  # characters of a key
VALUE_LIMIT = 300  # of a value shown alone on its line (`inspect --json` gives it whole)


def describe(tree: Any) -> list[str]:
    """Lines listing every tensor (key, dtype, shape) and every other value, nested like the tree.

    >>> print("\\n".join(describe({"epoch": 3, "lr": [0.1, 0.01]})))
    epoch: 3
    lr: [0.1, 0.01]
    """
    lines: list[str] = []
    if _is_mapping(tree):
        _mapping(tree, 0, lines)
    else:
        lines.append(_inline(tree) if not _has_tensor(tree) else "<root>:")
        if _has_tensor(tree):
            _children(tree, 1, lines)
    return lines


def _mapping(node: Any, depth: int, lines: list[str]) -> None:
    items = [(_key(key), value) for key, value in (node.items() if _is_mapping(node) else enumerate(node))]
    width = max((len(key) for key, value in items if isinstance(value, TensorRef)), default=0)
    for key, value in items:
        prefix = INDENT * depth + key
        if isinstance(value, TensorRef):
            lines.append(f"{prefix.ljust(len(INDENT * depth) + width)}  {tensor_text(value)}")
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


def _key(key: Any) -> str:
    return shown(key, KEY_LIMIT)


def tensor_text(ref: TensorRef) -> str:
    shape = str(list(ref.shape)) if len(ref.shape) <= 64 else shown(list(ref.shape[:64]), VALUE_LIMIT // 2) + "…"
    return f"{ref.dtype:<9} {shape}"


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
    return any(isinstance(leaf, TensorRef) for _, leaf in walk(node))


def human_bytes(count: int) -> str:
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{count} B"  # pragma: no cover - the loop always returns
