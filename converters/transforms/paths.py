"""Tree paths as text, and globs over them (``--select``, ``--exclude``, ``--dtype-include``).

A path is its keys joined by ``/``: ``optimizer_state_dict/state/0/momentum_buffer``. A segment
names a str key, or an int key or list index by its decimal digits.

Globs, one segment at a time:

- ``*`` any run of characters inside one key (``fc*``, ``*.num_batches_tracked``; it crosses the
  ``.`` of ``layer1.0.bn1.weight``, never a ``/``), ``?`` one character;
- ``**`` as a whole segment: any number of segments, none included (``**/*.num_batches_tracked``
  is that key at any depth).

Patterns are anchored at the root: ``*.num_batches_tracked`` names top-level keys (a bare
state_dict), ``model_state_dict/*.num_batches_tracked`` or ``**/*.num_batches_tracked`` those deeper.

Escaping, so every key stays addressable: a backslash makes the next ``/``, ``*``, ``?`` or ``\\``
literal — the key ``a/b`` is ``a\\/b``, the key ``w*`` is ``w\\*``, a backslash is ``\\\\``; a
backslash before anything else is an error. :func:`format_path` writes paths this way, so every
path ``--dry-run`` prints can be pasted back into ``--select``/``--exclude``.

>>> pattern = PathPattern.parse("model_state_dict/fc*", "--select")
>>> pattern.matches(("model_state_dict", "fc1.weight")), pattern.matches(("model_state_dict", "conv1.weight"))
(True, False)
>>> format_path(("a/b", "w*", 0))
'a\\\\/b/w\\\\*/0'
>>> PathPattern.parse("a\\\\/b/w\\\\*/0", "--select").matches(("a/b", "w*", 0))
True
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .base import InvalidOptionError, Key, Path, children

ESCAPABLE = "\\/*?"


_ESCAPES = str.maketrans({char: "\\" + char for char in ESCAPABLE})


def escape_key(key: Key) -> str:
    """A key as one path segment: ``\\``, ``/``, ``*`` and ``?`` escaped with a backslash."""
    return str(key).translate(_ESCAPES)


def format_path(path: Path) -> str:
    """A tree path as text that a pattern can name exactly (``""`` for the root)."""
    return "/".join(escape_key(key) for key in path)


@dataclass(frozen=True)
class Segment:
    """One segment of a pattern: a literal key, a glob inside one key, or ``**``."""

    text: str  # the literal key (escapes resolved) or the glob as written
    regex: re.Pattern[str] | None = None  # for a glob
    globstar: bool = False

    @property
    def literal(self) -> bool:
        return self.regex is None and not self.globstar

    def matches(self, key: Key) -> bool:
        """Does this (non-``**``) segment match ``key``? A literal matches a str key equal to it, or
        an int key / list index it spells; a glob matches the key's text."""
        if self.regex is not None:
            return self.regex.fullmatch(str(key)) is not None
        return key == self.text if type(key) is str else str(key) == self.text


@dataclass(frozen=True)
class PathPattern:
    """A parsed path pattern (see the module docstring)."""

    text: str
    segments: tuple[Segment, ...]

    @classmethod
    def parse(cls, text: str, option: str) -> PathPattern:
        """Parse ``text``; an invalid escape is an :class:`InvalidOptionError` naming ``option``."""
        if not isinstance(text, str):
            raise InvalidOptionError(option, repr(text), "a path pattern must be a string")
        segments: list[Segment] = []
        for raw in _split(text, option):
            if raw == [("*", True), ("*", True)]:
                if not segments or not segments[-1].globstar:  # a/**/**/b is a/**/b
                    segments.append(Segment("**", globstar=True))
                continue
            literal = "".join(char for char, _ in raw)
            if any(wild for _, wild in raw):
                pieces: list[str] = []
                for char, wild in raw:
                    piece = (".*" if char == "*" else ".") if wild else re.escape(char)
                    if not (piece == ".*" and pieces and pieces[-1] == ".*"):  # ** inside a key is *
                        pieces.append(piece)
                segments.append(Segment(_glob_text(raw), re.compile("".join(pieces), re.DOTALL)))
            else:
                segments.append(Segment(literal))
        return cls(text, tuple(segments))

    @property
    def is_literal(self) -> bool:
        """No wildcard anywhere: the pattern names one path."""
        return all(segment.literal for segment in self.segments)

    @property
    def literal_prefix(self) -> tuple[str, ...]:
        """The leading literal segments (keys named exactly, before the first wildcard)."""
        prefix = []
        for segment in self.segments:
            if not segment.literal:
                break
            prefix.append(segment.text)
        return tuple(prefix)

    def matches(self, path: Path) -> bool:
        """Does the pattern match exactly this path?"""
        return _match(self.segments, path)

    def matches_within(self, path: Path) -> bool:
        """Does the pattern match this path or one of its ancestors (the path is inside a matched
        sub-tree)?"""
        return any(_match(self.segments, path[:length]) for length in range(len(path) + 1))

    def find(self, tree: Any, start: Path = (), skip: int = 0) -> list[Path]:
        """The paths of every node of ``tree`` the pattern matches, in tree order; ``tree`` sits at
        ``start`` and the first ``skip`` segments are taken as already matched by ``start``."""
        found: dict[Path, None] = {}
        _find(self.segments[skip:], tree, start, found)
        return list(found)


def _split(text: str, option: str) -> Iterator[list[tuple[str, bool]]]:
    """The segments of ``text``: each a list of (character, is_wildcard); empty segments (a leading,
    trailing or doubled ``/``) are skipped."""
    segment: list[tuple[str, bool]] = []
    chars = iter(text)
    for char in chars:
        if char == "\\":
            escaped = next(chars, None)
            if escaped is None or escaped not in ESCAPABLE:
                shown_escape = "\\" + (escaped or "")
                raise InvalidOptionError(
                    option,
                    text,
                    f"'{shown_escape}' is not an escape (a backslash escapes only '/', '*', '?' and itself)",
                )
            segment.append((escaped, False))
        elif char == "/":
            if segment:
                yield segment
            segment = []
        else:
            segment.append((char, char in "*?"))
    if segment:
        yield segment


def _glob_text(raw: list[tuple[str, bool]]) -> str:
    return "".join(char if wild else escape_key(char) for char, wild in raw)


def _match(segments: tuple[Segment, ...], path: Path) -> bool:
    if not segments:
        return not path
    head, rest = segments[0], segments[1:]
    if head.globstar:
        return any(_match(rest, path[skip:]) for skip in range(len(path) + 1))
    return bool(path) and head.matches(path[0]) and _match(rest, path[1:])


def _find(segments: tuple[Segment, ...], node: Any, path: Path, found: dict[Path, None]) -> None:
    if not segments:
        found[path] = None
        return
    head, rest = segments[0], segments[1:]
    if head.globstar:
        _find(rest, node, path, found)  # ** as no segment at all
        for key, child in children(node):
            _find(segments, child, (*path, key), found)  # ** swallowing one more
        return
    for key, child in children(node):
        if head.matches(key):
            _find(rest, child, (*path, key), found)


def sort_in_tree_order(tree: Any, paths: list[Path]) -> list[Path]:
    """``paths`` in the order a walk of ``tree`` meets them (an ancestor before its descendants)."""
    wanted = set(paths)
    ordered: list[Path] = []

    def walk(node: Any, path: Path) -> None:
        if path in wanted:
            ordered.append(path)
        for key, child in children(node):
            walk(child, (*path, key))

    walk(tree, ())
    return ordered
