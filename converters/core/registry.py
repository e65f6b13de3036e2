"""The one registry that holds every format, built-in or plugged in, and chooses one for a path.

Built-in formats are registered by name and module (``converters.formats`` does it) and imported
only when a job needs them, so ``sdconvert inspect x.safetensors`` imports the safetensors format
and nothing else. Third-party formats are found through the ``statedict_convert.formats``
entry-point group (each entry point names a ``Format`` object or a class that builds one without
arguments), scanned only when no registered format fits (scanning costs tens of milliseconds).

Choosing a format: explicit name, then the file's suffix (longest wins), then the folder or the
first bytes; and whatever chose it, ``check_contents`` compares the bytes with the name.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import stat
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from .contract import Format
from .errors import ConverterError, UnknownFormatError

ENTRY_POINT_GROUP = "statedict_convert.formats"
SNIFF_BYTES = 64


class FormatRegistry:
    """Formats by name. Tests add and remove formats with ``register``/``unregister``."""

    def __init__(self) -> None:
        self._by_name: dict[str, Format] = {}
        self._lazy: dict[str, str] = {}  # name -> module exporting FORMAT, imported on first use
        self._order: list[str] = []  # registration order, built-ins first
        self._entry_points_loaded = False

    def register(self, fmt: Format, *, replace: bool = False) -> Format:
        missing = [attr for attr in ("name", "suffixes", "folder", "dtype_codes", "Options") if not hasattr(fmt, attr)]
        if missing or not isinstance(fmt, Format):
            raise TypeError(
                f"{fmt!r} does not have the attributes of converters.Format"
                + (f" (missing {', '.join(missing)})" if missing else "")
            )
        if (fmt.name in self._by_name or fmt.name in self._lazy) and not replace:
            raise ConverterError(f"a format named {fmt.name!r} is already registered")
        self._lazy.pop(fmt.name, None)
        self._by_name[fmt.name] = fmt
        if fmt.name not in self._order:
            self._order.append(fmt.name)
        return fmt

    def register_module(self, name: str, module: str) -> None:
        """A built-in format: ``module`` exports ``FORMAT`` named ``name``; imported when first needed."""
        if name not in self._by_name:
            self._lazy[name] = module
            if name not in self._order:
                self._order.append(name)

    def unregister(self, name: str) -> None:
        self._by_name.pop(name, None)
        self._lazy.pop(name, None)
        if name in self._order:
            self._order.remove(name)

    def __iter__(self) -> Iterator[Format]:
        """Every format, in registration order (built-ins first); imports them all."""
        self._load_entry_points()
        return iter(list(self._loaded()))

    def names(self) -> list[str]:
        return [fmt.name for fmt in self]

    def get(self, name: str) -> Format:
        if name in self._lazy:
            self._import(name)
        if name not in self._by_name:
            self._load_entry_points()
        try:
            return self._by_name[name]
        except KeyError:
            raise UnknownFormatError(f"unknown format {name!r}; known formats: {', '.join(self.names())}") from None

    def search(self, pick: Callable[[Format], bool]) -> Format | None:
        """The first format ``pick`` accepts, importing formats one at a time until one does;
        installed plugins are looked for only if none does."""
        for fmt in self._loaded():
            if pick(fmt):
                return fmt
        if not self._entry_points_loaded:
            self._load_entry_points()
            return next((fmt for fmt in self._loaded() if pick(fmt)), None)
        return None

    def for_suffix(self, path: Path) -> Format | None:
        name = path.name.lower()

        def longest(fmt: Format) -> int:
            return max((len(s) for s in fmt.suffixes if name.endswith(s)), default=0)

        # Built-in suffixes never end with one another (a test keeps that true), so the first
        # match is the longest among them; a plugin is asked only when no built-in matches.
        found = self.search(lambda fmt: longest(fmt) > 0)
        if found is None:
            return None
        rivals = [fmt for fmt in self._by_name.values() if longest(fmt) > longest(found)]
        return max(rivals, key=longest) if rivals else found

    def resolve(
        self, path: Path, explicit: str | None = None, *, for_write: bool = False, options: Iterable[str] = ()
    ) -> Format:
        """The format for ``path``: explicit name, then suffix, then (reading only) its contents;
        (writing) a name without a known suffix, with write ``options`` that exactly one format
        declares, is that format's (``--max-shard-size`` alone means sharded safetensors)."""
        if explicit:
            return self.get(explicit)
        by_suffix = self.for_suffix(path)
        if by_suffix is not None:
            return by_suffix
        wanted = set(options)
        if for_write and wanted:
            declaring = [fmt for fmt in self if wanted <= {f.name for f in dataclasses.fields(fmt.Options)}]
            if len(declaring) == 1:
                return declaring[0]
        if not for_write:
            found = self.by_contents(path)
            if found is not None:
                return found
        known = ", ".join(f"{f.name} ({' '.join(f.suffixes) or 'a folder'})" for f in self)
        if not for_write and path.is_dir():
            from .folders import unrecognised  # lazy: folders reads through this registry

            raise UnknownFormatError(
                f"cannot recognise the folder: {unrecognised(path)}; pass a format explicitly (known: {known})",
                file=path,
            )
        action = "write" if for_write else "recognise"
        raise UnknownFormatError(
            f"cannot {action} the format from the name{'' if for_write else ' or contents'}; "
            f"pass a format explicitly (known: {known})",
            file=path,
        )

    def by_contents(self, path: Path, *, besides: Format | None = None) -> Format | None:
        """The format whose folder layout or first bytes ``path`` has (other than ``besides``)."""
        if path.is_dir():
            # A folder is a checkpoint when a format recognises it (sharded index, DCP metadata).
            return self.search(lambda fmt: fmt is not besides and fmt.reads_folder(path))
        head = read_head(path)
        return self.search(lambda fmt: fmt is not besides and fmt.sniff(head))

    def check_contents(self, path: Path, fmt: Format) -> None:
        """A file whose name says one format but whose bytes are another's gets a helpful error."""
        if path.is_dir() or fmt.sniff(read_head(path)):
            return
        actual = self.by_contents(path, besides=fmt)
        if actual is not None:
            raise UnknownFormatError(
                f"the name says {fmt.name} but the contents are {actual.name}; "
                f"pass --from {actual.name} (format={actual.name!r}) or rename the file",
                file=path,
            )

    def _loaded(self) -> Iterator[Format]:
        for name in list(self._order):
            if name in self._lazy:
                self._import(name)
            if name in self._by_name:
                yield self._by_name[name]

    def _import(self, name: str) -> None:
        module = self._lazy.pop(name)
        fmt = importlib.import_module(module).FORMAT
        if fmt.name != name:
            raise AssertionError(f"{module}.FORMAT is named {fmt.name!r}, registered as {name!r}")
        self.register(fmt)

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        from importlib import metadata

        for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
            try:
                loaded = entry.load()
                fmt = loaded() if isinstance(loaded, type) else loaded
                if entry.name not in self._by_name and entry.name not in self._lazy:
                    self.register(fmt)
            except Exception as exc:  # a broken plugin must not break the built-in formats
                warnings.warn(
                    f"format plugin {entry.name!r} ({entry.value}) failed to load: {exc}",
                    stacklevel=2,
                )


def read_head(path: Path) -> bytes:
    """The first bytes of a regular file (opened non-blocking: a FIFO must not hang the sniffing)."""
    from .storage import RemotePath, open_read, pread

    if isinstance(path, RemotePath):  # one range request (the reader's first fetch holds it too)
        if path.is_dir():
            return b""
        with open_read(path) as handle:
            return pread(handle, SNIFF_BYTES, 0)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except IsADirectoryError:
        return b""
    except FileNotFoundError:
        raise ConverterError("no such file", file=path) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConverterError("is not a regular file", file=path)
        return os.pread(fd, SNIFF_BYTES, 0)
    finally:
        os.close(fd)


registry = FormatRegistry()
