"""One exception family for everything the converter refuses.

Every error subclasses :class:`ConverterError`, which subclasses :class:`ValueError`, so callers can
catch broadly. Messages name the file, the place inside it (a tree path or a byte offset), what was
expected and what was found, on one line: the CLI prints ``str(error)`` as its only output.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

PathLike = str | Path
TreePath = Sequence[str | int]


def format_tree_path(path: TreePath) -> str:
    """Render a tree path the way messages and the CLI show it: ``optimizer_state_dict/state/0``."""
    if not path:
        return "<root>"
    return "/".join(str(segment) for segment in path)


class ConverterError(ValueError):
    """Base class: the input or request cannot be converted. ``str()`` is a one-line message."""

    def __init__(
        self,
        message: str,
        *,
        file: PathLike | None = None,
        path: TreePath | None = None,
    ) -> None:
        self.file = str(file) if file is not None else None
        self.path = tuple(path) if path is not None else None
        where = []
        if self.file is not None:
            where.append(self.file)
        if self.path is not None:
            where.append(f"at {format_tree_path(self.path)}")
        prefix = " ".join(where) + ": " if where else ""
        super().__init__(prefix + message)


class UnknownFormatError(ConverterError):
    """No registered format matches the name, suffix or leading bytes."""


class UnsupportedValueError(ConverterError):
    """The tree holds something the neutral tree (or the chosen format) cannot represent."""


class CorruptFileError(ConverterError):
    """The file is truncated, inconsistent, or lies about its own layout."""


class UnsafeFileError(ConverterError):
    """The file asks for something we never do: run pickled code, read outside its folder, ..."""


class DestinationError(ConverterError):
    """The destination cannot be written as asked (exists without --force, is the source, ...)."""


class MissingDependencyError(ConverterError):
    """An optional dependency needed for this format or operation is not installed."""
