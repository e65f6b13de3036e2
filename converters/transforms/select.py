"""``Select``: keep one sub-tree (``--select model_state_dict``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..core.errors import ConverterError, TreePath
from ..core.tree import Checkpoint


@dataclass(frozen=True)
class Select:
    """Keep the sub-tree at ``path`` (``optimizer_state_dict/state``); a segment matches a str key,
    or an int key or index it spells.

    >>> Select("a/0")(Checkpoint({"a": [5, 6]})).tree
    5
    """

    path: str

    @property
    def segments(self) -> tuple[str, ...]:
        return tuple(segment for segment in self.path.split("/") if segment)

    def __call__(self, checkpoint: Checkpoint) -> Checkpoint:
        node = checkpoint.tree
        walked: list[str | int] = []
        for segment in self.segments:
            node, key = _child(node, segment, walked, checkpoint.origin)
            walked.append(key)
        return Checkpoint(node, checkpoint.origin, checkpoint.format)


def _child(node: Any, segment: str, walked: TreePath | list[str | int], file: Any) -> tuple[Any, str | int]:
    if isinstance(node, dict):
        if segment in node:
            return node[segment], segment
        if _is_int(segment) and int(segment) in node:
            return node[int(segment)], int(segment)
        keys = ", ".join(repr(k) for k in list(node)[:10])
        raise ConverterError(f"no key {segment!r} (keys: {keys})", file=file, path=list(walked))
    if isinstance(node, (list, tuple)) and _is_int(segment):
        index = int(segment)
        if 0 <= index < len(node):
            return node[index], index
        raise ConverterError(f"index {index} out of range (length {len(node)})", file=file, path=list(walked))
    raise ConverterError(f"cannot select {segment!r} inside a {type(node).__name__}", file=file, path=list(walked))


def _is_int(text: str) -> bool:
    return text.lstrip("-").isdigit()
