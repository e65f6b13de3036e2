"""The transformations a conversion asks for by option (CLI flags, library keywords), in the one
order they run: layout torch (undoing a recorded layout, so the others see PyTorch's keys), select,
exclude, drop-objects, strip-prefix, rename, ties, dtype, then a layout (flax, mlx, a rules file)."""

from __future__ import annotations

from collections.abc import Iterable

from .base import Transform
from .cast import Cast
from .keys import Rename, StripPrefix
from .layout import Layout
from .objects import DropObjects
from .select import Exclude, Select
from .ties import Ties


def _many(value: str | Iterable[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def from_options(
    *,
    select: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    strip_prefix: str | Iterable[str] | None = None,
    rename: str | Iterable[str] | None = None,
    dtype: str | None = None,
    dtype_include: str | Iterable[str] | None = None,
    dtype_exclude: str | Iterable[str] | None = None,
    ties: str | None = None,
    drop_objects: bool = False,
    layout: str | None = None,
    check: bool = False,
) -> list[Transform]:
    """The transformations for these options (each checked now, before any file is read).

    >>> [type(t).__name__ for t in from_options(select="model", strip_prefix="auto", dtype="bfloat16")]
    ['Select', 'StripPrefix', 'Cast']
    """
    steps: list[Transform] = []
    arranged = None if layout is None else Layout(layout, check=check)
    if arranged is not None and arranged.undoes:
        steps.append(arranged)
    if _many(select):
        steps.append(Select(*_many(select)))
    if _many(exclude):
        steps.append(Exclude(*_many(exclude)))
    if drop_objects:
        steps.append(DropObjects())
    if _many(strip_prefix):
        steps.append(StripPrefix.from_options(_many(strip_prefix)))
    if _many(rename):
        steps.append(Rename(_many(rename)))
    # ties before dtype: "--ties materialize" unties what a cast of one of the paths then changes
    if ties is not None and ties != "keep":
        steps.append(Ties(ties))
    elif ties == "keep":
        Ties(ties)  # checked, changes nothing
    if dtype is not None:
        steps.append(Cast(dtype, include=_many(dtype_include), exclude=_many(dtype_exclude), check=check))
    elif _many(dtype_include) or _many(dtype_exclude):
        from .base import InvalidOptionError

        option = "--dtype-include" if _many(dtype_include) else "--dtype-exclude"
        raise InvalidOptionError(option, (_many(dtype_include) or _many(dtype_exclude))[0], "goes with --dtype")
    if arranged is not None and not arranged.undoes:
        steps.append(arranged)
    return steps
