"""Human-readable descriptions of a checkpoint, for ``sdconvert inspect`` and the demo."""

from __future__ import annotations

from collections import Counter, OrderedDict
from typing import Any

from .tree import MAPPING_TYPES, TensorRef, walk

INDENT = "  "
INLINE_LIMIT = 100


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
    items = list(node.items()) if _is_mapping(node) else list(enumerate(node))
    width = max((len(str(key)) for key, value in items if isinstance(value, TensorRef)), default=0)
    for key, value in items:
        prefix = INDENT * depth + str(key)
        if isinstance(value, TensorRef):
            lines.append(f"{prefix.ljust(len(INDENT * depth) + width)}  {tensor_text(value)}")
        elif not _has_tensor(value) and len(_inline(value)) <= INLINE_LIMIT:
            lines.append(f"{prefix}: {_inline(value)}")
        else:
            lines.append(f"{prefix}:")
            _children(value, depth + 1, lines)


def _children(node: Any, depth: int, lines: list[str]) -> None:
    if _is_mapping(node) or isinstance(node, (list, tuple)):
        _mapping(node, depth, lines)
    else:
        lines.append(INDENT * depth + _inline(node))


def tensor_text(ref: TensorRef) -> str:
    return f"{ref.dtype:<9} {list(ref.shape)}"


def _inline(value: Any) -> str:
    if isinstance(value, TensorRef):
        return tensor_text(value)
    if type(value) is OrderedDict:
        return repr(dict(value))
    if type(value) is Counter:
        return f"Counter({dict(value)!r})"
    return repr(value)


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
