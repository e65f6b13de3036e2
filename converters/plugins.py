"""The format contract and the one registry that holds every format, built-in or plugged in.

A format is any object with the attributes of :class:`Format`. Built-ins register themselves when
``converters.formats`` is imported; third-party formats are found through the
``statedict_convert.formats`` entry-point group (each entry point names a ``Format`` object or a
class that builds one without arguments).

Choosing a format: explicit name, then the file's suffix, then sniffing its first bytes, else a
``UnknownFormatError`` listing what is known.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from .errors import ConverterError, UnknownFormatError
from .tree import Checkpoint

ENTRY_POINT_GROUP = "statedict_convert.formats"
SNIFF_BYTES = 64


@runtime_checkable
class Format(Protocol):
    """What a format plugin declares.

    The converter calls, in this order: ``sniff`` (only when neither a name nor a suffix chose the
    format), then ``read`` on the source, then ``write`` on the destination. ``write`` must be
    atomic (see ``converters.atomic``) and must refuse dtypes not in ``dtypes`` with an error
    naming the tensor, never change them silently.
    """

    name: str
    suffixes: tuple[str, ...]
    description: str
    dtypes: frozenset[str]

    def sniff(self, head: bytes) -> bool: ...

    def read(self, path: Path) -> Checkpoint: ...

    def write(self, checkpoint: Checkpoint, path: Path, **options: Any) -> None: ...


class FormatRegistry:
    """Formats by name and by suffix. Tests add and remove formats with ``register``/``unregister``."""

    def __init__(self) -> None:
        self._by_name: dict[str, Format] = {}
        self._entry_points_loaded = False

    def register(self, fmt: Format, *, replace: bool = False) -> Format:
        if not isinstance(fmt, Format):
            raise TypeError(f"{fmt!r} does not have the attributes of converters.registry.Format")
        if fmt.name in self._by_name and not replace:
            raise ConverterError(f"a format named {fmt.name!r} is already registered")
        self._by_name[fmt.name] = fmt
        return fmt

    def unregister(self, name: str) -> None:
        self._by_name.pop(name, None)

    def __iter__(self) -> Iterator[Format]:
        self._load_entry_points()
        return iter(list(self._by_name.values()))

    def search(self, pick: Callable[[list[Format]], Format | None]) -> Format | None:
        """``pick`` over the registered formats; installed plugins are looked for only if it finds
        none (scanning package metadata costs tens of milliseconds at every start)."""
        found = pick(list(self._by_name.values()))
        if found is None and not self._entry_points_loaded:
            self._load_entry_points()
            found = pick(list(self._by_name.values()))
        return found

    def names(self) -> list[str]:
        return [fmt.name for fmt in self]

    def get(self, name: str) -> Format:
        if name not in self._by_name:
            self._load_entry_points()
        try:
            return self._by_name[name]
        except KeyError:
            raise UnknownFormatError(f"unknown format {name!r}; known formats: {', '.join(self.names())}") from None

    def for_suffix(self, path: Path) -> Format | None:
        name = path.name.lower()

        def longest_suffix(formats: list[Format]) -> Format | None:
            matches = [f for f in formats for s in f.suffixes if name.endswith(s)]
            # The longest matching suffix wins, so ".safetensors.index.json" beats ".json".
            return max(matches, key=lambda f: max(len(s) for s in f.suffixes if name.endswith(s)), default=None)

        return self.search(longest_suffix)

    def resolve(self, path: Path, explicit: str | None = None, *, for_write: bool = False) -> Format:
        """The format for ``path``: explicit name, then suffix, then (reading only) sniffing."""
        if explicit:
            return self.get(explicit)
        by_suffix = self.for_suffix(path)
        if by_suffix is not None:
            return by_suffix
        if not for_write:
            if path.is_dir():
                # A folder is a checkpoint when a format recognises it (sharded index, DCP metadata).
                found = self.search(lambda fs: next((f for f in fs if _reads_folder(f, path)), None))
            else:
                head = _head(path)
                found = self.search(lambda fs: next((f for f in fs if f.sniff(head)), None))
            if found is not None:
                return found
        known = ", ".join(f"{f.name} ({' '.join(f.suffixes) or 'a folder'})" for f in self)
        action = "write" if for_write else "recognise"
        raise UnknownFormatError(
            f"cannot {action} the format from the name{'' if for_write else ' or contents'}; "
            f"pass a format explicitly (known: {known})",
            file=path,
        )

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        from importlib import metadata

        for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
            try:
                loaded = entry.load()
                fmt = loaded() if isinstance(loaded, type) else loaded
                if entry.name not in self._by_name:
                    self.register(fmt)
            except Exception as exc:  # a broken plugin must not break the built-in formats
                warnings.warn(
                    f"format plugin {entry.name!r} ({entry.value}) failed to load: {exc}",
                    stacklevel=2,
                )


def _reads_folder(fmt: Format, path: Path) -> bool:
    reads_folder = getattr(fmt, "reads_folder", None)  # optional: only folder formats define it
    return bool(reads_folder(path)) if reads_folder is not None else False


def _head(path: Path) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read(SNIFF_BYTES)
    except IsADirectoryError:
        return b""
    except FileNotFoundError:
        raise ConverterError("no such file", file=path) from None


registry = FormatRegistry()
