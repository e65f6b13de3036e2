"""One exception family for everything the converter refuses.

Every error subclasses :class:`ConverterError`, which subclasses :class:`ValueError`, so callers can
catch broadly. Messages name the file, the place inside it (a tree path or a byte offset), what was
expected and what was found, on one line: the CLI prints ``str(error)`` as its only output.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from pathlib import Path

PathLike = str | Path
TreePath = Sequence[str | int]

KEY_LIMIT = 120  # characters of one untrusted string (a key, a location, a name) in a message
FILE_LIMIT = 300  # of a file name in a message's prefix
TREE_PATH_LIMIT = 400  # of a whole tree path
MESSAGE_LIMIT = 2000  # of a whole message: the backstop when a reader quotes something huge
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
ELLIPSIS = "\u2026"


def shown(text: object, limit: int = KEY_LIMIT) -> str:
    """``text`` as it may appear in a message or a listing: safe to print on one line.

    Untrusted strings (keys, locations, names read from a file) may hold line breaks that forge
    output lines, terminal escape sequences, bidi overrides or megabytes of text. Every character
    that is not printable (``str.isprintable``: controls, format characters, line and paragraph
    separators) is shown escaped as ``repr`` would (``\\n``, ``\\x1b``, ``\\u202e``), and a text
    longer than ``limit`` keeps its start and its end around an ellipsis. The work is bounded by
    ``limit``, not by the text's length.

    >>> shown("a\\n/tmp/x.pt: pt, 1 GiB")
    'a\\\\n/tmp/x.pt: pt, 1 GiB'
    >>> shown("x" * 300, limit=10)
    'xxxxxx\u2026xxx'
    """
    if not isinstance(text, str):
        try:
            text = str(text)
        except ValueError:  # an int past Python's digit limit, read from a file
            text = f"<{type(text).__name__} too large to show>"
    if len(text) <= limit and text.isprintable():
        return text
    if len(text) <= 2 * limit:
        whole = "".join(map(_escaped, text))
        if len(whole) <= limit:
            return whole
    head_room = max(1, (limit - 1) * 2 // 3)
    tail_room = max(0, limit - 1 - head_room)
    head = "".join(_fill(map(_escaped, text[:head_room]), head_room))
    tail = _fill(map(_escaped, reversed(text[-tail_room:] if tail_room else "")), tail_room)
    return head + ELLIPSIS + "".join(reversed(tail))


def _escaped(char: str) -> str:
    if char.isprintable():
        return char
    if char in _ESCAPES:
        return _ESCAPES[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _fill(pieces: Iterable[str], room: int) -> list[str]:
    """Whole pieces (a character or its escape) while they fit in ``room`` characters."""
    taken: list[str] = []
    used = 0
    for piece in pieces:
        if used + len(piece) > room:
            break
        taken.append(piece)
        used += len(piece)
    return taken


def format_tree_path(path: TreePath) -> str:
    """Render a tree path the way messages and the CLI show it: ``optimizer_state_dict/state/0``
    (each segment escaped and shortened with :func:`shown`)."""
    if not path:
        return "<root>"
    return shown("/".join(shown(segment) for segment in path), TREE_PATH_LIMIT)


class ConverterError(ValueError):
    """Base class: the input or request cannot be converted. ``str()`` is a one-line message.

    The message, the file name and the tree path are made safe to print (:func:`shown`): one line,
    no control characters, bounded length, whatever a hostile file put in its keys.
    """

    def __init__(
        self,
        message: str,
        *,
        file: PathLike | None = None,
        path: TreePath | None = None,
    ) -> None:
        self.message = message
        self.file = str(file) if file is not None else None
        self.path = tuple(path) if path is not None else None
        super().__init__(self._text())

    def _text(self) -> str:
        where = []
        if self.file is not None:
            where.append(shown(self.file, FILE_LIMIT))
        if self.path is not None:
            where.append(f"at {format_tree_path(self.path)}")
        prefix = " ".join(where) + ": " if where else ""
        return prefix + shown(self.message, MESSAGE_LIMIT)

    def naming(self, file: PathLike) -> ConverterError:
        """The same error (same class, message and tree path) about ``file`` instead: a writer's
        error about its temporary file or staging folder is reported about the destination."""
        clone = copy.copy(self)
        clone.file = str(file)
        clone.args = (clone._text(),)
        return clone


class UnknownFormatError(ConverterError):
    """No registered format matches the name, suffix or leading bytes."""


class UnsupportedValueError(ConverterError):
    """The tree holds something the neutral tree (or the chosen format) cannot represent."""


class CorruptFileError(ConverterError):
    """The file is truncated, inconsistent, or lies about its own layout."""


class UnsafeFileError(ConverterError):
    """The file asks for something we never do: run pickled code, read outside its folder, ..."""


class DestinationError(ConverterError):
    """The destination cannot be written as asked (exists without --force, is the source, the
    disk is full, ...). ``errno`` is the operating system's error number when one caused it."""

    errno: int | None = None


class MissingDependencyError(ConverterError):
    """An optional dependency needed for this format or operation is not installed."""
