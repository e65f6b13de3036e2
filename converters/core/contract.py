"""The format contract: everything a format declares, and the context every writer receives.

A format is one object (usually one module exporting it) with the attributes of :class:`Format`.
It is the only place that knows its file layout: its suffixes, whether it is a folder, how to
recognise its bytes, its own dtype codes and its write options. The CLI builds its flags from
those declarations, and ``api``, ``atomic`` and ``cli`` name no format.

Write options are a frozen dataclass per format; each field is declared with :func:`option`
(default, help text, and how the CLI spells it). The converter builds the dataclass from keyword
arguments, so an unknown option gets one wording whatever the format (:func:`make_options`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from .budget import Budget
from .errors import ConverterError
from .parallel import Group
from .tree import Checkpoint

Progress = Callable[[int], None]


@dataclass(frozen=True)
class WriteContext:
    """What every writer honours, whatever the format.

    ``progress(n)`` is called as ``n`` more tensor bytes are written; ``fsync`` makes the output
    durable before it becomes visible; ``check`` re-hashes tensors that carry a stored digest and
    refuses to write bytes that no longer match it; ``overwrite`` says whether an existing
    destination may be replaced (writers pass it to ``atomic_output``/``atomic_folder``).
    A folder format writes its files on up to ``workers`` threads, and when ``group`` is set (the
    ranks of a ``torch.distributed`` job) only this rank's share of them (``core.parallel``).
    """

    progress: Progress | None = None
    fsync: bool = True
    check: bool = False
    overwrite: bool = True  # False: an existing destination (even one that appears while writing) is kept
    workers: int = 1
    group: Group | None = None


# How the CLI turns a flag's text into an option value, by the ``kind`` an option declares.
# "flag": a switch; "text": the string as given; "int": a number; "model" and "shape": a model
# spec ('recipe' or 'package.module:Class') and a tensor shape ('1,3,32,32'), resolved by the CLI.
OPTION_KINDS = ("flag", "text", "int", "model", "shape", "list")  # list: a repeatable flag, a tuple of texts


def option(default: Any, help: str, *, kind: str = "text", metavar: str | None = None, flag: str | None = None) -> Any:
    """Declare a write option field: ``external_data: bool = option(False, "...", kind="flag")``.

    ``flag`` overrides the CLI spelling (default: ``--`` plus the field name with dashes).
    """
    if kind not in OPTION_KINDS:
        raise ValueError(f"option kind must be one of {OPTION_KINDS}, got {kind!r}")
    return dataclasses.field(default=default, metadata={"help": help, "kind": kind, "metavar": metavar, "flag": flag})


@dataclass(frozen=True)
class NoOptions:
    """The options of a format that takes none."""


@dataclass(frozen=True)
class OptionSpec:
    """One write option as the CLI sees it."""

    name: str  # the dataclass field, the keyword argument of convert/save/write
    flag: str  # the command-line flag
    help: str
    kind: str
    metavar: str | None


def option_specs(options_type: type) -> list[OptionSpec]:
    """The declared options of a format's options dataclass, in declaration order."""
    specs = []
    for item in dataclasses.fields(options_type):
        meta = item.metadata
        if "help" not in meta:
            raise TypeError(f"{options_type.__name__}.{item.name} must be declared with converters.option(...)")
        flag = meta.get("flag") or "--" + item.name.replace("_", "-")
        specs.append(OptionSpec(item.name, flag, meta["help"], meta["kind"], meta.get("metavar")))
    return specs


def make_options(fmt: Format, values: Mapping[str, Any]) -> Any:
    """The format's options dataclass built from keyword arguments; unknown names are refused alike."""
    options_type = fmt.Options
    known = [item.name for item in dataclasses.fields(options_type)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        takes = f"its options are {', '.join(known)}" if known else "it takes no options"
        raise ConverterError(f"the {fmt.name} writer has no option {unknown[0]!r}; {takes}")
    return options_type(**values)


@runtime_checkable
class Format(Protocol):
    """What a format declares and does.

    The converter calls ``sniff`` (only when neither a name nor a suffix chose the format) or
    ``reads_folder`` (for a folder), then ``read`` on the source with the read's resource budget
    (``converters.core.budget``: charge it before creating what the input asks for); it validates
    the tree ``read`` returns, so a reader need not. Before ``write`` it checks every tensor's dtype against
    ``dtype_codes`` and builds ``options`` from the keyword arguments. ``write`` must be atomic
    (``converters.core.atomic``), must honour every field of ``context``, and copies tensor bytes
    with ``converters.core.writing.TensorWriter`` (which hashes and checks digests).

    Optional, looked up with ``getattr`` (not part of the protocol, so formats without it still
    satisfy it): ``read_selected(path, budget, wanted) -> Checkpoint``, called instead of ``read``
    when the conversion starts with a ``Select``. ``wanted(tree_path)`` (``Select.covers``) says
    whether a tensor at that path may be kept. The reader returns ``read``'s tree, except that it
    may leave out tensors that are not wanted, and so skip the files holding only those (a shard
    folder's other shards); it keeps every container and non-tensor value, and leaves out only
    values of a mapping (leaving out a list's item would renumber the items after it). The
    ``Select`` then makes of that tree what it makes of the whole one.
    ``written_last(name) -> bool`` (folder formats): the files readers open first to find the
    others (an index, DCP's ``.metadata``); a store without rename gets them after the rest.
    """

    name: str
    suffixes: tuple[str, ...]  # lower case, longest wins; empty for formats recognised only by content
    folder: bool  # written as a folder (shards, DCP) rather than one file
    description: str
    dtype_codes: Mapping[str, Any]  # torch dtype name -> this format's own code for it
    Options: type  # a frozen dataclass whose fields are declared with option(); NoOptions if none

    def sniff(self, head: bytes) -> bool: ...

    def reads_folder(self, path: Path) -> bool: ...

    def read(self, path: Path, budget: Budget) -> Checkpoint: ...

    def write(self, checkpoint: Checkpoint, path: Path, context: WriteContext, options: Any) -> None: ...


class FormatBase:
    """Defaults for the optional parts of the contract; a format may inherit from it or not."""

    folder = False
    Options: type = NoOptions

    def sniff(self, head: bytes) -> bool:
        return False

    def reads_folder(self, path: Path) -> bool:
        return False

    def replaceable(self, path: Path) -> bool:
        """For folder formats: may a file named like ``path`` inside an existing destination be replaced."""
        return False

    def written_last(self, name: str) -> bool:
        """For folder formats: is the file ``name`` one readers open first to find the others."""
        return False

    def writes_in_parallel(self, options: Any) -> bool:
        """Whether ``write`` with these options splits its files between workers and ranks
        (``WriteContext.workers``/``group``); a distributed conversion needs it."""
        return False


def writes_in_parallel(fmt: Format, options: Any) -> bool:
    """``FormatBase.writes_in_parallel`` for any format (a plugin need not inherit FormatBase)."""
    declared = getattr(fmt, "writes_in_parallel", None)
    return bool(declared(options)) if callable(declared) else False


def dtypes_of(fmt: Format) -> frozenset[str]:
    """The torch dtype names ``fmt`` can hold."""
    return frozenset(fmt.dtype_codes)
